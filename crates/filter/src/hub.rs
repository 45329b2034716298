//! The live filter: which config is active, whether it is on, which candidate runs in shadow, and what
//! each recent request was judged.
//!
//! A request takes one [`Selection`] when it starts and keeps it to the end, so a swap never changes the
//! filter under a request in flight. A swap replaces the selection atomically (arc-swap). Configs are
//! compiled and validated before they enter the library, so a bad file never replaces a good filter.
//! The shadow filter runs on its own thread from a bounded queue: it sees the same texts as the active one
//! but can neither change a response nor slow one down. The queue is bounded in texts and in bytes, and
//! shares each text with the request rather than copying it.
//!
//! The hub decides where a check runs: a heavy filter's full check (embeddings take milliseconds) goes to
//! the blocking pool, never the async threads; a partial check (the rules alone, what streamed output
//! gets) and a cheap filter's run inline.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use ferroserve_telemetry::names;

use crate::config::FilterConfig;
use crate::store::{Entry, Kept, Label, Source, Step, Store};
use crate::verdict::{Action, Filter, Verdict};

/// Where in the request path a text is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The prompt or the chat messages, before any model work.
    Input,
    /// The generated text, as it streams.
    Output,
}

impl Stage {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Stage::Input => "input",
            Stage::Output => "output",
        }
    }
}

/// A compiled, validated filter config.
pub struct Loaded {
    /// `name@version`.
    pub id: String,
    /// The config's name.
    pub name: String,
    /// What this version changed.
    pub description: String,
    /// The file it came from, if any.
    pub path: Option<PathBuf>,
    /// The filter itself.
    pub filter: Arc<dyn Filter>,
}

/// What judges requests now. Requests hold one for their whole life.
#[derive(Clone, Default)]
pub struct Selection {
    /// The enforcing filter.
    pub active: Option<Arc<Loaded>>,
    /// False when an operator switched filtering off.
    pub enabled: bool,
    /// A candidate that sees the same texts and only records.
    pub shadow: Option<Arc<Loaded>>,
}

/// A reviewer's correction of a past verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feedback {
    /// Blocked or flagged, but harmless.
    FalsePositive,
    /// Allowed, but harmful.
    FalseNegative,
}

impl Feedback {
    fn label(self) -> &'static str {
        match self {
            Feedback::FalsePositive => "false_positive",
            Feedback::FalseNegative => "false_negative",
        }
    }
}

/// One recent verdict, kept so that feedback can find it by request id.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The request.
    pub request_id: String,
    /// Which filter judged it.
    pub filter: String,
    /// Where.
    pub stage: Stage,
    /// What it decided.
    pub verdict: Verdict,
    /// The text judged, or its hash, as the feedback store keeps it; `None` without a store.
    pub text: Option<Kept>,
}

/// Why an operator's change or a piece of feedback was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// No such filter or request.
    #[error("{0}")]
    NotFound(String),
    /// The change or config is not valid; nothing changed.
    #[error("{0}")]
    Invalid(String),
}

/// How often the shadow agreed with the active filter, since the shadow was last set.
#[derive(Debug, Default)]
pub struct ShadowStats {
    /// Both blocked.
    pub agree_block: AtomicU64,
    /// Neither blocked.
    pub agree_allow: AtomicU64,
    /// Only the shadow would have blocked.
    pub shadow_only_block: AtomicU64,
    /// Only the active filter blocked.
    pub active_only_block: AtomicU64,
}

impl ShadowStats {
    /// The four counts, in field order.
    pub fn counts(&self) -> [u64; 4] {
        [
            self.agree_block.load(Ordering::Relaxed),
            self.agree_allow.load(Ordering::Relaxed),
            self.shadow_only_block.load(Ordering::Relaxed),
            self.active_only_block.load(Ordering::Relaxed),
        ]
    }
}

