//! `POST /v1/chat/completions` and `POST /v1/completions`: `n` copies of one request through the
//! pipeline, answered as one JSON body or as server-sent events ending with `data: [DONE]`.
//!
//! The copies run concurrently, so that a worker batches them together; with a seed, copy `i` uses
//! `seed + i`, so that copy 0 is the request a client sends with `n = 1`. A copy refused before it runs
//! refuses the whole request (the copies already started are dropped, which cancels them and refunds
//! their reservations). Streaming reuses the gRPC door's client side (stream.rs): the worker is read by
//! its own task, and a client that stops reading is given up on after the stall timeout.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ferroserve_admission::Tenant;
use ferroserve_proto::v1 as pb;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::wire::{self, Endpoint, Parsed};
use super::{HttpDoor, REQUEST_ID_HEADER, unix_now};
use crate::HttpError;
use crate::inference::COHORT_HEADER;
use crate::pipeline::{Arrival, Protocol, Start};
use crate::relay::Relay;

use pb::generate_stream_response::Event as Out;

/// Server-sent events waiting for a slow client, beyond what each copy's own relay buffers.
const SSE_BUFFER: usize = 32;

pub(crate) async fn chat(State(door): State<Arc<HttpDoor>>, headers: HeaderMap, body: Bytes) -> Response {
    door.complete(&headers, &body, Endpoint::Chat).await
}

pub(crate) async fn completions(State(door): State<Arc<HttpDoor>>, headers: HeaderMap, body: Bytes) -> Response {
    door.complete(&headers, &body, Endpoint::Completions).await
}

/// What every chunk or body of one response repeats.
#[derive(Clone)]
struct Meta {
    /// `chatcmpl-<request id>` or `cmpl-<request id>`.
    id: String,
    /// Unix seconds.
    created: u64,
    /// The serving `name@version` (the model as the client named it when none was chosen).
    model: String,
    endpoint: Endpoint,
    /// Whether token logprobs go out.
    logprobs: bool,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }
}

/// OpenAI's `finish_reason`. The server cancelling a request (drain, kill switch) is vLLM's `abort`.
pub(super) fn finish_reason(c: &pb::GenerationComplete) -> &'static str {
    match pb::FinishReason::try_from(c.finish_reason) {
        Ok(pb::FinishReason::Length) => "length",
        Ok(pb::FinishReason::Filtered) => "content_filter",
        Ok(pb::FinishReason::Cancelled) => "abort",
        _ => "stop",
    }
}

/// OpenAI's usage object; `cached` is `prompt_tokens_details.cached_tokens`, the prompt tokens the worker
/// took from its prefix cache.
fn usage_json(prompt: u32, completion: u32, cached: u32) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// Usage of all copies: the prompt once (with the first copy's cached count: the copies after it find
/// the prompt cached, but it was computed once), every copy's completion tokens.
fn total_usage<'a>(done: impl Iterator<Item = &'a pb::GenerationComplete>) -> Value {
    let (mut prompt, mut completion, mut cached) = (0, 0, u32::MAX);
    for c in done {
        let u = c.usage.unwrap_or_default();
        prompt = prompt.max(u.prompt_tokens);
        completion += u.completion_tokens;
        cached = cached.min(u.cached_tokens);
    }
    usage_json(prompt, completion, if cached == u32::MAX { 0 } else { cached })
}

/// One token's logprob entry in OpenAI's chat form.
fn chat_logprob(t: &pb::TokenLogprob) -> Value {
    let entry = |token: &str, bytes: &[u8], logprob: f32| json!({"token": token, "bytes": bytes, "logprob": logprob});
    let mut v = entry(&t.token, &t.bytes, t.logprob);
    v["top_logprobs"] = t.top.iter().map(|a| entry(&a.token, &a.bytes, a.logprob)).collect();
    v
}

