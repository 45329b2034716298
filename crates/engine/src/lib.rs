//! The generation engine: requests queue behind a bounded channel and a dedicated thread runs the model.
//! It takes validated requests and returns a stream of events; it knows nothing of gRPC.
//!
//! Flow: [`EngineHandle::submit`] tokenizes and checks the request on the caller's task, then queues it;
//! the engine thread batches continuously ([`schedule`]): each step runs one forward over the decode
//! tokens and prefill chunks of every running sequence, samples per sequence ([`sampler`]), detokenizes,
//! applies stop conditions ([`stop`]), and sends each event into the request's own channel. A closed channel means the
//! client left, and the engine stops work on that request at its next step.
#![forbid(unsafe_code)]

mod constrain;
mod handle;
mod instruments;
mod run;
pub mod sampler;
pub mod schedule;
mod seq;
pub mod stop;
mod supervise;

pub use constrain::{Compiled, ConstraintError, GbnfError, Grammars, Guide, prepare_all, to_lark};
pub use ferroserve_model::pool::PrefixCaching;
pub use handle::{EngineConfig, EngineHandle, KvReport};
pub use schedule::BatchLimits;