/// A text for the shadow thread.
struct ShadowJob {
    stats: Arc<ShadowStats>,
    shadow: Arc<Loaded>,
    active_id: String,
    active_blocked: bool,
    stage: Stage,
    text: Arc<str>,
    /// Where the queued bytes are counted, released once judged.
    queued: Arc<AtomicUsize>,
    /// Where a disagreement is recorded, if anywhere.
    store: Option<Arc<Store>>,
}

/// The live filter state.
pub struct FilterHub {
    /// The selection requests take.
    selection: ArcSwap<Selection>,
    /// Every loaded config by name (one version per name: the file's current content).
    library: RwLock<BTreeMap<String, Arc<Loaded>>>,
    /// Where configs are read from, for reloads.
    dir: Option<PathBuf>,
    /// Recent verdicts, oldest first, at most `capacity`.
    recent: Mutex<VecDeque<Recorded>>,
    /// How many verdicts `recent` keeps.
    capacity: usize,
    /// Texts queued for the shadow thread; full means the shadow skips a text (counted).
    shadow_tx: SyncSender<ShadowJob>,
    /// Bytes of the texts queued for the shadow thread.
    shadow_bytes: Arc<AtomicUsize>,
    /// Agreement of the current shadow, reset when the shadow changes.
    shadow_stats: ArcSwap<ShadowStats>,
    /// The durable feedback store, once set: reviewers' reports, shadow disagreements and operators' steps.
    store: OnceLock<Arc<Store>>,
}

/// Texts the shadow queue holds before it starts skipping.
const SHADOW_QUEUE: usize = 256;
/// Bytes of text the shadow queue holds before it starts skipping.
const SHADOW_QUEUE_BYTES: usize = 4 << 20;

fn shadow_worker(rx: std::sync::mpsc::Receiver<ShadowJob>) {
    while let Ok(job) = rx.recv() {
        let v = job.shadow.filter.check(&job.text);
        job.queued.fetch_sub(job.text.len(), Ordering::Relaxed);
        let shadow_blocked = v.action == Action::Block;
        let (outcome, count) = match (job.active_blocked, shadow_blocked) {
            (true, true) => ("agree_block", &job.stats.agree_block),
            (false, false) => ("agree_allow", &job.stats.agree_allow),
            (false, true) => ("shadow_only_block", &job.stats.shadow_only_block),
            (true, false) => ("active_only_block", &job.stats.active_only_block),
        };
        // Stored before it is counted, so that whoever sees the count finds the finding.
        if let Some(store) = job.store.as_ref().filter(|_| job.active_blocked != shadow_blocked) {
            let found = store.finding(
                Source::ShadowDisagreement,
                &job.shadow.id,
                None,
                &store.keep(&job.text),
                &v,
                None,
                "shadow",
            );
            if let Err(e) = store.append(&Entry::Finding(found)) {
                tracing::error!(error = %e, "could not record a shadow disagreement");
            }
        }
        count.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(
            names::FILTER_SHADOW_TOTAL,
            names::LABEL_ACTIVE => job.active_id,
            names::LABEL_SHADOW => job.shadow.id.clone(),
            names::LABEL_STAGE => job.stage.label(),
            names::LABEL_OUTCOME => outcome
        )
        .increment(1);
    }
}

/// Reads and compiles one config file.
pub fn load_file(path: &Path) -> Result<Loaded, String> {
    let config = FilterConfig::load(path).map_err(|e| e.to_string())?;
    let filter = config.compile().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Loaded {
        id: config.id(),
        name: config.name.clone(),
        description: config.description.clone(),
        path: Some(path.to_path_buf()),
        filter: Arc::new(filter),
    })
}

impl FilterHub {
    /// A hub over the configs in `dir` (every `*.toml`), with `active` (a config name) enforcing. Every
    /// config must compile: a bad file at startup is an error naming it.
    pub fn from_dir(dir: &Path, active: Option<&str>, capacity: usize) -> Result<Arc<FilterHub>, String> {
        let hub = Self::empty(Some(dir.to_path_buf()), capacity);
        let (loaded, errors) = read_dir(dir)?;
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        *hub.library.write().expect("library lock") = loaded.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        if let Some(name) = active {
            hub.swap(name)?;
        }
        Ok(hub)
    }

