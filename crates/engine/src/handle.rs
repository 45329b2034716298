//! The engine's front door: checks requests on the caller's task and queues them for the engine thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use ferroserve_core::{
    Backend, BackendError, Constraint, ConstraintKind, EventStream, ModelInfo, StatsStream, ValidRequest, WorkerStats,
};
use ferroserve_model::{LoadedModel, TextCodec};
use ferroserve_telemetry::cost::{self, CostMeter, Price};
use ferroserve_telemetry::drift::DriftMonitor;
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, WatchStream};

use crate::constrain::{Compiled, ConstraintError, Grammars, Guide};
use crate::instruments::EngineMetrics;
use crate::run::EngineLoop;
use crate::schedule::BatchLimits;
use crate::seq::Job;
use ferroserve_model::kv::BLOCK_TOKENS;
use ferroserve_model::pool::{PoolStats, PrefixCaching};

/// Engine settings from the `[engine]` and `[cost]` config sections.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Requests that may wait for the engine; more are refused as overloaded.
    pub queue_capacity: usize,
    /// Tokens in the drift monitor's sliding window.
    pub drift_window_tokens: usize,
    /// What this worker's busy time costs.
    pub price: Price,
    /// Continuous batching: sequences, tokens per step, KV budget.
    pub batch: BatchLimits,
    /// Reuse of computed prefixes in the KV pool.
    pub prefix_caching: PrefixCaching,
    /// Test-only fault injection (`FERROSERVE_TEST_FAULT=engine-panic:<marker>`): the engine thread panics
    /// on a request whose text contains the marker. Never set in a real deployment.
    pub test_fault_marker: Option<String>,
    /// Structured output: the longest a constraint may take to compile before it is refused.
    pub constraint_compile_ms: u64,
    /// Structured output: compiled constraints kept for reuse.
    pub constraint_cache_entries: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            queue_capacity: 64,
            drift_window_tokens: 4096,
            price: Price {
                worker_kind: "cpu".into(),
                usd_per_hour: 0.0,
            },
            batch: BatchLimits::default(),
            prefix_caching: PrefixCaching::default(),
            test_fault_marker: None,
            constraint_compile_ms: 2_000,
            constraint_cache_entries: 64,
        }
    }
}

/// What the engine's KV pool holds ([`EngineHandle::kv`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvReport {
    /// Blocks in use, idle (cached), and the capacity.
    pub blocks: PoolStats,
    /// Sequences preempted since the engine started.
    pub preemptions: u64,
}

/// State that both the handle and the engine thread touch.
pub(crate) struct Shared {
    /// Counters, published to watchers on every change.
    pub stats: watch::Sender<WorkerStats>,
    /// Metric handles with this engine's labels.
    pub metrics: EngineMetrics,
    /// The token-distribution drift of this engine's version.
    pub drift: Mutex<DriftMonitor>,
    /// Busy time and tokens, priced.
    pub cost: Arc<CostMeter>,
    /// False once the supervisor gave up on the engine thread.
    pub alive: watch::Sender<bool>,
    /// The KV pool's counts as the engine last published them (read by [`EngineHandle::kv`] without
    /// waiting for a step, which holds the pool).
    pub kv_blocks: Mutex<PoolStats>,
    /// Sequences preempted so far.
    pub preemptions: AtomicU64,
}

impl Shared {
    /// True once the server drains (`WorkerStats::draining`): what has not started is handed back, and
    /// new requests are refused.
    pub fn is_draining(&self) -> bool {
        self.stats.borrow().draining
    }

    /// Marks the engine dead: its stats stream ends, so its pool member turns unhealthy.
    pub fn die(&self) {
        self.alive.send_replace(false);
    }

    /// Counts one more waiting request, unless `capacity` are waiting already (in the channel and in the
    /// engine's own queue together). Atomic with other counter changes.
    pub fn take_waiting_place(&self, capacity: usize) -> bool {
        let taken = self.stats.send_if_modified(|s| {
            if s.waiting as usize >= capacity {
                return false;
            }
            s.waiting += 1;
            s.accepted += 1;
            true
        });
        self.update(|_| {});
        taken
    }

