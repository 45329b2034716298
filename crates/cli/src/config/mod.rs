//! Configuration: a TOML file (`--config`, default `configs/ferroserve.toml`), then environment and
//! command-line overrides, validated into typed settings before any port is bound. Every error names the
//! key to fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferroserve_admission::{AdmissionLimits, KeyStore};
use ferroserve_core::GenerationDefaults;
use ferroserve_core::RequestLimits;
use ferroserve_engine::{BatchLimits, EngineConfig};
use ferroserve_model::device::DeviceSpec;
use ferroserve_model::fetch;
use ferroserve_net::{ConnectionLimits, TlsFiles, TokenHash};
use ferroserve_router::{LoadSpec, Policy};
use ferroserve_telemetry::cost::Price;
use ferroserve_worker::WorkerClientConfig;
use serde::Deserialize;

mod access;
mod cluster;
mod network;
mod router;
mod secrets;
mod versions;
pub use access::{AdmissionSection, AuthSection, KeySection, LimitFields};
pub use network::{ConnectionsSection, ServerSection, WorkerSection};
pub use router::RouterSection;
pub use versions::{SamplingSettings, TrafficSection, VersionSection};

/// The config file as written. Unknown keys are errors, so typos do not pass silently.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// `[server]`: the public listener.
    pub server: ServerSection,
    /// `[model]`: what to serve.
    pub model: ModelSection,
    /// `[engine]`: the generation engine.
    pub engine: EngineSection,
    /// `[router]`: request limits and remote workers.
    pub router: RouterSection,
    /// `[worker]`: the worker process's listener.
    pub worker: WorkerSection,
    /// `[cost]`: what busy time costs.
    pub cost: CostSection,
    /// `[auth]`: API keys and the admin credential.
    pub auth: AuthSection,
    /// `[admission]`: server-wide limits, the waiting queue.
    pub admission: AdmissionSection,
    /// `[filter]`: the content filter.
    pub filter: FilterSection,
    /// `[connections]`: connection and HTTP/2 limits of every listener.
    pub connections: ConnectionsSection,
    /// `[cluster]`: the fleet of routers that shares tenant limits through Redis.
    pub cluster: cluster::ClusterSection,
}

/// `[filter]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterSection {
    /// Directory of filter configs (`*.toml`), watched for changes.
    pub dir: PathBuf,
    /// The config (by name) that enforces at startup; empty for none.
    pub active: String,
    /// Whether filtering starts switched on.
    pub enabled: bool,
    /// A config (by name) to run in shadow from startup; empty for none.
    pub shadow: String,
    /// Recent verdicts kept for `Admin.ReportFilterFeedback`.
    pub recent_verdicts: usize,
    /// Seconds between checks of `dir` for changed files; 0 disables the watcher.
    pub watch_interval_secs: f64,
    /// The durable feedback store (JSONL): reviewers' reports, shadow disagreements and operators' filter
    /// steps. Empty for none.
    pub store: PathBuf,
    /// Whether the store keeps the prompt text of a finding (opt-in); otherwise its SHA-256 and verdict.
    pub keep_text: bool,
}

impl Default for FilterSection {
    fn default() -> Self {
        FilterSection {
            dir: PathBuf::from("configs/filters"),
            active: "default".into(),
            enabled: true,
            shadow: String::new(),
            recent_verdicts: 10_000,
            watch_interval_secs: 1.0,
            store: PathBuf::new(),
            keep_text: false,
        }
    }
}

/// Validated `[filter]` settings.
#[derive(Debug, Clone)]
pub struct FilterSettings {
    /// Directory of configs.
    pub dir: PathBuf,
    /// Enforcing config name, if any.
    pub active: Option<String>,
    /// Starts switched on.
    pub enabled: bool,
    /// Shadow config name, if any.
    pub shadow: Option<String>,
    /// Verdicts kept for feedback.
    pub recent_verdicts: usize,
    /// Watcher period, if watching.
    pub watch_interval: Option<Duration>,
    /// The feedback store's file, if any.
    pub store: Option<PathBuf>,
    /// Whether it keeps prompt text.
    pub keep_text: bool,
}

