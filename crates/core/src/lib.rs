//! Domain types shared along the request path. No tokio, no tonic: the router converts wire messages into
//! these at its edge, and the engine consumes and produces only these.
#![forbid(unsafe_code)]

mod backend;
mod event;
mod request;

pub use backend::{Backend, BackendError, EventStream, ModelInfo, StatsStream, WorkerStats};
pub use event::{Completion, Event, FinishReason, Timings, TokenChunk, Usage};
pub use request::{ChatMessage, GenerationDefaults, Input, Role, Sampling, ValidRequest};
