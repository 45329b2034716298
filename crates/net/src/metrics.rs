//! The `/metrics` listener: plain HTTP/1.1 (TLS when the server has a certificate), a bounded header read,
//! and the same connection cap and handshake timeout as every other listener.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

use crate::incoming::{Listen, incoming};

/// Renders the exposition text for one scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` on `listener` until `shutdown` completes. A client has `handshake_timeout` to
/// send its request headers.
pub async fn serve_metrics(listener: TcpListener, listen: Listen, render: Render, shutdown: impl Future<Output = ()>) {
    let header_timeout = listen.limits.handshake_timeout;
    let conns = incoming(listener, listen);
    tokio::pin!(shutdown);
    tokio::pin!(conns);
    loop {
        let conn = tokio::select! {
            () = &mut shutdown => return,
            conn = conns.next() => match conn {
                Some(Ok(c)) => c,
                Some(Err(_)) => continue,
                None => return,
            },
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let render = Arc::clone(&render);
                async move { Ok::<_, Infallible>(respond(&req, &*render)) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(conn), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

fn respond(req: &Request<hyper::body::Incoming>, render: &(dyn Fn() -> String + Send + Sync)) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/metrics") => (StatusCode::OK, "text/plain; version=0.0.4", render()),
        ("GET", _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; metrics are at /metrics\n".to_string(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET /metrics\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}
