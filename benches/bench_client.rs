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

use std::time::Duration;

use ferroserve_bench::load::{Bound, Level, LoadSettings};
use ferroserve_bench::mock::{MockBehaviour, MockServer};
use ferroserve_bench::prompts::{PromptSource, Prompts};
use ferroserve_bench::report::{RunConfig, RunResult};
use ferroserve_bench::target::{Generation, TargetSpec};
use ferroserve_bench::{Bench, run};

/// User plus system CPU time of this process, from /proc (Linux); zero elsewhere.
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name; 100 ticks/s is
    // the Linux default (sysconf(_SC_CLK_TCK)).
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

async fn measure(url: &str, level: Level, requests: u32, max_tokens: u32) -> (RunResult, Duration) {
    let config = RunConfig {
        generation: Generation {
            model: String::new(),
            max_tokens,
            ignore_eos: true,
            temperature: 0.0,
        },
        prompts: PromptSource::Synthetic {
            input_tokens: 16,
            chat: false,
        },
        mean_input_tokens: 16.0,
        load: LoadSettings {
            levels: vec![level],
            bound: Bound::Requests(requests),
            warmup: 8,
            timeout_secs: 60.0,
            burstiness: 1.0,
            max_concurrency: None,
            seed: 1,
        },
        slo: None,
    };
    let prompts = Prompts::load(&config.prompts, 1, 256, None).expect("synthetic prompts");
    let bench = Bench {
        label: url.to_string(),
        target: TargetSpec::parse(url, false, false).expect("mock URL"),
        api_key: None,
        tls: Default::default(),
        config,
        show_progress: false,
        server_build: Some("mock server".into()),
    };
    let cpu = cpu_time();
    let result = run(&bench, prompts, |_| {}).await.expect("run against the mock");
    (result, cpu_time().saturating_sub(cpu))
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
