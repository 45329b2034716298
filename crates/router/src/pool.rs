//! The router's workers, and the choice of which one takes a request among the healthy workers serving
//! the wanted model: by default the one that recently served the longest prefix of its prompt, unless it
//! is loaded well beyond the least loaded ([`crate::affinity`]); or simply the least loaded. Load is the
//! router's own in-flight requests to each.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ferroserve_core::{Backend, ModelInfo, WorkerStats};
use futures::StreamExt;
use tokio::sync::watch;

use ferroserve_telemetry::names;

use crate::affinity::{self, Candidate, PrefixIndex, PrefixKeys, Routing};
use crate::{ModelSelector, RouterError};

/// Prefix keys the routing index remembers, each standing for 64 bytes of prompt (16 MiB of prompts). An
/// entry takes about 100 bytes with its place in the recording queue: some 30 MB in all.
const PREFIX_INDEX_KEYS: usize = 1 << 18;

/// One worker and what the router knows of it.
struct Member {
    /// The engine or remote worker.
    backend: Arc<dyn Backend>,
    /// Requests this router has in flight there: the load measure.
    in_flight: AtomicU32,
    /// False while its stats stream is down (remote worker unreachable, or its heartbeat stopped). A watch,
    /// so that requests in flight on it move elsewhere when it turns false.
    healthy: watch::Sender<bool>,
    /// Its latest counters.
    stats: Mutex<WorkerStats>,
    /// Set, then signalled, when it leaves the pool, so that its stats follower stops.
    gone: AtomicBool,
    removed: tokio::sync::Notify,
}

impl Member {
    fn is_healthy(&self) -> bool {
        *self.healthy.borrow()
    }
}

/// The set of workers. Cheap to share (`Arc`); members can be added while serving.
pub struct Pool {
    /// Every member, healthy or not.
    members: RwLock<Vec<Arc<Member>>>,
    /// Rotates tie-breaks so equal loads spread round-robin.
    next: AtomicUsize,
    /// Number of healthy members; health reporting follows it.
    healthy: watch::Sender<usize>,
    /// Model name used for `ModelSelector::Default`; the first member's model when unset.
    default_model: Option<String>,
    /// How a worker is chosen.
    routing: Routing,
    /// Which workers recently served which prompt prefixes (prefix-aware routing).
    index: Mutex<PrefixIndex>,
}

/// A worker chosen for one request. Holding it counts as load; dropping it ends that.
pub struct Lease {
    /// The chosen member.
    member: Arc<Member>,
}

