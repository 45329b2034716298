//! The request path that every front door shares, as named stages: [`Pipeline::authenticate`],
//! [`Pipeline::validate`], [`Pipeline::admit`], [`Pipeline::screen_input`], [`Pipeline::route`] and
//! [`Pipeline::hand_off`]; relaying with the output filter and settling follow in relay.rs. The gRPC door
//! (inference.rs) and the HTTP door (http/) turn their transport's request into an [`Arrival`] and a
//! `GenerateRequest`, call [`Pipeline::start`], and turn what comes back into their own messages.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroserve_admission::{Admitted, Ask, Permit, Scope, Tenant};
use ferroserve_core::{BackendError, Input, RequestLimits};
use ferroserve_filter::{Action, FilterHub, OutputGuard, Stage};
use ferroserve_proto::v1 as pb;
use tonic::Status;

use crate::affinity::PrefixKeys;
use crate::catalog::{Asking, Catalog};
use crate::live::Live;
use crate::migrate::Handoff;
use crate::pool::Pool;
use crate::relay::{Dispatched, record_outcome, until, verdict_to_wire};
use crate::validate::{Checked, validate};
use crate::{ModelSelector, RouterError};

/// The front door a request came through; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// `ferroserve.v1.Inference` over gRPC.
    Grpc,
    /// The OpenAI-compatible HTTP API.
    Http,
}

impl Protocol {
    /// The `protocol` label value.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::Http => "http",
        }
    }
}

/// How many workers a request may be offered to before it fails as unavailable.
const MAX_DISPATCH_ATTEMPTS: usize = 3;

/// Bytes per token assumed when reserving a prompt's tokens before the worker has tokenized it. English
/// averages about four bytes a token under byte-level BPE; three errs toward reserving too much, and the
/// reservation is reconciled with the worker's exact count when the request ends.
const BYTES_PER_TOKEN_ESTIMATE: usize = 3;
/// Tokens assumed per chat message for the template's role markers, and for a default system message.
const TEMPLATE_TOKENS_PER_MESSAGE: usize = 8;

/// The shared request path: stateless apart from the shared pool, filters, policies and live settings.
pub(crate) struct Pipeline {
    /// Where requests go.
    pub pool: Arc<Pool>,
    /// Who may send them, and how much (keys and admission limits, changeable live).
    pub live: Arc<Live>,
    /// Request shape limits.
    pub limits: RequestLimits,
    /// The content filter, swappable live.
    pub filters: Arc<FilterHub>,
    /// Which version takes a request (the traffic policy), where its outcomes go, and what cancels it.
    pub catalog: Arc<Catalog>,
    /// How long a streaming client may take no message before it is given up on.
    pub client_stall: Duration,
    /// How long a worker may send no event before the request moves to another.
    pub worker_stall: Duration,
    /// The server's shutdown: at its deadline, streams still open end with UNAVAILABLE.
    pub drain: ferroserve_net::DrainWatch,
}

/// How a request begins: handed to a worker, or refused by the input filter before any model work.
pub(crate) enum Start {
    /// Running on a worker.
    Dispatched(Box<Dispatched>),
    /// The input filter blocked it: the completion (FILTERED) to send.
    Filtered(pb::GenerationComplete),
}

/// What the transport tells about a request besides its body.
pub(crate) struct Arrival {
    /// When the router took it.
    pub at: Instant,
    /// The authenticated caller.
    pub tenant: Tenant,
    /// The client's deadline, as time left at arrival.
    pub budget: Option<Duration>,
    /// The A/B cohort header, if sent.
    pub cohort: Option<String>,
    /// Which door it came through.
    pub protocol: Protocol,
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

impl Pipeline {
    /// Authentication, from the `authorization` header, before the body is decoded: an unknown caller
    /// costs no decoding. A refusal is counted.
    pub(crate) fn authenticate(&self, authorization: Option<&str>, protocol: Protocol) -> Result<Tenant, RouterError> {
        self.live.keys().authenticate(authorization).map_err(|e| {
            let e = RouterError::from(e);
            record_outcome(&Err(Status::from(&e)), None, protocol);
            e
        })
    }

