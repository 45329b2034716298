//! The HTTP door: OpenAI's API on the same pipeline as gRPC.
//!
//! - `POST /v1/chat/completions` and `POST /v1/completions`, unary or streamed as server-sent events
//!   (complete.rs);
//! - `GET /v1/models`, `POST /v1/embeddings` and `POST /v1/moderations` (extra.rs);
//! - `POST /v1/responses`, stateless (responses.rs).
//!
//! Each request is authenticated from `Authorization: Bearer` before its body is parsed, read into the
//! pipeline's `GenerateRequest` (wire.rs), and sent through [`Pipeline::start`] exactly as a gRPC call is.
//! Errors are OpenAI's JSON, built from the gRPC status the same error gets ([`HttpError`]).
//!
//! The layers, outermost first: the accept loop (ferroserve-net: connection cap, TLS, handshake timeout),
//! hyper's HTTP/1.1 with a header-read timeout, the body-size limit (`max_request_bytes`, refused as a
//! 413 before the body is read), then the handlers.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ferroserve_admission::Tenant;
use ferroserve_filter::semantic::EmbedService;
use ferroserve_net::{Listen, Phase};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::Status;

use crate::pipeline::{Pipeline, Protocol};
use crate::relay::record_outcome;
use crate::{HttpError, RouterError};

mod complete;
mod extra;
mod format;
mod responses;
mod wire;

pub use wire::HttpLimits;

/// The header a client may set to choose its request id; echoed back.
const REQUEST_ID_HEADER: &str = "x-request-id";

/// What the HTTP handlers share.
pub(crate) struct HttpDoor {
    /// The request path both doors share.
    pipeline: Arc<Pipeline>,
    /// `n` and the default `max_tokens`.
    limits: HttpLimits,
    /// The sentence encoder behind `/v1/embeddings`, when loaded.
    embeddings: Option<Arc<EmbedService>>,
    /// When the server started, as `created` of `/v1/models`.
    started: u64,
}

impl HttpDoor {
    pub(crate) fn new(pipeline: Arc<Pipeline>, limits: HttpLimits, embeddings: Option<Arc<EmbedService>>) -> Self {
        HttpDoor {
            pipeline,
            limits,
            embeddings,
            started: unix_now(),
        }
    }

    /// The caller, from `Authorization: Bearer <key>`.
    fn authenticate(&self, headers: &HeaderMap) -> Result<Tenant, RouterError> {
        let authorization = headers.get("authorization").and_then(|v| v.to_str().ok());
        self.pipeline.authenticate(authorization, Protocol::Http)
    }

    /// A pipeline error as OpenAI's error response, with the tenant's rate-limit headers.
    fn router_error(&self, e: &RouterError, tenant: Option<&Tenant>) -> Response {
        self.error(HttpError::from_router(e, wire::param_for), tenant)
    }

    /// An error response: OpenAI's body, `Retry-After` when waiting helps, and the rate-limit headers.
    fn error(&self, e: HttpError, tenant: Option<&Tenant>) -> Response {
        let mut headers = tenant.map(|t| self.rate_headers(t)).unwrap_or_default();
        if let Some(wait) = e.retry_after {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            headers.insert("retry-after", HeaderValue::from(secs));
            headers.insert("retry-after-ms", HeaderValue::from(wait.as_millis() as u64));
        }
        (e.http_status(), headers, axum::Json(e.body())).into_response()
    }

    /// A request the HTTP door refused before the pipeline saw it (its JSON), counted like the others.
    fn refused(&self, e: HttpError, tenant: &Tenant) -> Response {
        record_outcome(&Err(Status::invalid_argument(e.message.clone())), None, Protocol::Http);
        self.error(e, Some(tenant))
    }

