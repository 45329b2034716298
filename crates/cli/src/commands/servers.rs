//! `serve`, `worker` and `router`: bind first (so health checks see NOT_SERVING while the model loads),
//! then load or connect in the background.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::Context;
use ferroserve_admission::Admission;
use ferroserve_core::Backend;
use ferroserve_engine::EngineHandle;
use ferroserve_filter::FilterHub;
use ferroserve_model::batched::BatchedLlama;
use ferroserve_model::{LoadedModel, ModelSpec};
use ferroserve_net::{ALPN_H2, ALPN_HTTP1};
use ferroserve_router::{
    Live, LiveSettings, LoadSpec, Pool, Progress as LoadProgress, Reloader, RouterConfig, RouterParts, VersionLoader,
};
use ferroserve_worker::{BackendSlot, WorkerServerConfig};
use futures::future::BoxFuture;
use tokio::net::TcpListener;

use super::listen::{Hangup, bind, load_tls, metrics};
use crate::config::Settings;
use crate::discovery::{WorkerTarget, follow_dns, join_worker};
use crate::running::{Running, Stop};

/// Things already loaded in this process, by canonical file path, held weakly: versions loaded from the
/// same file (differing only in their generation defaults) share one copy of the weights.
struct Shared<T>(Mutex<HashMap<PathBuf, Weak<T>>>);

impl<T> Default for Shared<T> {
    fn default() -> Self {
        Shared(Mutex::new(HashMap::new()))
    }
}

impl<T> Shared<T> {
    fn key(path: &std::path::Path) -> PathBuf {
        path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
    }

    /// The live copy loaded from `path`, if any.
    fn get(&self, path: &std::path::Path) -> Option<Arc<T>> {
        self.0
            .lock()
            .expect("shared lock")
            .get(&Self::key(path))
            .and_then(Weak::upgrade)
    }

    /// Remembers `value` as loaded from `path` (while something else keeps it alive).
    fn put(&self, path: &std::path::Path, value: &Arc<T>) {
        let mut map = self.0.lock().expect("shared lock");
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(Self::key(path), Arc::downgrade(value));
    }
}

/// The model weights loaded in this process.
type Weights = Shared<BatchedLlama>;

/// Loads the model on a blocking thread and starts its engine.
async fn load_engine(settings: &Settings, path: PathBuf, weights: Arc<Weights>) -> anyhow::Result<Arc<EngineHandle>> {
    load_engine_reporting(settings, path, weights, Arc::new(|_| {}), Foreground).await
}

/// Niceness of the thread that reads a version's weights while other versions serve. The kernel then gives
/// the CPU to the serving threads first: on a small machine a load slows generation less, and takes
/// longer itself.
const BACKGROUND_LOAD_NICENESS: i32 = 10;

/// Whether a load runs while the server serves other versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoadPriority {
    /// At startup, when nothing else runs yet.
    Foreground,
    /// `LoadVersion` and configured versions: on a thread of its own with a lower priority.
    Background,
}
use LoadPriority::{Background, Foreground};

/// Loads the model at `priority`, reporting progress, sharing weights already loaded from the same file,
/// and starts its engine.
async fn load_engine_reporting(
    settings: &Settings,
    path: PathBuf,
    weights: Arc<Weights>,
    progress: LoadProgress,
    priority: LoadPriority,
) -> anyhow::Result<Arc<EngineHandle>> {
    let spec = ModelSpec {
        name: settings.model_name.clone(),
        version: settings.model_version.clone(),
        path,
        device: settings.device,
        defaults: settings.defaults.clone(),
    };
    let load = move || {
        let shared = weights.get(&spec.path);
        if shared.is_some() {
            tracing::info!(path = %spec.path.display(), version = %spec.version, "sharing the weights of a version already loaded from this file");
        }
        let model = LoadedModel::load_reporting(&spec, shared, &*progress)?;
        tracing::info!(version = %spec.version, device = ?spec.device, cpu_kernels = ferroserve_model::cpu_kernels(), "model loaded");
        weights.put(&spec.path, &model.model);
        anyhow::Ok(model)
    };
    let model = match priority {
        Foreground => tokio::task::spawn_blocking(load)
            .await
            .context("model loading panicked")??,
        Background => {
            // A thread of its own: a lowered priority cannot be raised again without privileges, so it
            // must not go back to a pool. Linux threads inherit their creator's priority, so the engine
            // thread is started from here, not from the loading thread.
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name("version-load".into())
                .spawn(move || {
                    if let Err(e) = rustix::process::setpriority_process(None, BACKGROUND_LOAD_NICENESS) {
                        tracing::debug!(error = %e, "could not lower the loading thread's priority");
                    }
                    let _ = tx.send(load());
                })
                .context("spawning the loading thread")?;
            rx.await.context("model loading panicked")??
        }
    };
    Ok(Arc::new(EngineHandle::start(model, settings.engine.clone())))
}

