//! The engine thread: continuous batching. Each step admits waiting requests that fit
//! ([`schedule::admits`]), runs one forward over the planned tokens of every running sequence
//! ([`schedule::plan`]: decode tokens first, then prefill chunks), samples for the sequences whose prompt
//! is complete, and lets finished sequences leave, which frees their KV cache at once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Instant, SystemTime};

use ferroserve_core::{
    Alternative, BackendError, Completion, Event, FinishReason, MAX_TOP_LOGPROBS, Timings, TokenChunk, TokenDetail,
    Usage, ValidRequest, WorkerStats,
};
use ferroserve_model::batched::{BatchedLlama, Chunk, SeqCache};
use ferroserve_model::detok::IncrementalDecoder;
use ferroserve_model::{ModelError, TextCodec};
use tokio::sync::mpsc;

use crate::handle::Shared;
use crate::sampler::Sampler;
use crate::schedule::{self, BatchLimits, SeqView, Take};
use crate::stop::StopMatcher;

/// One queued request.
pub(crate) struct Job {
    /// The validated request.
    pub request: ValidRequest,
    /// Its prompt, already tokenized and checked against the context length, followed by its
    /// continuation (tokens a failed worker already generated), which is prefilled with it.
    pub prompt: Vec<u32>,
    /// Tokens of `prompt` that are the prompt proper (usage counts these as prompt tokens).
    pub prompt_len: usize,
    /// Where its events go. Closed means the client left.
    pub events: mpsc::Sender<Result<Event, BackendError>>,
}

impl Job {
    /// Tokens already generated elsewhere.
    fn resumed(&self) -> usize {
        self.prompt.len() - self.prompt_len
    }

    /// Whether the request's text contains the test fault marker.
    fn has_marker(&self, marker: &str) -> bool {
        match &self.request.input {
            ferroserve_core::Input::Prompt(t) => t.contains(marker),
            ferroserve_core::Input::Chat(m) => m.iter().any(|m| m.content.contains(marker)),
        }
    }
}

/// The requests the engine holds: waiting for a place in the batch, and running. They live outside the
/// loop so that after a panic the supervisor can tell each of them what happened.
#[derive(Default)]
pub(crate) struct Queues {
    /// Accepted, not yet in the batch, in admission order.
    waiting: VecDeque<Job>,
    /// In the batch.
    running: Vec<Seq>,
}

impl Queues {
    /// Ends every request held with `error` (UNAVAILABLE: another worker may take it) and takes them out
    /// of the counters. Returns how many there were.
    pub fn fail_all(&mut self, shared: &Shared, error: &BackendError) -> usize {
        let (waiting, running) = (self.waiting.len(), self.running.len());
        for job in self.waiting.drain(..) {
            let _ = job.events.try_send(Err(error.clone()));
        }
        for seq in self.running.drain(..) {
            let _ = seq.job.events.try_send(Err(error.clone()));
        }
        shared.update(|s| {
            s.waiting -= waiting as u32;
            s.running -= running as u32;
        });
        waiting + running
    }
}

/// How a sequence ended, for the counters. A completion is told to the client only once the sequence
/// has left the batch and its KV blocks are back (so that what the client sees next, the metrics
/// included, already counts them as free).
#[derive(Debug, Clone)]
enum Outcome {
    Completed(u32, Box<Completion>),
    Cancelled(u32),
    Failed,
}

/// A sequence in the running batch.
struct Seq {
    /// The request and its channel.
    job: Job,
    /// Its own KV cache, freed when the sequence leaves.
    cache: SeqCache,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// The token to feed on its next decode step.
    next: [u32; 1],
    /// Per-request sampler, seeded: the same seed gives the same text whatever else is in the batch.
    sampler: Sampler,
    /// Stop strings over the streamed text.
    stops: StopMatcher,
    /// Token ids to text, one whole character at a time.
    detok: IncrementalDecoder,
    /// Tokens generated so far, the continuation's included (usage counts them all).
    generated: u32,
    /// Of those, the continuation's: generated elsewhere, so not counted again in this worker's totals.
    resumed: u32,
    /// Arrival to admission.
    queue_ms: f64,
    /// Arrival to first token.
    ttft_ms: f64,
}