impl Lease {
    /// The backend to send the request to.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.member.backend
    }

    /// Where the worker is (for logs, and to skip it when another is picked).
    pub fn location(&self) -> &str {
        self.member.backend.location()
    }

    /// Resolves when this worker is marked unhealthy (its connection or heartbeat is gone): a request in
    /// flight on it then continues elsewhere.
    pub fn down(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut healthy = self.member.healthy.subscribe();
        async move {
            let _ = healthy.wait_for(|up| !*up).await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.member.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A snapshot of one worker for the admin API.
#[derive(Debug, Clone)]
pub struct WorkerView {
    /// Worker address or "in-process".
    pub location: String,
    /// The model it serves.
    pub model: ModelInfo,
    /// Requests in flight from this router.
    pub in_flight: u32,
    /// Whether it is reachable.
    pub healthy: bool,
    /// Its latest counters.
    pub stats: WorkerStats,
}

impl Pool {
    /// An empty pool with the default routing. `default_model` names the model used when a request leaves
    /// `model` empty.
    pub fn new(default_model: Option<String>) -> Arc<Pool> {
        Pool::with_routing(default_model, Routing::default())
    }

    /// An empty pool choosing workers by `routing`.
    pub fn with_routing(default_model: Option<String>, routing: Routing) -> Arc<Pool> {
        Arc::new(Pool {
            members: RwLock::new(Vec::new()),
            next: AtomicUsize::new(0),
            healthy: watch::Sender::new(0),
            default_model,
            routing,
            index: Mutex::new(PrefixIndex::new(PREFIX_INDEX_KEYS)),
        })
    }

    /// Adds a worker and starts following its counters; it is healthy while they flow.
    pub fn add(self: &Arc<Self>, backend: Arc<dyn Backend>) {
        let member = Arc::new(Member {
            backend,
            in_flight: AtomicU32::new(0),
            healthy: watch::Sender::new(false),
            stats: Mutex::new(WorkerStats::default()),
            gone: AtomicBool::new(false),
            removed: tokio::sync::Notify::new(),
        });
        self.members.write().expect("pool lock").push(Arc::clone(&member));
        tracing::info!(worker = member.backend.location(), model = %member.backend.model().qualified(), "worker joined the pool");
        let pool = Arc::downgrade(self);
        let healthy_gauge =
            metrics::gauge!(names::WORKER_HEALTHY, names::LABEL_WORKER => member.backend.location().to_string());
        healthy_gauge.set(0.0);
        tokio::spawn(async move {
            // Marks the member unhealthy (once) and updates the pool's count.
            let down = |pool: &Pool| {
                if member.healthy.send_replace(false) {
                    healthy_gauge.set(0.0);
                    pool.healthy.send_modify(|n| *n -= 1);
                }
            };
            while !member.gone.load(Ordering::Relaxed) {
                let mut stats = member.backend.watch_stats();
                loop {
                    let s = tokio::select! {
                        s = stats.next() => s,
                        () = member.removed.notified() => None,
                    };
                    let Some(s) = s.filter(|_| !member.gone.load(Ordering::Relaxed)) else {
                        break;
                    };
                    *member.stats.lock().expect("stats lock") = s;
                    // Only a change wakes the requests watching it (stats arrive with every token).
                    if member.healthy.send_if_modified(|up| !std::mem::replace(up, true)) {
                        healthy_gauge.set(1.0);
                        let Some(pool) = pool.upgrade() else { return };
                        pool.healthy.send_modify(|n| *n += 1);
                    }
                }
                let Some(strong) = pool.upgrade() else { return };
                if member.gone.load(Ordering::Relaxed) {
                    down(&strong);
                    return;
                }
                if member.is_healthy() {
                    tracing::warn!(
                        worker = member.backend.location(),
                        "worker stats stream ended; marked unhealthy"
                    );
                }
                down(&strong);
                drop(strong);
                tokio::time::sleep(Duration::from_millis(500)).await;
                // Back? Ask who it is now: a restarted worker may serve another version.
                if let Some(replacement) = member.backend.reidentify().await {
                    if let Some(strong) = pool.upgrade() {
                        strong.replace(&member, replacement);
                    }
                    return;
                }
            }
        });
    }

    /// Puts `replacement` in `old`'s place (the same worker, serving something else after a restart).
    fn replace(self: &Arc<Self>, old: &Arc<Member>, replacement: Arc<dyn Backend>) {
        self.members
            .write()
            .expect("pool lock")
            .retain(|m| !Arc::ptr_eq(m, old));
        old.gone.store(true, Ordering::Relaxed);
        old.removed.notify_one();
        // The process behind it changed: whatever prefixes it held are gone.
        self.index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget(old.backend.location());
        self.add(replacement);
    }

    /// Follows the number of healthy workers.
    pub fn watch_healthy(&self) -> watch::Receiver<usize> {
        self.healthy.subscribe()
    }

    fn members(&self) -> Vec<Arc<Member>> {
        self.members.read().expect("pool lock").clone()
    }

    /// Distinct models served, with the default first.
    pub fn models(&self) -> Vec<ModelInfo> {
        let mut models: Vec<ModelInfo> = Vec::new();
        for m in self.members() {
            let info = m.backend.model();
            if !models.contains(info) {
                models.push(info.clone());
            }
        }
        if let Some(default) = self.default_name() {
            models.sort_by_key(|m| m.name != default);
        }
        models
    }

    /// The name `ModelSelector::Default` resolves to.
    pub fn default_name(&self) -> Option<String> {
        self.default_model
            .clone()
            .or_else(|| self.members().first().map(|m| m.backend.model().name.clone()))
    }

    /// Takes every worker of `name@version` out of the pool; requests already leased to them finish.
    /// Returns how many left.
    pub fn remove_version(&self, name: &str, version: &str) -> usize {
        self.remove_where(|m| {
            let info = m.backend.model();
            info.name == name && info.version == version
        })
    }

    /// Takes the worker at `location` out of the pool (it left discovery); requests already leased to it
    /// finish. Returns whether it was there.
    pub fn remove_location(&self, location: &str) -> bool {
        self.remove_where(|m| m.backend.location() == location) > 0
    }

    fn remove_where(&self, leaves: impl Fn(&Member) -> bool) -> usize {
        let mut members = self.members.write().expect("pool lock");
        let (gone, kept): (Vec<_>, Vec<_>) = members.drain(..).partition(|m| leaves(m));
        *members = kept;
        drop(members);
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        for m in &gone {
            // A worker that comes back at the same address starts with an empty cache.
            index.forget(m.backend.location());
        }
        drop(index);
        for m in &gone {
            // Its follower marks it unhealthy and stops.
            m.gone.store(true, Ordering::Relaxed);
            m.removed.notify_one();
            tracing::info!(worker = m.backend.location(), model = %m.backend.model().qualified(), "worker left the pool");
        }
        gone.len()
    }

    /// The versions of `name` that have a healthy worker, in join order.
    pub fn healthy_versions(&self, name: &str) -> Vec<String> {
        self.versions_where(name, Member::is_healthy)
    }

    /// Every version of `name` some worker serves, healthy or not, in join order.
    pub fn versions(&self, name: &str) -> Vec<String> {
        self.versions_where(name, |_| true)
    }

    fn versions_where(&self, name: &str, keep: impl Fn(&Member) -> bool) -> Vec<String> {
        let mut versions: Vec<String> = Vec::new();
        for m in self.members() {
            let info = m.backend.model();
            if info.name == name && keep(&m) && !versions.contains(&info.version) {
                versions.push(info.version.clone());
            }
        }
        versions
    }

    /// Snapshots of every worker.
    pub fn workers(&self) -> Vec<WorkerView> {
        self.members()
            .iter()
            .map(|m| WorkerView {
                location: m.backend.location().to_string(),
                model: m.backend.model().clone(),
                in_flight: m.in_flight.load(Ordering::Relaxed),
                healthy: m.is_healthy(),
                stats: *m.stats.lock().expect("stats lock"),
            })
            .collect()
    }

    /// Every member serving `selector`'s model, with a label for messages. NOT_FOUND when no member
    /// serves it, UNAVAILABLE when there are no members at all yet.
    fn serving(&self, selector: &ModelSelector) -> Result<(Vec<Arc<Member>>, String), RouterError> {
        let members = self.members();
        let default = self.default_name();
        let label = match selector {
            ModelSelector::Default => default.clone().unwrap_or_else(|| "the default model".into()),
            ModelSelector::Name(n) => n.clone(),
            ModelSelector::Pinned { name, version } => ferroserve_core::VersionId::new(name, version).to_string(),
        };
        let wanted = |info: &ModelInfo| match selector {
            ModelSelector::Default => default.as_deref() == Some(info.name.as_str()),
            ModelSelector::Name(n) => *n == info.name,
            ModelSelector::Pinned { name, version } => *name == info.name && *version == info.version,
        };
        let serving: Vec<Arc<Member>> = members.iter().filter(|m| wanted(m.backend.model())).cloned().collect();
        if !serving.is_empty() {
            return Ok((serving, label));
        }
        if members.is_empty() {
            return Err(RouterError::NoWorker {
                model: label,
                reason: "no worker has joined yet (model still loading?)".into(),
            });
        }
        Err(RouterError::ModelNotFound {
            requested: label,
            available: self.models().iter().map(ModelInfo::qualified).collect(),
        })
    }

    /// The largest context length among the versions serving `selector`: a request that does not fit it
    /// fits no version. NOT_FOUND or UNAVAILABLE as [`Pool::pick`] would answer.
    pub fn context_length(&self, selector: &ModelSelector) -> Result<u32, RouterError> {
        let (serving, _) = self.serving(selector)?;
        Ok(serving
            .iter()
            .map(|m| m.backend.model().context_length)
            .max()
            .unwrap_or(0))
    }

    /// The healthy backends serving `selector`'s model.
    pub fn matching(&self, selector: &ModelSelector) -> Result<Vec<Arc<dyn Backend>>, RouterError> {
        let (serving, _) = self.serving(selector)?;
        Ok(serving
            .into_iter()
            .filter(|m| m.is_healthy())
            .map(|m| Arc::clone(&m.backend))
            .collect())
    }

    /// Chooses the least loaded healthy worker for `selector`, skipping the locations in `tried`.
    pub fn pick(&self, selector: &ModelSelector, tried: &[String]) -> Result<Lease, RouterError> {
        self.pick_for(selector, tried, &PrefixKeys::default())
    }

    /// Chooses a healthy worker for `selector` and a prompt with prefix `keys` by the pool's routing,
    /// skipping the locations in `tried`, and records the choice in the prefix index.
    pub fn pick_for(
        &self,
        selector: &ModelSelector,
        tried: &[String],
        keys: &PrefixKeys,
    ) -> Result<Lease, RouterError> {
        let (serving, label) = self.serving(selector)?;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = serving.len();
        let open: Vec<&Arc<Member>> = (0..n)
            .map(|i| &serving[(start + i) % n])
            .filter(|m| {
                m.is_healthy()
                    && !m.stats.lock().expect("stats lock").draining
                    && !tried.iter().any(|t| t == m.backend.location())
            })
            .collect();
        if open.is_empty() {
            return Err(RouterError::NoWorker {
                model: label,
                reason: format!("all {n} workers serving it are unhealthy, draining or refused the request"),
            });
        }
        let candidates: Vec<Candidate<'_>> = open
            .iter()
            .map(|m| Candidate {
                location: m.backend.location(),
                load: m.in_flight.load(Ordering::Relaxed),
            })
            .collect();
        let routing = if keys.is_empty() {
            Routing::LeastLoaded
        } else {
            self.routing
        };
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        let (at, outcome) = affinity::choose(routing, &index, keys, &candidates);
        let best = open[at];
        if let Some(outcome) = outcome {
            index.record(keys, best.backend.location());
            metrics::counter!(names::PREFIX_ROUTING_TOTAL, names::LABEL_OUTCOME => outcome.label()).increment(1);
        }
        drop(index);
        best.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok(Lease {
            member: Arc::clone(best),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferroserve_core::{BackendError, EventStream, Input, StatsStream, ValidRequest};
    use futures::future::BoxFuture;

    /// A mock worker: only a location and a stats stream that says it is up; it generates nothing.
    struct MockWorker {
        info: ModelInfo,
        location: String,
        stats: watch::Sender<WorkerStats>,
    }

    impl Backend for MockWorker {
        fn model(&self) -> &ModelInfo {
            &self.info
        }
        fn location(&self) -> &str {
            &self.location
        }
        fn generate(&self, _: ValidRequest) -> BoxFuture<'_, Result<EventStream, BackendError>> {
            Box::pin(async { Err(BackendError::Internal("a mock worker generates nothing".into())) })
        }
        fn watch_stats(&self) -> StatsStream {
            tokio_stream::wrappers::WatchStream::new(self.stats.subscribe()).boxed()
        }
        fn snapshot_drift_baseline(&self) -> BoxFuture<'_, Result<u64, BackendError>> {
            Box::pin(async { Ok(0) })
        }
    }

    async fn two_workers(routing: Routing) -> Arc<Pool> {
        let pool = Pool::with_routing(Some("m".into()), routing);
        for location in ["w1", "w2"] {
            pool.add(Arc::new(MockWorker {
                info: ModelInfo {
                    name: "m".into(),
                    version: "v".into(),
                    context_length: 4096,
                    defaults: Default::default(),
                },
                location: location.into(),
                stats: watch::Sender::new(WorkerStats::default()),
            }));
        }
        let mut healthy = pool.watch_healthy();
        healthy.wait_for(|&n| n == 2).await.expect("both workers come up");
        pool
    }

    fn keys(text: &str) -> PrefixKeys {
        PrefixKeys::of(&Input::Prompt(text.into()))
    }

    const SYSTEM: &str = "You are the assistant of a bicycle shop. You know the opening hours, the prices of \
        repairs and which parts are in stock, and you answer in two sentences at most.";

    #[tokio::test]
    async fn a_repeated_prefix_lands_on_the_worker_that_served_it() {
        let pool = two_workers(Routing::PrefixAware { max_imbalance: 2 }).await;
        let first = pool
            .pick_for(
                &ModelSelector::Default,
                &[],
                &keys(&format!("{SYSTEM} Are you open today?")),
            )
            .unwrap();
        let home = first.location().to_string();
        drop(first);
        // Both idle: least-loaded rotates its tie-break, so half of these would go elsewhere by chance.
        for i in 0..6 {
            let lease = pool
                .pick_for(&ModelSelector::Default, &[], &keys(&format!("{SYSTEM} Question {i}?")))
                .unwrap();
            assert_eq!(lease.location(), home, "request {i} follows its prefix");
        }
        // While it is busy within the threshold it keeps them; past it, the other worker takes them.
        let held: Vec<Lease> = (0..3)
            .map(|i| {
                pool.pick_for(&ModelSelector::Default, &[], &keys(&format!("{SYSTEM} Busy {i}?")))
                    .unwrap()
            })
            .collect();
        assert!(
            held.iter().all(|l| l.location() == home),
            "loads 0, 1, 2 are within 2 of 0"
        );
        let spill = pool
            .pick_for(&ModelSelector::Default, &[], &keys(&format!("{SYSTEM} Spill?")))
            .unwrap();
        assert_ne!(spill.location(), home, "load 3 is more than 2 over the idle worker");
    }

    #[tokio::test]
    async fn least_loaded_routing_ignores_prefixes() {
        let pool = two_workers(Routing::LeastLoaded).await;
        let a = pool.pick_for(&ModelSelector::Default, &[], &keys(SYSTEM)).unwrap();
        let b = pool.pick_for(&ModelSelector::Default, &[], &keys(SYSTEM)).unwrap();
        assert_ne!(
            a.location(),
            b.location(),
            "the same prefix goes to the less loaded worker"
        );
    }
}