/// Runs `server` while `load` brings the model up. A failed load ends the server with that error; a server
/// that stops first (shut down during loading) ends it cleanly.
async fn serve_while_loading(
    server: impl Future<Output = Result<(), tonic::transport::Error>>,
    load: impl Future<Output = anyhow::Result<()>>,
    what: &str,
) -> anyhow::Result<()> {
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => return r.with_context(|| format!("{what} server failed")),
        r = load => r.context("loading the model")?,
    }
    server.await.with_context(|| format!("{what} server failed"))
}

/// The public listeners' TLS: the gRPC port's and `/metrics`' (same certificate, their own ALPN).
struct PublicTls {
    grpc: Option<Arc<ferroserve_net::ServerTls>>,
    metrics: Option<Arc<ferroserve_net::ServerTls>>,
}

impl PublicTls {
    fn load(settings: &Settings) -> anyhow::Result<PublicTls> {
        Ok(PublicTls {
            grpc: load_tls(&settings.tls, &[ALPN_H2], "server.tls_cert")?,
            metrics: load_tls(&settings.tls, &[ALPN_HTTP1], "server.tls_cert")?,
        })
    }

    /// Both, by listener name, for SIGHUP.
    /// The HTTP API speaks HTTP/1.1 with the same certificate as /metrics (one reload serves both).
    fn certs(&self) -> Vec<(&'static str, Arc<ferroserve_net::ServerTls>)> {
        let grpc = self.grpc.clone().map(|t| ("grpc", t));
        let metrics = self.metrics.clone().map(|t| ("metrics", t));
        grpc.into_iter().chain(metrics).collect()
    }
}

/// The router's parts, warning when it runs without credentials. A SIGHUP (until `stopped`) re-reads the
/// config file, when the settings came from one, and applies its keys and limits live, and reloads the
/// certificates in `certs`.
async fn router_parts(
    settings: &Settings,
    pool: Arc<Pool>,
    stopped: &Stop,
    loader: Option<Arc<dyn VersionLoader>>,
    tls: &PublicTls,
    http: Option<TcpListener>,
) -> anyhow::Result<RouterParts> {
    if settings.keys.is_open() {
        tracing::warn!(
            listen = %settings.listen,
            "no API keys configured: the server is open to anyone who can reach it (see [auth] in the config)"
        );
    }
    let reload: Option<Reloader> = settings.reload.clone().map(|source| {
        Box::new(move || {
            let s = (source.0)().map_err(|e| e.to_string())?;
            Ok(LiveSettings {
                keys: s.keys,
                limits: s.admission,
            })
        }) as Reloader
    });
    let has_reload = reload.is_some();
    let admission = Admission::new(settings.admission.clone());
    let cluster = match &settings.cluster {
        Some(config) => {
            let cluster = ferroserve_cluster::Cluster::start(config.clone(), Arc::clone(&admission)).await?;
            let state = cluster.state();
            tracing::info!(mode = state.mode.label(), replicas = state.replicas, replica = %state.replica,
                "joined the fleet: tenant limits are shared through Redis");
            let leaving = Arc::clone(&cluster);
            let stop = stopped.wait();
            tokio::spawn(async move {
                stop.await;
                leaving.leave().await;
            });
            Some(cluster)
        }
        None => None,
    };
    let live = Live::in_fleet(settings.keys.clone(), admission, reload, cluster);
    Hangup {
        live: has_reload.then(|| Arc::clone(&live)),
        certs: tls.certs(),
    }
    .spawn(stopped.wait());
    let filters = filter_hub(settings)?;
    if let Some(every) = settings.filter.watch_interval
        && settings.filter.dir.is_dir()
    {
        tokio::spawn(watch_filters(
            Arc::clone(&filters),
            settings.filter.dir.clone(),
            every,
            stopped.wait(),
        ));
    }
    Ok(RouterParts {
        pool,
        live,
        filters,
        config: RouterConfig {
            limits: settings.request_limits,
            drain: settings.drain,
            state_file: settings.state_file.clone(),
            connections: settings.connections,
            tls: tls.grpc.clone(),
            client_stall: settings.client_stall,
            worker_stall: settings.worker_stall,
            http: settings.http,
            http_tls: tls.metrics.clone(),
        },
        embeddings: http.as_ref().and_then(|_| embeddings(settings)),
        http,
        preload: settings.versions.clone(),
        policies: settings
            .traffic
            .clone()
            .map(|p| (settings.model_name.clone(), p))
            .into_iter()
            .collect(),
        loader,
    })
}

