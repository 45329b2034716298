//! Capacity and cost planning that a team can check against its own measurements.
//!
//! - [`curve`]: a worker's service curve from `ferroserve bench` result files (a concurrency sweep);
//! - [`input`]: the workload, the SLO and the prices (`configs/plan/workload.toml`);
//! - [`size`] and [`queue`]: how many workers, with what `max_batch_seqs`, meet the SLO at a rate;
//! - [`cost`]: the whole plan: peak fleet, $/hour and $/1M tokens, spot mixes, the day, cost against SLO;
//! - [`scaling`]: the autoscaling rules of the Kubernetes manifests and the HPA algorithm;
//! - [`sim`]: a discrete-event simulation of a day through those rules, with spot interruptions;
//! - [`report`]: the printed tables and the charts.

pub mod cost;
pub mod curve;
mod error;
pub mod input;
pub mod queue;
pub mod report;
pub mod scaling;
pub mod sim;
pub mod size;

pub use cost::{Plan, plan};
pub use curve::ServiceCurve;
pub use error::PlanError;
pub use input::PlanInput;