    /// The request path, stage by stage, for an authenticated caller; a failure is counted by its status.
    pub(crate) async fn start(&self, arrival: Arrival, body: pb::GenerateRequest) -> Result<Start, RouterError> {
        let protocol = arrival.protocol;
        self.dispatch(arrival, body).await.inspect_err(|e| {
            record_outcome(&Err(Status::from(e)), None, protocol);
        })
    }

    async fn dispatch(&self, arrival: Arrival, body: pb::GenerateRequest) -> Result<Start, RouterError> {
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
        self.admit_ask(ask, arrival.at).await
    }

    /// Admission of any work (a generation, or an embedding on the HTTP door), waiting in the queue until
    /// the ask's deadline.
    /// In a fleet, the tenant's limits are reserved across the replicas first (in Redis), and the gate
    /// applies this replica's own limits; the permit settles the fleet's reservation when it ends.
    pub(crate) async fn admit_ask(&self, ask: Ask, at: Instant) -> Result<Permit, RouterError> {
        let deadline = ask.deadline.map(|d| at + d);
        let (scope, ticket) = match self.live.cluster() {
            Some(cluster) => {
                let r = cluster.reserve(&ask.tenant.name, ask.tokens).await?;
                (r.scope, r.ticket)
            }
            None => (Scope::Local, None),
        };
        let mut permit = match self.live.admission().admit_in(ask, scope)? {
            Admitted::Now(permit) => permit,
            Admitted::Queued(waiting) => tokio::select! {
                granted = waiting.granted() => granted?,
                () = until(deadline) => return Err(RouterError::DeadlineExceeded {
                    elapsed_ms: at.elapsed().as_millis() as u64,
                    completion_tokens: 0,
                }),
            },
        };
        if let Some(ticket) = ticket {
            permit.on_finish(ticket.into_hook());
        }
        Ok(permit)
    }

    /// The input filter; the completion to send when it blocks. The filter this request starts with is the
    /// one it finishes with, whatever is swapped meanwhile.
    async fn screen_input(&self, checked: &Checked, arrival: &Arrival) -> Option<pb::GenerationComplete> {
        let selection = self.filters.selection();
        let request_id = &checked.request.request_id;
        let text = filter_text(&checked.request.input);
        let verdict = self
            .filters
            .check(&selection, Stage::Input, Arc::clone(&text), true)
            .await?;
        let filter = selection.active.as_ref().map(|a| a.id.clone()).unwrap_or_default();
        self.filters
            .record(&filter, Stage::Input, request_id, &verdict, Some(&text));
        if verdict.action != Action::Block {
            return None;
        }
        tracing::info!(request_id = %request_id, %filter, category = ?verdict.category, "input filtered");
        record_outcome(&Ok(()), None, arrival.protocol);
        let wire = verdict_to_wire(&filter, Stage::Input.label(), &verdict);
        Some(input_filtered(request_id.clone(), arrival.at, wire))
    }

    /// The version the traffic policy sends this request to, as a pin; the request's own selector when
    /// the model has no policy.
    fn route(&self, checked: &Checked, arrival: &Arrival) -> ModelSelector {
        let asking = Asking {
            selector: &checked.selector,
            session: Some(checked.session.as_str()).filter(|s| !s.is_empty()),
            cohort: arrival.cohort.as_deref(),
            request_id: &checked.request.request_id,
        };
        self.catalog.choose(&self.pool, asking)
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
        let keys = PrefixKeys::of(&valid.input);
        loop {
            let lease = match self.pool.pick_for(&selector, &tried, &keys) {
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
                        cancel: self.catalog.in_flight.watch(&model.id()),
                        model,
                        request_id,
                        arrived: arrival.at,
                        deadline: arrival.deadline(),
                        guard: guard.take(),
                        observations: Arc::clone(&self.catalog.observations),
                        protocol: arrival.protocol,
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
