//! The engine thread: continuous batching over a shared KV pool. Each step admits waiting sequences the
//! pool has blocks for ([`EngineLoop::admit`]: their longest cached prefix, plus blocks for the rest of the
//! prompt), gives every planned sequence the blocks its tokens need, preempting the most recently
//! admitted when the pool runs out, runs one forward over the planned tokens ([`schedule::plan`]: decode
//! tokens first, then prefill chunks), samples for the sequences that have computed all their tokens, and
//! lets finished sequences leave, which gives their blocks back (full ones stay cached for reuse).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use ferroserve_core::{
    Alternative, BackendError, Completion, Event, FinishReason, MAX_TOP_LOGPROBS, Timings, TokenChunk, TokenDetail,
    Usage, WorkerStats,
};
use ferroserve_model::batched::{BatchedLlama, Chunk};
use ferroserve_model::kv::BLOCK_TOKENS;
use ferroserve_model::pool::KvPool;
use ferroserve_model::{ModelError, TextCodec};

use crate::handle::Shared;
use crate::schedule::{self, BatchLimits, SeqView};
use crate::seq::{Job, Outcome, Seq, StepError, ms_since};

/// The requests the engine holds: waiting for a place in the batch, and running. They live outside the
/// loop so that after a panic the supervisor can tell each of them what happened.
#[derive(Default)]
pub(crate) struct Queues {
    /// Not in the batch, in admission order: new, or preempted (those go back to the front).
    waiting: VecDeque<Seq>,
    /// In the batch, in the order they were admitted.
    running: Vec<Seq>,
}

impl Queues {
    /// Ends every request held with `error` (UNAVAILABLE: another worker may take it) and takes them out
    /// of the counters. Returns how many there were.
    pub fn fail_all(&mut self, shared: &Shared, error: &BackendError) -> usize {
        // A preempted sequence waits, but counts as running: it has started.
        let preempted = self.waiting.iter().filter(|s| s.started()).count();
        let (waiting, running) = (self.waiting.len() - preempted, self.running.len() + preempted);
        for seq in self.waiting.drain(..).chain(self.running.drain(..)) {
            let _ = seq.job.events.try_send(Err(error.clone()));
        }
        shared.update(|s| {
            s.waiting -= waiting as u32;
            s.running -= running as u32;
        });
        waiting + running
    }
}

/// Everything the engine thread owns.
pub(crate) struct EngineLoop {
    /// The model weights, shared by every sequence.
    pub model: Arc<BatchedLlama>,
    /// The KV blocks of every sequence, and the prefix cache.
    pub pool: KvPool,
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

/// Takes a sequence that leaves the waiting queue out of the counters: a preempted one counts as running.
fn leave_waiting(seq: &Seq, s: &mut WorkerStats) {
    if seq.started() {
        s.running -= 1;
    } else {
        s.waiting -= 1;
    }
}

/// Puts a sequence in the waiting queue by priority, behind every one of the same or a higher one.
fn enqueue(waiting: &mut VecDeque<Seq>, seq: Seq) {
    let at = schedule::queue_position(waiting.iter().map(|s| s.job.request.priority), seq.job.request.priority);
    waiting.insert(at, seq);
}

impl EngineLoop {
    /// Runs until every handle is gone and the queue and the batch are empty.
    pub fn run(&mut self, queue: &Receiver<Job>, q: &mut Queues) {
        loop {
            if q.running.is_empty() && q.waiting.is_empty() {
                match queue.recv() {
                    Ok(job) => self.accept(&mut q.waiting, job),
                    Err(_) => break,
                }
            }
            while let Ok(job) = queue.try_recv() {
                self.accept(&mut q.waiting, job);
            }
            if self.shared.is_draining() && q.waiting.iter().any(|s| !s.started()) {
                // Draining: what has not started goes back to the router, which sends it elsewhere.
                let (started, not_started) = std::mem::take(&mut q.waiting).into_iter().partition(Seq::started);
                q.waiting = started;
                let mut handed_back = Queues {
                    waiting: not_started,
                    running: Vec::new(),
                };
                handed_back.fail_all(
                    &self.shared,
                    &BackendError::Unavailable("this worker is draining; the request had not started".into()),
                );
            }
            self.admit(&mut q.waiting, &mut q.running);
            if !q.running.is_empty() {
                self.step(&mut q.waiting, &mut q.running);
            }
        }
        tracing::debug!("engine thread exiting: all handles dropped");
    }

