//! Shared by the benches that drive mock servers (`bench_client`, `router_cost`): one level of synthetic
//! load against a target, and a process's CPU time.

use std::time::Duration;

use ferroserve_bench::load::{Bound, Level, LoadSettings};
use ferroserve_bench::prompts::{PromptSource, Prompts};
use ferroserve_bench::report::{RunConfig, RunResult};
use ferroserve_bench::target::{Generation, TargetSpec};
use ferroserve_bench::{Bench, run};

/// User plus system CPU time of process `pid` (`"self"` for this one), from /proc (Linux); zero
/// elsewhere.
pub fn cpu_time(pid: &str) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
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

/// One level of `requests` synthetic 16-token prompts (after `warmup` uncounted ones), each generating
/// `max_tokens` with ignore_eos, against `url`; `server_build` is recorded in the result.
pub async fn run_level(
    url: &str,
    level: Level,
    requests: u32,
    warmup: u32,
    max_tokens: u32,
    server_build: &str,
) -> RunResult {
    let config = RunConfig {
        generation: Generation {
            model: String::new(),
            max_tokens,
            ignore_eos: true,
            temperature: 0.0,
            json_schema: None,
        },
        prompts: PromptSource::Synthetic {
            input_tokens: 16,
            chat: false,
        },
        mean_input_tokens: 16.0,
        load: LoadSettings {
            levels: vec![level],
            bound: Bound::Requests(requests),
            warmup,
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
        target: TargetSpec::parse(url, false, false).expect("a grpc:// or http:// URL"),
        api_key: None,
        tls: Default::default(),
        config,
        show_progress: false,
        server_build: Some(server_build.into()),
    };
    run(&bench, prompts, |_| {}).await.expect("the run completes")
}
