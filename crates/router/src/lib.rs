//! The public face of Ferroserve: the `ferroserve.v1` gRPC services and the OpenAI-compatible HTTP API,
//! two front doors (inference.rs, http/) onto one pipeline (pipeline.rs). A request reads top to bottom:
//!
//! ```text
//! authenticate, validate, admit, filter the input (pipeline.rs, validate.rs, ferroserve-admission,
//!   ferroserve-filter) -> choose the version (traffic.rs) and the worker (pool.rs)
//!   -> filter the output and stream it back (relay.rs, stream.rs) -> settle with admission (relay.rs)
//! ```
//!
//! Errors from every stage are one enum ([`RouterError`]) mapped to a gRPC status in one place, and from
//! that status to an HTTP status and OpenAI's error body (error.rs). Workers are anything implementing [`ferroserve_core::Backend`]: an engine in this process
//! or a remote worker, interchangeably.
#![forbid(unsafe_code)]

mod admin;
pub mod affinity;
mod catalog;
mod control;
mod deadline;
mod error;
mod http;
mod inference;
mod live;
mod migrate;
mod observe;
mod pipeline;
mod pool;
mod registry;
mod relay;
mod rollout;
mod server;
mod stream;
mod traffic;
mod validate;
mod versions;

pub use affinity::Routing;
pub use error::{HttpError, LIMIT_METADATA, RETRY_AFTER_MS, RouterError};
pub use http::HttpLimits;
pub use live::{Live, LiveSettings, Reloader};
pub use observe::{Observations, Sample, Summary};
pub use pool::{Pool, WorkerView};
pub use registry::{LoadSpec, Phase, Progress, Registry, VersionLoader};
pub use rollout::{Plan, Rollouts, breach};
pub use server::{RouterConfig, RouterParts, serve};
pub use traffic::{Change, Policy, PolicyAction, Traffic, VersionAsk};
pub use validate::{ModelSelector, check_request, generation_defaults};