/// The sentence encoder for `/v1/embeddings`: the one the filter uses, loaded (from the cache, fetching
/// it if needed) when the filter did not. Without it the HTTP API serves everything else.
fn embeddings(settings: &Settings) -> Option<Arc<ferroserve_filter::semantic::EmbedService>> {
    let loaded = super::install_embeddings(
        &settings.cache_dir,
        &ferroserve_model::fetch::Quiet,
        ferroserve_model::embed::Backend::Int8,
    );
    if let Err(e) = loaded {
        tracing::warn!(error = %format!("{e:#}"), "no embedding model: /v1/embeddings answers 404");
    }
    ferroserve_filter::semantic::service()
}

/// Binds the HTTP API's listener, if enabled.
async fn bind_http(settings: &Settings) -> anyhow::Result<(Option<TcpListener>, Option<std::net::SocketAddr>)> {
    let Some(addr) = settings.http_listen else {
        return Ok((None, None));
    };
    let listener = bind(addr, "HTTP API").await?;
    let bound = listener.local_addr()?;
    Ok((Some(listener), Some(bound)))
}

/// Loads new versions into `serve` as in-process engines, with this server's engine settings.
struct EngineLoader {
    settings: Settings,
    weights: Arc<Weights>,
}

impl VersionLoader for EngineLoader {
    fn load(&self, spec: LoadSpec, progress: LoadProgress) -> BoxFuture<'static, Result<Arc<dyn Backend>, String>> {
        let mut settings = self.settings.clone();
        settings.model_version = spec.version;
        // What the load leaves open, the server's own defaults fill.
        let (mine, server) = (spec.defaults, &mut settings.defaults);
        if mine.system_prompt.is_some() {
            server.system_prompt = mine.system_prompt;
        }
        if mine.sampling.is_some() {
            server.sampling = mine.sampling;
        }
        if !mine.stop.is_empty() {
            server.stop = mine.stop;
        }
        let weights = Arc::clone(&self.weights);
        Box::pin(async move {
            let engine = load_engine_reporting(&settings, spec.path, weights, progress, Background)
                .await
                .map_err(|e| format!("{e:#}"))?;
            Ok(engine as Arc<dyn Backend>)
        })
    }
}

/// The content filter from `[filter]`. A missing directory means no filtering (with a warning); a config
/// that does not compile stops the server from starting, naming the file and the problem.
fn filter_hub(settings: &Settings) -> anyhow::Result<Arc<FilterHub>> {
    let f = &settings.filter;
    if f.dir.is_dir() && ferroserve_filter::needs_embeddings(&f.dir) {
        super::install_embeddings(
            &settings.cache_dir,
            &ferroserve_model::fetch::Quiet,
            ferroserve_model::embed::Backend::Int8,
        )?;
    }
    let hub = if f.dir.is_dir() {
        FilterHub::from_dir(&f.dir, f.active.as_deref(), f.recent_verdicts)
            .map_err(|e| anyhow::anyhow!("[filter]: {e}"))?
    } else {
        tracing::warn!(dir = %f.dir.display(), "no filter directory: content filtering is off (see [filter] in the config)");
        FilterHub::empty(None, f.recent_verdicts)
    };
    if let Some(path) = &f.store {
        let store = ferroserve_filter::store::Store::open(path, f.keep_text)
            .map_err(|e| anyhow::anyhow!("filter.store: {e}"))?;
        hub.set_store(Arc::new(store));
    }
    if let Some(shadow) = &f.shadow {
        hub.set_shadow(Some(shadow))
            .map_err(|e| anyhow::anyhow!("filter.shadow: {e}"))?;
    }
    hub.set_enabled(f.enabled);
    Ok(hub)
}

