//! One module per subcommand. Each parses its settings, builds the parts and wires them; nothing more.

pub mod admin;
pub mod bench;
pub mod filter;
pub mod generate;
mod listen;
pub mod model;
pub mod models;
pub mod plan;
pub mod servers;

use std::path::PathBuf;

use anyhow::Context;
use ferroserve_model::embed;
use ferroserve_model::fetch::{self, Progress};

use crate::config::Settings;

/// A gRPC channel to `addr`, with TLS for `https://` (trusting `tls_ca`, else the system's roots).
pub(crate) async fn channel(addr: &str, tls_ca: &Option<PathBuf>) -> anyhow::Result<tonic::transport::Channel> {
    let tls = ferroserve_net::ClientTlsFiles {
        ca: tls_ca.clone(),
        ..Default::default()
    };
    ferroserve_net::endpoint(addr, &tls)
        .map_err(anyhow::Error::msg)?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}; is the server running (and is it TLS or not)?"))
}

/// The GGUF to serve: `model.path` if set, else the default model, fetched into the cache if absent.
pub fn resolve_model(settings: &Settings, progress: &dyn Progress) -> anyhow::Result<PathBuf> {
    match &settings.model_path {
        Some(p) => Ok(p.clone()),
        None => {
            fetch::ensure(&fetch::DEFAULT_MODEL, &settings.cache_dir, progress).context("fetching the default model")
        }
    }
}

/// `ferroserve fetch-model`: the default LLM and the content filter's embedding model.
pub fn fetch_model(cache_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let cache = cache_dir.unwrap_or_else(fetch::default_cache_dir);
    let bars = crate::progress::Bars::default();
    let path = fetch::ensure(&fetch::DEFAULT_MODEL, &cache, &bars)?;
    println!("{}", path.display());
    for path in fetch::ensure_all(&embed::MINILM, &cache, &bars)? {
        println!("{}", path.display());
    }
    Ok(())
}

/// Loads the sentence-embedding model (fetching it into `cache_dir` if needed) with the chosen forward
/// pass and installs it for filter configs with a `[semantic]` section. Once per process.
pub fn install_embeddings(
    cache_dir: &std::path::Path,
    progress: &dyn Progress,
    backend: embed::Backend,
) -> anyhow::Result<()> {
    if ferroserve_filter::semantic::service().is_some() {
        return Ok(());
    }
    let files = fetch::ensure_all(&embed::MINILM, cache_dir, progress).context("fetching the embedding model")?;
    let embedder =
        embed::Embedder::load_with(&files[0], &files[1], &files[2], backend).context("loading the embedding model")?;
    ferroserve_filter::semantic::install(ferroserve_filter::semantic::EmbedService::start(
        embedder,
        crate::config::test_fault("embed-panic"),
    ));
    Ok(())
}
