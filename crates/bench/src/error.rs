//! The load tester's setup errors. Failures of individual requests are not errors: they are data
//! ([`crate::sample::ErrorKind`]).

use std::path::PathBuf;

/// Why a run, a report or a plot could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The target URL or its options cannot be used.
    #[error("target {0}")]
    Target(String),
    /// A setting is out of range or inconsistent.
    #[error("invalid setting {field}: {message}")]
    Setting {
        /// The flag or JSON field.
        field: &'static str,
        /// What to change.
        message: String,
    },
    /// A prompt file line could not be used.
    #[error("{path}:{line}: {message}")]
    PromptFile {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        message: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A result file is not a `ferroserve-bench/v1` JSON document.
    #[error("{path} is not a ferroserve bench result: {message}")]
    Result {
        /// The file.
        path: PathBuf,
        /// What failed to parse.
        message: String,
    },
    /// Drawing a chart failed.
    #[error("plot {0}")]
    Plot(String),
}

impl BenchError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BenchError::Io {
            path: path.into(),
            source,
        }
    }

    /// An invalid setting.
    pub fn setting(field: &'static str, message: impl Into<String>) -> Self {
        BenchError::Setting {
            field,
            message: message.into(),
        }
    }
}
