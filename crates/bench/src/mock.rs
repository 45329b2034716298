//! Mock servers (no model): they stream tokens on a fixed schedule, so that the load tester's own
//! measurements and overhead can be checked against known delays. One speaks Ferroserve's gRPC API, the
//! other the OpenAI SSE API. Both bind 127.0.0.1:0 and stop when [`MockServer::stop`] is called.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::inference_server::{Inference, InferenceServer};
use futures::Stream;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Status, async_trait};

/// What the mock does to one request instead of answering it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// gRPC RESOURCE_EXHAUSTED / HTTP 429.
    RateLimited,
    /// gRPC UNAVAILABLE / HTTP 503.
    Unavailable,
    /// gRPC INVALID_ARGUMENT / HTTP 400.
    Invalid,
    /// gRPC INTERNAL / HTTP 500.
    Internal,
    /// Sends the first token, then nothing, forever (the client's timeout ends it).
    Stall,
}

/// How the mock streams.
#[derive(Debug, Clone)]
pub struct MockBehaviour {
    /// Delay before the first token.
    pub ttft: Duration,
    /// Delay between tokens.
    pub itl: Duration,
    /// Tokens per streamed chunk (the chunk goes out when its last token is due).
    pub tokens_per_chunk: u32,
    /// Request n gets `faults[n % len]`; `None` entries answer normally. Empty: no faults.
    pub faults: Vec<Option<Fault>>,
    /// OpenAI mock: send a final `usage` chunk when the client asks (`stream_options.include_usage`).
    pub report_usage: bool,
}

impl Default for MockBehaviour {
    fn default() -> Self {
        MockBehaviour {
            ttft: Duration::ZERO,
            itl: Duration::ZERO,
            tokens_per_chunk: 1,
            faults: Vec::new(),
            report_usage: true,
        }
    }
}

/// Shared by one server's requests.
struct Shared {
    /// The schedule and faults.
    behaviour: MockBehaviour,
    /// Requests seen, for the fault cycle.
    seen: AtomicU64,
}

impl Shared {
    fn fault(&self) -> Option<Fault> {
        let n = self.seen.fetch_add(1, Ordering::Relaxed) as usize;
        let f = &self.behaviour.faults;
        if f.is_empty() { None } else { f[n % f.len()] }
    }

    /// Streams `max_tokens` tokens in chunks on the schedule: `send(tokens_in_chunk)` per chunk. Returns
    /// false if the receiver left. A stall sends one chunk, then waits until the receiver leaves.
    async fn schedule<F, Fut>(&self, max_tokens: u32, stall: bool, mut send: F) -> bool
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = bool>,
    {
        let b = &self.behaviour;
        let start = Instant::now();
        let per_chunk = b.tokens_per_chunk.max(1);
        let mut produced = 0;
        while produced < max_tokens {
            let k = per_chunk.min(max_tokens - produced);
            produced += k;
            // Absolute times, so that timer rounding does not accumulate; no timer at all when the time has
            // come (a mock with no delays answers without a timer tick).
            let due = start + b.ttft + b.itl * (produced - 1);
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            if !send(k).await {
                return false;
            }
            if stall {
                std::future::pending::<()>().await;
            }
        }
        true
    }
}

/// A running mock server.
pub struct MockServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The URL a bench target uses.
    pub url: String,
    /// Ends the server.
    stop: oneshot::Sender<()>,
    /// The accept loop.
    task: JoinHandle<()>,
}

impl MockServer {
    /// A mock Ferroserve `Inference` service on 127.0.0.1:0 (`grpc://` URL).
    pub async fn grpc(behaviour: MockBehaviour) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let service = MockInference(Arc::new(Shared {
            behaviour,
            seen: AtomicU64::new(0),
        }));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(InferenceServer::new(service))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(MockServer {
            addr,
            url: format!("grpc://{addr}"),
            stop,
            task,
        })
    }

    /// A mock OpenAI-compatible server on 127.0.0.1:0 (`http://.../v1/completions` URL; chat too).
    pub async fn openai(behaviour: MockBehaviour) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            behaviour,
            seen: AtomicU64::new(0),
        });
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        let shared = shared.clone();
                        connections.spawn(async move {
                            let service = hyper::service::service_fn(move |r| openai_request(shared.clone(), r));
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                }
            }
            connections.abort_all();
        });
        Ok(MockServer {
            addr,
            url: format!("http://{addr}/v1/completions"),
            stop,
            task,
        })
    }

    /// Stops the server and waits for its accept loop to end.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// The mock gRPC service.
struct MockInference(Arc<Shared>);

type TokenStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[async_trait]
impl Inference for MockInference {
    type GenerateStreamStream = TokenStream;

    async fn generate(
        &self,
        _: tonic::Request<pb::GenerateRequest>,
    ) -> Result<tonic::Response<pb::GenerateResponse>, Status> {
        Err(Status::unimplemented("the mock streams only: use GenerateStream"))
    }

