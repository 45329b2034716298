//! The content filter stage's filters, and how their mistakes are measured.
//!
//! - [`normalize`]: NFKC, case folding, invisible characters removed, simple obfuscation undone.
//! - [`classifier`]: a trained head on sentence embeddings, its training and calibration.
//! - [`RulesFilter`]: per category terms (aho-corasick) and patterns (regex), with exceptions for
//!   defensive, educational and fictional framing; compiled once from a versioned config.
//! - [`FilterHub`]: the live state (active, on/off, shadow, recent verdicts), swapped atomically.
//! - [`OutputGuard`]: judges streamed text over a sliding window, holding back only a partial word.
//! - [`eval`]: precision, recall, FPR and FNR per category and overall, the confusion matrix, latency.
//!
//! This crate knows nothing of the engine or of gRPC.
#![forbid(unsafe_code)]

pub mod classifier;
mod composite;
pub mod config;
pub mod eval;
mod hub;
pub mod normalize;
mod output;
pub mod redteam;
mod rules;
pub mod semantic;
pub mod store;
mod verdict;

pub use composite::CompositeFilter;
pub use config::{ConfigError, FilterConfig};
pub use hub::{
    Feedback, FilterHub, HubError, Loaded, Recorded, Selection, ShadowStats, Stage, load_file, needs_embeddings,
};
pub use output::{OutputGuard, WINDOW_CHARS};
pub use rules::{CompileError, RulesFilter};
pub use verdict::{Action, Filter, Verdict};
