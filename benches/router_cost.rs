//! The router's own cost: the latency it adds per request and its CPU per request, at fixed arrival rates,
//! in front of a mock worker, against the load tester hitting a mock server directly in the same run.
//!
//!     cargo bench -p ferroserve --bench router_cost
//!
//! Both ends are mocks, named as such: the direct target is the load tester's mock `Inference` server (this
//! program run again as its own process); the routed one is `ferroserve router` in front of
//! `ferroserve worker --mock` (two processes), each streaming `MAX_TOKENS` placeholder tokens with no
//! delay. The difference between the
//! two end-to-end latencies is what the router (and the extra hop) adds; the router's CPU time comes from
//! /proc. On a 2-core machine the load tester, the router and the worker share the cores, so the added
//! latency at high rates includes that contention. Environment: ROUTER_COST_RATES (default 1000,5000),
//! ROUTER_COST_SECONDS per level (default 5).

#[path = "shared/mock_load.rs"]
mod mock_load;

use std::process::Stdio;

use ferroserve_bench::load::Level;
use ferroserve_bench::mock::{MockBehaviour, MockServer};
use ferroserve_bench::stats::LevelResult;
use mock_load::{cpu_time, run_level};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const MAX_TOKENS: u32 = 8;

/// `seconds` of Poisson arrivals at `rate` against `url` (after 200 uncounted requests).
async fn measure(url: &str, rate: f64, seconds: f64) -> LevelResult {
    let requests = (rate * seconds) as u32;
    let result = run_level(url, Level::Rate(rate), requests, 200, MAX_TOKENS, "mock").await;
    result.levels.into_iter().next().expect("one level")
}

/// `program args...`, waiting for its address.
async fn spawn(program: &std::path::Path, args: &[&str]) -> (Child, String) {
    let mut child = Command::new(program)
        .args(args)
        .env("RUST_LOG", "error")
        .env("FERROSERVE_HTTP_LISTEN", "")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start ferroserve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next_line().await.unwrap().expect("announces its address");
        if let Some(a) = line.split("listening on ").nth(1) {
            break a.trim().to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

/// With `--serve-mock`: this program is the direct target, the load tester's mock server in a process
/// of its own.
async fn serve_mock() {
    let direct = MockServer::grpc(MockBehaviour::default()).await.expect("mock binds");
    println!("mock listening on {}", direct.addr);
    std::future::pending::<()>().await;
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if std::env::args().any(|a| a == "--serve-mock") {
        return serve_mock().await;
    }
    let rates: Vec<f64> = std::env::var("ROUTER_COST_RATES")
        .unwrap_or_else(|_| "1000,5000".into())
        .split(',')
        .map(|r| r.trim().parse().expect("a rate"))
        .collect();
    let seconds: f64 = std::env::var("ROUTER_COST_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5.0);
    let me = std::env::current_exe().expect("this program");
    let (_direct, direct_addr) = spawn(&me, &["--serve-mock"]).await;
    let direct = format!("grpc://{direct_addr}");
    let ferroserve = std::path::Path::new(env!("CARGO_BIN_EXE_ferroserve"));

    let config = std::env::temp_dir().join(format!("ferroserve-router-cost-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        "[admission]\nmax_in_flight = 4096\nmax_queued_requests = 4096\n",
    )
    .unwrap();
    let loopback = ["--listen", "127.0.0.1:0", "--metrics-listen", ""];
    let (_worker, worker) = spawn(ferroserve, &[&["worker", "--mock"][..], &loopback].concat()).await;
    let worker_url = format!("http://{worker}");
    let args = ["router", "--config", config.to_str().unwrap(), "--worker", &worker_url];
    let (router, addr) = spawn(ferroserve, &[&args[..], &loopback].concat()).await;
    let router_pid = router.id().expect("running").to_string();
    let routed = format!("grpc://{addr}");
    // The router serves once the worker joined; a short run until nothing fails.
    for _ in 0..100 {
        if measure(&routed, 50.0, 0.2).await.failed == 0 {
            break;
        }
    }

    println!(
        "| rate (req/s) | target | achieved req/s | e2e p50 ms | e2e p99 ms | added p50 ms | added p99 ms | router CPU us/req | failed |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for rate in rates {
        let d = measure(&direct, rate, seconds).await;
        let cpu = cpu_time(&router_pid);
        let r = measure(&routed, rate, seconds).await;
        let cpu_per_request = cpu_time(&router_pid).saturating_sub(cpu).as_secs_f64() * 1e6 / r.completed.max(1) as f64;
        for (name, l) in [("mock direct", &d), ("router + mock worker", &r)] {
            let added = if std::ptr::eq(l, &r) {
                (
                    format!("{:.3}", r.e2e.median - d.e2e.median),
                    format!("{:.3}", r.e2e.p99 - d.e2e.p99),
                    format!("{cpu_per_request:.0}"),
                )
            } else {
                ("".into(), "".into(), "".into())
            };
            println!(
                "| {rate} | {name} | {:.0} | {:.3} | {:.3} | {} | {} | {} | {} |",
                l.achieved_rate, l.e2e.median, l.e2e.p99, added.0, added.1, added.2, l.failed
            );
        }
    }
    drop(router);
    let _ = std::fs::remove_file(&config);
}
