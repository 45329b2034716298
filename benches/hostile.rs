//! Hostile-input benchmark (not a test: it measures, it asserts nothing about speed).
//!
//! Starts `ferroserve serve --config configs/multi-tenant.toml` as a separate process on 127.0.0.1, then:
//! 1. sends 4 MiB hostile requests one at a time, and reports the client-observed time to the refusal:
//!    - 2 Mi empty chat messages from a tenant (refused at `max_request_bytes`, before decoding);
//!    - the same without a key (refused by the interceptor, before decoding);
//!    - a 4 MiB prompt from a tenant;
//! 2. measures health-check latency on a quiet server, then during a flood of those requests from
//!    `HOSTILE_CLIENTS` concurrent senders for `HOSTILE_SECS`;
//! 3. reads the server's peak RSS (VmHWM) before and after the flood.
//!
//! Results also go to `target/hostile.json`. Run: `cargo bench -p ferroserve --bench hostile`.

#[path = "../tests/support/raw.rs"]
#[allow(dead_code)]
mod raw;

use std::process::Stdio;
use std::time::{Duration, Instant};

use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::inference_client::InferenceClient;
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Refusals timed per kind of hostile request.
const REFUSALS: usize = 30;
/// Health checks on the quiet server.
const QUIET_CHECKS: usize = 300;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The three hostile requests, each about 4 MiB on the wire.
#[derive(Debug, Clone, Copy)]
enum Hostile {
    EmptyMessages,
    EmptyMessagesNoKey,
    HugePrompt,
}

/// The request encoded once: the senders then only write bytes, so that the client's own encoding (2 Mi
/// messages take tens of milliseconds) is not what is measured.
fn hostile_bytes(kind: Hostile) -> Vec<u8> {
    use prost::Message;
    hostile(kind).into_inner().encode_to_vec()
}

/// Sends pre-encoded request bytes to `Inference/Generate`; the status code of the answer.
async fn send_raw(channel: Channel, kind: Hostile, bytes: Vec<u8>) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
    grpc.ready().await.expect("channel ready");
    let mut r = tonic::Request::new(bytes);
    if !matches!(kind, Hostile::EmptyMessagesNoKey) {
        r.metadata_mut()
            .insert("authorization", "Bearer demo-key-beta".parse().unwrap());
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/ferroserve.v1.Inference/Generate");
    match grpc.unary(r, path, raw::RawCodec).await {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

fn hostile(kind: Hostile) -> tonic::Request<pb::GenerateRequest> {
    let body = match kind {
        Hostile::EmptyMessages | Hostile::EmptyMessagesNoKey => pb::GenerateRequest {
            messages: vec![pb::ChatMessage::default(); 2 << 20],
            max_tokens: 1,
            ..Default::default()
        },
        Hostile::HugePrompt => pb::GenerateRequest {
            prompt: "x".repeat(4 << 20),
            max_tokens: 1,
            ..Default::default()
        },
    };
    let mut r = tonic::Request::new(body);
    if !matches!(kind, Hostile::EmptyMessagesNoKey) {
        r.metadata_mut()
            .insert("authorization", "Bearer demo-key-beta".parse().unwrap());
    }
    r
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Peak resident memory of `pid` in MiB, from /proc.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Health checks on a runtime of their own (one thread), so that the senders' work does not delay them.
fn health_on_own_thread(
    url: String,
    n: Option<usize>,
    until: Option<Instant>,
) -> std::thread::JoinHandle<Histogram<u64>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
            health_latencies(channel, n, until).await
        })
    })
}

async fn health_latencies(channel: Channel, n: Option<usize>, until: Option<Instant>) -> Histogram<u64> {
    let mut health = HealthClient::new(channel);
    let mut h = Histogram::<u64>::new(3).unwrap();
    let mut i = 0;
    while n.is_none_or(|n| i < n) && until.is_none_or(|u| Instant::now() < u) {
        let sent = Instant::now();
        let reply = health.check(HealthCheckRequest { service: String::new() }).await;
        assert!(reply.is_ok(), "health failed: {reply:?}");
        h.record(sent.elapsed().as_micros() as u64).unwrap();
        i += 1;
    }
    h
}

async fn start() -> (tokio::process::Child, String) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let mut server = Command::new(env!("CARGO_BIN_EXE_ferroserve"))
        .env("FERROSERVE_HTTP_LISTEN", "")
        .current_dir(root)
        .args(["serve", "--config", "configs/multi-tenant.toml"])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", ""])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start ferroserve serve");
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the server announced its address");
        if let Some(a) = line.split("listening on ").nth(1) {
            break a.trim().to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (server, format!("http://{addr}"))
}

