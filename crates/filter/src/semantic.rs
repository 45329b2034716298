//! The semantic filter: sentence embeddings (all-MiniLM-L6-v2) compared by cosine similarity with
//! exemplar prompts per category, and with exemplars of harmless look-alikes.
//!
//! A text falls in a category when its best similarity to that category's exemplars reaches the
//! category's threshold and beats its best similarity to the allowed look-alikes by the margin. Embeddings
//! are computed on one thread that batches the texts of concurrent requests into one forward pass.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, OnceLock};

use ferroserve_model::embed::{Embedder, cosine};

use crate::config::SemanticConfig;
use crate::normalize::normalize;
use crate::verdict::{Action, Verdict};

/// Texts one forward pass embeds at most.
const MAX_BATCH: usize = 32;
/// Texts waiting for the embedding thread before callers block on sending.
const QUEUE: usize = 256;

/// One text to embed and where its embedding goes.
struct Job {
    text: String,
    reply: SyncSender<Result<Vec<f32>, String>>,
}

/// The process's embedding model, behind a batching thread.
pub struct EmbedService {
    tx: SyncSender<Job>,
}

fn batcher(embedder: Embedder, rx: Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let texts: Vec<&str> = jobs.iter().map(|j| j.text.as_str()).collect();
        match embedder.embed(&texts) {
            Ok(vectors) => {
                for (job, v) in jobs.iter().zip(vectors) {
                    let _ = job.reply.send(Ok(v));
                }
            }
            Err(e) => {
                for job in &jobs {
                    let _ = job.reply.send(Err(e.to_string()));
                }
            }
        }
    }
}

impl EmbedService {
    /// Starts the batching thread around a loaded model.
    pub fn start(embedder: Embedder) -> Arc<EmbedService> {
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("filter-embed".into())
            .spawn(move || batcher(embedder, rx))
            .expect("spawn the embedding thread");
        Arc::new(EmbedService { tx })
    }

    /// The embedding of one text; concurrent callers share forward passes.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, String> {
        let (reply, rx) = sync_channel(1);
        self.tx
            .send(Job {
                text: text.to_string(),
                reply,
            })
            .map_err(|_| "the embedding thread has stopped".to_string())?;
        rx.recv().map_err(|_| "the embedding thread has stopped".to_string())?
    }

    /// Embeddings of many texts (exemplars at compile time).
    pub fn embed_all(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
        texts.iter().map(|t| self.embed(t)).collect()
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
        })
    }

    /// Judges a text; an embedding failure allows it (and is logged), since the rules still run.
    pub fn check(&self, text: &str) -> Verdict {
        let v = match self.service.embed(&normalize(text)) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "semantic filter could not embed a text; allowing it");
                return Verdict::allow();
            }
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
