//! A whole run: connect, then each level of the sweep in turn, then the result document.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::Mutex;

use crate::BenchError;
use crate::load::{Sweep, run_level};
use crate::prompts::Prompts;
use crate::report::{HostInfo, RunConfig, RunResult, SCHEMA};
use crate::stats::LevelResult;
use crate::target::{Client, TargetSpec};

/// What to measure and how.
#[derive(Debug, Clone)]
pub struct Bench {
    /// Name in legends; the target URL when empty.
    pub label: String,
    /// The server.
    pub target: TargetSpec,
    /// Sent as `Bearer`; never written to the result.
    pub api_key: Option<String>,
    /// TLS for a `grpcs://` target (the CA to trust).
    pub tls: ferroserve_net::ClientTlsFiles,
    /// Generation, prompts, load and SLO.
    pub config: RunConfig,
    /// Draw progress bars on stderr.
    pub show_progress: bool,
    /// What the operator says about the server's build (recorded, not interpreted).
    pub server_build: Option<String>,
}

/// Runs every level and summarizes each. `on_level` sees each level's result as it completes (the CLI
/// prints a line per level during a sweep).
pub async fn run(
    bench: &Bench,
    prompts: Prompts,
    mut on_level: impl FnMut(&LevelResult),
) -> Result<RunResult, BenchError> {
    bench.config.load.validate()?;
    if bench.config.generation.max_tokens == 0 {
        return Err(BenchError::setting("max-tokens", "must be at least 1"));
    }
    let client = Client::connect(&bench.target, bench.api_key.as_deref(), &bench.tls).await?;
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let prompts = Mutex::new(prompts);
    let sweep = Sweep {
        client: &client,
        generation: &bench.config.generation,
        prompts: &prompts,
        settings: &bench.config.load,
        show_progress: bench.show_progress,
    };
    let mut levels = Vec::with_capacity(bench.config.load.levels.len());
    for &level in &bench.config.load.levels {
        let run = run_level(&sweep, level).await?;
        let result = LevelResult::of(&run, bench.config.slo.as_ref());
        on_level(&result);
        levels.push(result);
    }
    Ok(RunResult {
        schema: SCHEMA.to_string(),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        label: if bench.label.is_empty() {
            bench.target.url.clone()
        } else {
            bench.label.clone()
        },
        started_unix_ms,
        target: bench.target.clone(),
        config: bench.config.clone(),
        levels,
        host: HostInfo::this_machine(),
        server_build: bench.server_build.clone(),
    })
}