    /// A hub with no configs and no directory (filters are added with [`FilterHub::insert`]).
    pub fn empty(dir: Option<PathBuf>, capacity: usize) -> Arc<FilterHub> {
        let (shadow_tx, rx) = sync_channel(SHADOW_QUEUE);
        std::thread::Builder::new()
            .name("filter-shadow".into())
            .spawn(move || shadow_worker(rx))
            .expect("spawn the shadow thread");
        Arc::new(FilterHub {
            selection: ArcSwap::from_pointee(Selection {
                enabled: true,
                ..Selection::default()
            }),
            library: RwLock::new(BTreeMap::new()),
            dir,
            recent: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            shadow_tx,
            shadow_bytes: Arc::new(AtomicUsize::new(0)),
            shadow_stats: ArcSwap::from_pointee(ShadowStats::default()),
            store: OnceLock::new(),
        })
    }

    /// Sets the durable feedback store (once; later calls keep the first).
    pub fn set_store(&self, store: Arc<Store>) {
        let _ = self.store.set(store);
    }

    /// Records an operator's step (a swap, a shadow, on or off) in the feedback store, if one is set.
    pub fn record_step(&self, step: Step, filter: &str, by: &str) {
        if let Some(store) = self.store.get() {
            store.step(step, filter, by, "");
        }
    }

    /// Adds (or replaces) a compiled filter in the library; an active or shadow filter of the same name is
    /// replaced too.
    pub fn insert(&self, loaded: Loaded) {
        let loaded = Arc::new(loaded);
        self.library
            .write()
            .expect("library lock")
            .insert(loaded.name.clone(), Arc::clone(&loaded));
        self.selection.rcu(|s| {
            let mut next = Selection::clone(s);
            if next.active.as_ref().is_some_and(|a| a.name == loaded.name) {
                next.active = Some(Arc::clone(&loaded));
            }
            if next.shadow.as_ref().is_some_and(|a| a.name == loaded.name) {
                next.shadow = Some(Arc::clone(&loaded));
            }
            next
        });
    }

    /// What judges requests now.
    pub fn selection(&self) -> Arc<Selection> {
        self.selection.load_full()
    }

    /// Every loaded config.
    pub fn library(&self) -> Vec<Arc<Loaded>> {
        self.library.read().expect("library lock").values().cloned().collect()
    }

    fn find(&self, name: &str) -> Result<Arc<Loaded>, HubError> {
        let library = self.library.read().expect("library lock");
        library
            .get(name)
            .or_else(|| library.values().find(|l| l.id == name))
            .cloned()
            .ok_or_else(|| {
                HubError::NotFound(format!(
                    "no filter `{name}`; loaded: {}",
                    library.values().map(|l| l.id.as_str()).collect::<Vec<_>>().join(", ")
                ))
            })
    }

    /// Makes `name` (a config name or `name@version`) the enforcing filter.
    pub fn swap(&self, name: &str) -> Result<Arc<Loaded>, String> {
        self.swap_checked(name).map_err(|e| e.to_string())
    }

    /// [`FilterHub::swap`] with a typed error.
    pub fn swap_checked(&self, name: &str) -> Result<Arc<Loaded>, HubError> {
        let loaded = self.find(name)?;
        self.selection.rcu(|s| Selection {
            active: Some(Arc::clone(&loaded)),
            ..Selection::clone(s)
        });
        tracing::info!(filter = %loaded.id, "filter swapped in");
        Ok(loaded)
    }

    /// Switches filtering on or off.
    pub fn set_enabled(&self, enabled: bool) {
        self.selection.rcu(|s| Selection {
            enabled,
            ..Selection::clone(s)
        });
        tracing::info!(enabled, "filter toggled");
    }