    /// Takes a job from the channel: a waiting sequence, or at once a completion when a continuation
    /// already ends the request (the worker that failed had not sent it).
    fn accept(&self, waiting: &mut VecDeque<Seq>, job: Job) {
        let mut seq = Seq::new(job);
        match seq.resume(&self.text) {
            Ok(None) => enqueue(waiting, seq),
            Ok(Some(finish)) => {
                let outcome = self.complete(&mut seq, finish);
                self.shared.update(|s| {
                    s.waiting -= 1;
                    s.completed += 1;
                });
                if let Outcome::Completed(_, completion) = outcome {
                    let _ = seq.job.events.try_send(Ok(Event::Complete(*completion)));
                }
            }
            Err(e) => {
                self.fail(&seq.job, &e);
                self.shared.update(|s| s.waiting -= 1);
            }
        }
    }

    /// Moves waiting sequences into the batch while they fit, in queue order (priority, then arrival).
    fn admit(&mut self, waiting: &mut VecDeque<Seq>, running: &mut Vec<Seq>) {
        let m = &self.shared.metrics;
        while let Some(seq) = waiting.front_mut() {
            if seq.job.events.is_closed() {
                let mut seq = waiting.pop_front().expect("front exists");
                let n = seq.take_uncounted();
                m.cancelled.increment(1);
                m.finished(FinishReason::Cancelled);
                m.generation_tokens_total.increment(u64::from(n));
                self.shared.update(|s| {
                    leave_waiting(&seq, s);
                    s.cancelled += 1;
                    s.generated_tokens += u64::from(n);
                });
                continue;
            }
            if !schedule::has_slot(&self.limits, running.len()) {
                break;
            }
            let others = running.iter().map(|r| (r.job.tokens.as_slice(), r.computed()));
            if self.caching() && schedule::waits_for_prefix(&seq.job.tokens, others, BLOCK_TOKENS) {
                break;
            }
            if let Some(marker) = &self.test_fault_marker
                && seq.job.has_marker(marker)
            {
                // Test-only: the chaos suite's engine-thread panic. The job is still queued, so the
                // supervisor answers it with the rest.
                panic!("test fault: a request carried the engine panic marker");
            }
            // Keep a block free for each running sequence's next token, so that admitting does not
            // preempt at once.
            let headroom = running.len();
            let fresh = !seq.started();
            match self
                .model
                .cache_for(&self.pool, &seq.job.tokens, seq.capacity(), headroom)
            {
                Ok(Some(cache)) => {
                    // Counted once a request, as vLLM does: a preempted sequence finding its own blocks
                    // again is not a prefix hit.
                    if fresh && self.caching() {
                        m.prefix_cache_queries.increment(seq.job.tokens.len() as u64);
                        m.prefix_cache_hits.increment(cache.cached_tokens() as u64);
                    }
                    if fresh {
                        let queue_ms = ms_since(seq.job.request.arrived);
                        m.queue_duration.record(queue_ms / 1e3);
                        seq.queue_ms = Some(queue_ms);
                        seq.cached_prompt = cache.cached_tokens().min(seq.job.prompt_len) as u32;
                    }
                    seq.cache = Some(cache);
                }
                // The pool cannot spare the blocks until running sequences finish.
                Ok(None) if !running.is_empty() => break,
                Ok(None) => {
                    // Nothing runs, so every block is available: this cannot happen for a request within
                    // the context the engine advertises (at most the pool). Refuse rather than spin.
                    let seq = waiting.pop_front().expect("front exists");
                    self.fail(
                        &seq.job,
                        &ModelError::Cache("the request needs more KV blocks than the pool has".into()),
                    );
                    self.shared.update(|s| leave_waiting(&seq, s));
                    continue;
                }
                Err(e) => {
                    let seq = waiting.pop_front().expect("front exists");
                    self.fail(&seq.job, &e);
                    self.shared.update(|s| leave_waiting(&seq, s));
                    continue;
                }
            }
            let seq = waiting.pop_front().expect("front exists");
            if fresh {
                self.shared.update(|s| {
                    s.waiting -= 1;
                    s.running += 1;
                });
            }
            running.push(seq);
        }
        self.publish_kv();
    }

