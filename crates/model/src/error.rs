//! Errors from loading and running a model.

use std::path::PathBuf;

/// Why a model could not be loaded or run. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The weights file could not be opened or read.
    #[error("cannot read model file {path}: {source}; check the path, or run `ferroserve fetch-model`")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a GGUF this code understands, or lacks a required key.
    #[error("model file {path} is not usable: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is missing or wrong.
        message: String,
    },
    /// The tokenizer could not be built from the GGUF metadata.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be compiled or rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// The device string names nothing this build can use.
    #[error("{0}")]
    Device(String),
    /// Candle failed during a forward pass.
    #[error("model forward failed: {0}")]
    Forward(#[from] candle_core::Error),
    /// A step asked for more positions than a sequence's KV cache holds.
    #[error("KV cache: {0}")]
    Cache(String),
}
