//! What can go wrong while planning, each naming the input to fix.

use std::path::PathBuf;

/// A planning failure.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The workload, SLO or price file is malformed.
    #[error("{path}: {message}")]
    Input {
        /// The file.
        path: PathBuf,
        /// What to fix.
        message: String,
    },
    /// A setting is out of range; names the key or flag.
    #[error("{key}: {message}")]
    Setting {
        /// The key or flag.
        key: &'static str,
        /// What to fix.
        message: String,
    },
    /// The bench results cannot calibrate a service curve.
    #[error("bench results: {0}")]
    Curve(String),
    /// No fleet within the limits meets the SLO.
    #[error("{0}")]
    Infeasible(String),
    /// Reading a bench result file or drawing a chart failed.
    #[error(transparent)]
    Bench(#[from] ferroserve_bench::BenchError),
}

impl PlanError {
    /// A setting error.
    pub fn setting(key: &'static str, message: impl Into<String>) -> Self {
        PlanError::Setting {
            key,
            message: message.into(),
        }
    }
}