/// Reloads the filter directory whenever a config file in it changes (checked every `every`), until
/// `stopped`. A file that does not compile is refused and logged; its previous version stays.
async fn watch_filters(hub: Arc<FilterHub>, dir: PathBuf, every: Duration, stopped: impl Future<Output = ()>) {
    let stamp = |dir: &std::path::Path| -> Vec<(PathBuf, Option<std::time::SystemTime>, u64)> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
            .map(|e| {
                let meta = e.metadata().ok();
                (
                    e.path(),
                    meta.as_ref().and_then(|m| m.modified().ok()),
                    meta.map_or(0, |m| m.len()),
                )
            })
            .collect();
        files.sort();
        files
    };
    let mut seen = stamp(&dir);
    let mut tick = tokio::time::interval(every);
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            () = &mut stopped => return,
            _ = tick.tick() => {}
        }
        let now = stamp(&dir);
        if now != seen {
            seen = now;
            let refused = hub.reload();
            tracing::info!(refused = refused.len(), "filter directory changed; reloaded");
        }
    }
}

/// Router plus one in-process engine serving `model_path`.
pub async fn start_serve(settings: Settings, model_path: PathBuf) -> anyhow::Result<Running> {
    let tls = PublicTls::load(&settings)?;
    let listener = bind(settings.listen, "router").await?;
    let addr = listener.local_addr()?;
    let (http, http_addr) = bind_http(&settings).await?;
    let (stop, stopped) = Stop::new();
    let metrics_addr = metrics(
        settings.metrics_listen,
        tls.metrics.clone(),
        settings.connections,
        &stopped,
    )
    .await?;
    let pool = Pool::with_routing(Some(settings.model_name.clone()), settings.routing);
    let slot = BackendSlot::new();
    let weights = Arc::new(Weights::default());
    let task = tokio::spawn({
        let pool = Arc::clone(&pool);
        let slot = slot.clone();
        async move {
            let load = async {
                let engine = load_engine(&settings, model_path, Arc::clone(&weights)).await?;
                slot.fill(Arc::clone(&engine) as Arc<dyn Backend>);
                pool.add(engine);
                anyhow::Ok(())
            };
            let loader = Arc::new(EngineLoader {
                settings: settings.clone(),
                weights: Arc::clone(&weights),
            });
            let parts = router_parts(&settings, Arc::clone(&pool), &stopped, Some(loader), &tls, http).await?;
            let server = ferroserve_router::serve(listener, parts, stopped.wait());
            serve_while_loading(server, load, "router").await
        }
    });
    Ok(Running::new(addr, metrics_addr, slot, stop, task).with_http(http_addr))
}

/// A worker process: the internal contract around one engine.
/// What a worker serves.
pub enum WorkerModel {
    /// The model in this GGUF file.
    File(PathBuf),
    /// A mock engine: placeholder tokens, `per_token` apart, no model.
    Mock {
        /// Time per generated token.
        per_token: Duration,
    },
}

