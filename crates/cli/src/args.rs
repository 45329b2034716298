//! Command-line arguments. Flags override the config file; most also read a `FERROSERVE_*` variable.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::config::{ConfigError, FileConfig, ReloadSource, Settings};

/// Ferroserve: LLM inference serving over gRPC.
#[derive(Debug, Parser)]
#[command(name = "ferroserve", version, about, propagate_version = true)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Router plus one in-process worker with the default model: the one-command server.
    Serve(ServerArgs),
    /// Router only, in front of remote workers (`--worker http://host:port`, repeatable).
    Router(RouterArgs),
    /// A worker: loads the model and serves the internal contract to a router.
    Worker(WorkerArgs),
    /// Sends one request and prints tokens as they stream.
    Generate(crate::commands::generate::GenerateArgs),
    /// Downloads the default model into the cache and verifies its checksum.
    FetchModel(FetchArgs),
    /// Shows the admission limits with what is left of each budget, or changes them live when a limit
    /// flag is given (admin credential).
    Limits(crate::commands::admin::LimitsArgs),
    /// Model files: `ferroserve model derive --to q8_0` writes a re-quantized version of the default model.
    Model(crate::commands::model::ModelArgs),
    /// Live traffic between model versions: `ferroserve models list|split|disable|enable|rollback`
    /// (admin credential).
    Models(crate::commands::models::ModelsArgs),
    /// Content filters: `ferroserve filter eval --config X --data labeled.jsonl`.
    Filter(crate::commands::filter::FilterArgs),
    /// Load tester: measures Ferroserve or any OpenAI-compatible server (`bench compare`, `bench plot`
    /// read the result files).
    Bench(crate::commands::bench::BenchArgs),
    /// Capacity and cost planner: workers, routers, `max_batch_seqs`, $/hour and spot mix for a workload at
    /// an SLO, from `ferroserve bench` results; `--simulate 10,1000` replays a day under the autoscaling rules.
    Plan(crate::commands::plan::PlanArgs),
    /// Makes a running server re-read its config file and apply its keys and limits (as SIGHUP does).
    Reload(crate::commands::admin::AdminConn),
}

/// Options shared by the server commands.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Config file [default: configs/ferroserve.toml, skipped if absent].
    #[arg(long, env = "FERROSERVE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides server.listen, or worker.listen for `worker`).
    #[arg(long, env = "FERROSERVE_LISTEN")]
    pub listen: Option<String>,
    /// Serve this GGUF instead of the fetched default (overrides model.path).
    #[arg(long, env = "FERROSERVE_MODEL_PATH")]
    pub model_path: Option<PathBuf>,
    /// The version label this model is served under, e.g. `q8_0` for a derived file (overrides
    /// model.version); requests pin it as `name@version`.
    #[arg(long, env = "FERROSERVE_MODEL_VERSION")]
    pub model_version: Option<String>,
    /// Cache directory for fetched models (overrides model.cache_dir).
    #[arg(long, env = "FERROSERVE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// `cpu` or `cuda:N` (overrides model.device).
    #[arg(long, env = "FERROSERVE_DEVICE")]
    pub device: Option<String>,
    /// Seconds in-flight streams may finish after SIGINT/SIGTERM (overrides server.drain_timeout_secs).
    #[arg(long)]
    pub drain_timeout_secs: Option<f64>,
    /// Prometheus /metrics address, empty to disable (overrides server.metrics_listen, or
    /// worker.metrics_listen for `worker`).
    #[arg(long, env = "FERROSERVE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// The OpenAI-compatible HTTP API's address, empty to disable (overrides server.http_listen; `serve`
    /// and `router` only).
    #[arg(long, env = "FERROSERVE_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Allow a non-loopback address with no API keys configured (overrides auth.allow_unauthenticated), or
    /// a worker with no internal-plane authentication. `Admin` stays closed there without an admin
    /// credential.
    #[arg(long)]
    pub allow_unauthenticated: bool,
    /// PEM certificate chain for TLS (overrides server.tls_cert, or worker.tls_cert for `worker`); reloaded
    /// on SIGHUP.
    #[arg(long, env = "FERROSERVE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (overrides server.tls_key, or worker.tls_key for `worker`).
    #[arg(long, env = "FERROSERVE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// A file holding the internal-plane token the router sends to its workers (overrides
    /// router.worker_token_file).
    #[arg(long, env = "FERROSERVE_WORKER_TOKEN_FILE")]
    pub worker_token_file: Option<PathBuf>,
    /// Redis shared by a fleet of routers, e.g. redis://127.0.0.1:6379: tenant limits hold across every
    /// router that uses it (overrides cluster.redis_url; `serve` and `router` only).
    #[arg(long, env = "FERROSERVE_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Read and validate the config (with these flags, and every file it names), print what was checked,
    /// and exit without loading a model or binding a port: 0 if it would start, 1 with the reason if not.
    #[arg(long)]
    pub check_config: bool,
}

