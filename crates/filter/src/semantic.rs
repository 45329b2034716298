//! The semantic filter: sentence embeddings (all-MiniLM-L6-v2) compared by cosine similarity with
//! exemplar prompts per category, and with exemplars of harmless look-alikes.
//!
//! A text falls in a category when its best similarity to that category's exemplars reaches the
//! category's threshold and beats its best similarity to the allowed look-alikes by the margin. Embeddings
//! are computed on one thread that batches the texts of concurrent requests into one forward pass.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferroserve_model::embed::{Budget, Embedder, cosine};

use crate::config::{OnError, SemanticConfig};
use crate::normalize::normalize;
use crate::verdict::{Action, Verdict};

/// Texts one forward pass embeds at most.
const MAX_BATCH: usize = 32;
/// A text the embedding thread has not answered within this long gets the filter's `on_error` (a wedged
/// thread must not hang requests).
const EMBED_TIMEOUT: Duration = Duration::from_secs(10);
/// Texts waiting for the embedding thread before callers block on sending.
const QUEUE: usize = 256;

/// One text to embed and where its embedding goes.
struct Job {
    text: String,
    budget: Budget,
    reply: SyncSender<Result<Vec<f32>, String>>,
}

/// The process's embedding model, behind a batching thread.
pub struct EmbedService {
    tx: SyncSender<Job>,
    /// Layers of the model's encoder.
    depth: usize,
}

