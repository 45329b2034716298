//! Fault-injection figures (not a test: it measures; `tests/chaos.rs` asserts the behaviour).
//!
//! A router in front of two workers, the real binaries on 127.0.0.1 with the real model, the router's
//! fault settings as in the chaos suite (heartbeat silence 2 s, worker stall 10 s). For each kind of fault,
//! `CHAOS_ROUNDS` times: start 8 seeded streams (32 tokens, 4 per worker batch), inject the fault into one
//! worker once tokens flow, follow every stream to its end, and undo the fault. It reports:
//! - streams lost without a clear status (ended INTERNAL, UNKNOWN, or OK without a completion) per 100
//!   faults, and how many ended with UNAVAILABLE;
//! - moves between workers by outcome (the router's `ferroserve_migrations_total`);
//! - the time from the fault to the worker's ejection from the pool (WatchWorkers);
//! - the end-to-end latency of the streams and the largest gap between their tokens, against quiet rounds
//!   of the same load: the extra latency a move costs;
//! - the time from SIGTERM to exit of a worker under that load;
//! - TTFT at 16 concurrent streams, quiet and while a worker is killed and restarted in a loop
//!   (`CHAOS_LOOP_SECS` each).
//!
//! Results also go to `target/chaos.json`. Run: `cargo bench -p ferroserve --bench chaos`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::admin_client::AdminClient;
use hdrhistogram::Histogram;
use support::procs::{Proc, spawn};
use support::proxy::Proxy;
use support::{client, model_path, sample, seeded, wait_serving};
use tokio::sync::watch;

const STREAMS: usize = 8;
const MAX_TOKENS: u32 = 32;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The faults measured, one worker at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// No fault: the baseline rounds.
    Quiet,
    Kill9,
    Sigstop,
    Partition,
    Sigterm,
}

/// How one stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Complete,
    Unavailable,
    /// INTERNAL, UNKNOWN, any other status, or OK without a completion: lost without a clear status.
    Lost,
}

struct Stream {
    end: End,
    e2e: Duration,
    ttft: Option<Duration>,
    largest_gap: Duration,
}