impl Seq {
    /// Brings the decoder, the stop matcher and the sampler to where the failed worker left them, from
    /// the continuation alone: each is deterministic in the tokens it saw. The text it would release was
    /// streamed already, so it is dropped; a partial stop string stays held, as it was there.
    ///
    /// Returns how the request ends already, if it does: the continuation may hold its last token or
    /// complete a stop string (the worker failed before it sent the completion). An end-of-sequence token
    /// is never streamed, so it cannot be in a continuation.
    fn resume(&mut self, text: &TextCodec) -> Result<Option<FinishReason>, ModelError> {
        let continuation = self.job.prompt[self.job.prompt_len..].to_vec();
        for id in continuation {
            let piece = self.detok.push(&text.tokenizer, id)?;
            self.sampler.skip_draw(id);
            if self.stops.push(&piece).stopped {
                return Ok(Some(FinishReason::Stop));
            }
        }
        Ok((self.generated >= self.job.request.max_tokens).then_some(FinishReason::Length))
    }

    fn view(&self) -> SeqView {
        SeqView {
            prompt: self.job.prompt.len(),
            prefilled: self.prefilled,
            reserved: self.cache.capacity(),
        }
    }
}

/// Everything the engine thread owns.
pub(crate) struct EngineLoop {
    /// The model weights, shared by every sequence.
    pub model: Arc<BatchedLlama>,
    /// Tokenizer, for detokenizing and spotting end-of-sequence.
    pub text: Arc<TextCodec>,
    /// Batch size, step size and KV budget.
    pub limits: BatchLimits,
    /// Counters, metrics, drift and cost, shared with the handle.
    pub shared: Arc<Shared>,
    /// Test-only fault injection: the engine panics when it admits a request whose text contains this
    /// marker (the chaos suite's engine-thread panic). `None` in every real deployment.
    pub test_fault_marker: Option<String>,
}

