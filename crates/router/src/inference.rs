//! `ferroserve.v1.Inference`: validate, choose a worker, stream its events back.
//!
//! A request reads top to bottom through named stages (the caller was authenticated by the interceptor in
//! server.rs, before its body was decoded): [`InferenceService::validate`], [`InferenceService::admit`],
//! [`InferenceService::screen_input`], [`InferenceService::route`] and [`InferenceService::hand_off`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroserve_admission::{Admitted, Ask, AuthError, Permit, Tenant};
use ferroserve_core::{BackendError, Input, RequestLimits};
use ferroserve_filter::{Action, FilterHub, OutputGuard, Stage};
use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::inference_server::Inference;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::live::Live;
use crate::migrate::Handoff;
use crate::observe::Observations;
use crate::pool::Pool;
use crate::relay::{Dispatched, Relay, Relayed, record_outcome, until, verdict_to_wire};
use crate::traffic::{InFlight, Traffic, VersionAsk};
use crate::validate::{Checked, validate};
use crate::{ModelSelector, RouterError, deadline};

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
    pub limits: RequestLimits,
    /// The content filter, swappable live.
    pub filters: Arc<FilterHub>,
    /// Which version takes a request, changeable live.
    pub traffic: Arc<Traffic>,
    /// Each version's recent outcomes, for the canary analysis.
    pub observations: Arc<Observations>,
    /// Cancels requests in flight on a disabled version.
    pub in_flight: Arc<InFlight>,
    /// How long a streaming client may take no message before it is given up on.
    pub client_stall: Duration,
    /// How long a worker may send no event before the request moves to another.
    pub worker_stall: Duration,
    /// The server's shutdown: at its deadline, streams still open end with UNAVAILABLE.
    pub drain: ferroserve_net::DrainWatch,
}

/// The request header that puts a request in an A/B cohort of the traffic policy.
pub(crate) const COHORT_HEADER: &str = "x-ferroserve-cohort";

/// How a request begins: handed to a worker, or refused by the input filter before any model work.
enum Start {
    /// Running on a worker.
    Dispatched(Box<Dispatched>),
    /// The input filter blocked it: the completion (FILTERED) to send.
    Filtered(pb::GenerationComplete),
}

/// What the transport tells about a request besides its body.
struct Arrival {
    /// When the router took it.
    at: Instant,
    /// The authenticated caller.
    tenant: Tenant,
    /// The client's deadline, as time left at arrival.
    budget: Option<Duration>,
    /// The A/B cohort header, if sent.
    cohort: Option<String>,
}

impl Arrival {
    fn deadline(&self) -> Option<Instant> {
        self.budget.map(|d| self.at + d)
    }
}

