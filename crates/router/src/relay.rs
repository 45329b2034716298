//! From a worker's events to what the client receives: the output filter, the deadline, latency
//! bookkeeping, and the final accounting with admission. Both `Generate` and `GenerateStream` read a
//! request through a [`Relay`], so the two behave the same.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroserve_admission::{Generated, Permit};
use ferroserve_core::{BackendError, Completion, Event, EventStream, FinishReason, ModelInfo, Usage};
use ferroserve_filter::{OutputGuard, Verdict};
use ferroserve_proto::v1 as pb;
use ferroserve_telemetry::names;
use futures::StreamExt;
use metrics::Histogram;
use tonic::Status;

use crate::RouterError;
use crate::error::code_label;
use crate::migrate::{Handoff, is_worker_failure};
use crate::observe::{Observations, Sample};
use crate::pipeline::Protocol;
use crate::pool::Lease;

/// A request handed to a worker: its lease, its event stream and what the client will be told.
pub(crate) struct Dispatched {
    /// The worker it runs on; holding it counts as that worker's load.
    pub lease: Lease,
    /// How to send it to another worker if this one fails.
    pub handoff: Handoff,
    /// A worker that sends no event for this long is taken as failed, and the request moves on.
    pub worker_stall: Duration,
    /// The server's shutdown: at its deadline the stream ends with UNAVAILABLE.
    pub drain: ferroserve_net::DrainWatch,
    /// Its admission slot and token reservation; settled with real usage at the end.
    pub permit: Permit,
    /// The prompt tokens reserved, used when the request ends without the worker's exact count.
    pub prompt_estimate: u32,
    /// Events from the worker; dropping it cancels the generation.
    pub events: EventStream,
    /// The model that serves it.
    pub model: ModelInfo,
    /// Echoed to the client.
    pub request_id: String,
    /// When the router accepted it.
    pub arrived: Instant,
    /// When the client's deadline passes, if it set one.
    pub deadline: Option<Instant>,
    /// The output filter this request started with, if filtering is on.
    pub guard: Option<OutputGuard>,
    /// Where the request's outcome goes for the canary analysis.
    pub observations: Arc<Observations>,
    /// Changes when an operator disables the version and cancels its requests in flight.
    pub cancel: tokio::sync::watch::Receiver<u64>,
    /// The front door it came through, for the outcome's label.
    pub protocol: Protocol,
}

/// What the client gets next.
pub(crate) enum Relayed {
    /// Generated text (possibly empty while a partial word or stop string is held back).
    Token(pb::TokenDelta),
    /// The end: a completion, or a status.
    Done(Result<pb::GenerationComplete, Status>),
}

pub(crate) fn finish_to_wire(f: FinishReason) -> pb::FinishReason {
    match f {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::Filtered => pb::FinishReason::Filtered,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    }
}

/// Counts a finished request by status and front door, and by model and version once one was chosen.
pub(crate) fn record_outcome(result: &Result<(), Status>, model: Option<&ModelInfo>, protocol: Protocol) {
    let label = match result {
        Ok(()) => "ok",
        Err(s) => code_label(s.code()),
    };
    let (name, version) = model.map_or((String::new(), String::new()), |m| (m.name.clone(), m.version.clone()));
    metrics::counter!(
        names::REQUESTS_TOTAL,
        names::LABEL_STATUS => label,
        names::LABEL_MODEL => name,
        names::LABEL_VERSION => version,
        names::LABEL_PROTOCOL => protocol.label()
    )
    .increment(1);
}

/// Each token's logprob with its text and alternatives, when the request asked for them (the worker then
/// sends one detail per token).
fn token_logprobs(t: &ferroserve_core::TokenChunk) -> Vec<pb::TokenLogprob> {
    let entry = |token_id: u32, piece: &[u8], logprob: f32| pb::TokenLogprob {
        token_id,
        token: String::from_utf8_lossy(piece).into_owned(),
        bytes: piece.to_vec(),
        logprob,
        top: Vec::new(),
    };
    t.details
        .iter()
        .zip(&t.token_ids)
        .zip(&t.logprobs)
        .map(|((d, &id), &logprob)| pb::TokenLogprob {
            top: d.top.iter().map(|a| entry(a.token, &a.piece, a.logprob)).collect(),
            ..entry(id, &d.piece, logprob)
        })
        .collect()
}