    /// Gives each planned sequence the blocks its tokens need. While the pool cannot, preempts the most
    /// recently admitted sequence: its blocks go back (its full ones stay cached), and it waits at the
    /// front of the queue to be recomputed from its prompt and the tokens it generated. Returns the plan.
    fn plan_with_blocks(
        &self,
        waiting: &mut VecDeque<Seq>,
        running: &mut Vec<Seq>,
    ) -> Vec<(usize, std::ops::Range<usize>)> {
        loop {
            let views: Vec<SeqView> = running.iter().map(Seq::view).collect();
            let plan = schedule::plan(&self.limits, &views);
            let short = plan.iter().any(|(i, r)| {
                !running[*i]
                    .cache
                    .as_mut()
                    .expect("a running sequence has a cache")
                    .reserve(r.end)
            });
            if !short {
                return plan;
            }
            let priorities: Vec<i32> = running.iter().map(|s| s.job.request.priority).collect();
            let Some(v) = schedule::victim(&priorities) else {
                return Vec::new();
            };
            let mut seq = running.remove(v);
            // Its blocks go back now; its full blocks stay cached for its return.
            seq.cache = None;
            let n = seq.take_uncounted();
            let m = &self.shared.metrics;
            m.preemptions.increment(1);
            self.shared
                .preemptions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            m.generation_tokens_total.increment(u64::from(n));
            // It stays counted as running (it has started), so it takes no place in the waiting queue's
            // bound.
            self.shared.update(|s| s.generated_tokens += u64::from(n));
            tracing::info!(
                request_id = %seq.job.request.request_id,
                generated = seq.generated,
                "preempted: the KV pool is full; it is recomputed from its cached prefix when blocks free up"
            );
            let at =
                schedule::preempted_position(waiting.iter().map(|s| s.job.request.priority), seq.job.request.priority);
            waiting.insert(at, seq);
            self.publish_kv();
            if running.is_empty() {
                return Vec::new();
            }
        }
    }