/// Logprobs of some tokens in the endpoint's form: chat's `{content: [...]}`, or the legacy
/// completions' parallel lists.
fn logprobs_json(endpoint: Endpoint, tokens: &[pb::TokenLogprob], offset: usize) -> Value {
    match endpoint {
        Endpoint::Chat => json!({"content": tokens.iter().map(chat_logprob).collect::<Vec<_>>()}),
        Endpoint::Completions => {
            let mut at = offset;
            let mut offsets = Vec::with_capacity(tokens.len());
            for t in tokens {
                offsets.push(at);
                at += t.token.len();
            }
            json!({
                "tokens": tokens.iter().map(|t| t.token.as_str()).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": tokens.iter().map(|t| {
                    t.top.iter().map(|a| (a.token.clone(), json!(a.logprob))).collect::<serde_json::Map<_, _>>()
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
    }
}

/// One copy's whole answer.
pub(super) struct Collected {
    pub text: String,
    pub logprobs: Vec<pb::TokenLogprob>,
    pub done: pb::GenerationComplete,
}

/// A copy's messages for the client.
type Messages = BoxStream<'static, Result<pb::GenerateStreamResponse, Status>>;

/// One copy, started through the pipeline and already relaying: its worker is read as it produces
/// (stream.rs), so a copy that runs finishes and frees its admission slot even while a sibling copy is
/// still waiting in the queue for one.
pub(super) struct Copy {
    pub request_id: String,
    /// The serving `name@version`; `None` when the input filter refused the request.
    pub model: Option<String>,
    pub messages: Messages,
}

impl Copy {
    fn begin(start: Start, client_stall: std::time::Duration) -> Copy {
        match start {
            Start::Filtered(c) => Copy {
                request_id: c.request_id.clone(),
                model: None,
                messages: futures::stream::once(async move {
                    Ok(pb::GenerateStreamResponse {
                        event: Some(Out::Complete(c)),
                    })
                })
                .boxed(),
            },
            Start::Dispatched(d) => Copy {
                request_id: d.request_id.clone(),
                model: Some(d.model.qualified()),
                messages: {
                    let max_messages = d.handoff.request.max_tokens as usize + 2;
                    crate::stream::relay_to_client(Relay::new(*d), max_messages, client_stall).boxed()
                },
            },
        }
    }

    /// Reads the copy to its end.
    pub(super) async fn collect(mut self) -> Result<Collected, Status> {
        let (mut text, mut logprobs) = (String::new(), Vec::new());
        while let Some(message) = self.messages.next().await {
            match message?.event {
                Some(Out::Token(t)) => {
                    text.push_str(&t.text);
                    logprobs.extend(t.logprobs);
                }
                Some(Out::Complete(done)) => return Ok(Collected { text, logprobs, done }),
                None => {}
            }
        }
        Err(Status::internal("the request ended without a completion"))
    }
}

impl HttpDoor {
    /// Authenticate, parse, start `n` copies through the pipeline, answer.
    async fn complete(&self, headers: &HeaderMap, body: &[u8], endpoint: Endpoint) -> Response {
        let tenant = match self.authenticate(headers) {
            Ok(t) => t,
            Err(e) => return self.router_error(&e, None),
        };
        let mut parsed = match wire::parse(body, endpoint, &self.limits) {
            Ok(p) => p,
            Err(e) => return self.refused(e, &tenant),
        };
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        parsed.body.request_id = header(REQUEST_ID_HEADER).unwrap_or_default();
        if let Err(e) = self.check_n(parsed.n, &tenant) {
            return self.refused(e, &tenant);
        }
        let copies = match self.start_copies(&parsed, &tenant, header(COHORT_HEADER)).await {
            Ok(c) => c,
            Err(e) => return self.router_error(&e, Some(&tenant)),
        };
        let first_id = copies[0].request_id.clone();
        // The serving version, once one was chosen; the name the client sent when the input filter
        // refused the request first.
        let model = copies
            .iter()
            .find_map(|c| c.model.clone())
            .unwrap_or_else(|| parsed.body.model.clone());
        let meta = Meta {
            id: format!(
                "{}-{first_id}",
                if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" }
            ),
            created: unix_now(),
            model,
            endpoint,
            logprobs: parsed.logprobs.is_some(),
        };
        let mut response = if parsed.stream {
            stream(copies, meta, parsed.include_usage)
        } else {
            match unary(copies, &meta).await {
                Ok(r) => r,
                Err(status) => return self.error(HttpError::from_status(&status), Some(&tenant)),
            }
        };
        response.headers_mut().extend(self.rate_headers(&tenant));
        if let Ok(v) = first_id.parse() {
            response.headers_mut().insert(REQUEST_ID_HEADER, v);
        }
        response
    }

    /// `n` beyond what the tenant, or the server, may ever run at once can never succeed: a 400 naming
    /// `n`, not a retryable refusal.
    fn check_n(&self, n: u32, tenant: &Tenant) -> Result<(), HttpError> {
        let admission = self.pipeline.live.admission();
        let server = admission.server_view();
        let mine = admission.tenant_view(&tenant.name);
        let caps = [
            mine.as_ref().and_then(|v| v.limits.max_in_flight),
            mine.as_ref().and_then(|v| v.limits.requests.map(|r| r.burst)),
            server
                .limits
                .max_in_flight
                .map(|m| m.saturating_add(admission.queue_limits().0)),
        ];
        match caps.into_iter().flatten().min() {
            Some(cap) if n > cap => Err(HttpError::invalid(
                "n",
                format!("{n} completions at once can never be admitted here: the most is {cap}"),
            )),
            _ => Ok(()),
        }
    }

    /// The `n` copies, each relaying as soon as it starts; the first refusal refuses the request, and the
    /// copies already started are dropped (cancelled, their reservations settled).
    pub(super) async fn start_copies(
        &self,
        parsed: &Parsed,
        tenant: &Tenant,
        cohort: Option<String>,
    ) -> Result<Vec<Copy>, crate::RouterError> {
        let at = Instant::now();
        let client_stall = self.pipeline.client_stall;
        let copies = (0..parsed.n).map(|i| {
            let mut body = parsed.body.clone();
            if parsed.n > 1 {
                if let Some(seed) = body.sampling.as_mut().and_then(|s| s.seed.as_mut()) {
                    *seed = seed.wrapping_add(u64::from(i));
                }
                if !body.request_id.is_empty() {
                    body.request_id = format!("{}-{i}", body.request_id);
                }
            }
            body.logprobs = parsed.logprobs.is_some();
            body.top_logprobs = parsed.logprobs.unwrap_or(0);
            let arrival = Arrival {
                at,
                tenant: tenant.clone(),
                budget: None,
                cohort: cohort.clone(),
                protocol: Protocol::Http,
            };
            async move {
                let start = self.pipeline.start(arrival, body).await?;
                Ok(Copy::begin(start, client_stall))
            }
        });
        futures::future::try_join_all(copies).await
    }
}

/// Every copy to its end, as one JSON body. A copy that fails ends the request, and the others are
/// dropped (cancelled).
async fn unary(copies: Vec<Copy>, meta: &Meta) -> Result<Response, Status> {
    let collected = futures::future::try_join_all(copies.into_iter().map(Copy::collect)).await?;
    let choices: Vec<Value> = collected
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let logprobs = meta.logprobs.then(|| logprobs_json(meta.endpoint, &c.logprobs, 0));
            let mut choice = json!({"index": index, "finish_reason": finish_reason(&c.done), "logprobs": logprobs});
            match meta.endpoint {
                Endpoint::Chat => choice["message"] = json!({"role": "assistant", "content": c.text}),
                Endpoint::Completions => choice["text"] = json!(c.text),
            }
            choice
        })
        .collect();
    Ok(axum::Json(json!({
        "id": meta.id,
        "object": meta.object(false),
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": meta.model,
        "choices": choices,
        "usage": total_usage(collected.iter().map(|c| &c.done)),
    }))
    .into_response())
}

/// Every copy's messages as server-sent events, interleaved as they come.
fn stream(copies: Vec<Copy>, meta: Meta, include_usage: bool) -> Response {
    let copies = copies
        .into_iter()
        .enumerate()
        .map(|(i, copy)| copy.messages.map(move |m| (i, m)));
    let (tx, rx) = mpsc::channel(SSE_BUFFER);
    let writer = SseWriter {
        meta,
        tx,
        started: Vec::new(),
        offsets: Vec::new(),
        done: Vec::new(),
        include_usage,
    };
    tokio::spawn(writer.run(futures::stream::select_all(copies)));
    Sse::new(ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Turns the copies' messages into OpenAI chunks, in one task, until the last copy ends or the client
/// leaves (dropping the copies, which cancels them).
struct SseWriter {
    meta: Meta,
    tx: mpsc::Sender<SseEvent>,
    /// Copies whose first chunk (with the assistant role) went out.
    started: Vec<usize>,
    /// Text sent so far per copy, for the completions' `text_offset`.
    offsets: Vec<(usize, usize)>,
    /// Completions so far, for the usage chunk.
    done: Vec<pb::GenerationComplete>,
    include_usage: bool,
}

impl SseWriter {
    async fn run(
        mut self,
        mut copies: impl Stream<Item = (usize, Result<pb::GenerateStreamResponse, Status>)> + Unpin,
    ) {
        loop {
            let next = tokio::select! {
                () = self.tx.closed() => return,
                next = copies.next() => next,
            };
            let Some((i, message)) = next else { break };
            let event = match message {
                Ok(pb::GenerateStreamResponse { event: Some(e) }) => e,
                Ok(_) => continue,
                Err(status) => {
                    // The error in OpenAI's form; the SDKs raise it. The other copies stop with it.
                    let _ = self.send(HttpError::from_status(&status).body()).await;
                    break;
                }
            };
            let chunk = match event {
                Out::Token(t) => self.token(i, t),
                Out::Complete(c) => {
                    let chunk = self.choice_chunk(i, Value::Null, None, Some(finish_reason(&c)));
                    self.done.push(c);
                    Some(chunk)
                }
            };
            if let Some(chunk) = chunk
                && !self.send(chunk).await
            {
                return;
            }
        }
        if self.include_usage {
            let mut chunk = self.chunk(Vec::new());
            chunk["usage"] = total_usage(self.done.iter());
            if !self.send(chunk).await {
                return;
            }
        }
        let _ = self.tx.send(SseEvent::default().data("[DONE]")).await;
    }

    /// A token message as a chunk; `None` for one with nothing to show (text held back).
    fn token(&mut self, i: usize, t: pb::TokenDelta) -> Option<Value> {
        if t.text.is_empty() && t.logprobs.is_empty() {
            return None;
        }
        let offset = match self.offsets.iter_mut().find(|(c, _)| *c == i) {
            Some((_, at)) => at,
            None => {
                self.offsets.push((i, 0));
                &mut self.offsets.last_mut().expect("just pushed").1
            }
        };
        let logprobs = self
            .meta
            .logprobs
            .then(|| logprobs_json(self.meta.endpoint, &t.logprobs, *offset));
        *offset += t.text.len();
        Some(self.choice_chunk(i, json!(t.text), logprobs, None))
    }

    fn chunk(&self, choices: Vec<Value>) -> Value {
        json!({
            "id": self.meta.id,
            "object": self.meta.object(true),
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": choices,
        })
    }

    /// A chunk of one copy: text (null for none), logprobs, and the finish reason at its end.
    fn choice_chunk(&mut self, i: usize, text: Value, logprobs: Option<Value>, finish: Option<&str>) -> Value {
        let mut choice = json!({"index": i, "logprobs": logprobs, "finish_reason": finish});
        match self.meta.endpoint {
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if !self.started.contains(&i) {
                    self.started.push(i);
                    delta.insert("role".into(), json!("assistant"));
                }
                if !text.is_null() {
                    delta.insert("content".into(), text);
                }
                choice["delta"] = Value::Object(delta);
            }
            Endpoint::Completions => choice["text"] = if text.is_null() { json!("") } else { text },
        }
        self.chunk(vec![choice])
    }

    /// False when the client has gone.
    async fn send(&self, chunk: Value) -> bool {
        self.tx.send(SseEvent::default().data(chunk.to_string())).await.is_ok()
    }
}