/// The text the input filter judges: the raw prompt, or every message of a conversation.
fn filter_text(input: &Input) -> Arc<str> {
    match input {
        Input::Prompt(text) => Arc::from(text.as_str()),
        Input::Chat(messages) => Arc::from(
            messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    }
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

/// The `authorization` metadata value, if present and ASCII.
pub(crate) fn authorization(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata.get("authorization").and_then(|v| v.to_str().ok())
}

fn new_request_id() -> String {
    format!("req-{:016x}", rand::random::<u64>())
}

/// The completion of a request the input filter blocked: nothing ran.
fn input_filtered(request_id: String, arrived: Instant, verdict: pb::FilterVerdict) -> pb::GenerationComplete {
    pb::GenerationComplete {
        finish_reason: pb::FinishReason::Filtered as i32,
        usage: Some(pb::Usage::default()),
        model_version: String::new(),
        request_id,
        timings: Some(pb::Timings {
            total_ms: arrived.elapsed().as_secs_f64() * 1000.0,
            ..Default::default()
        }),
        filtered: Some(verdict),
    }
}

impl InferenceService {
    /// [`InferenceService::dispatch`], counting a failure by its status.
    async fn start(&self, request: Request<pb::GenerateRequest>) -> Result<Start, Status> {
        self.dispatch(request).await.map_err(|e| {
            let status = Status::from(e);
            record_outcome(&Err(status.clone()), None);
            status
        })
    }

    /// The request path, stage by stage.
    async fn dispatch(&self, request: Request<pb::GenerateRequest>) -> Result<Start, RouterError> {
        let (metadata, extensions, body) = request.into_parts();
        let arrival = Arrival {
            at: Instant::now(),
            tenant: extensions.get::<Tenant>().cloned().ok_or_else(|| {
                AuthError::Unauthenticated("the request reached the service without authentication".into())
            })?,
            budget: deadline::from_metadata(&metadata),
            cohort: metadata
                .get(COHORT_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        };
        let checked = self.validate(body, &arrival.tenant)?;
        let permit = self.admit(&checked, &arrival).await?;
        if let Some(done) = self.screen_input(&checked, &arrival).await {
            // Nothing ran: the permit drops unsettled, which refunds the whole token reservation.
            return Ok(Start::Filtered(done));
        }
        let selector = self.route(&checked, &arrival);
        self.hand_off(checked, selector, permit, arrival).await
    }

    /// Validation, before any budget is spent: the fields' rules, the tenant's priority range, and the
    /// model's context, so that a request that can never succeed is refused as invalid rather than shed
    /// as a retryable overload.
    fn validate(&self, body: pb::GenerateRequest, tenant: &Tenant) -> Result<Checked, RouterError> {
        let mut checked = validate(body, new_request_id, &self.limits)?;
        checked.request.priority = tenant.clamp_priority(checked.request.priority);
        let context = self.pool.context_length(&checked.selector)?;
        let max_tokens = checked.request.max_tokens;
        if max_tokens >= context {
            return Err(RouterError::Invalid {
                field: "max_tokens".into(),
                message: format!(
                    "max_tokens ({max_tokens}) leaves no room for a prompt within the context length of {context} \
                     tokens; lower max_tokens below {context}"
                ),
            });
        }
        Ok(checked)
    }

    /// Admission: rate limits, concurrency caps and the waiting queue, within the client's deadline.
    async fn admit(&self, checked: &Checked, arrival: &Arrival) -> Result<Permit, RouterError> {
        let valid = &checked.request;
        let ask = Ask {
            tenant: arrival.tenant.clone(),
            tokens: estimate_prompt_tokens(&valid.input).saturating_add(valid.max_tokens),
            max_tokens: valid.max_tokens,
            deadline: arrival.budget,
        };
        match self.live.admission().admit(ask)? {
            Admitted::Now(permit) => Ok(permit),
            Admitted::Queued(waiting) => tokio::select! {
                granted = waiting.granted() => Ok(granted?),
                () = until(arrival.deadline()) => Err(RouterError::DeadlineExceeded {
                    elapsed_ms: arrival.at.elapsed().as_millis() as u64,
                    completion_tokens: 0,
                }),
            },
        }
    }

    /// The input filter; the completion to send when it blocks. The filter this request starts with is the
    /// one it finishes with, whatever is swapped meanwhile.
    async fn screen_input(&self, checked: &Checked, arrival: &Arrival) -> Option<pb::GenerationComplete> {
        let selection = self.filters.selection();
        let request_id = &checked.request.request_id;
        let verdict = self
            .filters
            .check(&selection, Stage::Input, filter_text(&checked.request.input), true)
            .await?;
        let filter = selection.active.as_ref().map(|a| a.id.clone()).unwrap_or_default();
        self.filters.record(&filter, Stage::Input, request_id, &verdict);
        if verdict.action != Action::Block {
            return None;
        }
        tracing::info!(request_id = %request_id, %filter, category = ?verdict.category, "input filtered");
        record_outcome(&Ok(()), None);
        let wire = verdict_to_wire(&filter, Stage::Input.label(), &verdict);
        Some(input_filtered(request_id.clone(), arrival.at, wire))
    }

    /// The version the traffic policy sends this request to, as a pin; the request's own selector when
    /// the model has no policy.
    fn route(&self, checked: &Checked, arrival: &Arrival) -> ModelSelector {
        let selector = checked.selector.clone();
        let (name, pinned) = match &selector {
            ModelSelector::Default => match self.pool.default_name() {
                Some(name) => (name, None),
                None => return selector,
            },
            ModelSelector::Name(name) => (name.clone(), None),
            ModelSelector::Pinned { name, version } => (name.clone(), Some(version.as_str())),
        };
        // The common case, no policy: skip collecting the serving versions.
        if !self.traffic.has_policy(&name) {
            return selector;
        }
        let ask = VersionAsk {
            pinned,
            session: Some(checked.session.as_str()).filter(|s| !s.is_empty()),
            cohort: arrival.cohort.as_deref(),
            request_id: &checked.request.request_id,
        };
        match self.traffic.choose(&name, ask, &self.pool.healthy_versions(&name)) {
            Some(version) => ModelSelector::Pinned { name, version },
            None => selector,
        }
    }

    /// Hands the request to the least loaded worker of its version, trying another if one is full or
    /// unreachable.
    async fn hand_off(
        &self,
        checked: Checked,
        selector: ModelSelector,
        permit: Permit,
        arrival: Arrival,
    ) -> Result<Start, RouterError> {
        let valid = &checked.request;
        let request_id = valid.request_id.clone();
        let mut guard = OutputGuard::new(Arc::clone(&self.filters), self.filters.selection(), &request_id);
        let mut tried = Vec::new();
        let mut refused = None;
        loop {
            let lease = match self.pool.pick(&selector, &tried) {
                Ok(lease) => lease,
                // Every worker refused it: the last refusal says why (a full queue, a drain).
                Err(e) => return Err(refused.map_or(e, RouterError::from)),
            };
            let backend = Arc::clone(lease.backend());
            // The serving version completes what the client left open: sampling and stop strings.
            let request = backend.model().defaults.apply(valid, checked.sampling_given);
            match backend.generate(request.clone()).await {
                Ok(events) => {
                    tracing::debug!(request_id = %request_id, tenant = %arrival.tenant.name, worker = backend.location(), "dispatched");
                    let model = backend.model().clone();
                    return Ok(Start::Dispatched(Box::new(Dispatched {
                        lease,
                        handoff: Handoff {
                            pool: Arc::clone(&self.pool),
                            request,
                            tried,
                            moves: 0,
                        },
                        worker_stall: self.worker_stall,
                        drain: self.drain.clone(),
                        permit,
                        prompt_estimate: estimate_prompt_tokens(&valid.input),
                        events,
                        cancel: self.in_flight.watch(&model.qualified()),
                        model,
                        request_id,
                        arrived: arrival.at,
                        deadline: arrival.deadline(),
                        guard: guard.take(),
                        observations: Arc::clone(&self.observations),
                    })));
                }
                Err(e @ (BackendError::Overloaded(_) | BackendError::Unavailable(_)))
                    if tried.len() + 1 < MAX_DISPATCH_ATTEMPTS =>
                {
                    tracing::warn!(request_id = %request_id, worker = backend.location(), error = %e, "worker refused; trying another");
                    tried.push(backend.location().to_string());
                    refused = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The unary response: the whole text and the completion's fields.
fn unary(text: String, c: pb::GenerationComplete) -> pb::GenerateResponse {
    pb::GenerateResponse {
        text,
        finish_reason: c.finish_reason,
        usage: c.usage,
        model_version: c.model_version,
        request_id: c.request_id,
        timings: c.timings,
        filtered: c.filtered,
    }
}

type ResponseStream = std::pin::Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStreamStream = ResponseStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        let mut relay = match self.start(request).await? {
            Start::Filtered(c) => return Ok(Response::new(unary(String::new(), c))),
            Start::Dispatched(d) => Relay::new(*d),
        };
        let mut text = String::new();
        while let Some(item) = relay.next().await {
            match item {
                Relayed::Token(t) => text.push_str(&t.text),
                Relayed::Done(done) => return Ok(Response::new(unary(text, done?))),
            }
        }
        Err(Status::internal("the request ended without a completion"))
    }

    async fn generate_stream(&self, request: Request<pb::GenerateRequest>) -> Result<Response<ResponseStream>, Status> {
        use pb::generate_stream_response::Event as Out;
        let d = match self.start(request).await? {
            Start::Filtered(c) => {
                let done = pb::GenerateStreamResponse {
                    event: Some(Out::Complete(c)),
                };
                return Ok(Response::new(futures::stream::once(async { Ok(done) }).boxed()));
            }
            Start::Dispatched(d) => d,
        };
        // Tokens go out as soon as they arrive (see `stream.rs`): one message per token, a flush of held
        // text and the end bound what may wait for the client.
        let max_messages = d.handoff.request.max_tokens as usize + 2;
        let out = crate::stream::relay_to_client(Relay::new(*d), max_messages, self.client_stall);
        Ok(Response::new(out.boxed()))
    }

    async fn list_models(&self, _: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
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