    /// Changes the counters and mirrors the queue gauges into the metrics.
    pub fn update(&self, f: impl FnOnce(&mut WorkerStats)) {
        self.stats.send_modify(f);
        let s = *self.stats.borrow();
        self.metrics.waiting.set(f64::from(s.waiting));
        self.metrics.running.set(f64::from(s.running));
    }
}

/// A running engine. Dropping the last handle stops the engine thread once its queue is empty.
pub struct EngineHandle {
    /// Identity of the loaded model.
    info: ModelInfo,
    /// Tokenizer and template, to check requests before they queue.
    text: Arc<TextCodec>,
    /// The bounded queue into the engine thread.
    jobs: SyncSender<Job>,
    /// Counters, metrics and drift, shared with the engine thread.
    shared: Arc<Shared>,
    /// Requests that may wait at once, in the channel and in the engine's queue together.
    queue_capacity: usize,
    /// The structured-output compiler for this model's vocabulary (an error where it cannot be built).
    grammars: Result<Arc<Grammars>, String>,
    /// The bound on compiling one constraint.
    compile_limit: Duration,
}

impl EngineHandle {
    /// Starts the engine thread for `model`.
    pub fn start(model: LoadedModel, config: EngineConfig) -> EngineHandle {
        let (jobs, queue) = sync_channel(config.queue_capacity);
        let LoadedModel { mut info, text, model } = model;
        // A sequence can grow only as far as the pool holds: the context this engine serves is the smaller.
        let pool_blocks = config.batch.kv_budget_tokens / BLOCK_TOKENS;
        let pool_tokens = (pool_blocks * BLOCK_TOKENS) as u32;
        if pool_tokens < info.context_length {
            tracing::warn!(
                context = info.context_length,
                kv_budget_tokens = config.batch.kv_budget_tokens,
                "the KV budget is smaller than the model's context; requests are limited to the budget"
            );
            info.context_length = pool_tokens;
        }
        let pool = model.kv_pool(pool_blocks, config.prefix_caching);
        let grammars = Grammars::new(&text, config.constraint_cache_entries).map(Arc::new);
        if let Err(e) = &grammars {
            tracing::warn!(error = %e, "structured output is unavailable for this model's tokenizer");
        }
        let shared = Arc::new(Shared {
            stats: watch::Sender::new(WorkerStats::default()),
            metrics: EngineMetrics::new(&info),
            drift: Mutex::new(DriftMonitor::new(config.drift_window_tokens)),
            cost: cost::meter(&config.price),
            alive: watch::Sender::new(true),
            kv_blocks: Mutex::new(pool.stats()),
            preemptions: AtomicU64::new(0),
        });
        let engine = EngineLoop {
            model,
            pool,
            text: Arc::clone(&text),
            limits: config.batch,
            shared: Arc::clone(&shared),
            test_fault_marker: config.test_fault_marker.clone(),
        };
        thread::Builder::new()
            .name("ferroserve-engine".into())
            .spawn(move || crate::supervise::supervise(engine, queue))
            .expect("spawning the engine thread");
        EngineHandle {
            info,
            text,
            jobs,
            shared,
            queue_capacity: config.queue_capacity,
            grammars,
            compile_limit: Duration::from_millis(config.constraint_compile_ms),
        }
    }

    /// Starts draining: requests that have not started are handed back with UNAVAILABLE (the router sends
    /// them elsewhere), new ones are refused the same way; running ones finish.
    pub fn start_draining(&self) {
        // An idle engine thread holds nothing to hand back; a busy one checks the flag every step. Routers
        // following the counters stop picking this worker.
        self.shared.update(|s| s.draining = true);
    }

    /// False once the engine thread has failed for good.
    pub fn is_alive(&self) -> bool {
        *self.shared.alive.borrow()
    }

    /// Freezes the recent token distribution as this version's drift baseline; returns its token count.
    pub fn snapshot_drift_baseline(&self) -> u64 {
        self.shared
            .drift
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot_baseline() as u64
    }

