//! Overload benchmark for admission control (not a test: it measures, it asserts nothing about speed).
//!
//! Starts `ferroserve serve --config configs/multi-tenant.toml` as a separate process on 127.0.0.1, then:
//! 1. **unloaded**: sequential requests from `beta`, giving the TTFT of an idle server and its capacity
//!    (requests per second at concurrency 1);
//! 2. **overload**: open-loop Poisson arrivals at `OVERLOAD_FACTOR` x that capacity for `OVERLOAD_SECS`,
//!    one request in five from `alpha` (2 requests/s) and the rest from `beta`, each with a gRPC deadline.
//!
//! It reports whether the server stayed up, the client-observed time to a rejection (p50, p99), the TTFT
//! p99 of admitted requests against the unloaded run, and the rejections by code and limit. Results also go
//! to `target/overload.json`.
//!
//! Run: `cargo bench -p ferroserve --bench overload` (env: OVERLOAD_SECS, OVERLOAD_FACTOR, OVERLOAD_SEED, and
//! OVERLOAD_DEADLINE_MS, the end-to-end deadline each overload request carries: its SLO, default 10 s).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::inference_client::InferenceClient;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tonic::transport::Channel;

/// Output tokens per request.
const MAX_TOKENS: u32 = 32;
/// Requests in the unloaded run.
const UNLOADED_REQUESTS: usize = 8;
/// Bound on any single request in the benchmark.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn request(tenant: &str, i: usize, deadline: Option<Duration>) -> tonic::Request<pb::GenerateRequest> {
    let prompts = [
        "Name three rivers in Europe.",
        "What is a prime number?",
        "Give me a tip for writing clear emails.",
        "Why is the sky blue?",
    ];
    let mut r = tonic::Request::new(pb::GenerateRequest {
        messages: vec![pb::ChatMessage {
            role: "user".into(),
            content: prompts[i % prompts.len()].into(),
        }],
        max_tokens: MAX_TOKENS,
        ..Default::default()
    });
    r.metadata_mut()
        .insert("authorization", format!("Bearer demo-key-{tenant}").parse().unwrap());
    if let Some(d) = deadline {
        r.set_timeout(d);
    }
    r
}

/// What happened to one request.
enum Outcome {
    /// Streamed to completion; time to first token and to the end.
    Done { ttft: Duration, e2e: Duration },
    /// Refused before any token: code, the limit named in the trailer, time to the refusal.
    Refused {
        code: tonic::Code,
        limit: String,
        after: Duration,
    },
    /// Failed after it was admitted.
    Failed { code: tonic::Code },
}

