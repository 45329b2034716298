//! Domain types shared along the request path. No tokio, no tonic: the router converts wire messages into
//! these at its edge, and the engine consumes and produces only these.
#![forbid(unsafe_code)]

mod backend;
mod constraint;
mod event;
mod limits;
mod request;
mod version;

pub use backend::{Backend, BackendError, EventStream, ModelInfo, StatsStream, WorkerStats};
pub use constraint::{Constraint, ConstraintKind, GrammarSyntax, MAX_CHOICES, MAX_CONSTRAINT_BYTES};
pub use event::{Alternative, Completion, Event, FinishReason, Timings, TokenChunk, TokenDetail, Usage};
pub use limits::{
    GREEDY_BELOW_TEMPERATURE, MAX_REPETITION_PENALTY, MAX_TEMPERATURE, MAX_TOP_LOGPROBS, RequestLimits, Violation,
    check_sampling, echo,
};
pub use request::{ChatMessage, GenerationDefaults, Input, Role, Sampling, ValidRequest};
pub use version::VersionId;
