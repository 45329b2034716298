//! One module per subcommand. Each parses its settings, builds the parts and wires them; nothing more.

pub mod admin;
pub mod generate;
pub mod servers;

use std::path::PathBuf;

use anyhow::Context;
use ferroserve_model::fetch::{self, Progress};

use crate::config::Settings;

/// The GGUF to serve: `model.path` if set, else the default model, fetched into the cache if absent.
pub fn resolve_model(settings: &Settings, progress: &dyn Progress) -> anyhow::Result<PathBuf> {
    match &settings.model_path {
        Some(p) => Ok(p.clone()),
        None => {
            fetch::ensure(&fetch::DEFAULT_MODEL, &settings.cache_dir, progress).context("fetching the default model")
        }
    }
}

/// `ferroserve fetch-model`.
pub fn fetch_model(cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let cache = cache_dir.unwrap_or_else(fetch::default_cache_dir);
    let path = fetch::ensure(&fetch::DEFAULT_MODEL, &cache, &crate::progress::Bars::default())?;
    println!("{}", path.display());
    Ok(())
}