/// `[model]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Name clients use.
    pub name: String,
    /// Version label.
    pub version: String,
    /// A GGUF to serve instead of the fetched default.
    pub path: Option<PathBuf>,
    /// Where fetched models live.
    pub cache_dir: Option<PathBuf>,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// System message for conversations that bring none; empty leaves it to the model's chat template.
    pub system_prompt: String,
    /// Sampling for requests that send none [default: greedy].
    pub sampling: Option<SamplingSettings>,
    /// Stop strings added to every request's own.
    pub stop: Vec<String>,
    /// More versions of this model that `serve` loads at startup, in the background (`[[model.versions]]`).
    pub versions: Vec<VersionSection>,
    /// The traffic policy between versions at startup (`[model.traffic]`).
    pub traffic: Option<TrafficSection>,
}

/// The default system prompt. SmolLM2's own template default ("You are a helpful AI assistant named
/// SmolLM, ...") sends the Q4_1 build off-topic on simple questions (greedy answers "L'Étoile, ..." to
/// "What is the capital of France?"), while this plain one keeps it on task.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant.";

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            name: fetch::DEFAULT_MODEL_NAME.into(),
            version: fetch::DEFAULT_MODEL_VERSION.into(),
            path: None,
            cache_dir: None,
            device: "cpu".into(),
            system_prompt: DEFAULT_SYSTEM_PROMPT.into(),
            sampling: None,
            stop: Vec::new(),
            versions: Vec::new(),
            traffic: None,
        }
    }
}

/// `[engine]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// Requests that may wait for the engine.
    pub queue_capacity: usize,
    /// Tokens in the drift monitor's sliding window.
    pub drift_window_tokens: usize,
    /// Continuous batching: sequences generated together.
    pub max_batch_seqs: usize,
    /// Tokens in one step (decode tokens plus prefill chunks); bounds how long one step takes.
    pub max_batch_tokens: usize,
    /// KV-cache positions across the batch: the pool's size, in tokens (blocks of 16).
    pub kv_budget_tokens: usize,
    /// Keep finished sequences' full KV blocks, and start new sequences from their longest cached prefix.
    pub prefix_caching: bool,
    /// The largest share of the pool that cached blocks no sequence holds may keep, 0 to 1.
    pub prefix_cache_max_share: f64,
    /// Structured output: the longest one constraint may take to compile, in milliseconds.
    pub constraint_compile_ms: u64,
    /// Structured output: compiled constraints kept for reuse.
    pub constraint_cache_entries: usize,
}

impl Default for EngineSection {
    fn default() -> Self {
        let e = EngineConfig::default();
        EngineSection {
            queue_capacity: e.queue_capacity,
            drift_window_tokens: e.drift_window_tokens,
            max_batch_seqs: e.batch.max_seqs,
            max_batch_tokens: e.batch.max_batch_tokens,
            kv_budget_tokens: e.batch.kv_budget_tokens,
            prefix_caching: e.prefix_caching.enabled,
            prefix_cache_max_share: e.prefix_caching.max_idle_share,
            constraint_compile_ms: e.constraint_compile_ms,
            constraint_cache_entries: e.constraint_cache_entries,
        }
    }
}

/// `[cost]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CostSection {
    /// Label for the price, e.g. `cpu-2core` or `h200`.
    pub worker_kind: String,
    /// US dollars per busy hour of one worker.
    pub usd_per_hour: f64,
}

impl Default for CostSection {
    fn default() -> Self {
        let p = EngineConfig::default().price;
        CostSection {
            worker_kind: p.worker_kind,
            usd_per_hour: p.usd_per_hour,
        }
    }
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key}: {message}")]
pub struct ConfigError {
    /// Dotted key, e.g. `server.listen`.
    pub key: String,
    /// What is wrong and what would be right.
    pub message: String,
}

/// Test-only fault injection, for the chaos suite: `FERROSERVE_TEST_FAULT=<kind>:<marker>` (kinds
/// `engine-panic`, `embed-panic`) makes that thread panic on a text containing the marker. The marker of
/// `kind`, if the variable names it.
pub fn test_fault(kind: &str) -> Option<String> {
    let spec = std::env::var("FERROSERVE_TEST_FAULT").ok()?;
    let (k, marker) = spec.split_once(':')?;
    (k == kind && !marker.is_empty()).then(|| {
        tracing::warn!(
            kind,
            "test fault injection is on (FERROSERVE_TEST_FAULT); never in production"
        );
        marker.to_string()
    })
}

fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

/// Validated settings: everything typed, nothing left to check.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Public gRPC address.
    pub listen: SocketAddr,
    /// Worker gRPC address (worker command).
    pub worker_listen: SocketAddr,
    /// `/metrics` address of serve and router, if enabled.
    pub metrics_listen: Option<SocketAddr>,
    /// The OpenAI-compatible HTTP API's address, if enabled.
    pub http_listen: Option<SocketAddr>,
    /// The HTTP API's own limits.
    pub http: ferroserve_router::HttpLimits,
    /// `/metrics` address of a worker, if enabled.
    pub worker_metrics_listen: Option<SocketAddr>,
    /// The whole shutdown: pre-stop delay (NOT_SERVING, still accepting), then the drain timeout.
    pub drain: ferroserve_net::DrainPlan,
    /// How long a streaming client may take no message before it is given up on.
    pub client_stall: Duration,
    /// How long a worker may send no event before its request moves to another.
    pub worker_stall: Duration,
    /// Where the router saves its traffic policy, if anywhere.
    pub state_file: Option<PathBuf>,
    /// How the router chooses among a model's workers.
    pub routing: ferroserve_router::Routing,
    /// Model name.
    pub model_name: String,
    /// Model version.
    pub model_version: String,
    /// Explicit GGUF, or `None` for the fetched default.
    pub model_path: Option<PathBuf>,
    /// Cache for fetched models.
    pub cache_dir: PathBuf,
    /// Where the model runs.
    pub device: DeviceSpec,
    /// The served version's system prompt, sampling and stop strings.
    pub defaults: GenerationDefaults,
    /// More versions `serve` loads at startup, their defaults resolved.
    pub versions: Vec<LoadSpec>,
    /// The traffic policy set at startup, recorded as a change by `config`.
    pub traffic: Option<Policy>,
    /// Engine settings.
    pub engine: EngineConfig,
    /// Request shape limits (router and workers).
    pub request_limits: RequestLimits,
    /// Connection and HTTP/2 limits of every listener.
    pub connections: ConnectionLimits,
    /// TLS of the public listener and `/metrics`.
    pub tls: Option<TlsFiles>,
    /// TLS (and mTLS) of the worker listener.
    pub worker_tls: Option<TlsFiles>,
    /// The internal-plane token a worker requires, as a hash.
    pub worker_token: Option<TokenHash>,
    /// How a router reaches its workers: TLS and the token.
    pub worker_client: WorkerClientConfig,
    /// Remote workers (router command): addresses, or `dns://name:port` names.
    pub workers: Vec<String>,
    /// How `dns://` worker names are resolved.
    pub dns: crate::discovery::DnsSettings,
    /// Credentials.
    pub keys: KeyStore,
    /// Admission limits, per tenant and for the server.
    pub admission: AdmissionLimits,
    /// The content filter.
    pub filter: FilterSettings,
    /// How to read these settings again (SIGHUP, `Admin.ReloadConfig`); set by the command line.
    pub reload: Option<ReloadSource>,
    /// The fleet this router shares tenant limits with, if `cluster.redis_url` is set.
    pub cluster: Option<ferroserve_cluster::ClusterConfig>,
}

/// Produces fresh settings from the same file and flags, for a live reload.
#[derive(Clone)]
pub struct ReloadSource(pub Arc<dyn Fn() -> Result<Settings, ConfigError> + Send + Sync>);

impl std::fmt::Debug for ReloadSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReloadSource")
    }
}

