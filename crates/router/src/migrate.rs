//! Continuing a request on another worker when its worker fails: before the first token this is simply
//! sending it again; after, the new worker continues from the prompt plus the tokens already streamed,
//! with its sampler advanced past them (`ValidRequest::continuation`), so the client sees one
//! uninterrupted stream, exactly the same for a seeded one. Only the same version may continue a request:
//! other weights would continue it differently.

use std::sync::Arc;

use ferroserve_core::{BackendError, EventStream, ValidRequest};
use ferroserve_telemetry::names;
use tonic::Status;

use crate::ModelSelector;
use crate::pool::{Lease, Pool};

/// Workers a request may move to after its own failed, in all.
const MAX_MIGRATIONS: usize = 2;

/// What a request needs to be sent again.
pub(crate) struct Handoff {
    /// The workers.
    pub pool: Arc<Pool>,
    /// The request as the first worker got it (the version's defaults applied).
    pub request: ValidRequest,
    /// Workers that failed it or refused it, not to be picked again.
    pub tried: Vec<String>,
    /// Moves so far.
    pub moves: usize,
}

/// True for a failure of the worker or its connection, after which another worker can take over; false
/// for an answer about the request itself.
pub(crate) fn is_worker_failure(e: &BackendError) -> bool {
    matches!(e, BackendError::Unavailable(_))
}

impl Handoff {
    /// Sends the request, with `generated` as its continuation, to another healthy worker of the same
    /// version than `failed`. UNAVAILABLE, saying how many tokens were sent, when none can take it.
    pub async fn continue_elsewhere(
        &mut self,
        failed: &Lease,
        cause: &BackendError,
        generated: &[u32],
    ) -> Result<(Lease, EventStream), Status> {
        self.tried.push(failed.location().to_string());
        let info = failed.backend().model().clone();
        let same_version = ModelSelector::Pinned {
            name: info.name.clone(),
            version: info.version.clone(),
        };
        let outcome = if generated.is_empty() {
            "redispatched"
        } else {
            "resumed"
        };
        tracing::warn!(
            request_id = %self.request.request_id,
            worker = failed.location(),
            error = %cause,
            tokens = generated.len(),
            "the worker failed a request in flight; continuing it on another"
        );
        while self.moves < MAX_MIGRATIONS {
            self.moves += 1;
            let Ok(lease) = self.pool.pick(&same_version, &self.tried) else {
                break;
            };
            let mut request = self.request.clone();
            request.continuation = generated.to_vec();
            match lease.backend().generate(request).await {
                Ok(events) => {
                    metrics::counter!(names::MIGRATIONS_TOTAL, names::LABEL_OUTCOME => outcome).increment(1);
                    return Ok((lease, events));
                }
                Err(e) => {
                    tracing::warn!(request_id = %self.request.request_id, worker = lease.location(), error = %e, "the next worker refused it too");
                    self.tried.push(lease.location().to_string());
                }
            }
        }
        metrics::counter!(names::MIGRATIONS_TOTAL, names::LABEL_OUTCOME => "failed").increment(1);
        Err(Status::unavailable(format!(
            "the worker serving {} failed after {} tokens were sent, and no other worker could continue the \
             request; retry it",
            info.qualified(),
            generated.len()
        )))
    }
}