fn ms_since(t: SystemTime) -> f64 {
    t.elapsed().map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Puts a job in the waiting queue by priority, behind every job of the same or a higher one.
fn enqueue(waiting: &mut VecDeque<Job>, job: Job) {
    let at = schedule::queue_position(waiting.iter().map(|j| j.request.priority), job.request.priority);
    waiting.insert(at, job);
}

impl EngineLoop {
    /// Runs until every handle is gone and the queue and the batch are empty.
    pub fn run(&mut self, queue: &Receiver<Job>, q: &mut Queues) {
        loop {
            if q.running.is_empty() && q.waiting.is_empty() {
                match queue.recv() {
                    Ok(job) => enqueue(&mut q.waiting, job),
                    Err(_) => break,
                }
            }
            while let Ok(job) = queue.try_recv() {
                enqueue(&mut q.waiting, job);
            }
            if self.shared.is_draining() && !q.waiting.is_empty() {
                // Draining: what has not started goes back to the router, which sends it elsewhere.
                let mut not_started = Queues {
                    waiting: std::mem::take(&mut q.waiting),
                    running: Vec::new(),
                };
                not_started.fail_all(
                    &self.shared,
                    &BackendError::Unavailable("this worker is draining; the request had not started".into()),
                );
            }
            self.admit(&mut q.waiting, &mut q.running);
            if !q.running.is_empty() {
                self.step(&mut q.running);
            }
        }
        tracing::debug!("engine thread exiting: all handles dropped");
    }

    /// Moves waiting requests into the batch while they fit, in queue order (priority, then arrival).
    fn admit(&mut self, waiting: &mut VecDeque<Job>, running: &mut Vec<Seq>) {
        let m = &self.shared.metrics;
        while let Some(job) = waiting.front() {
            if job.events.is_closed() {
                waiting.pop_front();
                m.cancelled.increment(1);
                m.finished(FinishReason::Cancelled);
                self.shared.update(|s| {
                    s.waiting -= 1;
                    s.cancelled += 1;
                });
                continue;
            }
            // The KV cache holds the prompt, the continuation, and what is left to generate.
            let need = job.prompt_len + job.request.max_tokens as usize;
            let views: Vec<SeqView> = running.iter().map(Seq::view).collect();
            if !schedule::admits(&self.limits, &views, need) {
                break;
            }
            if let Some(marker) = &self.test_fault_marker
                && job.has_marker(marker)
            {
                // Test-only: the chaos suite's engine-thread panic. The job is still queued, so the
                // supervisor answers it with the rest.
                panic!("test fault: a request carried the engine panic marker");
            }
            let job = waiting.pop_front().expect("front exists");
            self.shared.update(|s| {
                s.waiting -= 1;
                s.running += 1;
            });
            let queue_ms = ms_since(job.request.arrived);
            m.queue_duration.record(queue_ms / 1e3);
            let resumed = job.resumed();
            match self.model.new_cache(need) {
                Ok(cache) => {
                    let mut seq = Seq {
                        sampler: Sampler::new(job.request.sampling, &job.prompt),
                        stops: StopMatcher::new(&job.request.stop),
                        detok: IncrementalDecoder::default(),
                        job,
                        cache,
                        prefilled: 0,
                        next: [0],
                        generated: resumed as u32,
                        resumed: resumed as u32,
                        queue_ms,
                        ttft_ms: 0.0,
                    };
                    match seq.resume(&self.text) {
                        Err(e) => {
                            self.fail(&seq.job, &e);
                            self.shared.update(|s| s.running -= 1);
                        }
                        Ok(Some(finish)) => {
                            // It ended on the worker that failed, before the completion went out. It never
                            // joined the batch: its cache goes before the completion is sent.
                            let outcome = self.complete(&mut seq, finish);
                            let Seq { job, .. } = seq;
                            self.shared.update(|s| {
                                s.running -= 1;
                                s.completed += 1;
                            });
                            if let Outcome::Completed(_, completion) = outcome {
                                let _ = job.events.try_send(Ok(Event::Complete(*completion)));
                            }
                        }
                        Ok(None) => running.push(seq),
                    }
                }
                Err(e) => {
                    self.fail(&job, &e);
                    self.shared.update(|s| s.running -= 1);
                }
            }
        }
        self.publish_kv(running);
    }

    /// One forward over the planned tokens, then sampling and streaming for each sequence.
    fn step(&mut self, running: &mut Vec<Seq>) {
        // A client that left frees its place before the step, not after.
        let mut ended: Vec<(usize, Outcome)> = Vec::new();
        for (i, seq) in running.iter().enumerate() {
            if seq.job.events.is_closed() {
                self.shared.metrics.cancelled.increment(1);
                self.shared.metrics.finished(FinishReason::Cancelled);
                ended.push((i, Outcome::Cancelled(seq.generated)));
            }
        }
        self.retire(running, ended);
        if running.is_empty() {
            return;
        }
        let views: Vec<SeqView> = running.iter().map(Seq::view).collect();
        let mut takes: Vec<Option<Take>> = vec![None; running.len()];
        for (i, take) in schedule::plan(&self.limits, &views) {
            takes[i] = Some(take);
        }
        let started = Instant::now();
        let mut order = Vec::with_capacity(running.len());
        let mut chunks: Vec<Chunk<'_>> = Vec::with_capacity(running.len());
        for (i, (seq, take)) in running.iter_mut().zip(&takes).enumerate() {
            let tokens: &[u32] = match take {
                None => continue,
                Some(Take::Decode) => &seq.next,
                Some(Take::Prefill(r)) => &seq.job.prompt[r.clone()],
            };
            order.push(i);
            chunks.push(Chunk {
                cache: &mut seq.cache,
                tokens,
            });
        }
        let step_tokens: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let result = self.model.forward(&mut chunks);
        drop(chunks);
        self.shared.metrics.batch_tokens.record(step_tokens as f64);
        let mut ended = Vec::new();
        let mut produced = 0u64;
        match result {
            Err(e) => {
                tracing::error!(error = %e, sequences = order.len(), "batch step failed");
                for &i in &order {
                    self.fail(&running[i].job, &e);
                    ended.push((i, Outcome::Failed));
                }
            }
            Ok(all) => {
                for (&i, mut logits) in order.iter().zip(all) {
                    let seq = &mut running[i];
                    if let Some(Take::Prefill(r)) = &takes[i] {
                        seq.prefilled = r.end;
                        if seq.prefilled < seq.job.prompt.len() {
                            continue;
                        }
                    }
                    produced += 1;
                    match self.advance(seq, &mut logits) {
                        Ok(None) => {}
                        Ok(Some(outcome)) => ended.push((i, outcome)),
                        Err(e) => {
                            self.fail(&seq.job, &e);
                            ended.push((i, Outcome::Failed));
                        }
                    }
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        self.shared.cost.charge(elapsed, produced);
        let prefills = takes.iter().filter(|t| matches!(t, Some(Take::Prefill(_)))).count();
        let phase = match (prefills, order.len() - prefills) {
            (_, 0) => 0,
            (0, _) => 1,
            _ => 2,
        };
        self.shared.metrics.step_seconds[phase].record(elapsed);
        self.retire(running, ended);
    }

    /// A generated token's text and its alternatives, for a request that asked for logprobs.
    fn detail(&self, token: u32, top: Vec<(u32, f32)>) -> TokenDetail {
        let piece = |t: u32| {
            self.text
                .tokenizer
                .decode(&[t])
                .map(String::into_bytes)
                .unwrap_or_default()
        };
        TokenDetail {
            piece: piece(token),
            top: top
                .into_iter()
                .map(|(t, logprob)| Alternative {
                    token: t,
                    piece: piece(t),
                    logprob,
                })
                .collect(),
        }
    }

    /// Samples the next token of `seq` and streams it; `Some` when the sequence has ended.
    fn advance(&self, seq: &mut Seq, logits: &mut [f32]) -> Result<Option<Outcome>, ModelError> {
        let m = &self.shared.metrics;
        let request = &seq.job.request;
        // The alternatives come from the logits as the model gave them, before the sampler rewrites them.
        let top = request
            .top_logprobs
            .map(|k| crate::sampler::top_logprobs(logits, k.min(MAX_TOP_LOGPROBS) as usize));
        let pick = seq.sampler.sample(logits);
        m.token_logprob.record(f64::from(pick.logprob));
        m.token_entropy.record(f64::from(pick.entropy));
        self.shared
            .drift
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(f64::from(pick.logprob), f64::from(pick.entropy));
        if seq.generated == 0 {
            seq.ttft_ms = ms_since(request.arrived);
        }
        if !request.sampling.ignore_eos && self.text.tokenizer.is_stop(pick.token) {
            return Ok(Some(self.complete(seq, FinishReason::Eos)));
        }
        seq.generated += 1;
        let piece = seq.detok.push(&self.text.tokenizer, pick.token)?;
        let check = seq.stops.push(&piece);
        let chunk = TokenChunk {
            text: check.release,
            token_ids: vec![pick.token],
            logprobs: vec![pick.logprob],
            entropies: vec![pick.entropy],
            details: top.map_or_else(Vec::new, |top| vec![self.detail(pick.token, top)]),
        };
        if seq.job.events.try_send(Ok(Event::Token(chunk))).is_err() {
            tracing::info!(request_id = %request.request_id, generated = seq.generated, "client gone; generation cancelled");
            m.cancelled.increment(1);
            m.finished(FinishReason::Cancelled);
            m.generation_tokens_total
                .increment(u64::from(seq.generated - seq.resumed));
            return Ok(Some(Outcome::Cancelled(seq.generated - seq.resumed)));
        }
        if check.stopped {
            return Ok(Some(self.complete(seq, FinishReason::Stop)));
        }
        if seq.generated >= request.max_tokens || seq.cache.len() + 1 > seq.cache.capacity() {
            return Ok(Some(self.complete(seq, FinishReason::Length)));
        }
        seq.next = [pick.token];
        Ok(None)
    }

    /// Flushes held text and returns the completion, for the caller to send once the sequence is freed.
    #[must_use = "the completion is sent by whoever frees the sequence"]
    fn complete(&self, seq: &mut Seq, finish: FinishReason) -> Outcome {
        let m = &self.shared.metrics;
        let Job { request, events, .. } = &seq.job;
        let tail = seq.stops.finish();
        if !tail.is_empty() {
            let _ = events.try_send(Ok(Event::Token(TokenChunk {
                text: tail,
                ..TokenChunk::default()
            })));
        }
        let prompt_tokens = seq.job.prompt_len as u32;
        let completion = Completion {
            finish,
            usage: Usage {
                prompt_tokens,
                completion_tokens: seq.generated,
            },
            timings: Timings {
                queue_ms: seq.queue_ms,
                time_to_first_token_ms: seq.ttft_ms,
                total_ms: ms_since(request.arrived),
            },
        };
        m.prompt_tokens_total.increment(u64::from(prompt_tokens));
        m.generation_tokens_total
            .increment(u64::from(seq.generated - seq.resumed));
        m.request_prompt_tokens.record(f64::from(prompt_tokens));
        m.request_generation_tokens.record(f64::from(seq.generated));
        m.finished(finish);
        let score = self.shared.drift.lock().unwrap_or_else(|e| e.into_inner()).score();
        m.drift_score.set(score);
        tracing::debug!(request_id = %request.request_id, generated = seq.generated, finish = finish.as_str(), "request complete");
        Outcome::Completed(seq.generated - seq.resumed, Box::new(completion))
    }

    /// Tells the client its request failed.
    fn fail(&self, job: &Job, e: &ModelError) {
        tracing::error!(request_id = %job.request.request_id, error = %e, "generation failed");
        let _ = job.events.try_send(Err(BackendError::Internal(e.to_string())));
    }

    /// Removes ended sequences (dropping their caches) and updates the counters.
    fn retire(&self, running: &mut Vec<Seq>, mut ended: Vec<(usize, Outcome)>) {
        if ended.is_empty() {
            return;
        }
        // Highest index first, so earlier indices stay valid; `remove` keeps arrival order for the planner.
        ended.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        let mut completed = Vec::new();
        for (i, outcome) in ended {
            // Dropping the sequence frees its KV blocks.
            let Seq { job, .. } = running.remove(i);
            let tokens = match &outcome {
                Outcome::Completed(n, _) | Outcome::Cancelled(n) => *n,
                Outcome::Failed => 0,
            };
            self.shared.update(|s: &mut WorkerStats| {
                s.running -= 1;
                s.generated_tokens += u64::from(tokens);
                match outcome {
                    Outcome::Completed(..) => s.completed += 1,
                    Outcome::Cancelled(_) => s.cancelled += 1,
                    Outcome::Failed => {}
                }
            });
            if let Outcome::Completed(_, completion) = outcome {
                completed.push((job.events, completion));
            }
        }
        self.publish_kv(running);
        for (events, completion) in completed {
            let _ = events.try_send(Ok(Event::Complete(*completion)));
        }
    }

    fn publish_kv(&self, running: &[Seq]) {
        let views: Vec<SeqView> = running.iter().map(Seq::view).collect();
        let m = &self.shared.metrics;
        m.kv_usage.set(schedule::kv_usage(&self.limits, &views));
        m.kv_blocks_used
            .set(running.iter().map(|s| s.cache.blocks()).sum::<usize>() as f64);
        m.kv_blocks_capacity.set(
            self.limits
                .kv_budget_tokens
                .div_ceil(ferroserve_model::kv::BLOCK_TOKENS) as f64,
        );
    }
}