impl FileConfig {
    /// Reads `path`. A missing file is an error only when `explicit` (the user named it).
    pub fn load(path: &Path, explicit: bool) -> Result<FileConfig, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => return Ok(FileConfig::default()),
            Err(e) => return Err(err("--config", format!("cannot read {}: {e}", path.display()))),
        };
        let mut file: FileConfig = toml::from_str(&text).map_err(|e| {
            let key = e.message().split('`').nth(1).unwrap_or("(file)").to_string();
            err(&key, format!("{} (in {})", e.to_string().trim(), path.display()))
        })?;
        file.read_secret_files()?;
        Ok(file)
    }

    /// Checks every value and produces typed settings.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let addr = |key: &str, v: &str| {
            v.parse::<SocketAddr>().map_err(|_| {
                err(
                    key,
                    format!("`{v}` is not a socket address; use host:port, e.g. 127.0.0.1:50051"),
                )
            })
        };
        let listen = addr("server.listen", &self.server.listen)?;
        let worker_listen = addr("worker.listen", &self.worker.listen)?;
        let optional = |key: &str, v: &str| if v.is_empty() { Ok(None) } else { addr(key, v).map(Some) };
        let metrics_listen = optional("server.metrics_listen", &self.server.metrics_listen)?;
        let http_listen = optional("server.http_listen", &self.server.http_listen)?;
        if self.server.http_max_n == 0 {
            return Err(err("server.http_max_n", "must be at least 1"));
        }
        if self.server.http_default_max_tokens == 0 {
            return Err(err("server.http_default_max_tokens", "must be at least 1"));
        }
        let http = ferroserve_router::HttpLimits {
            max_n: self.server.http_max_n,
            default_max_tokens: self.server.http_default_max_tokens,
        };
        let worker_metrics_listen = optional("worker.metrics_listen", &self.worker.metrics_listen)?;
        let price = self.cost.usd_per_hour;
        if !(price.is_finite() && price >= 0.0) {
            return Err(err(
                "cost.usd_per_hour",
                format!("must be a finite number >= 0 (got {price})"),
            ));
        }
        if self.cost.worker_kind.is_empty() {
            return Err(err("cost.worker_kind", "must be non-empty, e.g. `cpu` or `h200`"));
        }
        if self.engine.drift_window_tokens == 0 {
            return Err(err("engine.drift_window_tokens", "must be at least 1"));
        }
        let d = self.server.drain_timeout_secs;
        if !(0.0..=3600.0).contains(&d) {
            return Err(err(
                "server.drain_timeout_secs",
                format!("must be between 0 and 3600 seconds (got {d})"),
            ));
        }
        if self.model.name.is_empty() || self.model.name.contains('@') {
            return Err(err("model.name", "must be non-empty and contain no `@`"));
        }
        if self.model.version.is_empty() || self.model.version.contains('@') {
            return Err(err("model.version", "must be non-empty and contain no `@`"));
        }
        let device: DeviceSpec = self.model.device.parse().map_err(|m: String| err("model.device", m))?;
        device.check_built().map_err(|m| err("model.device", m))?;
        if let Some(p) = &self.model.path
            && !p.is_file()
        {
            return Err(err(
                "model.path",
                format!(
                    "{} is not a file; fix the path or remove it to use the default model",
                    p.display()
                ),
            ));
        }
        if self.engine.constraint_compile_ms == 0 {
            return Err(err(
                "engine.constraint_compile_ms",
                "must be at least 1 (milliseconds a constraint may take to compile)",
            ));
        }
        if self.engine.queue_capacity == 0 {
            return Err(err("engine.queue_capacity", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.engine.prefix_cache_max_share) {
            return Err(err(
                "engine.prefix_cache_max_share",
                "must be between 0 and 1 (a share of the KV budget)",
            ));
        }
        if self.engine.kv_budget_tokens < ferroserve_model::kv::BLOCK_TOKENS {
            return Err(err("engine.kv_budget_tokens", "must be at least 16 (one KV block)"));
        }
        for (key, value) in [
            ("engine.max_batch_seqs", self.engine.max_batch_seqs),
            ("engine.max_batch_tokens", self.engine.max_batch_tokens),
            ("engine.kv_budget_tokens", self.engine.kv_budget_tokens),
        ] {
            if value == 0 {
                return Err(err(key, "must be at least 1"));
            }
        }
        let limits = self.router.limits()?;
        let (model_defaults, versions, traffic) =
            versions::resolve(&self.model, &limits, !self.router.workers.is_empty())?;
        for (i, w) in self.router.workers.iter().enumerate() {
            let key = format!("router.workers[{i}]");
            match crate::discovery::WorkerTarget::parse(w) {
                Ok(crate::discovery::WorkerTarget::Static(_)) if w.parse::<tonic::transport::Uri>().is_err() => {
                    return Err(err(
                        &key,
                        format!("`{w}` is not a URL; use http://host:port, or https://host:port for TLS"),
                    ));
                }
                Ok(_) => {}
                Err(e) => return Err(err(&key, e)),
            }
        }
        let dns = self.router.dns()?;
        let r = &self.router;
        let connections = self.connections.validate()?;
        let (client_stall, worker_stall, heartbeat) = r.timeouts()?;
        let mut worker_client = network::worker_client(
            &r.worker_tls_ca,
            &r.worker_tls_cert,
            &r.worker_tls_key,
            &r.worker_token_file,
        )?;
        worker_client.keepalive = (connections.keepalive_interval, connections.keepalive_timeout);
        worker_client.heartbeat_timeout = heartbeat;
        let prestop = self.server.drain_prestop_secs;
        if !(0.0..=3600.0).contains(&prestop) {
            return Err(err(
                "server.drain_prestop_secs",
                format!("must be between 0 and 3600 seconds (got {prestop})"),
            ));
        }
        let tls = self.server.tls()?;
        let (worker_tls, worker_token) = self.worker.protection(worker_listen, self.auth.allow_unauthenticated)?;
        let f = &self.filter;
        if f.recent_verdicts == 0 {
            return Err(err("filter.recent_verdicts", "must be at least 1"));
        }
        if !(f.watch_interval_secs.is_finite() && f.watch_interval_secs >= 0.0) {
            return Err(err(
                "filter.watch_interval_secs",
                "must be a number >= 0 (0 disables the watcher)",
            ));
        }
        let filter = FilterSettings {
            dir: f.dir.clone(),
            active: Some(f.active.clone()).filter(|a| !a.is_empty()),
            enabled: f.enabled,
            shadow: Some(f.shadow.clone()).filter(|a| !a.is_empty()),
            recent_verdicts: f.recent_verdicts,
            watch_interval: (f.watch_interval_secs > 0.0).then(|| Duration::from_secs_f64(f.watch_interval_secs)),
            store: Some(f.store.clone()).filter(|p| !p.as_os_str().is_empty()),
            keep_text: f.keep_text,
        };
        // Keys are required where either door is reachable from off this machine.
        let exposed = http_listen.filter(|a| !a.ip().is_loopback()).unwrap_or(listen);
        let (keys, tenants) = self.auth.validate(exposed)?;
        // Default: as many requests in flight as the workers batch (the same [engine] section is assumed for
        // remote workers); more would only wait in the engines' queues.
        let batching = (self.router.workers.len().max(1) * self.engine.max_batch_seqs.max(1)) as u32;
        let admission = self.admission.limits(tenants, batching)?;
        let drain_timeout = Duration::from_secs_f64(d);
        let cluster = self.cluster.settings()?;
        Ok(Settings {
            listen,
            worker_listen,
            metrics_listen,
            http_listen,
            http,
            worker_metrics_listen,
            model_name: self.model.name,
            model_version: self.model.version,
            model_path: self.model.path,
            cache_dir: self.model.cache_dir.unwrap_or_else(fetch::default_cache_dir),
            device,
            defaults: model_defaults,
            versions,
            traffic,
            engine: EngineConfig {
                queue_capacity: self.engine.queue_capacity,
                drift_window_tokens: self.engine.drift_window_tokens,
                batch: BatchLimits {
                    max_seqs: self.engine.max_batch_seqs,
                    max_batch_tokens: self.engine.max_batch_tokens,
                    kv_budget_tokens: self.engine.kv_budget_tokens,
                },
                prefix_caching: ferroserve_engine::PrefixCaching {
                    enabled: self.engine.prefix_caching,
                    max_idle_share: self.engine.prefix_cache_max_share,
                },
                price: Price {
                    worker_kind: self.cost.worker_kind,
                    usd_per_hour: price,
                },
                test_fault_marker: test_fault("engine-panic"),
                constraint_compile_ms: self.engine.constraint_compile_ms,
                constraint_cache_entries: self.engine.constraint_cache_entries,
            },
            request_limits: limits,
            connections,
            tls,
            worker_tls,
            worker_token,
            worker_client,
            client_stall,
            worker_stall,
            drain: ferroserve_net::DrainPlan {
                prestop: Duration::from_secs_f64(prestop),
                timeout: drain_timeout,
            },
            routing: self.router.routing(),
            state_file: self.router.state_file,
            workers: self.router.workers,
            dns,
            keys,
            admission,
            filter,
            reload: None,
            cluster,
        })
    }
}

#[cfg(test)]
mod tests;