/// Options of the worker command.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Common server options.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Serve a mock engine instead of the model: placeholder tokens, no model loaded (version `mock`). For
    /// measuring the router and the network alone.
    #[arg(long)]
    pub mock: bool,
    /// With --mock: microseconds per generated token (0: as fast as the transport takes them).
    #[arg(long, default_value_t = 0, requires = "mock")]
    pub mock_token_us: u64,
}

/// Options of the router command.
#[derive(Debug, Args)]
pub struct RouterArgs {
    /// Common server options.
    #[command(flatten)]
    pub server: ServerArgs,
    /// A worker address, e.g. http://127.0.0.1:50061; repeat for more (overrides router.workers).
    #[arg(long = "worker")]
    pub workers: Vec<String>,
}

/// Options of fetch-model.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Cache directory [default: $FERROSERVE_CACHE_DIR or ~/.cache/ferroserve].
    #[arg(long, env = "FERROSERVE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// Which listener `--listen` overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The public router listener.
    Router,
    /// The worker listener.
    Worker,
}

impl ServerArgs {
    /// Reads the config file, applies flag and environment overrides, validates.
    pub fn settings(&self, role: Role, workers: &[String]) -> Result<Settings, ConfigError> {
        let default = PathBuf::from("configs/ferroserve.toml");
        let (path, explicit) = match &self.config {
            Some(p) => (p.clone(), true),
            None => (default, false),
        };
        let mut file = FileConfig::load(&path, explicit)?;
        if let Some(l) = &self.listen {
            match role {
                Role::Router => file.server.listen = l.clone(),
                Role::Worker => file.worker.listen = l.clone(),
            }
        }
        if let Some(l) = &self.metrics_listen {
            match role {
                Role::Router => file.server.metrics_listen = l.clone(),
                Role::Worker => file.worker.metrics_listen = l.clone(),
            }
        }
        if let Some(l) = &self.http_listen {
            file.server.http_listen = l.clone();
        }
        if let Some(url) = &self.redis_url {
            file.cluster.redis_url = url.clone();
        }
        if let Some(p) = &self.model_path {
            file.model.path = Some(p.clone());
        }
        if let Some(v) = &self.model_version {
            file.model.version = v.clone();
        }
        if let Some(c) = &self.cache_dir {
            file.model.cache_dir = Some(c.clone());
        }
        if let Some(d) = &self.device {
            file.model.device = d.clone();
        }
        if let Some(d) = self.drain_timeout_secs {
            file.server.drain_timeout_secs = d;
        }
        if self.allow_unauthenticated {
            file.auth.allow_unauthenticated = true;
        }
        let tls = match role {
            Role::Router => (&mut file.server.tls_cert, &mut file.server.tls_key),
            Role::Worker => (&mut file.worker.tls_cert, &mut file.worker.tls_key),
        };
        if let Some(c) = &self.tls_cert {
            *tls.0 = Some(c.clone());
        }
        if let Some(k) = &self.tls_key {
            *tls.1 = Some(k.clone());
        }
        if let Some(t) = &self.worker_token_file {
            file.router.worker_token_file = Some(t.clone());
        }
        if !workers.is_empty() {
            file.router.workers = workers.to_vec();
        }
        file.validate()
    }

    /// Like [`ServerArgs::settings`], with a way to read the same file and flags again for live reloads.
    pub fn reloadable_settings(&self, role: Role, workers: &[String]) -> Result<Settings, ConfigError> {
        let mut settings = self.settings(role, workers)?;
        let (args, workers) = (self.clone(), workers.to_vec());
        settings.reload = Some(ReloadSource(Arc::new(move || args.settings(role, &workers))));
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_subcommand_parses_consistently() {
        // clap's own checks (unique names, valid defaults) over every subcommand, not only those a test runs.
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
