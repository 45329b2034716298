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

use hdrhistogram::Histogram;
use support::faults::{End, Outcome, WORKER_CONFIG, outcomes, router_config, run_stream, start_streams, until_tokens};
use support::procs::{Proc, spawn, until_workers, wait_workers_healthy};
use support::proxy::Proxy;
use support::{model_path, sample, seeded, wait_serving};
use tokio::sync::watch;

const STREAMS: usize = 8;
const MAX_TOKENS: u32 = 32;
/// Tokens per request of the TTFT runs.
const TTFT_TOKENS: u32 = 16;

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

/// How one stream ended, for the figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// A completion with every token asked for.
    Complete,
    Unavailable,
    /// INTERNAL, UNKNOWN, any other status, a short completion, or OK without a completion: lost without
    /// a clear status.
    Lost,
}

fn verdict(o: &Outcome, want: u32) -> Verdict {
    match &o.end {
        End::Complete(c) if c.usage.is_some_and(|u| u.completion_tokens == want) => Verdict::Complete,
        End::Status(s) if s.code() == tonic::Code::Unavailable => Verdict::Unavailable,
        _ => Verdict::Lost,
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

impl Fleet {
    async fn start() -> Fleet {
        let dir = std::env::temp_dir().join(format!("ferroserve-chaos-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The chaos suite's settings; a worker drain may take a minute, and the router serves /metrics.
        std::fs::write(
            dir.join("w.toml"),
            format!("{WORKER_CONFIG}[server]\ndrain_timeout_secs = 60.0\n"),
        )
        .unwrap();
        let router = router_config().replace("metrics_listen = \"\"", "metrics_listen = \"127.0.0.1:0\"");
        std::fs::write(dir.join("r.toml"), router).unwrap();
        let model = model_path().display().to_string();
        let w1 = Fleet::worker(&dir, &model, "127.0.0.1:0").await;
        let w2 = Fleet::worker(&dir, &model, "127.0.0.1:0").await;
        let proxy = Proxy::start(&w1.addr).await;
        let rcfg = dir.join("r.toml").display().to_string();
        let via = format!("http://{}", proxy.addr);
        let router = spawn(&["router", "--config", &rcfg, "--worker", &via, "--worker", &w2.url]).await;
        wait_serving(&router.url).await;
        wait_workers_healthy(&router.url, 2).await;
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
        wait_workers_healthy(&self.router.url, 2).await;
    }

    async fn migrations(&self) -> [f64; 3] {
        let addr = self.router.metrics_addr().await.parse().unwrap();
        let (_, text) = support::http_get(addr, "/metrics").await;
        ["resumed", "redispatched", "failed"]
            .map(|o| sample(&text, &format!("ferroserve_migrations_total{{outcome=\"{o}\"}}")).unwrap_or(0.0))
    }
}

/// One round: 8 streams, the fault once 8 tokens have arrived, every stream to its end.
async fn round(fleet: &mut Fleet, fault: Fault, n: usize) -> (Vec<Outcome>, Option<Duration>, Option<Duration>) {
    let requests = (0..STREAMS).map(|i| seeded(n * STREAMS + i, MAX_TOKENS)).collect();
    let (handles, mut tokens) = start_streams(&fleet.router.url, requests);
    until_tokens(&mut tokens, STREAMS).await;
    let at = Instant::now();
    let watch = (fault != Fault::Quiet && fault != Fault::Sigterm).then(|| {
        let url = fleet.router.url.clone();
        tokio::spawn(async move {
            until_workers(&url, |r| r.workers.iter().filter(|w| w.healthy).count() < 2).await;
            at.elapsed()
        })
    });
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
    let streams = outcomes(handles).await;
    let ejected = match watch {
        Some(w) => Some(w.await.unwrap()),
        None => None,
    };
    match fault {
        Fault::Quiet => {}
        Fault::Kill9 | Fault::Sigterm => fleet.restart(victim).await,
        Fault::Sigstop => {
            fleet.workers[victim].signal("CONT");
            wait_workers_healthy(&fleet.router.url, 2).await;
        }
        Fault::Partition => {
            fleet.proxy.heal();
            wait_workers_healthy(&fleet.router.url, 2).await;
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

/// p50 and max in milliseconds, if anything was recorded.
fn p50_max(h: &Histogram<u64>) -> Option<(f64, f64)> {
    (!h.is_empty()).then(|| (ms(h, 0.5), h.max() as f64 / 1e3))
}

/// Streams counted by verdict.
#[derive(Default)]
struct Tally {
    complete: usize,
    unavailable: usize,
    lost: usize,
}

impl Tally {
    fn add(&mut self, v: Verdict) {
        match v {
            Verdict::Complete => self.complete += 1,
            Verdict::Unavailable => self.unavailable += 1,
            Verdict::Lost => self.lost += 1,
        }
    }
}

/// Runs `rounds` rounds of `fault`; prints and returns its figures.
async fn measure(fleet: &mut Fleet, fault: Fault, rounds: usize) -> serde_json::Value {
    let before = fleet.migrations().await;
    let (mut e2e, mut gap, mut eject, mut exit) = (hist(), hist(), hist(), hist());
    let mut tally = Tally::default();
    for n in 0..rounds {
        let (streams, ejected, exited) = round(fleet, fault, n).await;
        for s in &streams {
            tally.add(verdict(s, MAX_TOKENS));
            e2e.record(s.took.as_micros() as u64).unwrap();
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
    let Tally {
        complete,
        unavailable,
        lost,
    } = tally;
    let per_100 = 100.0 * lost as f64 / rounds as f64;
    let (eject, exit) = (p50_max(&eject), p50_max(&exit));
    let spread = |what: &str, v: Option<(f64, f64)>| {
        v.map(|(p50, max)| format!("; {what} p50 {p50:.0} max {max:.0} ms"))
            .unwrap_or_default()
    };
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
        spread("ejected after", eject),
        spread("SIGTERM to exit", exit),
    );
    let json = |v: Option<(f64, f64)>| v.map(|(p50, max)| serde_json::json!({"p50": p50, "max": max}));
    serde_json::json!({
        "fault": format!("{fault:?}"), "rounds": rounds, "streams": rounds * STREAMS,
        "completed": complete, "unavailable": unavailable, "lost": lost, "lost_per_100_faults": per_100,
        "moves": {"resumed": moves[0], "redispatched": moves[1], "failed": moves[2]},
        "e2e_ms": {"p50": ms(&e2e, 0.5), "p99": ms(&e2e, 0.99)},
        "largest_gap_ms": {"p50": ms(&gap, 0.5), "max": gap.max() as f64 / 1e3},
        "ejection_ms": json(eject),
        "sigterm_to_exit_ms": json(exit),
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
                    out.push(
                        run_stream(
                            url.clone(),
                            seeded(10_000 + c * 1000 + i, TTFT_TOKENS),
                            Arc::clone(&tokens),
                        )
                        .await,
                    );
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
    let (mut ttft, mut tally) = (hist(), Tally::default());
    for c in clients {
        for s in c.await.unwrap() {
            let v = verdict(&s, TTFT_TOKENS);
            tally.add(v);
            if let (Verdict::Complete, Some(t)) = (v, s.ttft) {
                ttft.record(t.as_micros() as u64).unwrap();
            }
        }
    }
    let Tally {
        complete: done,
        unavailable,
        lost,
    } = tally;
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
