//! The engine's front door: checks requests on the caller's task and queues them for the engine thread.

use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::thread;

use ferroserve_core::{Backend, BackendError, EventStream, ModelInfo, StatsStream, ValidRequest, WorkerStats};
use ferroserve_model::LoadedModel;
use ferroserve_model::TextCodec;
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, WatchStream};

use crate::run::{Job, run_engine};

/// Engine settings from the `[engine]` config section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Requests that may wait for the engine; more are refused as overloaded.
    pub queue_capacity: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { queue_capacity: 64 }
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
    /// Counters, shared with the engine thread which updates most of them.
    stats: Arc<watch::Sender<WorkerStats>>,
}

impl EngineHandle {
    /// Starts the engine thread for `model`.
    pub fn start(model: LoadedModel, config: EngineConfig) -> EngineHandle {
        let (jobs, queue) = sync_channel(config.queue_capacity);
        let stats = Arc::new(watch::Sender::new(WorkerStats::default()));
        let LoadedModel { info, text, llama } = model;
        let engine_stats = Arc::clone(&stats);
        let engine_text = Arc::clone(&text);
        let context_length = info.context_length as usize;
        thread::Builder::new()
            .name("ferroserve-engine".into())
            .spawn(move || run_engine(llama, &engine_text, context_length, &queue, &engine_stats))
            .expect("spawning the engine thread");
        EngineHandle {
            info,
            text,
            jobs,
            stats,
        }
    }

    /// Tokenizes and checks `request`, then queues it. Fails at once when the prompt does not fit the
    /// context or the queue is full.
    pub fn submit(&self, request: ValidRequest) -> Result<EventStream, BackendError> {
        let prompt = self
            .text
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
        let context = self.info.context_length as usize;
        let wanted = prompt.len() + request.max_tokens as usize;
        if wanted > context {
            return Err(BackendError::InvalidRequest {
                field: "max_tokens".into(),
                message: format!(
                    "prompt ({} tokens) plus max_tokens ({}) is {wanted} tokens, over the context length of \
                     {context} tokens for {}; shorten the prompt or lower max_tokens",
                    prompt.len(),
                    request.max_tokens,
                    self.info.qualified()
                ),
            });
        }
        // One event per generated token, plus a possible flush of held text, plus the completion: the
        // engine never blocks on a slow client, and the channel can hold no more than that.
        let (events, rx) = mpsc::channel(request.max_tokens as usize + 2);
        let job = Job {
            request,
            prompt,
            events,
        };
        // Count it as waiting before the engine can see it, so the engine never decrements first.
        self.stats.send_modify(|s| {
            s.waiting += 1;
            s.accepted += 1;
        });
        let refused = |s: &mut WorkerStats| {
            s.waiting -= 1;
            s.accepted -= 1;
        };
        match self.jobs.try_send(job) {
            Ok(()) => Ok(ReceiverStream::new(rx).boxed()),
            Err(TrySendError::Full(_)) => {
                self.stats.send_modify(refused);
                Err(BackendError::Overloaded(format!(
                    "the engine queue is full ({} requests waiting); retry later",
                    self.stats.borrow().waiting
                )))
            }
            Err(TrySendError::Disconnected(_)) => {
                self.stats.send_modify(refused);
                Err(BackendError::Unavailable("the engine has stopped".into()))
            }
        }
    }

    /// The current counters.
    pub fn stats(&self) -> WorkerStats {
        *self.stats.borrow()
    }
}

impl Backend for EngineHandle {
    fn model(&self) -> &ModelInfo {
        &self.info
    }

    fn location(&self) -> &str {
        "in-process"
    }

    fn generate(&self, request: ValidRequest) -> BoxFuture<'_, Result<EventStream, BackendError>> {
        let submitted = self.submit(request);
        Box::pin(async move { submitted })
    }

    fn watch_stats(&self) -> StatsStream {
        WatchStream::new(self.stats.subscribe()).boxed()
    }
}
