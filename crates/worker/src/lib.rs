//! Both sides of the internal worker contract (`ferroserve.worker.v1`):
//! - [`serve`] exposes any [`Backend`](ferroserve_core::Backend) (an engine) as a gRPC worker;
//! - [`RemoteWorker`] is a `Backend` that forwards to such a worker over the network.
//!
//! Because both ends speak in core types, the router cannot tell an in-process engine from a remote one.
#![forbid(unsafe_code)]

mod convert;
pub mod mock;
mod remote;
mod server;
mod slot;

pub use mock::MockBackend;
pub use remote::{AddToken, RemoteWorker, WorkerClientConfig};
pub use server::{WorkerServerConfig, check_work_request, serve};
pub use slot::BackendSlot;