/// A worker serving `model` to routers.
pub async fn start_worker(settings: Settings, model: WorkerModel) -> anyhow::Result<Running> {
    let tls = load_tls(&settings.worker_tls, &[ALPN_H2], "worker.tls_cert")?;
    let listener = bind(settings.worker_listen, "worker").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = Stop::new();
    // The worker's /metrics speaks TLS with the worker's certificate when the worker does, without asking
    // for a client certificate: Prometheus scrapes it, and who may reach it is the network's decision.
    let metrics_files = settings
        .worker_tls
        .clone()
        .map(|f| ferroserve_net::TlsFiles { client_ca: None, ..f });
    let metrics_tls = load_tls(&metrics_files, &[ALPN_HTTP1], "worker.tls_cert")?;
    let metrics_addr = metrics(
        settings.worker_metrics_listen,
        metrics_tls.clone(),
        settings.connections,
        &stopped,
    )
    .await?;
    let slot = BackendSlot::new();
    let (loaded, ready) = tokio::sync::oneshot::channel::<()>();
    if settings.worker_token.is_none() && tls.as_ref().is_none_or(|t| t.files().client_ca.is_none()) {
        tracing::warn!(listen = %settings.worker_listen, "the worker accepts any caller (no worker.token_sha256, no mTLS)");
    }
    Hangup {
        live: None,
        certs: tls
            .clone()
            .map(|t| ("worker", t))
            .into_iter()
            .chain(metrics_tls.map(|t| ("worker-metrics", t)))
            .collect(),
    }
    .spawn(stopped.wait());
    let config = WorkerServerConfig {
        drain: settings.drain,
        connections: settings.connections,
        tls,
        token: settings.worker_token,
        limits: settings.request_limits,
    };
    let task = tokio::spawn({
        let slot = slot.clone();
        async move {
            let load = async {
                let engine: Arc<dyn Backend> = match model {
                    WorkerModel::File(path) => load_engine(&settings, path, Arc::default()).await?,
                    WorkerModel::Mock { per_token } => {
                        tracing::warn!(
                            ?per_token,
                            "serving a MOCK engine: placeholder tokens, no model (--mock)"
                        );
                        Arc::new(ferroserve_worker::MockBackend::new(&settings.model_name, per_token))
                    }
                };
                slot.fill(engine);
                let _ = loaded.send(());
                anyhow::Ok(())
            };
            let server = ferroserve_worker::serve(
                listener,
                slot.clone(),
                async {
                    let _ = ready.await;
                },
                config,
                stopped.wait(),
            );
            serve_while_loading(server, load, "worker").await
        }
    });
    Ok(Running::new(addr, metrics_addr, slot, stop, task))
}

/// A router in front of remote workers. Each worker is connected in the background and joins the pool
/// once it answers, so workers may start before or after the router.
pub async fn start_router(settings: Settings) -> anyhow::Result<Running> {
    anyhow::ensure!(
        !settings.workers.is_empty(),
        "the router needs at least one worker: pass --worker http://host:port (or dns://name:port) or set router.workers"
    );
    let tls = PublicTls::load(&settings)?;
    let listener = bind(settings.listen, "router").await?;
    let addr = listener.local_addr()?;
    let (http, http_addr) = bind_http(&settings).await?;
    let (stop, stopped) = Stop::new();
    let metrics_addr = metrics(
        settings.metrics_listen,
        tls.metrics.clone(),
        settings.connections,
        &stopped,
    )
    .await?;
    let pool = Pool::with_routing(Some(settings.model_name.clone()), settings.routing);
    let mut discovery = Vec::new();
    for entry in &settings.workers {
        match WorkerTarget::parse(entry).map_err(anyhow::Error::msg)? {
            WorkerTarget::Static(address) => {
                join_worker(&pool, address, &settings.worker_client);
            }
            WorkerTarget::Dns { name, port } => {
                let (pool, client) = (Arc::clone(&pool), settings.worker_client.clone());
                discovery.push(tokio::spawn(follow_dns(pool, name, port, client, settings.dns)));
            }
        }
    }
    {
        let stop = stopped.wait();
        tokio::spawn(async move {
            stop.await;
            for d in discovery {
                d.abort();
            }
        });
    }
    let parts = router_parts(&settings, pool, &stopped, None, &tls, http).await?;
    let task = tokio::spawn(async move {
        ferroserve_router::serve(listener, parts, stopped.wait())
            .await
            .context("router server failed")
    });
    Ok(Running::new(addr, metrics_addr, BackendSlot::new(), stop, task).with_http(http_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_from_one_file_share_while_one_is_alive() {
        let shared = Shared::<String>::default();
        let path = std::path::Path::new("Cargo.toml");
        assert!(shared.get(path).is_none());
        let first = Arc::new("weights".to_string());
        shared.put(path, &first);
        // The same file by another spelling is the same key.
        let again = shared.get(&std::path::absolute(path).unwrap()).expect("shared");
        assert!(Arc::ptr_eq(&first, &again));
        assert!(shared.get(std::path::Path::new("Cargo.lock")).is_none());
        drop((first, again));
        assert!(shared.get(path).is_none(), "nothing is kept alive by the cache itself");
    }
}