/// Embeds queued texts in batches until every sender is gone. A batch holds queued texts of one budget;
/// a text with another waits for the next batch. A panic inside one batch (a bug, a corrupt model, or the
/// test-only fault marker) fails that batch's texts with an error and is counted; the thread goes on
/// with the next batch.
fn batcher(embedder: Embedder, rx: Receiver<Job>, test_fault_marker: Option<String>) {
    let mut held: Option<Job> = None;
    while let Some(first) = held.take().or_else(|| rx.recv().ok()) {
        let budget = first.budget;
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) if job.budget == budget => jobs.push(job),
                Ok(job) => {
                    held = Some(job);
                    break;
                }
                Err(_) => break,
            }
        }
        let texts: Vec<&str> = jobs.iter().map(|j| j.text.as_str()).collect();
        let embedded = catch_unwind(AssertUnwindSafe(|| {
            if let Some(marker) = &test_fault_marker
                && texts.iter().any(|t| t.contains(marker.as_str()))
            {
                panic!("test fault: a text carried the embedding panic marker");
            }
            embedder.embed_with(&texts, budget).map_err(|e| e.to_string())
        }))
        .unwrap_or_else(|_| {
            tracing::error!(
                texts = texts.len(),
                "the embedding thread panicked; those texts get the filter's on_error"
            );
            metrics::counter!(ferroserve_telemetry::names::EMBEDDING_PANICS_TOTAL).increment(1);
            Err("the embedding thread panicked".to_string())
        });
        match embedded {
            Ok(vectors) => {
                for (job, v) in jobs.iter().zip(vectors) {
                    let _ = job.reply.send(Ok(v));
                }
            }
            Err(e) => {
                for job in &jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

impl EmbedService {
    /// Starts the batching thread around a loaded model. `test_fault_marker` is test-only fault
    /// injection (the chaos suite): a text containing it panics the thread.
    pub fn start(embedder: Embedder, test_fault_marker: Option<String>) -> Arc<EmbedService> {
        let (tx, rx) = sync_channel(QUEUE);
        let depth = embedder.depth();
        std::thread::Builder::new()
            .name("filter-embed".into())
            .spawn(move || batcher(embedder, rx, test_fault_marker))
            .expect("spawn the embedding thread");
        Arc::new(EmbedService { tx, depth })
    }

    /// Layers of the model's encoder.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// The embedding of one text; concurrent callers share forward passes.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, String> {
        let mut one = self.embed_many(std::slice::from_ref(&text.to_string()))?;
        one.pop()
            .ok_or_else(|| "the embedding thread gave no answer".to_string())
    }

    /// Embeddings of many texts with the whole encoder; see [`EmbedService::embed_many_with`].
    pub fn embed_many(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
        self.embed_many_with(texts, Budget::FULL)
    }

    /// Embeddings of many texts within `budget`, queued together so that the thread batches them (up to
    /// its batch size per forward pass). Blocks: call it off the async threads.
    pub fn embed_many_with(&self, texts: &[String], budget: Budget) -> Result<Vec<Vec<f32>>, String> {
        let stopped = || "the embedding thread has stopped".to_string();
        let replies = texts
            .iter()
            .map(|text| {
                let (reply, rx) = sync_channel(1);
                self.tx
                    .send(Job {
                        text: text.clone(),
                        budget,
                        reply,
                    })
                    .map_err(|_| stopped())?;
                Ok(rx)
            })
            .collect::<Result<Vec<_>, String>>()?;
        replies
            .into_iter()
            .map(|rx| match rx.recv_timeout(EMBED_TIMEOUT) {
                Ok(result) => result,
                Err(RecvTimeoutError::Timeout) => Err(format!(
                    "the embedding thread gave no answer within {} s",
                    EMBED_TIMEOUT.as_secs()
                )),
                Err(RecvTimeoutError::Disconnected) => Err(stopped()),
            })
            .collect()
    }

    /// Embeddings of many texts (exemplars at compile time).
    pub fn embed_all(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
        self.embed_many(texts)
    }
}

/// The embedding service of this process, once started (configs with a `[semantic]` section need it).
static SERVICE: OnceLock<Arc<EmbedService>> = OnceLock::new();

/// Installs the process's embedding service; later calls keep the first.
pub fn install(service: Arc<EmbedService>) -> Arc<EmbedService> {
    Arc::clone(SERVICE.get_or_init(|| service))
}

/// The installed embedding service, if any.
pub fn service() -> Option<Arc<EmbedService>> {
    SERVICE.get().cloned()
}

/// One category, with its exemplars embedded.
struct Category {
    name: String,
    action: Action,
    threshold: f32,
    exemplars: Vec<Vec<f32>>,
}

/// The compiled semantic filter.
pub struct SemanticFilter {
    service: Arc<EmbedService>,
    categories: Vec<Category>,
    allow: Vec<Vec<f32>>,
    margin: f32,
    /// What a text that cannot be embedded gets.
    on_error: OnError,
    /// Texts that could not be embedded.
    failures: AtomicU64,
}

fn best(v: &[f32], set: &[Vec<f32>]) -> f32 {
    set.iter().map(|e| cosine(v, e)).fold(f32::MIN, f32::max)
}

impl SemanticFilter {
    /// Embeds every exemplar of `config` once.
    pub fn compile(config: &SemanticConfig, service: Arc<EmbedService>) -> Result<SemanticFilter, String> {
        let mut categories = Vec::new();
        for c in &config.categories {
            if c.exemplars.is_empty() {
                return Err(format!("semantic category `{}` has no exemplars", c.name));
            }
            let threshold = c.threshold.unwrap_or(config.threshold);
            if !(0.0..=1.0).contains(&threshold) {
                return Err(format!("semantic category `{}`: threshold must be in [0, 1]", c.name));
            }
            categories.push(Category {
                name: c.name.clone(),
                action: c.action,
                threshold,
                exemplars: service.embed_all(&c.exemplars)?,
            });
        }
        let allow = service.embed_all(&config.allow)?;
        Ok(SemanticFilter {
            service,
            categories,
            allow,
            margin: config.margin,
            on_error: config.on_error,
            failures: AtomicU64::new(0),
        })
    }

    /// Texts that could not be embedded, and what they got.
    pub fn failures(&self) -> (u64, OnError) {
        (self.failures.load(Ordering::Relaxed), self.on_error)
    }

    /// Judges a text. One that cannot be embedded gets `on_error` (the rules still judged it), counted.
    pub fn check(&self, text: &str) -> Verdict {
        let v = match self.service.embed(&normalize(text)) {
            Ok(v) => v,
            Err(e) => return embedding_failed("semantic", self.on_error, &self.failures, &e),
        };
        let allow = if self.allow.is_empty() {
            f32::MIN
        } else {
            best(&v, &self.allow)
        };
        let mut verdict = Verdict::allow();
        let mut top = f32::MIN;
        for c in &self.categories {
            let score = best(&v, &c.exemplars);
            if score >= c.threshold && score - allow >= self.margin && (c.action > verdict.action || score > top) {
                if c.action < verdict.action {
                    continue;
                }
                top = score;
                verdict = Verdict {
                    action: c.action,
                    category: Some(c.name.clone()),
                    evidence: format!("semantic: {} similarity {score:.2} (look-alikes {allow:.2})", c.name),
                };
            }
        }
        verdict
    }
}

/// The verdict for a text that could not be embedded: `on_error`'s, counted and logged. `part` names the
/// filter part (`semantic`, `classifier`) in the metric and the log.
pub(crate) fn embedding_failed(part: &'static str, on_error: OnError, failures: &AtomicU64, e: &str) -> Verdict {
    failures.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(
        ferroserve_telemetry::names::FILTER_FAILURES_TOTAL,
        ferroserve_telemetry::names::LABEL_STAGE => part,
        ferroserve_telemetry::names::LABEL_ACTION => on_error.label()
    )
    .increment(1);
    tracing::error!(error = %e, part, on_error = on_error.label(), "filter could not embed a text");
    match on_error {
        OnError::Allow => Verdict::allow(),
        OnError::Block => Verdict {
            action: Action::Block,
            category: Some("filter_unavailable".into()),
            evidence: format!("{part}: the text could not be embedded ({e})"),
        },
    }
}