#[tokio::main]
async fn main() {
    let secs: u64 = env_or("HOSTILE_SECS", 10);
    let clients: usize = env_or("HOSTILE_CLIENTS", 4);
    let (server, url) = start().await;
    let pid = server.id().expect("running");
    let channel = loop {
        if let Ok(c) = Channel::from_shared(url.clone()).unwrap().connect().await {
            let mut health = HealthClient::new(c.clone());
            let r = health.check(HealthCheckRequest { service: String::new() }).await;
            if r.is_ok_and(|r| r.into_inner().status == 1) {
                break c;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let rss_before = peak_rss_mib(pid);
    let mut client = InferenceClient::new(channel.clone());
    let kinds = [Hostile::EmptyMessages, Hostile::EmptyMessagesNoKey, Hostile::HugePrompt];
    let encoded: Vec<Vec<u8>> = kinds.iter().map(|k| hostile_bytes(*k)).collect();
    let mut refusals = Vec::new();
    for (kind, bytes) in kinds.iter().zip(&encoded) {
        let mut h = Histogram::<u64>::new(3).unwrap();
        let mut code = tonic::Code::Ok;
        for _ in 0..REFUSALS {
            let sent = Instant::now();
            code = send_raw(channel.clone(), *kind, bytes.clone()).await;
            h.record(sent.elapsed().as_micros() as u64).unwrap();
        }
        println!(
            "{kind:?} ({} bytes): {code:?}, refused in p50 {:.2} ms, p99 {:.2} ms (client-observed, sending over loopback)",
            bytes.len(),
            ms(&h, 0.5),
            ms(&h, 0.99)
        );
        refusals.push(serde_json::json!({
            "kind": format!("{kind:?}"), "bytes": bytes.len(), "code": format!("{code:?}"),
            "p50_ms": ms(&h, 0.5), "p99_ms": ms(&h, 0.99), "max_ms": h.max() as f64 / 1000.0,
        }));
    }
    let quiet = health_on_own_thread(url.clone(), Some(QUIET_CHECKS), None)
        .join()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(secs);
    let prober = health_on_own_thread(url.clone(), None, Some(until));
    let mut flood = Vec::new();
    for i in 0..clients {
        let (channel, encoded) = (channel.clone(), encoded.clone());
        flood.push(tokio::spawn(async move {
            let mut sent = 0u64;
            while Instant::now() < until {
                let k = (i + sent as usize) % 3;
                let code = send_raw(channel.clone(), kinds[k], encoded[k].clone()).await;
                assert_ne!(code, tonic::Code::Ok, "a hostile request was accepted");
                sent += 1;
            }
            sent
        }));
    }
    let flooded = prober.join().unwrap();
    let mut sent = 0;
    for f in flood {
        sent += f.await.unwrap();
    }
    let rss_after = peak_rss_mib(pid);
    // Still serving real requests afterwards.
    let mut ok = tonic::Request::new(pb::GenerateRequest {
        prompt: "Hello".into(),
        max_tokens: 2,
        ..Default::default()
    });
    ok.metadata_mut()
        .insert("authorization", "Bearer demo-key-beta".parse().unwrap());
    let still = client.generate(ok).await.is_ok();
    println!(
        "health p50/p99/max: quiet {:.2}/{:.2}/{:.2} ms over {} checks; during {sent} hostile requests from {clients} clients \
         in {secs} s: {:.2}/{:.2}/{:.2} ms over {} checks",
        ms(&quiet, 0.5),
        ms(&quiet, 0.99),
        quiet.max() as f64 / 1000.0,
        quiet.len(),
        ms(&flooded, 0.5),
        ms(&flooded, 0.99),
        flooded.max() as f64 / 1000.0,
        flooded.len()
    );
    println!("server peak RSS: {rss_before:.0} MiB before the flood, {rss_after:.0} MiB after; still serving: {still}");
    let result = serde_json::json!({
        "refusals": refusals,
        "health_quiet_ms": {"p50": ms(&quiet, 0.5), "p99": ms(&quiet, 0.99), "max": quiet.max() as f64 / 1000.0, "n": quiet.len()},
        "health_flood_ms": {"p50": ms(&flooded, 0.5), "p99": ms(&flooded, 0.99), "max": flooded.max() as f64 / 1000.0, "n": flooded.len()},
        "flood": {"clients": clients, "secs": secs, "requests": sent},
        "peak_rss_mib": {"before": rss_before, "after": rss_after},
        "still_serving": still,
    });
    let out = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/hostile.json");
    std::fs::write(out, serde_json::to_string_pretty(&result).unwrap()).unwrap();
}
