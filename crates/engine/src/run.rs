//! The engine thread: one sequence at a time, prefill then decode, until a stop condition or the client
//! leaves. Continuous batching replaces this loop; the contract (jobs in, events out) stays.

use std::sync::mpsc::Receiver;
use std::time::{Instant, SystemTime};

use ferroserve_core::{
    BackendError, Completion, Event, FinishReason, Timings, TokenChunk, Usage, ValidRequest, WorkerStats,
};
use ferroserve_model::ModelError;
use ferroserve_model::TextCodec;
use ferroserve_model::detok::IncrementalDecoder;
use ferroserve_model::llama::Llama;
use ferroserve_telemetry::names;
use tokio::sync::{mpsc, watch};

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

/// Runs jobs until every handle is gone.
pub(crate) fn run_engine(
    mut llama: Llama,
    text: &TextCodec,
    context_length: usize,
    queue: &Receiver<Job>,
    stats: &watch::Sender<WorkerStats>,
) {
    while let Ok(job) = queue.recv() {
        stats.send_modify(|s| {
            s.waiting -= 1;
            s.running += 1;
        });
        metrics::gauge!(names::RUNNING_REQUESTS).set(1.0);
        let id = job.request.request_id.clone();
        let outcome = match generate(&mut llama, text, context_length, &job) {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::error!(request_id = %id, error = %e, "generation failed");
                let _ = job.events.try_send(Err(BackendError::Internal(e.to_string())));
                Outcome::Failed
            }
        };
        llama.clear();
        metrics::gauge!(names::RUNNING_REQUESTS).set(0.0);
        stats.send_modify(|s| {
            s.running -= 1;
            match outcome {
                Outcome::Completed(n) => {
                    s.completed += 1;
                    s.generated_tokens += u64::from(n);
                }
                Outcome::Cancelled(n) => {
                    s.cancelled += 1;
                    s.generated_tokens += u64::from(n);
                }
                Outcome::Failed => {}
            }
        });
    }
    tracing::debug!("engine thread exiting: all handles dropped");
}

fn ms_since(t: SystemTime) -> f64 {
    t.elapsed().map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

fn generate(llama: &mut Llama, text: &TextCodec, context_length: usize, job: &Job) -> Result<Outcome, ModelError> {
    let Job {
        request,
        prompt,
        events,
    } = job;
    let queue_ms = ms_since(request.arrived);
    metrics::histogram!(names::QUEUE_DURATION_SECONDS).record(queue_ms / 1e3);
    if events.is_closed() {
        metrics::counter!(names::CANCELLED_REQUESTS_TOTAL).increment(1);
        return Ok(Outcome::Cancelled(0));
    }
    let started = Instant::now();
    let mut sampler = Sampler::new(request.sampling, prompt);
    let mut stops = StopMatcher::new(&request.stop);
    let mut detok = IncrementalDecoder::default();
    let mut ttft_ms = 0.0;
    let mut generated: u32 = 0;
    let mut logits = llama.forward(prompt, 0)?;
    let finish = loop {
        let pick = sampler.sample(&mut logits);
        if generated == 0 {
            ttft_ms = ms_since(request.arrived);
        }
        if text.tokenizer.is_stop(pick.token) {
            break FinishReason::Eos;
        }
        generated += 1;
        let piece = detok.push(&text.tokenizer, pick.token)?;
        let check = stops.push(&piece);
        let chunk = TokenChunk {
            text: check.release,
            token_ids: vec![pick.token],
            logprobs: vec![pick.logprob],
        };
        if events.try_send(Ok(Event::Token(chunk))).is_err() {
            tracing::info!(request_id = %request.request_id, generated, "client gone; generation cancelled");
            metrics::counter!(names::CANCELLED_REQUESTS_TOTAL).increment(1);
            return Ok(Outcome::Cancelled(generated));
        }
        if check.stopped {
            break FinishReason::Stop;
        }
        let position = prompt.len() + generated as usize;
        if generated >= request.max_tokens || position >= context_length {
            break FinishReason::Length;
        }
        logits = llama.forward(&[pick.token], position - 1)?;
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
    metrics::counter!(names::PROMPT_TOKENS_TOTAL).increment(prompt.len() as u64);
    metrics::counter!(names::GENERATION_TOKENS_TOTAL).increment(u64::from(generated));
    tracing::debug!(
        request_id = %request.request_id,
        generated,
        finish = finish.as_str(),
        decode_s = started.elapsed().as_secs_f64(),
        "request complete"
    );
    let _ = events.try_send(Ok(Event::Complete(completion)));
    Ok(Outcome::Completed(generated))
}