    /// Runs `name` in shadow beside the active filter, or no shadow with `None`.
    pub fn set_shadow(&self, name: Option<&str>) -> Result<Option<Arc<Loaded>>, HubError> {
        let shadow = name.map(|n| self.find(n)).transpose()?;
        self.shadow_stats.store(Arc::new(ShadowStats::default()));
        self.selection.rcu(|s| Selection {
            shadow: shadow.clone(),
            ..Selection::clone(s)
        });
        tracing::info!(shadow = ?shadow.as_ref().map(|s| &s.id), "shadow filter set");
        Ok(shadow)
    }

    /// How the current shadow has agreed with the active filter since it was set.
    pub fn shadow_stats(&self) -> Arc<ShadowStats> {
        self.shadow_stats.load_full()
    }

    /// Re-reads the directory. Each valid file replaces its config; an invalid one is refused with a
    /// message naming the problem and the previous version stays. Returns those messages.
    pub fn reload(&self) -> Vec<String> {
        let Some(dir) = &self.dir else {
            return vec!["no filter directory to reload".into()];
        };
        let (loaded, mut errors) = match read_dir(dir) {
            Ok(r) => r,
            Err(e) => return vec![e],
        };
        for (_, l) in loaded {
            let known = self
                .library
                .read()
                .expect("library lock")
                .get(&l.name)
                .map(|k| k.id.clone());
            if known.as_deref() != Some(l.id.as_str()) {
                tracing::info!(filter = %l.id, "filter config loaded");
            }
            self.insert(l);
        }
        for e in &errors {
            tracing::error!(error = %e, "filter config refused; the previous version stays");
        }
        errors.sort();
        errors
    }

    /// Judges `text` with the selection a request holds; `None` when filtering is off. Records the
    /// verdict's latency and queues the text for the shadow filter. A heavy filter's full check runs on
    /// the blocking pool; with `full` false (streamed output mid-sentence) the filter may run only its
    /// cheap part, inline.
    pub async fn check(
        self: &Arc<Self>,
        selection: &Arc<Selection>,
        stage: Stage,
        text: Arc<str>,
        full: bool,
    ) -> Option<Verdict> {
        let heavy = full && selection.active.as_ref().is_some_and(|a| a.filter.is_heavy());
        if !heavy {
            return self.judge(selection, stage, &text, full);
        }
        let (hub, selection) = (Arc::clone(self), Arc::clone(selection));
        match tokio::task::spawn_blocking(move || hub.judge(&selection, stage, &text, full)).await {
            Ok(verdict) => verdict,
            Err(e) => {
                // A panic inside a filter: counted and logged; the request goes on unjudged.
                tracing::error!(error = %e, stage = stage.label(), "filter check panicked; the text passes unjudged");
                metrics::counter!(names::FILTER_FAILURES_TOTAL, names::LABEL_STAGE => stage.label()).increment(1);
                None
            }
        }
    }

    /// The check itself, on the caller's thread.
    fn judge(&self, selection: &Selection, stage: Stage, text: &Arc<str>, full: bool) -> Option<Verdict> {
        let active = selection.active.as_ref().filter(|_| selection.enabled)?;
        let started = Instant::now();
        let verdict = if full {
            active.filter.check(text)
        } else {
            active.filter.check_partial(text)
        };
        metrics::histogram!(names::FILTER_DURATION_SECONDS, names::LABEL_FILTER => active.id.clone(), names::LABEL_STAGE => stage.label())
            .record(started.elapsed().as_secs_f64());
        if let Some(shadow) = &selection.shadow {
            self.shadow(shadow, active, stage, text, verdict.action == Action::Block);
        }
        Some(verdict)
    }

