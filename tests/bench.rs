//! `ferroserve bench` against the real server (real model, real gRPC on 127.0.0.1): a short smoke run
//! through the binary, then `compare` and `plot` on its result file; and `ignore_eos`, which the load
//! tester relies on for equal work across peers.

mod support;

use std::path::Path;
use std::time::Duration;

use ferroserve_bench::report::RunResult;
use ferroserve_proto::v1 as pb;
use support::{WAIT, chat, client, start_serve, stream_all};
use tokio::process::Command;

/// Runs the `ferroserve` binary with `args`, bounded in time; returns stdout, asserting success.
async fn ferroserve(args: &[&str]) -> String {
    let out = tokio::time::timeout(
        WAIT,
        Command::new(env!("CARGO_BIN_EXE_ferroserve"))
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the command ends in bounded time")
    .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ferroserve {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_run_against_the_real_server() {
    let server = start_serve().await;
    let target = server.url().replace("http://", "grpc://");
    let dir = std::env::temp_dir().join(format!("ferroserve-bench-smoke-{}", std::process::id()));
    let json = dir.join("run.json");
    let json_arg = json.to_str().unwrap();
    let table = ferroserve(&[
        "bench",
        "--target",
        &target,
        "--concurrency",
        "1,2",
        "--requests",
        "2",
        "--warmup",
        "1",
        "--input-tokens",
        "24",
        "--max-tokens",
        "6",
        "--ignore-eos",
        "--quiet",
        "--label",
        "smoke",
        "--slo",
        "e2e=600s",
        "--output",
        json_arg,
    ])
    .await;
    assert!(table.contains("output throughput") && table.contains("c=2"), "{table}");

    let run = RunResult::read(&json).expect("the result file reads back");
    assert_eq!(run.label, "smoke");
    assert_eq!(run.levels.len(), 2);
    for l in &run.levels {
        assert_eq!((l.sent, l.completed, l.failed), (2, 2, 0), "{:?}", l.error_samples);
        assert_eq!(l.output_tokens, 12, "ignore_eos: every request generates max_tokens");
        assert_eq!(l.token_count, "usage");
        assert!(
            l.input_tokens >= 2 * 24,
            "the chat-free prompt has at least its 24 tokens"
        );
        assert!(l.ttft.mean > 0.0 && l.e2e.mean >= l.ttft.mean);
        assert_eq!(l.itl.count, 2 * 5, "one gap per token after the first");
        assert_eq!(
            l.goodput,
            Some(l.request_throughput),
            "a 600 s e2e objective is met by all"
        );
    }
    server.shutdown().await.expect("server stops");

    let compared = ferroserve(&["bench", "compare", json_arg, json_arg]).await;
    assert!(compared.contains("1.00x"), "{compared}");
    let plots = dir.join("plots");
    let listed = ferroserve(&["bench", "plot", json_arg, "--out", plots.to_str().unwrap()]).await;
    assert_eq!(listed.lines().count(), 10, "{listed}");
    assert!(png(&plots.join("throughput.png")));
    std::fs::remove_dir_all(dir).expect("clean up");
}

fn png(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.starts_with(b"\x89PNG\r\n\x1a\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_eos_generates_max_tokens() {
    let server = start_serve().await;
    let mut c = client(&server.url()).await;
    // A request that ends early on its own: the first of a few short questions that the model answers
    // and closes with end-of-sequence (which one does depends on the weights and kernels, not on us).
    let mut found = None;
    for question in [
        "What is 2+2?",
        "Say hello.",
        "What is the capital of France?",
        "Name a color.",
    ] {
        let (_, done) = stream_all(&mut c, chat(question, 64)).await;
        if done.finish_reason == pb::FinishReason::Eos as i32 {
            found = Some((question, done.usage.expect("usage").completion_tokens));
            break;
        }
    }
    let (question, natural) = found.expect("one of the short questions ends with EOS");
    assert!(natural < 64, "{natural} tokens");

    // The same request with ignore_eos runs to max_tokens, past where the model stopped.
    let wanted = natural + 8;
    let mut r = chat(question, wanted);
    r.sampling = Some(pb::SamplingParams {
        ignore_eos: true,
        ..Default::default()
    });
    let (_, done) = tokio::time::timeout(Duration::from_secs(120), stream_all(&mut c, r))
        .await
        .expect("bounded");
    assert_eq!(done.finish_reason, pb::FinishReason::Length as i32);
    assert_eq!(done.usage.expect("usage").completion_tokens, wanted);
    server.shutdown().await.expect("server stops");
}
