//! `ferroserve.v1.Inference`: validate, choose a worker, stream its events back.

use std::sync::Arc;
use std::time::Instant;

use ferroserve_admission::{Admitted, Ask, Generated, Permit};
use ferroserve_core::{BackendError, Completion, Event, EventStream, FinishReason, Input, ModelInfo, Usage};
use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::inference_server::Inference;
use ferroserve_telemetry::names;
use futures::{Stream, StreamExt};
use metrics::Histogram;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::code_label;
use crate::live::Live;
use crate::pool::{Lease, Pool};
use crate::validate::{Limits, validate};
use crate::{RouterError, deadline};

/// How many workers a request may be offered to before it fails as unavailable.
const MAX_DISPATCH_ATTEMPTS: usize = 3;

/// Bytes per token assumed when reserving a prompt's tokens before the worker has tokenized it. English
/// averages about four bytes a token under byte-level BPE; three errs toward reserving too much, and the
/// reservation is reconciled with the worker's exact count when the request ends.
const BYTES_PER_TOKEN_ESTIMATE: usize = 3;
/// Tokens assumed per chat message for the template's role markers, and for a default system message.
const TEMPLATE_TOKENS_PER_MESSAGE: usize = 8;

/// The inference service: stateless apart from the shared pool and live settings.
pub(crate) struct InferenceService {
    /// Where requests go.
    pub pool: Arc<Pool>,
    /// Who may send them, and how much (keys and admission limits, changeable live).
    pub live: Arc<Live>,
    /// Request shape limits.
    pub limits: Limits,
}

/// An upper-leaning estimate of a prompt's tokens, for the admission reservation.
fn estimate_prompt_tokens(input: &Input) -> u32 {
    let tokens = match input {
        Input::Prompt(text) => text.len().div_ceil(BYTES_PER_TOKEN_ESTIMATE),
        Input::Chat(messages) => messages
            .iter()
            .map(|m| m.content.len().div_ceil(BYTES_PER_TOKEN_ESTIMATE) + TEMPLATE_TOKENS_PER_MESSAGE)
            .sum::<usize>()
            .saturating_add(TEMPLATE_TOKENS_PER_MESSAGE),
    };
    u32::try_from(tokens).unwrap_or(u32::MAX)
}

/// A request in progress: its worker lease, its event stream and what the client will be told.
struct Dispatched {
    /// Keeps the worker's load count while the request runs.
    _lease: Lease,
    /// Its admission slot and token reservation; settled with real usage at the end.
    permit: Permit,
    /// The prompt tokens reserved, used when the request ends without the worker's exact count.
    prompt_estimate: u32,
    /// Events from the worker; dropping it cancels the generation.
    events: EventStream,
    /// The model that serves it.
    model: ModelInfo,
    /// Echoed to the client.
    request_id: String,
    /// When the router accepted it.
    arrived: Instant,
    /// When the client's deadline passes, if it set one.
    deadline: Option<Instant>,
}

/// The `authorization` metadata value, if present and ASCII.
pub(crate) fn authorization(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata.get("authorization").and_then(|v| v.to_str().ok())
}

fn new_request_id() -> String {
    format!("req-{:016x}", rand::random::<u64>())
}

fn finish_to_wire(f: FinishReason) -> pb::FinishReason {
    match f {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::Filtered => pb::FinishReason::Filtered,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    }
}

/// Counts a finished request by status, and by model and version once one was chosen.
fn record_outcome(result: &Result<(), Status>, model: Option<&ModelInfo>) {
    let label = match result {
        Ok(()) => "ok",
        Err(s) => code_label(s.code()),
    };
    let (name, version) = model.map_or((String::new(), String::new()), |m| (m.name.clone(), m.version.clone()));
    metrics::counter!(
        names::REQUESTS_TOTAL,
        names::LABEL_STATUS => label,
        names::LABEL_MODEL => name,
        names::LABEL_VERSION => version
    )
    .increment(1);
}