    /// One forward over the planned tokens, then sampling and streaming for each sequence.
    fn step(&mut self, waiting: &mut VecDeque<Seq>, running: &mut Vec<Seq>) {
        // A client that left frees its place before the step, not after.
        let mut ended: Vec<(usize, Outcome)> = Vec::new();
        for (i, seq) in running.iter_mut().enumerate() {
            if seq.job.events.is_closed() {
                let n = seq.take_uncounted();
                self.shared.metrics.cancelled.increment(1);
                self.shared.metrics.finished(FinishReason::Cancelled);
                self.shared.metrics.generation_tokens_total.increment(u64::from(n));
                ended.push((i, Outcome::Cancelled(n)));
            }
        }
        self.retire(running, ended);
        let plan = self.plan_with_blocks(waiting, running);
        if plan.is_empty() {
            self.publish_kv();
            return;
        }
        let started = Instant::now();
        let mut takes: Vec<Option<std::ops::Range<usize>>> = vec![None; running.len()];
        for (i, range) in plan {
            takes[i] = Some(range);
        }
        let mut order = Vec::with_capacity(running.len());
        let mut chunks: Vec<Chunk<'_>> = Vec::with_capacity(running.len());
        // The constraints of the sequences that sample this step: their masks are computed while the
        // forward pass runs.
        let mut guides = Vec::new();
        for (i, (seq, take)) in running.iter_mut().zip(&takes).enumerate() {
            let Some(range) = take else { continue };
            let Seq { cache, job, guide, .. } = seq;
            order.push(i);
            if range.end == job.tokens.len()
                && let Some(g) = guide.as_mut()
            {
                guides.push(g);
            }
            chunks.push(Chunk {
                cache: cache.as_mut().expect("a running sequence has a cache"),
                tokens: &job.tokens[range.clone()],
            });
        }
        let step_tokens: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let result = if guides.is_empty() {
            self.model.forward(&mut chunks)
        } else {
            std::thread::scope(|s| {
                let masks = s.spawn(move || crate::constrain::prepare_all(guides));
                let result = self.model.forward(&mut chunks);
                // A mask thread that panicked leaves its guides unprepared: each computes its mask when
                // it samples, and fails its own sequence if that fails too.
                if let Ok(took) = masks.join() {
                    self.shared.metrics.constraint_mask_seconds.record(took.as_secs_f64());
                }
                result
            })
        };
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
                    if seq.computed() < seq.job.tokens.len() {
                        continue;
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
        let prefills = takes.iter().flatten().filter(|r| r.len() > 1).count();
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
    fn advance(&self, seq: &mut Seq, logits: &mut [f32]) -> Result<Option<Outcome>, StepError> {
        let m = &self.shared.metrics;
        let request = &seq.job.request;
        // The alternatives come from the logits as the model gave them, before the sampler rewrites them.
        let top = request
            .top_logprobs
            .map(|k| crate::sampler::top_logprobs(logits, k.min(MAX_TOP_LOGPROBS) as usize));
        let mut masked = Ok(());
        let pick = match &mut seq.guide {
            None => seq.sampler.sample(logits),
            Some(guide) => seq.sampler.sample_masked(logits, |l| masked = guide.mask(l)),
        };
        masked?;
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
        // Under a constraint, end-of-sequence is possible only where the output is complete, and ends it
        // even with ignore_eos (there is nothing more it may say).
        if (!request.sampling.ignore_eos || seq.guide.is_some()) && self.text.tokenizer.is_stop(pick.token) {
            return Ok(Some(self.complete(seq, FinishReason::Eos)));
        }
        let complete = match &mut seq.guide {
            Some(guide) => guide.commit(pick.token)?,
            None => false,
        };
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
            let n = seq.take_uncounted();
            m.cancelled.increment(1);
            m.finished(FinishReason::Cancelled);
            m.generation_tokens_total.increment(u64::from(n));
            return Ok(Some(Outcome::Cancelled(n)));
        }
        if check.stopped || complete {
            return Ok(Some(self.complete(seq, FinishReason::Stop)));
        }
        if seq.generated >= request.max_tokens || seq.job.tokens.len() + 1 > seq.capacity() {
            return Ok(Some(self.complete(seq, FinishReason::Length)));
        }
        seq.job.tokens.push(pick.token);
        Ok(None)
    }

    /// Flushes held text and returns the completion, for the caller to send once the sequence is freed.
    #[must_use = "the completion is sent by whoever frees the sequence"]
    fn complete(&self, seq: &mut Seq, finish: FinishReason) -> Outcome {
        let m = &self.shared.metrics;
        let n = seq.take_uncounted();
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
                cached_tokens: seq.cached_prompt,
            },
            timings: Timings {
                queue_ms: seq.queue_ms.unwrap_or(0.0),
                time_to_first_token_ms: seq.ttft_ms,
                total_ms: ms_since(request.arrived),
            },
        };
        m.prompt_tokens_total.increment(u64::from(prompt_tokens));
        m.generation_tokens_total.increment(u64::from(n));
        m.request_prompt_tokens.record(f64::from(prompt_tokens));
        m.request_generation_tokens.record(f64::from(seq.generated));
        m.finished(finish);
        let score = self.shared.drift.lock().unwrap_or_else(|e| e.into_inner()).score();
        m.drift_score.set(score);
        tracing::debug!(request_id = %request.request_id, generated = seq.generated, finish = finish.as_str(), "request complete");
        Outcome::Completed(n, Box::new(completion))
    }

    /// Tells the client its request failed.
    fn fail(&self, job: &Job, e: &dyn std::fmt::Display) {
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
        // Dropping the sequences frees their KV blocks; the pool's figures are published before the
        // counters say they have gone.
        let ended: Vec<(Job, Outcome)> = ended
            .into_iter()
            .map(|(i, outcome)| (running.remove(i).job, outcome))
            .collect();
        self.publish_kv();
        let mut completed = Vec::new();
        for (job, outcome) in ended {
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
        for (events, completion) in completed {
            let _ = events.try_send(Ok(Event::Complete(*completion)));
        }
    }

    /// Whether the pool caches prefixes: as configured, and off where the model's caches cannot share
    /// blocks (Candle slot caches). Then requests neither wait for a shared prefix nor count as queries.
    fn caching(&self) -> bool {
        self.pool.lock().caching()
    }

    fn publish_kv(&self) {
        let stats = self.pool.stats();
        *self.shared.kv_blocks.lock().unwrap_or_else(|e| e.into_inner()) = stats;
        let m = &self.shared.metrics;
        m.kv_usage.set(stats.in_use as f64 / stats.capacity.max(1) as f64);
        m.kv_blocks_used.set(stats.in_use as f64);
        m.kv_blocks_cached.set(stats.idle as f64);
        m.kv_blocks_capacity.set(stats.capacity as f64);
    }
}
