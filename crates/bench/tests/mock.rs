//! The load tester against its mock servers (named as mocks: they stream tokens on a fixed schedule and
//! run no model): measured timings against injected ones, error classes, open-loop rates, the result
//! file, `compare` and `plot`.

use std::time::Duration;

use ferroserve_bench::load::{Bound, Level, LoadSettings};
use ferroserve_bench::mock::{Fault, MockBehaviour, MockServer};
use ferroserve_bench::prompts::{PromptSource, Prompts};
use ferroserve_bench::report::{RunConfig, RunResult, compare};
use ferroserve_bench::target::{Generation, TargetSpec};
use ferroserve_bench::{Bench, run};

fn config(levels: Vec<Level>, requests: u32, max_tokens: u32) -> RunConfig {
    RunConfig {
        generation: Generation {
            model: String::new(),
            max_tokens,
            ignore_eos: true,
            temperature: 0.0,
            json_schema: None,
        },
        prompts: PromptSource::Synthetic {
            input_tokens: 32,
            chat: false,
        },
        mean_input_tokens: 32.0,
        load: LoadSettings {
            levels,
            bound: Bound::Requests(requests),
            warmup: 2,
            timeout_secs: 30.0,
            burstiness: 1.0,
            max_concurrency: None,
            seed: 1,
        },
        slo: None,
    }
}

async fn measure(url: &str, config: RunConfig) -> RunResult {
    let target = TargetSpec::parse(url, false, false).unwrap();
    let prompts = Prompts::load(&config.prompts, 1, 64, None).unwrap();
    let bench = Bench {
        label: "mock".into(),
        target,
        api_key: None,
        tls: Default::default(),
        config,
        show_progress: false,
        server_build: Some("mock server, no kernels".into()),
    };
    tokio::time::timeout(Duration::from_secs(120), run(&bench, prompts, |_| {}))
        .await
        .expect("the run ends in bounded time")
        .expect("the run completes")
}

