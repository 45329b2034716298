//! The load tester's own cost: how fast `ferroserve bench` can drive a server that costs nothing.
//!
//!     cargo bench -p ferroserve --bench bench_client
//!
//! It runs the tool against its mock servers (named as mocks: they stream tokens on a fixed schedule with
//! no model), in this process, and reports:
//! - the highest request rate it sustains (1 output token per request, 64 in flight);
//! - the highest token rate it sustains (256 tokens per request, 16 in flight, no delay);
//! - the latency it adds per token: measured ITL against an injected 5 ms, and TTFT against 0;
//! - process CPU time per token (tool and mock together: an upper bound on the tool's own).
//!
//! Both targets are measured: gRPC (Ferroserve's API) and OpenAI SSE. Results also go to
//! target/bench-client.json. Environment: BENCH_CLIENT_REQUESTS (default 2000).

#[path = "shared/mock_load.rs"]
mod mock_load;

use std::time::Duration;

use ferroserve_bench::load::Level;
use ferroserve_bench::mock::{MockBehaviour, MockServer};
use ferroserve_bench::report::RunResult;
use mock_load::{cpu_time, run_level};

/// One closed-loop level against a mock, and the CPU time this process spent on it.
async fn measure(url: &str, level: Level, requests: u32, max_tokens: u32) -> (RunResult, Duration) {
    let cpu = cpu_time("self");
    let result = run_level(url, level, requests, 8, max_tokens, "mock server").await;
    (result, cpu_time("self").saturating_sub(cpu))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let requests: u32 = std::env::var("BENCH_CLIENT_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut report = serde_json::Map::new();
    println!(
        "{:<8}{:>16}{:>16}{:>18}{:>18}{:>16}",
        "target", "max req/s", "max tok/s", "ITL - 5 ms (us)", "TTFT - 0 (us)", "CPU us/token"
    );
    for grpc in [true, false] {
        let start = |b: MockBehaviour| async move {
            if grpc {
                MockServer::grpc(b).await.expect("mock binds")
            } else {
                MockServer::openai(b).await.expect("mock binds")
            }
        };
        let name = if grpc { "grpc" } else { "openai" };

        let server = start(MockBehaviour::default()).await;
        let (rate, _) = measure(&server.url, Level::Concurrency(64), requests, 1).await;
        let (tokens, cpu) = measure(&server.url, Level::Concurrency(16), requests / 8, 256).await;
        server.stop().await;

        let paced = MockBehaviour {
            itl: Duration::from_millis(5),
            ..Default::default()
        };
        let server = start(paced).await;
        let (latency, _) = measure(&server.url, Level::Concurrency(16), 64, 64).await;
        server.stop().await;

        let (r, t, l) = (&rate.levels[0], &tokens.levels[0], &latency.levels[0]);
        let itl_over_us = (l.itl.mean - 5.0) * 1000.0;
        let ttft_us = l.ttft.mean * 1000.0;
        let cpu_per_token_us = cpu.as_secs_f64() * 1e6 / t.output_tokens.max(1) as f64;
        println!(
            "{name:<8}{:>16.0}{:>16.0}{:>18.1}{:>18.1}{:>16.2}",
            r.request_throughput, t.output_throughput, itl_over_us, ttft_us, cpu_per_token_us
        );
        report.insert(
            name.into(),
            serde_json::json!({
                "max_request_rate": r.request_throughput,
                "max_token_rate": t.output_throughput,
                "itl_overhead_us_mean": itl_over_us,
                "itl_overhead_us_p99": (l.itl.p99 - 5.0) * 1000.0,
                "ttft_overhead_us_mean": ttft_us,
                "cpu_us_per_token_tool_and_mock": cpu_per_token_us,
                "failed": r.failed + t.failed + l.failed,
            }),
        );
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-client.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).expect("json")).expect("write report");
    println!("wrote {}", path.display());
}