impl InferenceService {
    /// Validates the request and hands it to a worker, trying another if one is full or unreachable.
    async fn dispatch(&self, request: Request<pb::GenerateRequest>) -> Result<Dispatched, RouterError> {
        let arrived = Instant::now();
        // Authentication first: an unknown caller costs nothing further.
        let tenant = self.live.keys().authenticate(authorization(request.metadata()))?;
        let budget = deadline::from_metadata(request.metadata());
        let deadline = budget.map(|d| arrived + d);
        let request = request.into_inner();
        let request_id = if request.request_id.is_empty() {
            new_request_id()
        } else {
            request.request_id.clone()
        };
        // Validation before rate limits, so that a malformed request never spends a tenant's budget.
        let (selector, valid) = validate(request, request_id.clone(), &self.limits)?;
        let prompt_estimate = estimate_prompt_tokens(&valid.input);
        let ask = Ask {
            tenant: tenant.clone(),
            tokens: prompt_estimate.saturating_add(valid.max_tokens),
            max_tokens: valid.max_tokens,
            deadline: budget,
        };
        let permit = match self.live.admission().admit(ask)? {
            Admitted::Now(permit) => permit,
            Admitted::Queued(waiting) => tokio::select! {
                granted = waiting.granted() => granted?,
                () = until(deadline) => return Err(RouterError::DeadlineExceeded {
                    elapsed_ms: arrived.elapsed().as_millis() as u64,
                    completion_tokens: 0,
                }),
            },
        };
        let mut tried = Vec::new();
        loop {
            let lease = self.pool.pick(&selector, &tried)?;
            let backend = Arc::clone(lease.backend());
            match backend.generate(valid.clone()).await {
                Ok(events) => {
                    tracing::debug!(request_id = %request_id, tenant = %tenant.name, worker = backend.location(), "dispatched");
                    return Ok(Dispatched {
                        _lease: lease,
                        permit,
                        prompt_estimate,
                        events,
                        model: backend.model().clone(),
                        request_id,
                        arrived,
                        deadline,
                    });
                }
                Err(e @ (BackendError::Overloaded(_) | BackendError::Unavailable(_)))
                    if tried.len() + 1 < MAX_DISPATCH_ATTEMPTS =>
                {
                    tracing::warn!(request_id = %request_id, worker = backend.location(), error = %e, "worker refused; trying another");
                    tried.push(backend.location().to_string());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Per-request latency bookkeeping, recorded under the serving model's labels.
struct Clock {
    arrived: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: u32,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    tpot: Histogram,
}

impl Clock {
    fn new(arrived: Instant, model: &ModelInfo) -> Clock {
        let labels = [
            (names::LABEL_MODEL, model.name.clone()),
            (names::LABEL_VERSION, model.version.clone()),
        ];
        Clock {
            arrived,
            first: None,
            last: None,
            tokens: 0,
            ttft: metrics::histogram!(names::TIME_TO_FIRST_TOKEN_SECONDS, &labels),
            itl: metrics::histogram!(names::INTER_TOKEN_LATENCY_SECONDS, &labels),
            e2e: metrics::histogram!(names::REQUEST_DURATION_SECONDS, &labels),
            tpot: metrics::histogram!(names::TIME_PER_OUTPUT_TOKEN_SECONDS, &labels),
        }
    }

    fn tokens(&mut self, n: usize) {
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

    /// When the tokens came, once there were any.
    fn generated(&self) -> Option<Generated> {
        Some(Generated {
            first: self.first?,
            last: self.last?,
            tokens: self.tokens,
        })
    }

    fn complete(&self) {
        let e2e = self.arrived.elapsed();
        self.e2e.record(e2e.as_secs_f64());
        if let (Some(first), true) = (self.first, self.tokens > 1) {
            let tpot = first.elapsed().as_secs_f64() / f64::from(self.tokens - 1);
            self.tpot.record(tpot);
        }
    }
}

fn complete_to_wire(c: Completion, model: &ModelInfo, request_id: &str) -> pb::GenerationComplete {
    pb::GenerationComplete {
        finish_reason: finish_to_wire(c.finish) as i32,
        usage: Some(pb::Usage {
            prompt_tokens: c.usage.prompt_tokens,
            completion_tokens: c.usage.completion_tokens,
        }),
        model_version: model.qualified(),
        request_id: request_id.to_string(),
        timings: Some(pb::Timings {
            queue_ms: c.timings.queue_ms,
            time_to_first_token_ms: c.timings.time_to_first_token_ms,
            total_ms: c.timings.total_ms,
        }),
    }
}

/// Waits until `deadline`, or forever when there is none.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

fn deadline_error(arrived: Instant, completion_tokens: u32) -> Status {
    RouterError::DeadlineExceeded {
        elapsed_ms: arrived.elapsed().as_millis() as u64,
        completion_tokens,
    }
    .into()
}

impl Dispatched {
    /// Tells admission what the request used: the worker's exact usage when it completed, else the
    /// reserved prompt estimate plus the tokens streamed so far.
    fn settle(&mut self, clock: &Clock, usage: Option<&Usage>) {
        let used = match usage {
            Some(u) => u.prompt_tokens.saturating_add(u.completion_tokens),
            None => self.prompt_estimate.saturating_add(clock.tokens),
        };
        self.permit.settle(used, clock.generated());
    }
}

type ResponseStream = std::pin::Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStreamStream = ResponseStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        let mut d = match self.dispatch(request).await {
            Ok(d) => d,
            Err(e) => {
                let status = Status::from(e);
                record_outcome(&Err(status.clone()), None);
                return Err(status);
            }
        };
        let mut clock = Clock::new(d.arrived, &d.model);
        let mut text = String::new();
        let complete = loop {
            let next = tokio::select! {
                next = d.events.next() => next,
                () = until(d.deadline) => break Err(deadline_error(d.arrived, clock.tokens)),
            };
            match next {
                Some(Ok(Event::Token(t))) => {
                    clock.tokens(t.token_ids.len());
                    text.push_str(&t.text);
                }
                Some(Ok(Event::Complete(c))) => break Ok(c),
                Some(Err(e)) => break Err(RouterError::from(e).into()),
                None => break Err(Status::internal("the worker ended the stream without a completion")),
            }
        };
        record_outcome(&complete.as_ref().map(|_| ()).map_err(Clone::clone), Some(&d.model));
        d.settle(&clock, complete.as_ref().ok().map(|c| &c.usage));
        let complete = complete?;
        clock.complete();
        let c = complete_to_wire(complete, &d.model, &d.request_id);
        Ok(Response::new(pb::GenerateResponse {
            text,
            finish_reason: c.finish_reason,
            usage: c.usage,
            model_version: c.model_version,
            request_id: c.request_id,
            timings: c.timings,
        }))
    }

    async fn generate_stream(&self, request: Request<pb::GenerateRequest>) -> Result<Response<ResponseStream>, Status> {
        let d = match self.dispatch(request).await {
            Ok(d) => d,
            Err(e) => {
                let status = Status::from(e);
                record_outcome(&Err(status.clone()), None);
                return Err(status);
            }
        };
        // Tokens go out as soon as they arrive. The task ends when the stream completes, the client leaves
        // (`tx.closed()`) or the deadline passes; ending drops the worker stream, which cancels generation.
        let (tx, rx) = mpsc::channel(32);
        tokio::spawn(forward(d, tx));
        Ok(Response::new(ReceiverStream::new(rx).boxed()))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        self.live
            .keys()
            .authenticate(authorization(request.metadata()))
            .map_err(RouterError::from)?;
        let default = self.pool.default_name();
        let models = self
            .pool
            .models()
            .into_iter()
            .map(|m| pb::ModelInfo {
                is_default: default.as_deref() == Some(m.name.as_str()),
                name: m.name,
                version: m.version,
                context_length: m.context_length,
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}

async fn forward(mut d: Dispatched, tx: mpsc::Sender<Result<pb::GenerateStreamResponse, Status>>) {
    use pb::generate_stream_response::Event as Out;
    let mut clock = Clock::new(d.arrived, &d.model);
    let mut usage = None;
    let outcome: Result<(), Status> = loop {
        let next = tokio::select! {
            () = tx.closed() => {
                tracing::info!(request_id = %d.request_id, "client disconnected; cancelling");
                break Err(Status::cancelled("client disconnected"));
            }
            () = until(d.deadline) => {
                let status = deadline_error(d.arrived, clock.tokens);
                let _ = tx.send(Err(status.clone())).await;
                break Err(status);
            }
            next = d.events.next() => next,
        };
        let out = match next {
            Some(Ok(Event::Token(t))) => {
                clock.tokens(t.token_ids.len());
                Out::Token(pb::TokenDelta {
                    text: t.text,
                    token_ids: t.token_ids,
                })
            }
            Some(Ok(Event::Complete(c))) => {
                clock.complete();
                usage = Some(c.usage);
                let _ = tx
                    .send(Ok(pb::GenerateStreamResponse {
                        event: Some(Out::Complete(complete_to_wire(c, &d.model, &d.request_id))),
                    }))
                    .await;
                break Ok(());
            }
            Some(Err(e)) => {
                let status = Status::from(RouterError::from(e));
                let _ = tx.send(Err(status.clone())).await;
                break Err(status);
            }
            None => {
                let status = Status::internal("the worker ended the stream without a completion");
                let _ = tx.send(Err(status.clone())).await;
                break Err(status);
            }
        };
        if tx
            .send(Ok(pb::GenerateStreamResponse { event: Some(out) }))
            .await
            .is_err()
        {
            break Err(Status::cancelled("client disconnected"));
        }
    };
    record_outcome(&outcome, Some(&d.model));
    d.settle(&clock, usage.as_ref());
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
        };
        metrics::with_local_recorder(&recorder, || {
            record_outcome(&Ok(()), Some(&model));
            record_outcome(&Err(Status::invalid_argument("x")), None);
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
