//! The engine thread: one sequence at a time, prefill then decode, until a stop condition or the client
//! leaves. Continuous batching replaces this loop; the contract (jobs in, events out) stays.

use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Instant, SystemTime};

use ferroserve_core::{
    BackendError, Completion, Event, FinishReason, Timings, TokenChunk, Usage, ValidRequest, WorkerStats,
};
use ferroserve_model::detok::IncrementalDecoder;
use ferroserve_model::llama::Llama;
use ferroserve_model::{ModelError, TextCodec};
use tokio::sync::mpsc;

use crate::handle::Shared;
use crate::sampler::Sampler;
use crate::stop::StopMatcher;

/// One queued request.
pub(crate) struct Job {
    /// The validated request.
    pub request: ValidRequest,
    /// Its prompt, already tokenized and checked against the context length.
    pub prompt: Vec<u32>,
    /// Where its events go. Closed means the client left.
    pub events: mpsc::Sender<Result<Event, BackendError>>,
}

/// How a job ended, for the counters.
enum Outcome {
    Completed(u32),
    Cancelled(u32),
    Failed,
}

/// Everything the engine thread owns.
pub(crate) struct EngineLoop {
    /// The model and its KV cache.
    pub llama: Llama,
    /// Tokenizer, for detokenizing and spotting end-of-sequence.
    pub text: Arc<TextCodec>,
    /// The model's context length, the KV budget of the one sequence.
    pub context_length: usize,
    /// Counters, metrics, drift and cost, shared with the handle.
    pub shared: Arc<Shared>,
}

fn ms_since(t: SystemTime) -> f64 {
    t.elapsed().map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

impl EngineLoop {
    /// Runs jobs until every handle is gone.
    pub fn run(mut self, queue: &Receiver<Job>) {
        while let Ok(job) = queue.recv() {
            self.shared.update(|s| {
                s.waiting -= 1;
                s.running += 1;
            });
            let busy = Instant::now();
            let outcome = match self.generate(&job) {
                Ok(outcome) => outcome,
                Err(e) => {
                    tracing::error!(request_id = %job.request.request_id, error = %e, "generation failed");
                    let _ = job.events.try_send(Err(BackendError::Internal(e.to_string())));
                    Outcome::Failed
                }
            };
            self.llama.clear();
            self.shared.metrics.kv_usage.set(0.0);
            let tokens = match outcome {
                Outcome::Completed(n) | Outcome::Cancelled(n) => n,
                Outcome::Failed => 0,
            };
            self.shared.cost.charge(busy.elapsed().as_secs_f64(), u64::from(tokens));
            self.shared.update(|s: &mut WorkerStats| {
                s.running -= 1;
                s.generated_tokens += u64::from(tokens);
                match outcome {
                    Outcome::Completed(_) => s.completed += 1,
                    Outcome::Cancelled(_) => s.cancelled += 1,
                    Outcome::Failed => {}
                }
            });
        }
        tracing::debug!("engine thread exiting: all handles dropped");
    }

    fn generate(&mut self, job: &Job) -> Result<Outcome, ModelError> {
        let Job {
            request,
            prompt,
            events,
        } = job;
        let m = &self.shared.metrics;
        let queue_ms = ms_since(request.arrived);
        m.queue_duration.record(queue_ms / 1e3);
        if events.is_closed() {
            m.cancelled.increment(1);
            m.finished(FinishReason::Cancelled);
            return Ok(Outcome::Cancelled(0));
        }
        let mut sampler = Sampler::new(request.sampling, prompt);
        let mut stops = StopMatcher::new(&request.stop);
        let mut detok = IncrementalDecoder::default();
        let mut ttft_ms = 0.0;
        let mut generated: u32 = 0;
        let mut logits = self.llama.forward(prompt, 0)?;
        m.batch_tokens.record(prompt.len() as f64);
        let finish = loop {
            let pick = sampler.sample(&mut logits);
            m.token_logprob.record(f64::from(pick.logprob));
            m.token_entropy.record(f64::from(pick.entropy));
            self.shared
                .drift
                .lock()
                .expect("drift lock")
                .observe(f64::from(pick.logprob), f64::from(pick.entropy));
            if generated == 0 {
                ttft_ms = ms_since(request.arrived);
            }
            if !request.sampling.ignore_eos && self.text.tokenizer.is_stop(pick.token) {
                break FinishReason::Eos;
            }
            generated += 1;
            let piece = detok.push(&self.text.tokenizer, pick.token)?;
            let check = stops.push(&piece);
            let chunk = TokenChunk {
                text: check.release,
                token_ids: vec![pick.token],
                logprobs: vec![pick.logprob],
            };
            if events.try_send(Ok(Event::Token(chunk))).is_err() {
                tracing::info!(request_id = %request.request_id, generated, "client gone; generation cancelled");
                m.cancelled.increment(1);
                m.finished(FinishReason::Cancelled);
                m.generation_tokens_total.increment(u64::from(generated));
                return Ok(Outcome::Cancelled(generated));
            }
            if check.stopped {
                break FinishReason::Stop;
            }
            let position = prompt.len() + generated as usize;
            m.kv_usage.set(position as f64 / self.context_length as f64);
            if generated >= request.max_tokens || position >= self.context_length {
                break FinishReason::Length;
            }
            logits = self.llama.forward(&[pick.token], position - 1)?;
            m.batch_tokens.record(1.0);
        };
        let tail = stops.finish();
        if !tail.is_empty() {
            let _ = events.try_send(Ok(Event::Token(TokenChunk {
                text: tail,
                ..TokenChunk::default()
            })));
        }
        let completion = Completion {
            finish,
            usage: Usage {
                prompt_tokens: prompt.len() as u32,
                completion_tokens: generated,
            },
            timings: Timings {
                queue_ms,
                time_to_first_token_ms: ttft_ms,
                total_ms: ms_since(request.arrived),
            },
        };
        m.prompt_tokens_total.increment(prompt.len() as u64);
        m.generation_tokens_total.increment(u64::from(generated));
        m.request_prompt_tokens.record(prompt.len() as f64);
        m.request_generation_tokens.record(f64::from(generated));
        m.finished(finish);
        self.publish_drift();
        tracing::debug!(request_id = %request.request_id, generated, finish = finish.as_str(), "request complete");
        let _ = events.try_send(Ok(Event::Complete(completion)));
        Ok(Outcome::Completed(generated))
    }

    /// Updates the drift gauge; once per request is often enough for a windowed score.
    fn publish_drift(&self) {
        let score = self.shared.drift.lock().expect("drift lock").score();
        self.shared.metrics.drift_score.set(score);
    }
}
