//! Every way the router can refuse or fail a request, and the one place each becomes a gRPC status.

use ferroserve_admission::AuthError;
use ferroserve_core::BackendError;
use tonic::Status;

/// Why a request failed at the router. Messages say what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The request breaks a rule; `field` names what to change.
    #[error("{field}: {message}")]
    Invalid {
        /// The field to fix, e.g. `sampling.top_p` or `messages[2].role`.
        field: String,
        /// What is wrong, with the limit that applies.
        message: String,
    },
    /// No served model matches the request's `model`.
    #[error("model `{requested}` is not served here; available: {}", available.join(", "))]
    ModelNotFound {
        /// What the client asked for.
        requested: String,
        /// What it could ask for instead.
        available: Vec<String>,
    },
    /// No healthy worker can take the request now.
    #[error("no worker is available for {model}: {reason}; retry shortly")]
    NoWorker {
        /// The model asked for.
        model: String,
        /// Why none could take it.
        reason: String,
    },
    /// The request's gRPC deadline passed before it finished.
    #[error("deadline exceeded after {elapsed_ms} ms; {completion_tokens} tokens had been generated")]
    DeadlineExceeded {
        /// Time since arrival.
        elapsed_ms: u64,
        /// Progress when it was cut off.
        completion_tokens: u32,
    },
    /// A worker refused or failed the request.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The caller's credentials were missing, unknown, or not valid for this service.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

impl From<RouterError> for Status {
    fn from(e: RouterError) -> Status {
        let message = e.to_string();
        match e {
            RouterError::Invalid { .. } => Status::invalid_argument(message),
            RouterError::ModelNotFound { .. } => Status::not_found(message),
            RouterError::NoWorker { .. } => Status::unavailable(message),
            RouterError::DeadlineExceeded { .. } => Status::deadline_exceeded(message),
            RouterError::Auth(AuthError::Unauthenticated(_)) => Status::unauthenticated(message),
            RouterError::Auth(AuthError::PermissionDenied(_)) => Status::permission_denied(message),
            RouterError::Backend(b) => match b {
                BackendError::InvalidRequest { field, message } => {
                    Status::invalid_argument(format!("{field}: {message}"))
                }
                // Load balancers retry UNAVAILABLE elsewhere, which is right for a full or missing worker.
                BackendError::Overloaded(_) | BackendError::Unavailable(_) => Status::unavailable(message),
                BackendError::Internal(_) => Status::internal(message),
            },
        }
    }
}

/// Short label for a status code, for the `status` metric label.
pub(crate) fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        ResourceExhausted => "resource_exhausted",
        Unavailable => "unavailable",
        Internal => "internal",
        Unauthenticated => "unauthenticated",
        PermissionDenied => "permission_denied",
        FailedPrecondition => "failed_precondition",
        _ => "other",
    }
}