    fn shadow(&self, shadow: &Arc<Loaded>, active: &Loaded, stage: Stage, text: &Arc<str>, active_blocked: bool) {
        let skipped = || metrics::counter!(names::FILTER_SHADOW_SKIPPED_TOTAL).increment(1);
        let len = text.len();
        if self.shadow_bytes.fetch_add(len, Ordering::Relaxed) + len > SHADOW_QUEUE_BYTES {
            self.shadow_bytes.fetch_sub(len, Ordering::Relaxed);
            skipped();
            return;
        }
        let job = ShadowJob {
            stats: self.shadow_stats.load_full(),
            shadow: Arc::clone(shadow),
            active_id: active.id.clone(),
            active_blocked,
            stage,
            text: Arc::clone(text),
            queued: Arc::clone(&self.shadow_bytes),
            store: self.store.get().cloned(),
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.shadow_tx.try_send(job) {
            self.shadow_bytes.fetch_sub(len, Ordering::Relaxed);
            skipped();
        }
    }

    /// Counts a request's final verdict at a stage and keeps it for feedback, with the text judged (or its
    /// hash) where a feedback store wants it.
    pub fn record(&self, filter: &str, stage: Stage, request_id: &str, verdict: &Verdict, text: Option<&Arc<str>>) {
        metrics::counter!(
            names::FILTER_VERDICTS_TOTAL,
            names::LABEL_FILTER => filter.to_string(),
            names::LABEL_STAGE => stage.label(),
            names::LABEL_CATEGORY => verdict.category.clone().unwrap_or_default(),
            names::LABEL_ACTION => verdict.action.label()
        )
        .increment(1);
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == self.capacity {
            recent.pop_front();
        }
        recent.push_back(Recorded {
            request_id: request_id.to_string(),
            filter: filter.to_string(),
            stage,
            verdict: verdict.clone(),
            text: text.zip(self.store.get()).map(|(t, store)| store.keep(t)),
        });
    }

    /// A reviewer's correction. The request must be among the recent verdicts; a false positive must have
    /// been blocked or flagged, a false negative allowed. Counted per filter version.
    pub fn feedback(&self, request_id: &str, kind: Feedback, by: &str) -> Result<Recorded, HubError> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let mut found: Vec<&Recorded> = recent.iter().filter(|r| r.request_id == request_id).collect();
        if found.is_empty() {
            return Err(HubError::NotFound(format!(
                "no recent verdict for request `{request_id}`; the last {} verdicts are kept",
                self.capacity
            )));
        }
        // The decisive verdict: a block or flag if there was one, else the last.
        found.sort_by_key(|r| std::cmp::Reverse(r.verdict.action));
        let decisive = found[0].clone();
        let flagged = decisive.verdict.action != Action::Allow;
        match (kind, flagged) {
            (Feedback::FalsePositive, false) => Err(HubError::Invalid(format!(
                "request `{request_id}` was allowed, so it cannot be a false positive; report a false negative"
            ))),
            (Feedback::FalseNegative, true) => Err(HubError::Invalid(format!(
                "request `{request_id}` was {}, so it cannot be a false negative; report a false positive",
                if decisive.verdict.action == Action::Block {
                    "blocked"
                } else {
                    "flagged"
                }
            ))),
            _ => {
                metrics::counter!(names::FILTER_FEEDBACK_TOTAL, names::LABEL_FILTER => decisive.filter.clone(), names::LABEL_KIND => kind.label())
                    .increment(1);
                self.store_feedback(&decisive, kind, by);
                Ok(decisive)
            }
        }
    }

    /// Puts a reviewer's report in the feedback store, if one is set: a false positive is labelled
    /// harmless; a false negative waits for `filter review` to name its category. A verdict recorded with
    /// no text (an output stream's end) is stored with an empty hash.
    fn store_feedback(&self, r: &Recorded, kind: Feedback, by: &str) {
        let Some(store) = self.store.get() else { return };
        let (source, label) = match kind {
            Feedback::FalsePositive => (Source::FalsePositive, Some(Label::Allow)),
            Feedback::FalseNegative => (Source::FalseNegative, None),
        };
        let text = r.text.clone().unwrap_or_else(|| Kept::Hash(String::new()));
        let found = store.finding(source, &r.filter, Some(&r.request_id), &text, &r.verdict, label, by);
        if let Err(e) = store.append(&Entry::Finding(found)) {
            tracing::error!(error = %e, "could not store filter feedback");
        }
    }
}

/// True when a config in `dir` has a `[semantic]` or `[classifier]` section, so the embedding model must be
/// loaded first.
pub fn needs_embeddings(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .any(|p| FilterConfig::load(&p).is_ok_and(|c| c.needs_embeddings()))
}