    /// Tokenizes and checks `request`, then queues it. Fails at once when the prompt does not fit the
    /// context or the queue is full. Runs on the caller's thread: [`Backend::generate`] calls it on the
    /// blocking pool, since rendering and tokenizing a long prompt takes milliseconds.
    pub fn submit(&self, request: ValidRequest) -> Result<EventStream, BackendError> {
        let prompt = prompt_ids(&self.text, &self.info, &request)?;
        let guide = match &request.constraint {
            None => None,
            Some(c) => Some(self.record(c.kind(), compile(self.grammars()?, c)?)),
        };
        self.enqueue(request, prompt, guide)
    }

    /// The constraint compiler, or why this model has none.
    fn grammars(&self) -> Result<&Arc<Grammars>, BackendError> {
        self.grammars.as_ref().map_err(|e| BackendError::InvalidRequest {
            field: "constraint".into(),
            message: format!("structured output is unavailable for this model's tokenizer: {e}"),
        })
    }

    /// Compiles `constraint` on the blocking pool, within the configured bound. A compile past the bound
    /// is refused; it finishes on its own thread (llguidance's fuel limits bound it) and is not cached.
    async fn guide(&self, constraint: &Constraint) -> Result<Guide, BackendError> {
        let grammars = Arc::clone(self.grammars()?);
        let kind = constraint.kind();
        let c = constraint.clone();
        let work = tokio::task::spawn_blocking(move || compile(&grammars, &c));
        match tokio::time::timeout(self.compile_limit, work).await {
            Ok(joined) => {
                let compiled =
                    joined.map_err(|e| BackendError::Internal(format!("compiling the constraint failed: {e}")))??;
                Ok(self.record(kind, compiled))
            }
            Err(_) => Err(ConstraintError::TooSlow {
                kind: kind.as_str(),
                limit_ms: self.compile_limit.as_millis() as u64,
            }
            .into()),
        }
    }

    /// Counts a compiled constraint in the metrics; returns its guide.
    fn record(&self, kind: ConstraintKind, (guide, how, took): (Guide, Compiled, Duration)) -> Guide {
        self.shared.metrics.constrained(kind, how, took);
        guide
    }

    /// Queues a tokenized request for the engine thread.
    fn enqueue(
        &self,
        request: ValidRequest,
        prompt: Vec<u32>,
        guide: Option<Guide>,
    ) -> Result<EventStream, BackendError> {
        if self.shared.is_draining() {
            return Err(BackendError::Unavailable(
                "this worker is draining; retry on another".into(),
            ));
        }
        if !self.is_alive() {
            return Err(BackendError::Unavailable(
                "the engine has stopped after repeated failures".into(),
            ));
        }
        let full = || {
            BackendError::Overloaded(format!(
                "the engine queue is full ({} requests waiting); retry later",
                self.queue_capacity
            ))
        };
        // Count it as waiting before the engine can see it, so the engine never decrements first. The
        // count covers the channel and the engine's own queue: `queue_capacity` bounds both together.
        if !self.shared.take_waiting_place(self.queue_capacity) {
            return Err(full());
        }
        // One event per generated token, plus a possible flush of held text, plus the completion: the
        // engine never blocks on a slow client, and the channel can hold no more than that.
        let (events, rx) = mpsc::channel(request.max_tokens as usize + 2);
        let prompt_len = prompt.len();
        let mut tokens = prompt;
        tokens.extend_from_slice(&request.continuation);
        let job = Job {
            request,
            tokens,
            prompt_len,
            events,
            guide,
        };
        let refused = |s: &mut WorkerStats| {
            s.waiting -= 1;
            s.accepted -= 1;
        };
        match self.jobs.try_send(job) {
            Ok(()) => Ok(ReceiverStream::new(rx).boxed()),
            Err(TrySendError::Full(_)) => {
                self.shared.update(refused);
                Err(full())
            }
            Err(TrySendError::Disconnected(_)) => {
                self.shared.update(refused);
                Err(BackendError::Unavailable("the engine has stopped".into()))
            }
        }
    }