async fn run_stream(url: String, request: pb::GenerateRequest, tokens: Arc<watch::Sender<usize>>) -> Stream {
    use pb::generate_stream_response::Event;
    let started = Instant::now();
    let want = request.max_tokens;
    let (mut last, mut gap, mut ttft) = (started, Duration::ZERO, None);
    let mut c = client(&url).await;
    let end = match c.generate_stream(request).await {
        Err(s) if s.code() == tonic::Code::Unavailable => End::Unavailable,
        Err(_) => End::Lost,
        Ok(s) => {
            let mut s = s.into_inner();
            loop {
                match s.message().await {
                    Ok(Some(pb::GenerateStreamResponse {
                        event: Some(Event::Token(_)),
                    })) => {
                        let now = Instant::now();
                        gap = gap.max(now - last);
                        ttft.get_or_insert(now - started);
                        last = now;
                        tokens.send_modify(|n| *n += 1);
                    }
                    Ok(Some(pb::GenerateStreamResponse {
                        event: Some(Event::Complete(c)),
                    })) => {
                        let n = c.usage.map_or(0, |u| u.completion_tokens);
                        break if n == want { End::Complete } else { End::Lost };
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break End::Lost,
                    Err(s) if s.code() == tonic::Code::Unavailable => break End::Unavailable,
                    Err(_) => break End::Lost,
                }
            }
        }
    };
    Stream {
        end,
        e2e: started.elapsed(),
        ttft,
        largest_gap: gap,
    }
}

/// The fleet: two workers (the first behind a proxy that can partition it) and a router.
struct Fleet {
    model: String,
    dir: std::path::PathBuf,
    workers: [Proc; 2],
    proxy: Proxy,
    router: Proc,
}

const WORKER_CONFIG: &str = "[worker]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"\"\n[engine]\nmax_batch_seqs = 4\n\
                             [server]\ndrain_timeout_secs = 60.0\n";
const ROUTER_CONFIG: &str = "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n\
                             [router]\nworker_heartbeat_timeout_secs = 2.0\nworker_stall_timeout_secs = 10.0\n\
                             [connections]\nkeepalive_interval_secs = 2.0\nkeepalive_timeout_secs = 2.0\n";

impl Fleet {
    async fn start() -> Fleet {
        let dir = std::env::temp_dir().join(format!("ferroserve-chaos-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("w.toml"), WORKER_CONFIG).unwrap();
        std::fs::write(dir.join("r.toml"), ROUTER_CONFIG).unwrap();
        let model = model_path().display().to_string();
        let w1 = Fleet::worker(&dir, &model, "127.0.0.1:0").await;
        let w2 = Fleet::worker(&dir, &model, "127.0.0.1:0").await;
        let proxy = Proxy::start(&w1.addr).await;
        let rcfg = dir.join("r.toml").display().to_string();
        let via = format!("http://{}", proxy.addr);
        let router = spawn(&["router", "--config", &rcfg, "--worker", &via, "--worker", &w2.url]).await;
        wait_serving(&router.url).await;
        support::procs::wait_workers_healthy(&router.url, 2).await;
        Fleet {
            model,
            dir,
            workers: [w1, w2],
            proxy,
            router,
        }
    }

    async fn worker(dir: &std::path::Path, model: &str, listen: &str) -> Proc {
        let cfg = dir.join("w.toml").display().to_string();
        let w = spawn(&["worker", "--config", &cfg, "--model-path", model, "--listen", listen]).await;
        wait_serving(&w.url).await;
        w
    }

    /// Starts worker `i` again on its address, and waits until the router has it back.
    async fn restart(&mut self, i: usize) {
        let addr = self.workers[i].addr.clone();
        self.workers[i] = Fleet::worker(&self.dir, &self.model, &addr).await;
        support::procs::wait_workers_healthy(&self.router.url, 2).await;
    }

    async fn migrations(&self) -> [f64; 3] {
        let addr = self.router.metrics_addr().await.parse().unwrap();
        let (_, text) = support::http_get(addr, "/metrics").await;
        ["resumed", "redispatched", "failed"]
            .map(|o| sample(&text, &format!("ferroserve_migrations_total{{outcome=\"{o}\"}}")).unwrap_or(0.0))
    }
}

/// Follows WatchWorkers until fewer than two workers are healthy; the time it took.
async fn ejection(router: String, from: Instant) -> Duration {
    let mut admin = AdminClient::connect(router).await.unwrap();
    let mut reports = admin
        .watch_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner();
    while let Ok(Some(r)) = reports.message().await {
        if r.workers.iter().filter(|w| w.healthy).count() < 2 {
            break;
        }
    }
    from.elapsed()
}

/// One round: 8 streams, the fault once 8 tokens have arrived, every stream to its end.
async fn round(fleet: &mut Fleet, fault: Fault, n: usize) -> (Vec<Stream>, Option<Duration>, Option<Duration>) {
    let tokens = Arc::new(watch::Sender::new(0usize));
    let mut flowing = tokens.subscribe();
    let handles: Vec<_> = (0..STREAMS)
        .map(|i| {
            tokio::spawn(run_stream(
                fleet.router.url.clone(),
                seeded(n * STREAMS + i, MAX_TOKENS),
                Arc::clone(&tokens),
            ))
        })
        .collect();
    let _ = flowing.wait_for(|t| *t >= STREAMS).await;
    let at = Instant::now();
    let watch = (fault != Fault::Quiet && fault != Fault::Sigterm)
        .then(|| tokio::spawn(ejection(fleet.router.url.clone(), at)));
    // Alternate the worker faulted, except for the partition, which only the proxied one can have.
    let victim = if fault == Fault::Partition { 0 } else { n % 2 };
    let mut exit = None;
    match fault {
        Fault::Quiet => {}
        Fault::Kill9 => fleet.workers[victim].kill9().await,
        Fault::Sigstop => fleet.workers[victim].signal("STOP"),
        Fault::Partition => fleet.proxy.partition(),
        Fault::Sigterm => {
            fleet.workers[victim].signal("TERM");
            let _ = fleet.workers[victim].child.wait().await;
            exit = Some(at.elapsed());
        }
    }
    let mut streams = Vec::new();
    for h in handles {
        streams.push(h.await.unwrap());
    }
    let ejected = match watch {
        Some(w) => Some(w.await.unwrap()),
        None => None,
    };
    match fault {
        Fault::Quiet => {}
        Fault::Kill9 | Fault::Sigterm => fleet.restart(victim).await,
        Fault::Sigstop => {
            fleet.workers[victim].signal("CONT");
            support::procs::wait_workers_healthy(&fleet.router.url, 2).await;
        }
        Fault::Partition => {
            fleet.proxy.heal();
            support::procs::wait_workers_healthy(&fleet.router.url, 2).await;
        }
    }
    (streams, ejected, exit)
}

fn hist() -> Histogram<u64> {
    Histogram::new(3).unwrap()
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1e3
}

/// Runs `rounds` rounds of `fault`; prints and returns its figures.
async fn measure(fleet: &mut Fleet, fault: Fault, rounds: usize) -> serde_json::Value {
    let before = fleet.migrations().await;
    let (mut e2e, mut gap, mut eject, mut exit) = (hist(), hist(), hist(), hist());
    let (mut complete, mut unavailable, mut lost) = (0, 0, 0);
    for n in 0..rounds {
        let (streams, ejected, exited) = round(fleet, fault, n).await;
        for s in &streams {
            match s.end {
                End::Complete => complete += 1,
                End::Unavailable => unavailable += 1,
                End::Lost => lost += 1,
            }
            e2e.record(s.e2e.as_micros() as u64).unwrap();
            gap.record(s.largest_gap.as_micros() as u64).unwrap();
        }
        if let Some(d) = ejected {
            eject.record(d.as_micros() as u64).unwrap();
        }
        if let Some(d) = exited {
            exit.record(d.as_micros() as u64).unwrap();
        }
    }
    let after = fleet.migrations().await;
    let moves: Vec<f64> = (0..3).map(|i| after[i] - before[i]).collect();
    let per_100 = 100.0 * lost as f64 / rounds as f64;
    println!(
        "{fault:?}: {rounds} faults, {} streams: {complete} completed, {unavailable} UNAVAILABLE, {lost} lost \
         ({per_100:.1} per 100 faults); moves resumed {} redispatched {} failed {}; e2e p50 {:.0} p99 {:.0} ms; \
         largest token gap p50 {:.0} max {:.0} ms{}{}",
        rounds * STREAMS,
        moves[0],
        moves[1],
        moves[2],
        ms(&e2e, 0.5),
        ms(&e2e, 0.99),
        ms(&gap, 0.5),
        gap.max() as f64 / 1e3,
        if eject.is_empty() {
            String::new()
        } else {
            format!(
                "; ejected after p50 {:.0} max {:.0} ms",
                ms(&eject, 0.5),
                eject.max() as f64 / 1e3
            )
        },
        if exit.is_empty() {
            String::new()
        } else {
            format!(
                "; SIGTERM to exit p50 {:.0} max {:.0} ms",
                ms(&exit, 0.5),
                exit.max() as f64 / 1e3
            )
        },
    );
    serde_json::json!({
        "fault": format!("{fault:?}"), "rounds": rounds, "streams": rounds * STREAMS,
        "completed": complete, "unavailable": unavailable, "lost": lost, "lost_per_100_faults": per_100,
        "moves": {"resumed": moves[0], "redispatched": moves[1], "failed": moves[2]},
        "e2e_ms": {"p50": ms(&e2e, 0.5), "p99": ms(&e2e, 0.99)},
        "largest_gap_ms": {"p50": ms(&gap, 0.5), "max": gap.max() as f64 / 1e3},
        "ejection_ms": (!eject.is_empty()).then(|| serde_json::json!({"p50": ms(&eject, 0.5), "max": eject.max() as f64 / 1e3})),
        "sigterm_to_exit_ms": (!exit.is_empty()).then(|| serde_json::json!({"p50": ms(&exit, 0.5), "max": exit.max() as f64 / 1e3})),
    })
}

/// 16 closed-loop clients for `secs`; with `churn`, worker 1 is killed and restarted in a loop meanwhile.
async fn ttft_under(fleet: &mut Fleet, secs: u64, churn: bool) -> serde_json::Value {
    let until = Instant::now() + Duration::from_secs(secs);
    let tokens = Arc::new(watch::Sender::new(0usize));
    let clients: Vec<_> = (0..16)
        .map(|c| {
            let (url, tokens) = (fleet.router.url.clone(), Arc::clone(&tokens));
            tokio::spawn(async move {
                let mut out = Vec::new();
                let mut i = 0;
                while Instant::now() < until {
                    out.push(run_stream(url.clone(), seeded(10_000 + c * 1000 + i, 16), Arc::clone(&tokens)).await);
                    i += 1;
                }
                out
            })
        })
        .collect();
    let mut kills = 0;
    while churn && Instant::now() + Duration::from_secs(4) < until {
        fleet.workers[1].kill9().await;
        kills += 1;
        fleet.restart(1).await;
        // Let it serve a while before the next kill (a bench, not a test: pacing by the clock is the point).
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let (mut ttft, mut done, mut unavailable, mut lost) = (hist(), 0, 0, 0);
    for c in clients {
        for s in c.await.unwrap() {
            match s.end {
                End::Complete => done += 1,
                End::Unavailable => unavailable += 1,
                End::Lost => lost += 1,
            }
            if let (End::Complete, Some(t)) = (s.end, s.ttft) {
                ttft.record(t.as_micros() as u64).unwrap();
            }
        }
    }
    let label = if churn { "kill/restart loop" } else { "quiet" };
    println!(
        "16 streams, {label} ({kills} kills in {secs} s): {done} completed, {unavailable} UNAVAILABLE, {lost} lost; \
         TTFT p50 {:.0} p99 {:.0} ms",
        ms(&ttft, 0.5),
        ms(&ttft, 0.99)
    );
    serde_json::json!({"run": label, "secs": secs, "kills": kills, "completed": done, "unavailable": unavailable,
        "lost": lost, "ttft_ms": {"p50": ms(&ttft, 0.5), "p99": ms(&ttft, 0.99)}})
}

#[tokio::main]
async fn main() {
    let rounds: usize = env_or("CHAOS_ROUNDS", 10);
    let secs: u64 = env_or("CHAOS_LOOP_SECS", 40);
    let mut fleet = Fleet::start().await;
    let mut results = Vec::new();
    for fault in [
        Fault::Quiet,
        Fault::Kill9,
        Fault::Sigstop,
        Fault::Partition,
        Fault::Sigterm,
    ] {
        results.push(measure(&mut fleet, fault, rounds).await);
    }
    let quiet = ttft_under(&mut fleet, secs, false).await;
    let churn = ttft_under(&mut fleet, secs, true).await;
    let ratio = churn["ttft_ms"]["p99"].as_f64().unwrap() / quiet["ttft_ms"]["p99"].as_f64().unwrap();
    println!("TTFT p99 under the kill/restart loop: {ratio:.2}x the quiet run's");
    let out = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/chaos.json");
    let json = serde_json::json!({"faults": results, "ttft": [quiet, churn], "ttft_p99_ratio": ratio});
    std::fs::write(out, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("results in {out}");
    let _ = std::fs::remove_dir_all(&fleet.dir);
}