    async fn generate_stream(
        &self,
        request: tonic::Request<pb::GenerateRequest>,
    ) -> Result<tonic::Response<TokenStream>, Status> {
        use pb::generate_stream_response::Event;
        let shared = self.0.clone();
        let fault = shared.fault();
        match fault {
            Some(Fault::RateLimited) => return Err(Status::resource_exhausted("mock: tenant_requests limit")),
            Some(Fault::Unavailable) => return Err(Status::unavailable("mock: queue full")),
            Some(Fault::Invalid) => return Err(Status::invalid_argument("mock: max_tokens out of range")),
            Some(Fault::Internal) => return Err(Status::internal("mock: internal error")),
            Some(Fault::Stall) | None => {}
        }
        let r = request.into_inner();
        let prompt_tokens = (r.prompt.len() as u32).div_ceil(4);
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut next_id = 0;
            let finished = shared
                .schedule(r.max_tokens, fault == Some(Fault::Stall), |k| {
                    let ids: Vec<u32> = (next_id..next_id + k).collect();
                    next_id += k;
                    let tx = tx.clone();
                    async move {
                        let token = pb::TokenDelta {
                            text: " tok".repeat(ids.len()),
                            token_ids: ids,
                            logprobs: Vec::new(),
                        };
                        tx.send(Ok(pb::GenerateStreamResponse {
                            event: Some(Event::Token(token)),
                        }))
                        .await
                        .is_ok()
                    }
                })
                .await;
            if finished {
                let done = pb::GenerationComplete {
                    finish_reason: pb::FinishReason::Length as i32,
                    usage: Some(pb::Usage {
                        prompt_tokens,
                        completion_tokens: r.max_tokens,
                        ..Default::default()
                    }),
                    model_version: "mock@1".into(),
                    ..Default::default()
                };
                let _ = tx
                    .send(Ok(pb::GenerateStreamResponse {
                        event: Some(Event::Complete(done)),
                    }))
                    .await;
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_models(
        &self,
        _: tonic::Request<pb::ListModelsRequest>,
    ) -> Result<tonic::Response<pb::ListModelsResponse>, Status> {
        Ok(tonic::Response::new(pb::ListModelsResponse {
            models: vec![pb::ModelInfo {
                name: "mock".into(),
                is_default: true,
                ..Default::default()
            }],
        }))
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r
}

/// One OpenAI request: `max_tokens` tokens as SSE chunks, then `usage` if asked, then `[DONE]`.
async fn openai_request(shared: Arc<Shared>, request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let chat = match request.uri().path() {
        "/v1/completions" => false,
        "/v1/chat/completions" => true,
        other => return Ok(text(StatusCode::NOT_FOUND, format!("mock: no route {other}"))),
    };
    let Ok(body) = request.into_body().collect().await else {
        return Ok(text(StatusCode::BAD_REQUEST, "mock: unreadable body".into()));
    };
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body.to_bytes()) else {
        return Ok(text(StatusCode::BAD_REQUEST, "mock: body is not JSON".into()));
    };
    let fault = shared.fault();
    match fault {
        Some(Fault::RateLimited) => return Ok(text(StatusCode::TOO_MANY_REQUESTS, "mock: slow down".into())),
        Some(Fault::Unavailable) => return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "mock: busy".into())),
        Some(Fault::Invalid) => return Ok(text(StatusCode::BAD_REQUEST, "mock: bad max_tokens".into())),
        Some(Fault::Internal) => return Ok(text(StatusCode::INTERNAL_SERVER_ERROR, "mock: broke".into())),
        Some(Fault::Stall) | None => {}
    }
    let max_tokens = json["max_tokens"].as_u64().unwrap_or(16) as u32;
    let usage = shared.behaviour.report_usage && json["stream_options"]["include_usage"].as_bool() == Some(true);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
    tokio::spawn(async move {
        let event = |v: serde_json::Value| Ok(Frame::data(Bytes::from(format!("data: {v}\n\n"))));
        let finished = shared
            .schedule(max_tokens, fault == Some(Fault::Stall), |k| {
                let piece = " tok".repeat(k as usize);
                let chunk = if chat {
                    serde_json::json!({"choices": [{"index": 0, "delta": {"content": piece}}]})
                } else {
                    serde_json::json!({"choices": [{"index": 0, "text": piece}]})
                };
                let tx = tx.clone();
                async move { tx.send(event(chunk)).await.is_ok() }
            })
            .await;
        if finished {
            if usage {
                let u =
                    serde_json::json!({"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": max_tokens}});
                let _ = tx.send(event(u)).await;
            }
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n")))).await;
        }
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx))));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "text/event-stream".parse().expect("valid header"),
    );
    Ok(response)
}