/// Waits until `deadline`, or forever when there is none.
pub(crate) async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// The wire form of a filter's verdict.
pub(crate) fn verdict_to_wire(filter: &str, stage: &str, v: &Verdict) -> pb::FilterVerdict {
    pb::FilterVerdict {
        filter: filter.to_string(),
        stage: stage.to_string(),
        category: v.category.clone().unwrap_or_default(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Per-request latency bookkeeping, recorded under the serving model's labels.
pub(crate) struct Clock {
    arrived: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    pub tokens: u32,
    /// Sum and count of the sampled tokens' logprobs.
    logprob: (f64, u32),
    /// Sum and count of the entropies of the distributions they came from.
    entropy: (f64, u32),
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    tpot: Histogram,
}

impl Clock {
    pub(crate) fn new(arrived: Instant, model: &ModelInfo) -> Clock {
        let labels = [
            (names::LABEL_MODEL, model.name.clone()),
            (names::LABEL_VERSION, model.version.clone()),
        ];
        Clock {
            arrived,
            first: None,
            last: None,
            tokens: 0,
            logprob: (0.0, 0),
            entropy: (0.0, 0),
            ttft: metrics::histogram!(names::TIME_TO_FIRST_TOKEN_SECONDS, &labels),
            itl: metrics::histogram!(names::INTER_TOKEN_LATENCY_SECONDS, &labels),
            e2e: metrics::histogram!(names::REQUEST_DURATION_SECONDS, &labels),
            tpot: metrics::histogram!(names::TIME_PER_OUTPUT_TOKEN_SECONDS, &labels),
        }
    }

    pub(crate) fn tokens(&mut self, n: usize) {
        let now = Instant::now();
        match self.last {
            None => {
                self.first = Some(now);
                self.ttft.record(now.duration_since(self.arrived).as_secs_f64());
            }
            Some(last) if n > 0 => {
                let gap = now.duration_since(last).as_secs_f64() / n as f64;
                for _ in 0..n {
                    self.itl.record(gap);
                }
            }
            Some(_) => {}
        }
        self.last = Some(now);
        self.tokens += n as u32;
    }

    /// Adds the sampled tokens' logprobs and their distributions' entropies.
    pub(crate) fn drift(&mut self, logprobs: &[f32], entropies: &[f32]) {
        let add = |acc: &mut (f64, u32), v: &[f32]| {
            acc.0 += v.iter().map(|x| f64::from(*x)).sum::<f64>();
            acc.1 += v.len() as u32;
        };
        add(&mut self.logprob, logprobs);
        add(&mut self.entropy, entropies);
    }

    /// This request as a sample for the canary analysis.
    fn sample(&self, failed: bool, filtered: bool) -> Sample {
        Sample {
            at: Instant::now(),
            failed,
            ttft: self.first.map(|f| f - self.arrived),
            itl: match (self.first, self.last) {
                (Some(first), Some(last)) if self.tokens > 1 => Some((last - first) / (self.tokens - 1)),
                _ => None,
            },
            filtered,
            mean_logprob: (self.logprob.1 > 0).then(|| self.logprob.0 / f64::from(self.logprob.1)),
            mean_entropy: (self.entropy.1 > 0).then(|| self.entropy.0 / f64::from(self.entropy.1)),
            tokens: self.tokens,
        }
    }

    /// When the tokens came, once there were any.
    fn generated(&self) -> Option<Generated> {
        Some(Generated {
            first: self.first?,
            last: self.last?,
            tokens: self.tokens,
        })
    }

    pub(crate) fn complete(&self) {
        let e2e = self.arrived.elapsed();
        self.e2e.record(e2e.as_secs_f64());
        if let (Some(first), true) = (self.first, self.tokens > 1) {
            let tpot = first.elapsed().as_secs_f64() / f64::from(self.tokens - 1);
            self.tpot.record(tpot);
        }
    }
}

/// Who a failed request's failure is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blame {
    /// The version or its workers: a sample against it.
    Version,
    /// The client (its deadline).
    Client,
    /// An operator (a kill switch with cancellation).
    Operator,
}

/// One request's way from worker events to client messages.
pub(crate) struct Relay {
    d: Dispatched,
    clock: Clock,
    /// Every token id streamed so far: a migrated request's continuation.
    generated: Vec<u32>,
    /// A completion that waits while held-back text goes out first.
    pending: Option<Completion>,
    /// True once `Done` was produced.
    finished: bool,
}

impl Relay {
    pub(crate) fn new(d: Dispatched) -> Relay {
        let clock = Clock::new(d.arrived, &d.model);
        Relay {
            d,
            clock,
            generated: Vec::new(),
            pending: None,
            finished: false,
        }
    }

    /// When the client's deadline passes, if it set one.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.d.deadline
    }

    /// What the client gets next; `None` after [`Relayed::Done`].
    pub(crate) async fn next(&mut self) -> Option<Relayed> {
        if self.finished {
            return None;
        }
        if let Some(c) = self.pending.take() {
            return Some(self.complete(c));
        }
        loop {
            // Biased: events the worker sent before it failed are relayed before its failure is acted on.
            let next = tokio::select! {
                biased;
                () = until(self.d.deadline) => {
                    let status = RouterError::DeadlineExceeded {
                        elapsed_ms: self.d.arrived.elapsed().as_millis() as u64,
                        completion_tokens: self.clock.tokens,
                    };
                    // The client's own deadline says nothing about the version.
                    return Some(self.end(status.into(), Blame::Client));
                }
                next = self.d.events.next() => next,
                Ok(()) = self.d.cancel.changed() => {
                    let status = Status::unavailable(format!(
                        "{} was disabled by an operator and its requests in flight were cancelled after {} tokens; \
                         retry and the request goes to another version",
                        self.d.model.qualified(),
                        self.clock.tokens
                    ));
                    self.d.events = futures::stream::empty().boxed();
                    return Some(self.end(status, Blame::Operator));
                }
                () = self.d.drain.reached(ferroserve_net::Phase::CutOff) => {
                    let status = Status::unavailable(format!(
                        "the server is shutting down and its drain deadline passed after {} tokens were sent; retry \
                         and the request goes to another replica",
                        self.clock.tokens
                    ));
                    self.d.events = futures::stream::empty().boxed();
                    return Some(self.end(status, Blame::Operator));
                }
                () = self.d.lease.down() => Some(Err(BackendError::Unavailable("the worker stopped answering".into()))),
                () = tokio::time::sleep(self.d.worker_stall) => Some(Err(BackendError::Unavailable(format!(
                    "no event from the worker for {} s", self.d.worker_stall.as_secs()
                )))),
            };
            let failure = match next {
                Some(Ok(Event::Token(t))) => return Some(self.token(t).await),
                Some(Ok(Event::Complete(c))) => return Some(self.completion(c).await),
                Some(Err(e)) if is_worker_failure(&e) => e,
                Some(Err(e)) => return Some(self.end(RouterError::from(e).into(), Blame::Version)),
                None => BackendError::Unavailable("the worker ended the stream without a completion".into()),
            };
            match self
                .d
                .handoff
                .continue_elsewhere(&self.d.lease, &failure, &self.generated)
                .await
            {
                Ok((lease, events)) => {
                    self.d.lease = lease;
                    self.d.events = events;
                }
                Err(status) => return Some(self.end(status, Blame::Version)),
            }
        }
    }

    async fn token(&mut self, t: ferroserve_core::TokenChunk) -> Relayed {
        self.clock.tokens(t.token_ids.len());
        self.clock.drift(&t.logprobs, &t.entropies);
        self.generated.extend_from_slice(&t.token_ids);
        let logprobs = token_logprobs(&t);
        let text = match self.d.guard.as_mut() {
            None => t.text,
            Some(g) => match g.push(&t.text).await {
                Ok(released) => released,
                Err(verdict) => return self.filtered(&verdict),
            },
        };
        Relayed::Token(pb::TokenDelta {
            logprobs,
            text,
            token_ids: t.token_ids,
        })
    }

    async fn completion(&mut self, c: Completion) -> Relayed {
        let rest = match self.d.guard.as_mut() {
            None => Ok(String::new()),
            Some(g) => g.finish().await,
        };
        match rest {
            Err(verdict) => self.filtered(&verdict),
            Ok(rest) if !rest.is_empty() => {
                self.pending = Some(c);
                Relayed::Token(pb::TokenDelta {
                    text: rest,
                    token_ids: Vec::new(),
                    logprobs: Vec::new(),
                })
            }
            Ok(_) => self.complete(c),
        }
    }

    fn settle(&mut self, usage: Option<&Usage>) {
        let used = match usage {
            Some(u) => u.prompt_tokens.saturating_add(u.completion_tokens),
            None => self.d.prompt_estimate.saturating_add(self.clock.tokens),
        };
        self.d.permit.settle(used, self.clock.generated());
    }

    fn complete(&mut self, c: Completion) -> Relayed {
        self.finished = true;
        self.clock.complete();
        record_outcome(&Ok(()), Some(&self.d.model), self.d.protocol);
        self.observe(false, false);
        self.settle(Some(&c.usage));
        Relayed::Done(Ok(pb::GenerationComplete {
            finish_reason: finish_to_wire(c.finish) as i32,
            usage: Some(pb::Usage {
                prompt_tokens: c.usage.prompt_tokens,
                completion_tokens: c.usage.completion_tokens,
                cached_tokens: c.usage.cached_tokens,
            }),
            model_version: self.d.model.qualified(),
            request_id: self.d.request_id.clone(),
            timings: Some(pb::Timings {
                queue_ms: c.timings.queue_ms,
                time_to_first_token_ms: c.timings.time_to_first_token_ms,
                total_ms: c.timings.total_ms,
            }),
            filtered: None,
        }))
    }

    /// The output filter blocked: no more text, generation stops (the worker stream is dropped), and the
    /// stream ends with FILTERED.
    fn filtered(&mut self, verdict: &Verdict) -> Relayed {
        self.finished = true;
        self.d.events = futures::stream::empty().boxed();
        self.clock.complete();
        record_outcome(&Ok(()), Some(&self.d.model), self.d.protocol);
        self.observe(false, true);
        self.settle(None);
        let filter = self
            .d
            .guard
            .as_ref()
            .map(|g| g.filter_id().to_string())
            .unwrap_or_default();
        tracing::info!(request_id = %self.d.request_id, %filter, category = ?verdict.category, "output filtered");
        Relayed::Done(Ok(pb::GenerationComplete {
            finish_reason: pb::FinishReason::Filtered as i32,
            // The worker reports the exact prompt count only when it completes; it never did.
            usage: Some(pb::Usage {
                prompt_tokens: 0,
                completion_tokens: self.clock.tokens,
                cached_tokens: 0,
            }),
            model_version: self.d.model.qualified(),
            request_id: self.d.request_id.clone(),
            timings: Some(pb::Timings {
                queue_ms: 0.0,
                time_to_first_token_ms: self.clock.first.map_or(0.0, |f| ms(f - self.d.arrived)),
                total_ms: ms(self.d.arrived.elapsed()),
            }),
            filtered: Some(verdict_to_wire(&filter, "output", verdict)),
        }))
    }

    fn observe(&self, failed: bool, filtered: bool) {
        let sample = self.clock.sample(failed, filtered);
        self.d.observations.record(&self.d.model.qualified(), sample);
    }

    /// Ends the request with `status`. Only a failure the version is to blame for counts against it in
    /// the canary analysis: a client's own deadline, or an operator's cancellation, does not.
    fn end(&mut self, status: Status, blame: Blame) -> Relayed {
        self.finished = true;
        record_outcome(&Err(status.clone()), Some(&self.d.model), self.d.protocol);
        if blame == Blame::Version {
            self.observe(true, false);
        }
        self.settle(None);
        Relayed::Done(Err(status))
    }
}

/// A relay dropped before its end (the client left, a unary call was cancelled, the writer gave up on a
/// stalled client) settles the request for what it used and records the outcome; dropping its worker
/// stream cancels the generation.
impl Drop for Relay {
    fn drop(&mut self) {
        if !self.finished {
            tracing::info!(request_id = %self.d.request_id, "client disconnected; cancelling");
            // The client's leaving says nothing about the version: not a sample.
            record_outcome(
                &Err(Status::cancelled("client disconnected")),
                Some(&self.d.model),
                self.d.protocol,
            );
            self.settle(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;

    #[test]
    fn outcomes_count_by_status_and_latencies_by_version() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let model = ModelInfo {
            name: "m".into(),
            version: "v1".into(),
            context_length: 8,
            defaults: Default::default(),
        };
        metrics::with_local_recorder(&recorder, || {
            record_outcome(&Ok(()), Some(&model), Protocol::Grpc);
            record_outcome(&Err(Status::invalid_argument("x")), None, Protocol::Http);
            let mut clock = Clock::new(Instant::now(), &model);
            clock.tokens(1);
            clock.tokens(2);
            clock.complete();
        });
        let snapshot = snapshotter.snapshot().into_vec();
        let counter = |status: &str| {
            snapshot.iter().find_map(|(k, _, _, v)| {
                let key = k.key();
                (key.name() == names::REQUESTS_TOTAL
                    && key
                        .labels()
                        .any(|l| l.key() == names::LABEL_STATUS && l.value() == status))
                .then_some(v)
            })
        };
        assert!(matches!(counter("ok"), Some(DebugValue::Counter(1))));
        assert!(matches!(counter("invalid_argument"), Some(DebugValue::Counter(1))));
        let histogram = |name: &str| {
            snapshot.iter().find_map(|(k, _, _, v)| match v {
                DebugValue::Histogram(values)
                    if k.key().name() == name
                        && k.key()
                            .labels()
                            .any(|l| l.key() == names::LABEL_VERSION && l.value() == "v1") =>
                {
                    Some(values.len())
                }
                _ => None,
            })
        };
        assert_eq!(histogram(names::TIME_TO_FIRST_TOKEN_SECONDS), Some(1));
        // A chunk of two tokens counts as two inter-token gaps.
        assert_eq!(histogram(names::INTER_TOKEN_LATENCY_SECONDS), Some(2));
        assert_eq!(histogram(names::REQUEST_DURATION_SECONDS), Some(1));
        assert_eq!(histogram(names::TIME_PER_OUTPUT_TOKEN_SECONDS), Some(1));
    }
}