    /// OpenAI's `x-ratelimit-*` headers for the tenant's own request and token buckets: the bucket's size,
    /// what is left now, and how long until it is full again.
    fn rate_headers(&self, tenant: &Tenant) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let Some(view) = self.pipeline.live.admission().tenant_view(&tenant.name) else {
            return headers;
        };
        let buckets = [
            ("requests", view.limits.requests, view.remaining_requests),
            ("tokens", view.limits.tokens, view.remaining_tokens),
        ];
        for (what, rate, remaining) in buckets {
            let (Some(rate), Some(remaining)) = (rate, remaining) else {
                continue;
            };
            let missing = (f64::from(rate.burst) - remaining).max(0.0);
            let reset = rate.interval().as_secs_f64() * missing;
            let pairs = [
                (format!("x-ratelimit-limit-{what}"), rate.burst.to_string()),
                (
                    format!("x-ratelimit-remaining-{what}"),
                    (remaining.floor() as u64).to_string(),
                ),
                (format!("x-ratelimit-reset-{what}"), format!("{reset:.3}s")),
            ];
            for (name, value) in pairs {
                if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
                    headers.insert(n, v);
                }
            }
        }
        headers
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The routes, with the body limit.
fn routes(door: Arc<HttpDoor>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(complete::chat))
        .route("/v1/completions", post(complete::completions))
        .route("/v1/models", get(extra::models))
        .route("/v1/embeddings", post(extra::embeddings))
        .route("/v1/moderations", post(extra::moderations))
        .route("/v1/responses", post(responses::responses))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn(move |request, next| {
            refuse_oversize(request, next, max_body_bytes)
        }))
        .with_state(door)
}

/// A body whose `Content-Length` is over the limit is refused before any of it is read, in OpenAI's
/// error form (a chunked body over the limit is cut off as it is read, by [`DefaultBodyLimit`]).
async fn refuse_oversize(
    request: axum::extract::Request,
    next: axum::middleware::Next,
    max_body_bytes: usize,
) -> Response {
    let length = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match length {
        Some(n) if n > max_body_bytes as u64 => {
            let e = HttpError::too_large(format!("is {n} bytes; the limit max_request_bytes is {max_body_bytes}"));
            record_outcome(&Err(Status::invalid_argument(e.message.clone())), None, Protocol::Http);
            (e.http_status(), axum::Json(e.body())).into_response()
        }
        _ => next.run(request).await,
    }
}

async fn not_found(uri: axum::http::Uri) -> Response {
    let e = HttpError::not_found(
        "unknown_url",
        format!(
            "no endpoint at {}; this server has /v1/chat/completions, /v1/completions, /v1/models, \
             /v1/embeddings, /v1/moderations and /v1/responses",
            uri.path()
        ),
        None,
    );
    (e.http_status(), axum::Json(e.body())).into_response()
}

/// Serves the HTTP door on `listener` until the drain: it accepts through the pre-stop delay (as the
/// gRPC listener does), then stops accepting, closes idle connections, and returns once the open
/// requests have finished. The caller bounds that wait with the drain deadline, at which the relay ends
/// the streams still open.
pub(crate) async fn serve_http(
    listener: TcpListener,
    listen: Listen,
    door: Arc<HttpDoor>,
    max_body_bytes: usize,
    drain: ferroserve_net::DrainWatch,
    prestop: Duration,
) {
    let header_timeout = listen.limits.handshake_timeout;
    let service = TowerToHyperService::new(routes(door, max_body_bytes));
    let graceful = GracefulShutdown::new();
    let stop_accepting = {
        let draining = drain.reached(Phase::Draining);
        async move {
            draining.await;
            tokio::time::sleep(prestop).await;
        }
    };
    // The accept loop owns the listener: leaving it closes the socket, so that new connections are
    // refused (and go elsewhere) while the open ones finish.
    let conns = ferroserve_net::incoming(listener, listen);
    tokio::pin!(stop_accepting);
    let mut conns = Box::pin(conns);
    loop {
        let conn = tokio::select! {
            () = &mut stop_accepting => break,
            conn = conns.next() => match conn {
                Some(Ok(c)) => c,
                Some(Err(_)) => continue,
                None => break,
            },
        };
        let served = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(conn), service.clone());
        let watched = graceful.watch(served);
        tokio::spawn(async move {
            if let Err(e) = watched.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(conns);
    graceful.shutdown().await;
}