/// Every config in `dir`: the valid ones by name, and a message for each invalid one.
fn read_dir(dir: &Path) -> Result<(BTreeMap<String, Loaded>, Vec<String>), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read filter directory {}: {e}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    let mut loaded = BTreeMap::new();
    let mut errors = Vec::new();
    for p in paths {
        match load_file(&p) {
            Ok(l) => {
                if let Some(other) = loaded.get(&l.name).map(|o: &Loaded| o.path.clone()) {
                    errors.push(format!(
                        "{}: name `{}` is also used by {}; each config needs its own name",
                        p.display(),
                        l.name,
                        other.map(|o| o.display().to_string()).unwrap_or_default()
                    ));
                    continue;
                }
                loaded.insert(l.name.clone(), l);
            }
            Err(e) => errors.push(e),
        }
    }
    Ok((loaded, errors))
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{Receiver, channel};
    use std::time::Duration;

    use super::*;

    /// A heavy filter whose check waits for a signal that only another task on the runtime can send.
    struct WaitsForTheRuntime(Mutex<Receiver<()>>);

    impl Filter for WaitsForTheRuntime {
        fn id(&self) -> &str {
            "waits@1"
        }

        fn check(&self, _: &str) -> Verdict {
            let rx = self.0.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(()) => Verdict::allow(),
                Err(_) => Verdict {
                    action: Action::Block,
                    category: Some("blocked the runtime".into()),
                    evidence: String::new(),
                },
            }
        }

        fn is_heavy(&self) -> bool {
            true
        }
    }

    /// A cheap filter that lets everything through.
    struct AllowAll;

    impl Filter for AllowAll {
        fn id(&self) -> &str {
            "waits@1"
        }

        fn check(&self, _: &str) -> Verdict {
            Verdict::allow()
        }
    }

    fn hub_with(filter: Arc<dyn Filter>) -> Arc<FilterHub> {
        let hub = FilterHub::empty(None, 8);
        hub.insert(Loaded {
            id: "waits@1".into(),
            name: "waits".into(),
            description: String::new(),
            path: None,
            filter,
        });
        hub.swap("waits").unwrap();
        hub
    }

    #[test]
    fn a_heavy_check_runs_off_the_async_thread() {
        let (go, wait) = channel();
        let hub = hub_with(Arc::new(WaitsForTheRuntime(Mutex::new(wait))));
        // One async thread: had the check run on it, the task that sends `go` could never run.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let verdict = runtime.block_on(async {
            let selection = hub.selection();
            let check = tokio::spawn({
                let hub = Arc::clone(&hub);
                async move { hub.check(&selection, Stage::Output, Arc::from("text."), true).await }
            });
            tokio::task::yield_now().await;
            go.send(()).unwrap();
            check.await.unwrap()
        });
        assert_eq!(verdict.map(|v| v.action), Some(Action::Allow));
    }

    #[test]
    fn the_shadow_queue_is_bounded_in_bytes() {
        let (_go, wait) = channel();
        let hub = hub_with(Arc::new(AllowAll));
        hub.insert(Loaded {
            id: "slow@1".into(),
            name: "slow".into(),
            description: String::new(),
            path: None,
            filter: Arc::new(WaitsForTheRuntime(Mutex::new(wait))),
        });
        hub.set_shadow(Some("slow")).unwrap();
        let selection = hub.selection();
        let text: Arc<str> = Arc::from("x".repeat(1 << 20));
        // The shadow thread takes the first text and waits; the queue then fills to its byte budget.
        for _ in 0..16 {
            hub.judge(&selection, Stage::Input, &text, true);
        }
        let queued = hub.shadow_bytes.load(Ordering::Relaxed);
        assert!(queued <= SHADOW_QUEUE_BYTES, "{queued} bytes queued");
        assert!(queued >= SHADOW_QUEUE_BYTES - (1 << 20), "{queued} bytes queued");
    }
}