async fn run_one(mut client: InferenceClient<Channel>, request: tonic::Request<pb::GenerateRequest>) -> Outcome {
    let sent = Instant::now();
    let mut stream = match client.generate_stream(request).await {
        Ok(s) => s.into_inner(),
        Err(status) => {
            return Outcome::Refused {
                code: status.code(),
                limit: status
                    .metadata()
                    .get("ferroserve-limit")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string(),
                after: sent.elapsed(),
            };
        }
    };
    let mut ttft = None;
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                if matches!(m.event, Some(pb::generate_stream_response::Event::Token(_))) && ttft.is_none() {
                    ttft = Some(sent.elapsed());
                }
                if matches!(m.event, Some(pb::generate_stream_response::Event::Complete(_))) {
                    return Outcome::Done {
                        ttft: ttft.unwrap_or_else(|| sent.elapsed()),
                        e2e: sent.elapsed(),
                    };
                }
            }
            Ok(None) => {
                return Outcome::Failed {
                    code: tonic::Code::Internal,
                };
            }
            Err(status) => return Outcome::Failed { code: status.code() },
        }
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[tokio::main]
async fn main() {
    let secs: u64 = env_or("OVERLOAD_SECS", 30);
    let factor: f64 = env_or("OVERLOAD_FACTOR", 4.0);
    let seed: u64 = env_or("OVERLOAD_SEED", 7);
    let deadline = Duration::from_millis(env_or("OVERLOAD_DEADLINE_MS", 10_000));
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let mut server = Command::new(env!("CARGO_BIN_EXE_ferroserve"))
        .env("FERROSERVE_HTTP_LISTEN", "")
        .current_dir(root)
        .args(["serve", "--config", "configs/multi-tenant.toml"])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start ferroserve serve");
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let (mut addr, mut metrics) = (None, None);
    while addr.is_none() || metrics.is_none() {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("server announced its addresses");
        if let Some(a) = line.split("listening on ").nth(1) {
            addr = Some(a.trim().to_string());
        }
        if let Some(m) = line.split("metrics on http://").nth(1) {
            metrics = Some(m.trim().trim_end_matches("/metrics").to_string());
        }
    }
    let (addr, metrics) = (addr.unwrap(), metrics.unwrap());
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let url = format!("http://{addr}");
    let mut attempts = 0;
    let client = loop {
        // The model loads in the background; health is NOT_SERVING until then. Retry (bounded) until a
        // request from beta succeeds.
        if let Ok(c) = InferenceClient::connect(url.clone()).await
            && let Outcome::Done { .. } = run_one(c.clone(), request("beta", 0, None)).await
        {
            break c;
        }
        attempts += 1;
        assert!(attempts < 600, "the server did not become ready in a minute");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // 1. Unloaded.
    let mut unloaded = hist();
    let started = Instant::now();
    for i in 0..UNLOADED_REQUESTS {
        match tokio::time::timeout(REQUEST_TIMEOUT, run_one(client.clone(), request("beta", i, None))).await {
            Ok(Outcome::Done { ttft, .. }) => unloaded.record(ttft.as_micros() as u64).unwrap(),
            _ => panic!("an unloaded request failed"),
        }
    }
    let capacity = UNLOADED_REQUESTS as f64 / started.elapsed().as_secs_f64();
    let rate = capacity * factor;
    println!(
        "unloaded: {UNLOADED_REQUESTS} requests, capacity {capacity:.2} req/s, TTFT p50 {:.0} ms p99 {:.0} ms",
        ms(&unloaded, 0.5),
        ms(&unloaded, 0.99)
    );

    // 2. Overload: open-loop Poisson arrivals.
    println!("overload: {rate:.2} req/s ({factor}x capacity) for {secs} s, seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tasks = Vec::new();
    let start = tokio::time::Instant::now();
    let mut at = Duration::ZERO;
    let mut i = 0usize;
    while at < Duration::from_secs(secs) {
        tokio::time::sleep_until(start + at).await;
        let tenant = if rng.random::<f64>() < 0.2 { "alpha" } else { "beta" };
        let c = client.clone();
        let req = request(tenant, i, Some(deadline));
        tasks.push((
            tenant,
            tokio::spawn(async move { tokio::time::timeout(REQUEST_TIMEOUT, run_one(c, req)).await }),
        ));
        i += 1;
        let u: f64 = rng.random();
        at += Duration::from_secs_f64(-(1.0 - u).ln() / rate);
    }
    let (mut ttft, mut e2e, mut rejected, mut dropped) = (hist(), hist(), hist(), hist());
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    let (mut done, mut refused) = (0u64, 0u64);
    for (tenant, task) in tasks {
        match task.await.unwrap() {
            Ok(Outcome::Done { ttft: t, e2e: e }) => {
                done += 1;
                ttft.record(t.as_micros() as u64).unwrap();
                e2e.record(e.as_micros() as u64).unwrap();
            }
            Ok(Outcome::Refused { code, limit, after }) => {
                refused += 1;
                // Refusals at arrival are the gate's decisions; `queue_deadline` ones waited first.
                let h = if limit == "queue_deadline" {
                    &mut dropped
                } else {
                    &mut rejected
                };
                h.record(after.as_micros().max(1) as u64).unwrap();
                *reasons.entry(format!("{tenant} {code:?} {limit}")).or_default() += 1;
            }
            Ok(Outcome::Failed { code }) => *failed.entry(format!("{tenant} {code:?}")).or_default() += 1,
            Err(_) => *failed.entry(format!("{tenant} client-timeout")).or_default() += 1,
        }
    }
    let alive = server.try_wait().unwrap().is_none()
        && matches!(
            run_one(client.clone(), request("beta", 0, None)).await,
            Outcome::Done { .. }
        );
    println!(
        "sent {i}: {done} completed, {refused} refused, {} failed after admission",
        failed.values().sum::<u64>()
    );
    println!("server stayed up and serves: {alive}");
    println!(
        "time to reject at arrival (client-observed, {} refusals): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        rejected.len(),
        ms(&rejected, 0.5),
        ms(&rejected, 0.99),
        rejected.max() as f64 / 1000.0
    );
    println!(
        "left the queue when the deadline became unmeetable: {} after p50 {:.0} ms",
        dropped.len(),
        ms(&dropped, 0.5)
    );
    println!(
        "admitted e2e: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms against a deadline of {} ms",
        ms(&e2e, 0.5),
        ms(&e2e, 0.99),
        e2e.max() as f64 / 1000.0,
        deadline.as_millis()
    );
    println!(
        "admitted TTFT: p50 {:.0} ms, p99 {:.0} ms; unloaded p99 {:.0} ms; ratio p99 {:.2}x",
        ms(&ttft, 0.5),
        ms(&ttft, 0.99),
        ms(&unloaded, 0.99),
        ms(&ttft, 0.99) / ms(&unloaded, 0.99)
    );
    let decision = decision_quantiles(&metrics).await;
    println!(
        "server-side admission decision (all requests, from ferroserve_admission_decision_seconds): \
         p50 <= {} us, p99 <= {} us",
        decision.0, decision.1
    );
    println!("rejections by tenant, code and limit:");
    for (k, v) in &reasons {
        println!("  {k:<40} {v}");
    }
    for (k, v) in &failed {
        println!("  failed: {k:<32} {v}");
    }
    let json = serde_json::json!({
        "config": {"seconds": secs, "factor": factor, "seed": seed, "rate_rps": rate,
                   "max_tokens": MAX_TOKENS, "deadline_ms": deadline.as_millis() as u64},
        "unloaded": {"capacity_rps": capacity, "ttft_p50_ms": ms(&unloaded, 0.5), "ttft_p99_ms": ms(&unloaded, 0.99)},
        "overload": {"sent": i, "completed": done, "refused": refused, "failed": failed,
                     "reject_p50_ms": ms(&rejected, 0.5), "reject_p99_ms": ms(&rejected, 0.99),
                     "left_queue": dropped.len(), "decision_p50_le_us": decision.0, "decision_p99_le_us": decision.1, "e2e_p99_ms": ms(&e2e, 0.99),
                     "ttft_p50_ms": ms(&ttft, 0.5), "ttft_p99_ms": ms(&ttft, 0.99),
                     "rejections": reasons, "server_alive": alive},
    });
    let out = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/overload.json");
    std::fs::write(out, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("wrote {out}");
    let _ = server.start_kill();
    let _ = server.wait().await;
}

/// The upper bounds (µs) of the histogram buckets holding the p50 and p99 of the server's admission
/// decision time, read from its `/metrics`.
async fn decision_quantiles(addr: &str) -> (f64, f64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("metrics endpoint");
    let get = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(get.as_bytes()).await.unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).await.unwrap();
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with("ferroserve_admission_decision_seconds_bucket"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let count: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((le.parse().unwrap_or(f64::INFINITY), count))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    let at = |q: f64| {
        buckets
            .iter()
            .find(|b| b.1 >= q * total)
            .map_or(f64::NAN, |b| b.0 * 1e6)
    };
    (at(0.5), at(0.99))
}
