//! Every way the router can refuse or fail a request, and the one place each becomes a gRPC status and,
//! from that status, an HTTP status with OpenAI's error body ([`HttpError`]): the HTTP door never
//! classifies an error itself, so the two doors cannot disagree.

use ferroserve_admission::{AuthError, PatchError, Rejection};
use ferroserve_core::BackendError;
use ferroserve_filter::HubError;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Trailer with the milliseconds to wait before retrying a refused request (also sent as
/// `google.rpc.RetryInfo` in the status details).
pub const RETRY_AFTER_MS: &str = "retry-after-ms";
/// Trailer naming the admission limit that refused a request, e.g. `tenant_requests` or `queue_full`.
pub const LIMIT_METADATA: &str = "ferroserve-limit";

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
    /// Admission refused the request: a rate limit, a concurrency cap, a full queue or a deadline that
    /// cannot be met.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// An operator's limit change was refused; nothing changed.
    #[error(transparent)]
    LimitChange(#[from] PatchError),
    /// A filter change or feedback was refused; nothing changed.
    #[error(transparent)]
    Filter(#[from] HubError),
    /// A config reload was refused; the running settings stay.
    #[error("configuration not reloaded, the running settings stay: {0}")]
    Reload(String),
    /// A change to state the fleet shares could not reach Redis; nothing changed anywhere.
    #[error(transparent)]
    Fleet(#[from] ferroserve_cluster::DocError),
}

/// A refused request's status. Quotas (the caller's own limits, or the server's rate limits) are
/// RESOURCE_EXHAUSTED. A full queue or a deadline this server cannot meet is UNAVAILABLE: that is a
/// condition of this replica, and UNAVAILABLE is what load balancers and gRPC retry policies retry
/// elsewhere. Both carry the limit's name and, when waiting helps, when to retry.
fn rejected(r: &Rejection, message: String) -> Status {
    let code = if r.reason.is_quota() {
        Code::ResourceExhausted
    } else {
        Code::Unavailable
    };
    let mut metadata = MetadataMap::new();
    metadata.insert(LIMIT_METADATA, MetadataValue::from_static(r.reason.label()));
    let details = match r.retry_after {
        Some(wait) => {
            let ms = wait.as_millis().max(1) as u64;
            metadata.insert(RETRY_AFTER_MS, MetadataValue::from(ms));
            ErrorDetails::with_retry_info(Some(std::time::Duration::from_millis(ms)))
        }
        None => ErrorDetails::new(),
    };
    Status::with_error_details_and_metadata(code, message, details, metadata)
}

impl From<RouterError> for Status {
    fn from(e: RouterError) -> Status {
        Status::from(&e)
    }
}

impl From<&RouterError> for Status {
    fn from(e: &RouterError) -> Status {
        let message = e.to_string();
        match e {
            RouterError::Invalid { .. } => Status::invalid_argument(message),
            RouterError::ModelNotFound { .. } => Status::not_found(message),
            RouterError::NoWorker { .. } | RouterError::Fleet(_) => Status::unavailable(message),
            RouterError::DeadlineExceeded { .. } => Status::deadline_exceeded(message),
            RouterError::Auth(AuthError::Unauthenticated(_)) => Status::unauthenticated(message),
            RouterError::Auth(AuthError::PermissionDenied(_)) => Status::permission_denied(message),
            RouterError::Rejected(r) => rejected(r, message),
            RouterError::LimitChange(PatchError::UnknownTenant(_)) | RouterError::Filter(HubError::NotFound(_)) => {
                Status::not_found(message)
            }
            RouterError::Filter(HubError::Invalid(_)) => Status::invalid_argument(message),
            RouterError::LimitChange(PatchError::Invalid(_)) | RouterError::Reload(_) => {
                Status::invalid_argument(message)
            }
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

/// An error as the OpenAI-compatible API sends it: an HTTP status, OpenAI's `{"error": {...}}` body, and
/// `Retry-After` when waiting helps. Built from the gRPC status the same error gets on the other door.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpError {
    /// The HTTP status code.
    pub status: u16,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `permission_error`,
    /// `not_found_error`, `rate_limit_error`, `server_error` or `timeout_error`.
    pub kind: &'static str,
    /// OpenAI's `code`: the admission limit's name, or a short name of the condition.
    pub code: &'static str,
    /// What is wrong and what to do.
    pub message: String,
    /// The request parameter to fix, for a 400.
    pub param: Option<String>,
    /// When a retry could succeed.
    pub retry_after: Option<std::time::Duration>,
}

impl HttpError {
    /// A request parameter the HTTP door itself refused (its JSON shape, or a value gRPC has no field for).
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> HttpError {
        let param = param.into();
        HttpError {
            status: 400,
            kind: "invalid_request_error",
            code: "invalid_value",
            message: format!("{param}: {}", message.into()),
            param: Some(param),
            retry_after: None,
        }
    }

    /// Something the HTTP door does not have: a path, or a model only it serves (embeddings).
    pub fn not_found(code: &'static str, message: impl Into<String>, param: Option<&str>) -> HttpError {
        HttpError {
            status: 404,
            kind: "not_found_error",
            code,
            message: message.into(),
            param: param.map(str::to_string),
            retry_after: None,
        }
    }

    /// A body over the size limit, refused before it is read.
    pub fn too_large(message: impl Into<String>) -> HttpError {
        HttpError {
            status: 413,
            ..HttpError::invalid("body", message)
        }
    }

    /// The HTTP status, as axum takes it.
    pub fn http_status(&self) -> axum::http::StatusCode {
        axum::http::StatusCode::from_u16(self.status).unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The HTTP form of a gRPC status: the one table from codes to HTTP statuses.
    pub fn from_status(status: &Status) -> HttpError {
        let (http, kind, fallback) = match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                (400, "invalid_request_error", "invalid_value")
            }
            Code::Unauthenticated => (401, "authentication_error", "invalid_api_key"),
            Code::PermissionDenied => (403, "permission_error", "permission_denied"),
            Code::NotFound => (404, "not_found_error", "model_not_found"),
            Code::ResourceExhausted => (429, "rate_limit_error", "rate_limit_exceeded"),
            Code::Unavailable => (503, "server_error", "unavailable"),
            Code::DeadlineExceeded => (504, "timeout_error", "deadline_exceeded"),
            // nginx's "client closed request": only ever logged, as the client is gone.
            Code::Cancelled => (499, "server_error", "cancelled"),
            _ => (500, "server_error", "internal_error"),
        };
        let metadata = status.metadata();
        let limit = metadata
            .get(LIMIT_METADATA)
            .and_then(|v| ferroserve_admission::Reason::parse(v.to_str().ok()?));
        let (http, kind, code) = match limit {
            // A reservation larger than a bucket can ever hold never succeeds: a 400, which HTTP clients
            // do not retry (gRPC's RESOURCE_EXHAUSTED carries no retry delay for it either).
            Some(r @ ferroserve_admission::Reason::TooLarge) => (400, "invalid_request_error", r.label()),
            Some(r) if http == 503 => (http, kind, r.label()),
            _ => (http, kind, fallback),
        };
        HttpError {
            status: http,
            kind,
            code,
            message: status.message().to_string(),
            param: None,
            retry_after: metadata
                .get(RETRY_AFTER_MS)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .map(std::time::Duration::from_millis),
        }
    }

    /// The HTTP form of a router error; `param` names the OpenAI parameter for a field of ours (`None`
    /// keeps our field's name).
    pub fn from_router(e: &RouterError, param: impl Fn(&str) -> Option<String>) -> HttpError {
        let mut http = HttpError::from_status(&Status::from(e));
        let field = match e {
            RouterError::Invalid { field, .. } => Some(field.as_str()),
            RouterError::Backend(BackendError::InvalidRequest { field, .. }) => Some(field.as_str()),
            RouterError::ModelNotFound { .. } => Some("model"),
            _ => None,
        };
        http.param = field.map(|f| param(f).unwrap_or_else(|| f.to_string()));
        http
    }

    /// OpenAI's error body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
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