    /// The current counters.
    pub fn stats(&self) -> WorkerStats {
        *self.shared.stats.borrow()
    }

    /// The KV pool's blocks by state, and the preemptions so far.
    pub fn kv(&self) -> KvReport {
        KvReport {
            blocks: *self.shared.kv_blocks.lock().unwrap_or_else(|e| e.into_inner()),
            preemptions: self.shared.preemptions.load(Ordering::Relaxed),
        }
    }
}

/// A guide for `constraint`, whether the cache had it, and how long it took.
fn compile(grammars: &Grammars, constraint: &Constraint) -> Result<(Guide, Compiled, Duration), BackendError> {
    let started = std::time::Instant::now();
    let (guide, how) = grammars.guide(constraint)?;
    Ok((guide, how, started.elapsed()))
}

/// `request`'s prompt tokens, checked against `info`'s context length.
fn prompt_ids(text: &TextCodec, info: &ModelInfo, request: &ValidRequest) -> Result<Vec<u32>, BackendError> {
    let prompt = text
        .prompt_ids(&request.input)
        .map_err(|e| BackendError::InvalidRequest {
            field: "messages".into(),
            message: format!("cannot render the input for this model: {e}"),
        })?;
    if prompt.is_empty() {
        return Err(BackendError::InvalidRequest {
            field: "prompt".into(),
            message: "the input encodes to zero tokens; send some text".into(),
        });
    }
    // A continuation comes from another worker's stream; an id outside the vocabulary would index past the
    // embedding table.
    let vocab = text.tokenizer.vocab_size();
    if let Some(bad) = request.continuation.iter().find(|&&id| id as usize >= vocab) {
        return Err(BackendError::InvalidRequest {
            field: "continuation".into(),
            message: format!("token id {bad} is outside the vocabulary of {vocab} tokens"),
        });
    }
    let context = info.context_length as usize;
    let wanted = prompt.len() + request.max_tokens as usize;
    if wanted > context {
        return Err(BackendError::InvalidRequest {
            field: "max_tokens".into(),
            message: format!(
                "prompt ({} tokens) plus max_tokens ({}) is {wanted} tokens, over the context length of \
                 {context} tokens for {}; shorten the prompt or lower max_tokens",
                prompt.len(),
                request.max_tokens,
                info.qualified()
            ),
        });
    }
    Ok(prompt)
}

impl Backend for EngineHandle {
    fn model(&self) -> &ModelInfo {
        &self.info
    }

    fn location(&self) -> &str {
        "in-process"
    }

    fn generate(&self, request: ValidRequest) -> BoxFuture<'_, Result<EventStream, BackendError>> {
        let (text, info) = (Arc::clone(&self.text), self.info.clone());
        Box::pin(async move {
            // Template rendering and tokenization off the async threads: a long prompt takes milliseconds.
            let (request, prompt) = tokio::task::spawn_blocking(move || {
                let prompt = prompt_ids(&text, &info, &request)?;
                Ok::<_, BackendError>((request, prompt))
            })
            .await
            .map_err(|e| BackendError::Internal(format!("tokenizing the request failed: {e}")))??;
            let guide = match &request.constraint {
                None => None,
                Some(c) => Some(self.guide(c).await?),
            };
            self.enqueue(request, prompt, guide)
        })
    }

    fn snapshot_drift_baseline(&self) -> BoxFuture<'_, Result<u64, BackendError>> {
        let tokens = EngineHandle::snapshot_drift_baseline(self);
        Box::pin(async move { Ok(tokens) })
    }

    fn drain(&self) {
        self.start_draining();
    }

    fn watch_stats(&self) -> StatsStream {
        // Ends when the engine dies, so that whoever follows it sees the worker go.
        let mut alive = self.shared.alive.subscribe();
        let dead = async move {
            let _ = alive.wait_for(|a| !*a).await;
        };
        WatchStream::new(self.shared.stats.subscribe()).take_until(dead).boxed()
    }
}