/// Checks that a measured mean (ms) is at least the injected delay and not far above it. The upper
/// margin covers timer granularity (1 ms) and scheduling on a busy 2-core machine.
fn near(what: &str, measured_ms: f64, injected: Duration) {
    let want = injected.as_secs_f64() * 1000.0;
    assert!(
        measured_ms >= want * 0.97 && measured_ms <= want * 1.35 + 3.0,
        "{what}: measured {measured_ms:.2} ms, injected {want:.2} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timings_match_the_injected_delays() {
    let behaviour = MockBehaviour {
        ttft: Duration::from_millis(60),
        itl: Duration::from_millis(15),
        ..Default::default()
    };
    let server = MockServer::grpc(behaviour.clone()).await.unwrap();
    let r = measure(&server.url, config(vec![Level::Concurrency(4)], 12, 20)).await;
    server.stop().await;
    let l = &r.levels[0];
    assert_eq!((l.sent, l.completed, l.failed), (12, 12, 0));
    assert_eq!(l.output_tokens, 12 * 20);
    assert_eq!(l.token_count, "usage");
    near("TTFT mean", l.ttft.mean, behaviour.ttft);
    near("TTFT median", l.ttft.median, behaviour.ttft);
    near("ITL mean", l.itl.mean, behaviour.itl);
    near("ITL median", l.itl.median, behaviour.itl);
    near("TPOT mean", l.tpot.mean, behaviour.itl);
    near("E2E mean", l.e2e.mean, behaviour.ttft + behaviour.itl * 19);
    assert_eq!(l.itl.count, 12 * 19, "one gap per token after the first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chunks_of_several_tokens_and_counting_without_usage() {
    // Two tokens per chunk, no usage: each chunk counts as one token and one gap (all the stream shows).
    let behaviour = MockBehaviour {
        ttft: Duration::from_millis(40),
        itl: Duration::from_millis(10),
        tokens_per_chunk: 2,
        report_usage: false,
        ..Default::default()
    };
    let server = MockServer::openai(behaviour.clone()).await.unwrap();
    let r = measure(&server.url, config(vec![Level::Concurrency(2)], 6, 16)).await;
    server.stop().await;
    let l = &r.levels[0];
    assert_eq!((l.completed, l.token_count.as_str()), (6, "chunks"));
    assert_eq!(l.output_tokens, 6 * 8, "8 chunks per request");
    near("ITL mean (per chunk)", l.itl.mean, behaviour.itl * 2);
    // The first chunk is due when its second token is: ttft + itl.
    near("TTFT mean", l.ttft.mean, behaviour.ttft + behaviour.itl);

    // With usage, the server's count is used and TPOT is per token.
    let behaviour = MockBehaviour {
        report_usage: true,
        ..behaviour
    };
    let server = MockServer::openai(behaviour.clone()).await.unwrap();
    let chat_url = format!("http://{}/v1/chat/completions", server.addr);
    let r = measure(&chat_url, config(vec![Level::Concurrency(2)], 6, 16)).await;
    server.stop().await;
    let l = &r.levels[0];
    assert_eq!(
        (l.completed, l.output_tokens, l.token_count.as_str()),
        (6, 6 * 16, "usage")
    );
    assert_eq!(l.input_tokens, 6 * 8, "the mock reports 8 prompt tokens");
    // TPOT = (e2e - ttft) / 15 over 7 chunk gaps of 20 ms = 140 / 15 ms.
    near("TPOT mean", l.tpot.mean, Duration::from_secs_f64(0.140 / 15.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_classified_and_rate_limits_are_not_failures() {
    let faults = vec![
        None,
        Some(Fault::RateLimited),
        Some(Fault::Unavailable),
        Some(Fault::Invalid),
        Some(Fault::Internal),
        Some(Fault::Stall),
    ];
    for grpc in [true, false] {
        let behaviour = MockBehaviour {
            faults: faults.clone(),
            ..Default::default()
        };
        let server = if grpc {
            MockServer::grpc(behaviour).await.unwrap()
        } else {
            MockServer::openai(behaviour).await.unwrap()
        };
        let mut c = config(vec![Level::Concurrency(6)], 12, 4);
        c.load.warmup = 0;
        c.load.timeout_secs = 0.5;
        let r = measure(&server.url, c).await;
        server.stop().await;
        let l = &r.levels[0];
        let e = |k: &str| l.errors[k];
        assert_eq!(
            (
                l.completed,
                e("rate_limited"),
                e("unavailable"),
                e("invalid"),
                e("other"),
                e("timeout")
            ),
            (2, 2, 2, 2, 2, 2),
            "grpc={grpc}: {:?}",
            l.error_samples
        );
        assert_eq!(l.failed, 8, "rate-limited requests are not failures");
        assert_eq!(l.output_tokens, 8, "only completed requests' tokens count");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_sends_at_the_requested_rate() {
    let server = MockServer::grpc(MockBehaviour::default()).await.unwrap();
    // 160 Poisson arrivals: the achieved rate's relative standard error is 1/sqrt(160) = 8 %, so 30 %
    // is more than three standard errors.
    let mut c = config(vec![Level::Rate(40.0)], 160, 2);
    c.load.warmup = 0;
    let r = measure(&server.url, c).await;
    server.stop().await;
    let l = &r.levels[0];
    assert_eq!(l.completed, 160);
    assert!(
        (l.achieved_rate / 40.0 - 1.0).abs() < 0.3,
        "achieved {} req/s",
        l.achieved_rate
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duration_bound_stops_sending_and_counts_what_was_in_flight() {
    let server = MockServer::grpc(MockBehaviour {
        itl: Duration::from_millis(20),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut c = config(vec![Level::Concurrency(2), Level::Rate(20.0)], 1, 10);
    c.load.bound = Bound::Seconds(0.6);
    c.load.warmup = 0;
    let r = measure(&server.url, c).await;
    server.stop().await;
    for l in &r.levels {
        // Each request takes 180 ms, so a 0.6 s level sends a handful and then lets the last ones finish.
        assert!(l.sent >= 2, "{:?}: sent {}", l.level, l.sent);
        assert_eq!((l.completed, l.failed), (l.sent, 0));
        assert!(
            l.duration_s > 0.6,
            "in-flight requests finish and count: {} s",
            l.duration_s
        );
        assert!(
            l.duration_s < 5.0,
            "no request starts after the bound: {} s",
            l.duration_s
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_round_trip_compare_and_plot() {
    let server = MockServer::grpc(MockBehaviour {
        ttft: Duration::from_millis(5),
        itl: Duration::from_millis(2),
        ..Default::default()
    })
    .await
    .unwrap();
    let a = measure(
        &server.url,
        config(vec![Level::Concurrency(1), Level::Concurrency(3)], 6, 8),
    )
    .await;
    let mut b = measure(
        &server.url,
        config(vec![Level::Concurrency(1), Level::Concurrency(3)], 6, 8),
    )
    .await;
    server.stop().await;
    b.label = "mock-b".into();
    // 5 ms injected: a server without TCP_NODELAY would add a delayed-ACK stall of about 40 ms here.
    assert!(
        a.levels[0].ttft.median < 30.0,
        "TTFT median {} ms",
        a.levels[0].ttft.median
    );

    let dir = std::env::temp_dir().join(format!("ferroserve-bench-test-{}", std::process::id()));
    let path = dir.join("a.json");
    a.write(&path).unwrap();
    let back = RunResult::read(&path).unwrap();
    assert_eq!(back, a, "the result file round-trips");
    assert_eq!(back.levels.len(), 2);
    assert_eq!(back.server_build.as_deref(), Some("mock server, no kernels"));
    #[cfg(target_os = "linux")]
    {
        let host = back.host.as_ref().expect("the measuring machine is recorded");
        assert!(!host.cpu.is_empty());
        #[cfg(target_arch = "x86_64")]
        assert!(host.features.iter().any(|f| f == "avx2"), "{:?}", host.features);
    }
    // A file written before `host` and `server_build` existed still reads.
    let mut old: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    old.as_object_mut().unwrap().remove("host");
    old.as_object_mut().unwrap().remove("server_build");
    std::fs::write(dir.join("old.json"), old.to_string()).unwrap();
    assert_eq!(RunResult::read(&dir.join("old.json")).unwrap().host, None);

    std::fs::write(dir.join("bad.json"), "{\"schema\": \"other/v9\"}").unwrap();
    let err = RunResult::read(&dir.join("bad.json")).unwrap_err().to_string();
    assert!(err.contains("other/v9") && err.contains("ferroserve-bench/v1"), "{err}");

    let same = compare(&a, &a);
    assert!(same.contains("output throughput") && same.contains("1.00x"), "{same}");
    let text = compare(&a, &b);
    assert!(
        text.contains("c=1") && text.contains("c=3") && text.contains("mock-b"),
        "{text}"
    );

    let files = ferroserve_bench::plot::plot(&[a, b], &dir.join("plots")).unwrap();
    assert_eq!(files.len(), 10, "five charts, PNG and SVG each");
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        match f.extension().and_then(|e| e.to_str()) {
            Some("png") => {
                assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is a PNG", f.display());
                assert!(bytes.len() > 5_000, "{} has content", f.display());
            }
            Some("svg") => {
                let s = String::from_utf8(bytes).unwrap();
                assert!(s.contains("<svg") && s.contains("</svg>"), "{} is an SVG", f.display());
                assert!(s.contains("mock-b"), "{} has the legend", f.display());
            }
            other => panic!("unexpected file type {other:?}"),
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}
