//! A request inside the engine: queued ([`Job`]), then a sequence ([`Seq`]) that waits, runs, may be
//! preempted back to waiting, and ends with an [`Outcome`].

use std::time::SystemTime;

use ferroserve_core::{BackendError, Completion, Event, FinishReason, ValidRequest};
use ferroserve_model::batched::SeqCache;
use ferroserve_model::detok::IncrementalDecoder;
use ferroserve_model::{ModelError, TextCodec};
use tokio::sync::mpsc;

use crate::constrain::{ConstraintError, Guide};
use crate::sampler::Sampler;
use crate::schedule::SeqView;
use crate::stop::StopMatcher;

/// What ends one sequence's generation with an error, the others going on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StepError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Constraint(#[from] ConstraintError),
}

/// One queued request.
pub(crate) struct Job {
    /// The validated request.
    pub request: ValidRequest,
    /// Its prompt, already tokenized and checked against the context length, followed by its
    /// continuation (tokens a failed worker already generated), which is prefilled with it.
    pub tokens: Vec<u32>,
    /// Tokens of `tokens` that are the prompt proper (usage counts these as prompt tokens).
    pub prompt_len: usize,
    /// Where its events go. Closed means the client left.
    pub events: mpsc::Sender<Result<Event, BackendError>>,
    /// Its compiled constraint, when it has one.
    pub guide: Option<Guide>,
}

impl Job {
    /// Whether the request's text contains the test fault marker.
    pub fn has_marker(&self, marker: &str) -> bool {
        match &self.request.input {
            ferroserve_core::Input::Prompt(t) => t.contains(marker),
            ferroserve_core::Input::Chat(m) => m.iter().any(|m| m.content.contains(marker)),
        }
    }
}

/// How a sequence ended, for the counters. A completion is told to the client only once the sequence
/// has left the batch and its KV blocks are back (so that what the client sees next, the metrics
/// included, already counts them as free).
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Completed(u32, Box<Completion>),
    Cancelled(u32),
    Failed,
}

/// A request from the moment the engine takes it: waiting, running, or preempted (waiting again).
pub(crate) struct Seq {
    /// The request and its channel. `job.tokens` grows by each sampled token: after a preemption, the
    /// sequence is recomputed from all of them.
    pub job: Job,
    /// Its KV cache while in the batch; `None` while waiting.
    pub cache: Option<SeqCache>,
    /// Per-request sampler, seeded: the same seed gives the same text whatever else is in the batch, and
    /// whether or not the sequence was preempted (a preemption draws nothing).
    pub sampler: Sampler,
    /// Stop strings over the streamed text.
    pub stops: StopMatcher,
    /// Token ids to text, one whole character at a time.
    pub detok: IncrementalDecoder,
    /// Tokens generated so far, the continuation's included (usage counts them all).
    pub generated: u32,
    /// Of those, the ones not yet counted in this worker's totals start here: the continuation's were
    /// generated elsewhere, and a preempted sequence's were counted when it was preempted.
    pub counted: u32,
    /// Arrival to first admission; `None` until then (it has not started).
    pub queue_ms: Option<f64>,
    /// Arrival to first token.
    pub ttft_ms: f64,
    /// Prompt tokens found in the prefix cache at the first admission.
    pub cached_prompt: u32,
    /// Its constraint, following the tokens it generates; `None` for free text.
    pub guide: Option<Guide>,
}

pub(crate) fn ms_since(t: SystemTime) -> f64 {
    t.elapsed().map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

impl Seq {
    /// A sequence for `job`, waiting.
    pub fn new(mut job: Job) -> Seq {
        let resumed = (job.tokens.len() - job.prompt_len) as u32;
        Seq {
            guide: job.guide.take(),
            sampler: Sampler::new(job.request.sampling, &job.tokens),
            stops: StopMatcher::new(&job.request.stop),
            detok: IncrementalDecoder::default(),
            job,
            cache: None,
            generated: resumed,
            counted: resumed,
            queue_ms: None,
            ttft_ms: 0.0,
            cached_prompt: 0,
        }
    }

    /// Brings the decoder, the stop matcher, the sampler and the constraint to where the failed worker left
    /// them, from the continuation alone: each is deterministic in the tokens it saw. The text it would release was
    /// streamed already, so it is dropped; a partial stop string stays held, as it was there.
    ///
    /// Returns how the request ends already, if it does: the continuation may hold its last token or
    /// complete a stop string (the worker failed before it sent the completion). An end-of-sequence token
    /// is never streamed, so it cannot be in a continuation.
    pub fn resume(&mut self, text: &TextCodec) -> Result<Option<FinishReason>, StepError> {
        let continuation = self.job.tokens[self.job.prompt_len..].to_vec();
        for id in continuation {
            let piece = self.detok.push(&text.tokenizer, id)?;
            self.sampler.skip_draw(id);
            let complete = match &mut self.guide {
                Some(g) => g.commit(id)?,
                None => false,
            };
            if self.stops.push(&piece).stopped || complete {
                return Ok(Some(FinishReason::Stop));
            }
        }
        Ok((self.generated >= self.job.request.max_tokens).then_some(FinishReason::Length))
    }

    /// Positions its cache may reach: the prompt and everything it may generate.
    pub fn capacity(&self) -> usize {
        self.job.prompt_len + self.job.request.max_tokens as usize
    }

    /// Tokens in its KV cache (0 while waiting).
    pub fn computed(&self) -> usize {
        self.cache.as_ref().map_or(0, SeqCache::len)
    }

    /// Whether it has started: admitted once (it may have been preempted since).
    pub fn started(&self) -> bool {
        self.queue_ms.is_some()
    }

    /// Generated tokens not yet in this worker's totals; counts them as counted.
    pub fn take_uncounted(&mut self) -> u32 {
        let n = self.generated - self.counted;
        self.counted = self.generated;
        n
    }

    pub fn view(&self) -> SeqView {
        SeqView {
            tokens: self.job.tokens.len(),
            computed: self.computed(),
        }
    }
}
