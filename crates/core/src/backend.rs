//! The one interface between the router and whatever generates tokens: an engine in the same process or a
//! worker across the network. Both implement [`Backend`], so the router cannot tell them apart.

use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::{Event, GenerationDefaults, ValidRequest};

/// Events of one generation. Dropping the stream cancels the generation at the engine's next step.
pub type EventStream = BoxStream<'static, Result<Event, BackendError>>;

/// Snapshots of a backend's counters: the current one at once, then one per change.
pub type StatsStream = BoxStream<'static, WorkerStats>;

/// Something that turns validated requests into token streams.
pub trait Backend: Send + Sync + 'static {
    /// The model this backend serves.
    fn model(&self) -> &ModelInfo;

    /// Where it runs, for logs and the admin API: a worker address, or "in-process".
    fn location(&self) -> &str;

    /// Starts a generation. Fails fast (before any token) for input the model cannot take or when the
    /// backend is full or gone; after that, failures arrive on the stream.
    fn generate(&self, request: ValidRequest) -> BoxFuture<'_, Result<EventStream, BackendError>>;

    /// Follows the backend's counters. The stream ends when the backend goes away.
    fn watch_stats(&self) -> StatsStream;

    /// Freezes the backend's recent token distribution as the drift baseline of its version; returns how
    /// many tokens the baseline holds.
    fn snapshot_drift_baseline(&self) -> BoxFuture<'_, Result<u64, BackendError>>;

    /// Starts draining: requests that have not started end with `Unavailable` (so that they go elsewhere)
    /// and new ones are refused the same way; running ones finish. Nothing for a remote backend, which
    /// drains itself when its process is told to.
    fn drain(&self) {}

    /// Asks the backend again who it is: a worker that restarted may serve another model or version. A
    /// changed identity comes back as a new backend to put in the pool in place of this one; `None` when
    /// nothing changed or the backend cannot be asked (an in-process engine never changes).
    fn reidentify(&self) -> BoxFuture<'_, Option<std::sync::Arc<dyn Backend>>> {
        Box::pin(async { None })
    }
}

/// Identity, limits and generation defaults of a served model version.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Model name, e.g. `smollm2-135m-instruct`.
    pub name: String,
    /// Version label, e.g. `q4_1`.
    pub version: String,
    /// Largest prompt plus generated tokens per request.
    pub context_length: u32,
    /// What the version does with a request that leaves sampling, stop strings or the system prompt to it.
    pub defaults: GenerationDefaults,
}

impl ModelInfo {
    /// Which version this is.
    pub fn id(&self) -> crate::VersionId {
        crate::VersionId::new(&self.name, &self.version)
    }

    /// `name@version`, the form clients use to pin a version.
    pub fn qualified(&self) -> String {
        self.id().to_string()
    }
}

/// Counters a backend publishes. All are totals since start, except `waiting` and `running`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkerStats {
    /// Requests the engine accepted.
    pub accepted: u64,
    /// Requests that ended with a completion.
    pub completed: u64,
    /// Requests stopped because the client left or its deadline passed.
    pub cancelled: u64,
    /// Requests queued for the engine now.
    pub waiting: u32,
    /// Requests being generated now.
    pub running: u32,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Shutting down: nothing new goes there; what runs finishes.
    pub draining: bool,
}

/// Why a backend could not serve a request. The router maps each kind to one gRPC status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The request is well-formed but this model cannot take it (e.g. it does not fit the context).
    #[error("invalid {field}: {message}")]
    InvalidRequest {
        /// The request field to change.
        field: String,
        /// What is wrong and what limit applies.
        message: String,
    },
    /// The backend's queue is full; another backend or a later retry may succeed.
    #[error("backend overloaded: {0}")]
    Overloaded(String),
    /// The backend is not reachable or is shutting down.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// A fault inside the backend (model error). The request is lost; the backend keeps serving.
    #[error("backend failed: {0}")]
    Internal(String),
}
