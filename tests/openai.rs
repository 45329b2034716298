//! The OpenAI-compatible HTTP API of `ferroserve serve --config configs/multi-tenant.toml`, with the real
//! model, driven by the real `openai` Python SDK (tests/openai/sdk_test.py): chat and completions, unary
//! and streamed, usage, `n`, logprobs, a seed reproduced, stop strings, models, embeddings, moderations,
//! and every error class with its SDK exception and headers. The same seeded request goes through the
//! gRPC door first, and the SDK must get the same text and usage.
//!
//! The SDK is installed from PyPI into the target directory on first use (`pip install --target`), so
//! that `cargo test` sets up what it needs.

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use ferroserve_proto::v1 as pb;
use support::procs::{spawn_with, wait_log};
use support::{client, model_path, wait_serving};

/// The SDK version the test pins.
const OPENAI_SDK: &str = "openai==3.63.0";
/// Bound on the whole SDK script.
const SDK_TIMEOUT: Duration = Duration::from_secs(600);

/// A directory holding the `openai` package, installed there once.
fn sdk_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("python-{}", OPENAI_SDK.replace("==", "-")));
    let marker = dir.join(".installed");
    if !marker.exists() {
        let status = std::process::Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&dir)
            .arg(OPENAI_SDK)
            .status()
            .expect("python3 and pip are needed for the SDK test");
        assert!(status.success(), "pip install {OPENAI_SDK} failed");
        std::fs::write(&marker, OPENAI_SDK).unwrap();
    }
    dir
}

/// The multi-tenant sample, with the repository's filter directory (the test runs in crates/cli).
fn config() -> PathBuf {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let sample = std::fs::read_to_string(format!("{root}/configs/multi-tenant.toml")).expect("the sample config");
    let path = std::env::temp_dir().join(format!("ferroserve-openai-{}.toml", std::process::id()));
    std::fs::write(&path, format!("{sample}\n[filter]\ndir = \"{root}/configs/filters\"\n")).unwrap();
    path
}

/// A counter's total over every series whose labels include all of `labels`.
fn counter(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_gets_what_it_expects() {
    let sdk = sdk_dir();
    let config = config();
    let model = model_path();
    // The engine's one info line is the cancellation of a generation whose client left.
    let log_filter = [("RUST_LOG", "warn,ferroserve_engine::run=info")];
    let server = spawn_with(
        &[
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--model-path",
            model.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
        &log_filter,
    )
    .await;
    let mut logs = server.logs();
    wait_serving(&server.url).await;
    let http = server.http_addr().await;

    // The seeded request through the gRPC door: the SDK must get the same text and usage.
    let mut request = tonic::Request::new(pb::GenerateRequest {
        prompt: "The three primary colours are".into(),
        max_tokens: 16,
        sampling: Some(pb::SamplingParams {
            temperature: 0.9,
            seed: Some(1234),
            ..Default::default()
        }),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", "Bearer demo-key-beta".parse().unwrap());
    let grpc = client(&server.url).await.generate(request).await.unwrap().into_inner();
    let usage = grpc.usage.unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/openai/sdk_test.py");
    let run = tokio::process::Command::new("python3")
        .arg(script)
        .args(["--base-url", &format!("http://{http}/v1")])
        .args(["--grpc-text", &grpc.text])
        .args([
            "--grpc-usage",
            &format!("[{}, {}]", usage.prompt_tokens, usage.completion_tokens),
        ])
        .env("PYTHONPATH", &sdk)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(SDK_TIMEOUT, run)
        .await
        .expect("the SDK script finished in time")
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the SDK checks failed:\n{stdout}");
    assert!(stdout.contains("all checks passed"));

    // The stream the script closed after three chunks was cancelled on the worker.
    wait_log(&mut logs, "client gone; generation cancelled").await;
    // Both doors count into the same metrics, told apart by `protocol`.
    let metrics: std::net::SocketAddr = server.metrics_addr().await.parse().unwrap();
    let (_, text) = support::http_get(metrics, "/metrics").await;
    let http_ok = counter(
        &text,
        "ferroserve_requests_total",
        &["protocol=\"http\"", "status=\"ok\""],
    );
    let grpc_ok = counter(
        &text,
        "ferroserve_requests_total",
        &["protocol=\"grpc\"", "status=\"ok\""],
    );
    let limited = counter(
        &text,
        "ferroserve_requests_total",
        &["protocol=\"http\"", "status=\"resource_exhausted\""],
    );
    assert!(http_ok >= 10.0 && grpc_ok >= 1.0, "http {http_ok}, grpc {grpc_ok}");
    assert!(limited >= 1.0, "the 429 is counted: {limited}");
    server.stop().await;
}
