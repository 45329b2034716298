//! `ferroserve router` in front of two `ferroserve worker` processes: separate processes on 127.0.0.1,
//! started from the real binary, each announcing its ephemeral port on stdout.

mod support;

use ferroserve_proto::worker::WatchStatsRequest;
use ferroserve_proto::worker::worker_client::WorkerClient;
use futures::StreamExt;
use support::procs::{run_to_end, spawn, wait_workers_healthy};
use support::*;

async fn completed_on(worker_url: &str) -> u64 {
    let mut w = WorkerClient::connect(worker_url.to_string()).await.unwrap();
    let mut stats = w.watch_stats(WatchStatsRequest {}).await.unwrap().into_inner();
    stats.message().await.unwrap().expect("a first snapshot").completed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_spreads_concurrent_requests_across_two_worker_processes() {
    let model = model_path();
    let model = model.to_str().unwrap();
    let loopback = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"];
    let w1 = spawn(&[&["worker", "--model-path", model][..], &loopback].concat()).await;
    let w2 = spawn(&[&["worker", "--model-path", model][..], &loopback].concat()).await;
    let router = spawn(&[&["router", "--worker", &w1.url, "--worker", &w2.url][..], &loopback].concat()).await;
    wait_serving(&w1.url).await;
    wait_serving(&w2.url).await;
    wait_serving(&router.url).await;
    wait_workers_healthy(&router.url, 2).await;

    let requests = (0..6).map(|i| {
        let url = router.url.clone();
        tokio::spawn(async move {
            let mut c = client(&url).await;
            let (tokens, done) = stream_all(&mut c, chat(&format!("Say the number {i}."), 8)).await;
            assert!(!tokens.is_empty());
            done
        })
    });
    for r in futures::future::join_all(requests).await {
        let done = r.expect("request task");
        assert_eq!(done.model_version, "smollm2-135m-instruct@q4_1");
    }
    // A worker counts a request completed just after it sends the completion: follow the counters
    // (bounded) until all six are counted.
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
    let (a, b) = tokio::time::timeout(WAIT, async {
        loop {
            tick.tick().await;
            let (a, b) = (completed_on(&w1.url).await, completed_on(&w2.url).await);
            if a + b >= 6 {
                return (a, b);
            }
        }
    })
    .await
    .expect("every request counted in time");
    assert_eq!(a + b, 6, "every request completed on some worker");
    assert!(a >= 1 && b >= 1, "both workers served requests: {a} and {b}");

    // A client that disconnects from the router cancels the generation on the worker process.
    let mut c = client(&router.url).await;
    let mut stream = c
        .generate_stream(chat("Tell me a very long story about dragons.", 2000))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some(), "a first token");
    drop(stream);
    drop(c);
    tokio::time::timeout(WAIT, async {
        let mut watchers = Vec::new();
        for url in [&w1.url, &w2.url] {
            let mut w = WorkerClient::connect(url.to_string()).await.unwrap();
            watchers.push(w.watch_stats(WatchStatsRequest {}).await.unwrap().into_inner());
        }
        let mut merged = futures::stream::select_all(watchers.into_iter().map(|s| s.boxed()));
        while let Some(s) = merged.next().await {
            let s = s.unwrap();
            if s.cancelled >= 1 && s.running == 0 {
                assert!(s.generated_tokens < 2000 + 6 * 8);
                return;
            }
        }
        panic!("stats streams ended");
    })
    .await
    .expect("the worker cancelled the abandoned generation in time");

    // Prefix-aware routing: a conversation's next turn resends its history and lands on the worker that
    // served the first turn, whose prefix cache holds it. (Least-loaded routing alternates between two
    // idle workers, and the other worker would compute the whole prompt again.)
    let history = "I am planning a trip along the river and would like to know which towns have a \
                   bridge, a market and a museum that opens on Sunday mornings. We travel by bicycle, \
                   with two children, and we would rather sleep in small guest houses than in hotels.";
    let mut c = client(&router.url).await;
    let (_, first) = stream_all(&mut c, chat(history, 4)).await;
    // Only the default system prompt, which earlier requests shared, can be cached yet.
    let first = first.usage.unwrap().cached_tokens;
    for turn in 0..3 {
        let (_, next) = stream_all(&mut c, chat(&format!("{history} And on turn {turn}?"), 4)).await;
        let cached = next.usage.unwrap().cached_tokens;
        assert!(
            cached >= first + 48,
            "turn {turn} found the shared history cached ({cached} tokens, {first} before it)"
        );
    }

    router.stop().await;
    w1.stop().await;
    w2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_exits_before_binding_and_names_the_key() {
    let dir = std::env::temp_dir().join(format!("ferroserve-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[engine]\nqueue_capacity = 0\n").unwrap();
    let (status, _, stderr) = run_to_end(&["serve", "--config", cfg.to_str().unwrap()]).await;
    assert!(!status.success());
    assert!(stderr.contains("engine.queue_capacity"), "{stderr}");

    std::fs::write(&cfg, "[server]\nlisten = \"127.0.0.1:0\"\nlisten_typo = 1\n").unwrap();
    let (status, _, stderr) = run_to_end(&["serve", "--config", cfg.to_str().unwrap()]).await;
    assert!(!status.success());
    assert!(stderr.contains("listen_typo"), "{stderr}");

    let (status, _, stderr) = run_to_end(&["worker", "--listen", "127.0.0.1:0", "--device", "cuda:0"]).await;
    assert!(!status.success());
    assert!(
        stderr.contains("model.device") && stderr.contains("not built with CUDA"),
        "{stderr}"
    );

    // A worker reachable beyond loopback with no internal-plane authentication does not start.
    let (status, _, stderr) = run_to_end(&["worker", "--listen", "0.0.0.0:0", "--metrics-listen", ""]).await;
    assert!(!status.success());
    assert!(
        stderr.contains("worker.token_sha256") && stderr.contains("tls_client_ca"),
        "{stderr}"
    );

    // Secure default: no keys on a non-loopback address is refused before anything is bound.
    let (status, _, stderr) = run_to_end(&["serve", "--listen", "0.0.0.0:0", "--metrics-listen", ""]).await;
    assert!(!status.success());
    assert!(
        stderr.contains("auth.keys") && stderr.contains("--allow-unauthenticated"),
        "{stderr}"
    );

    let (status, _, stderr) = run_to_end(&["serve", "--config", dir.join("missing.toml").to_str().unwrap()]).await;
    assert!(!status.success());
    assert!(
        stderr.contains("--config") && stderr.contains("missing.toml"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two versions of one model behind a router: the default Q4_1 file and a Q8_0 file written by
/// `ferroserve model derive`, each worker labelled with `--model-version`. A pinned request lands on its
/// version and every completion names the version that served it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_derived_version_serves_beside_the_original_and_pins_reach_it() {
    let dir = std::env::temp_dir().join(format!("ferroserve-versions-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let derived = dir.join("smollm2.Q8_0.gguf");
    let model = model_path();
    let (status, _, stderr) = run_to_end(&[
        "model",
        "derive",
        "--to",
        "q8_0",
        "--source",
        model.to_str().unwrap(),
        "--output",
        derived.to_str().unwrap(),
    ])
    .await;
    assert!(status.success(), "{stderr}");
    let loopback = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"];
    let v1 = spawn(&[&["worker", "--model-path", model.to_str().unwrap()][..], &loopback].concat()).await;
    let v2 = spawn(
        &[
            &[
                "worker",
                "--model-path",
                derived.to_str().unwrap(),
                "--model-version",
                "q8_0",
            ][..],
            &loopback,
        ]
        .concat(),
    )
    .await;
    let router = spawn(&[&["router", "--worker", &v1.url, "--worker", &v2.url][..], &loopback].concat()).await;
    wait_serving(&router.url).await;
    wait_workers_healthy(&router.url, 2).await;

    let mut c = client(&router.url).await;
    for version in ["q8_0", "q4_1", "q8_0"] {
        let mut request = chat("What is the capital of France?", 8);
        request.model = format!("smollm2-135m-instruct@{version}");
        let (tokens, done) = stream_all(&mut c, request).await;
        assert!(!tokens.is_empty());
        assert_eq!(done.model_version, format!("smollm2-135m-instruct@{version}"));
    }
    let (on_v1, on_v2) = (completed_on(&v1.url).await, completed_on(&v2.url).await);
    assert_eq!((on_v1, on_v2), (1, 2), "each pin reached its own worker");
    // The traffic policy through the operator's CLI: a split, the kill switch, a rollback, the history.
    let models = |args: &[&str]| {
        let mut all = vec!["models", "--addr", &router.url, "--operator", "ops-test"];
        all.extend_from_slice(args);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferroserve"))
            .args(&all)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = models(&["split", "q4_1=1", "q8_0=1", "--reason", "a/b"]);
    assert!(ok && out.contains("50.0%"), "{out}");
    let (ok, out) = models(&["disable", "q8_0"]);
    assert!(ok && out.contains("disabled"), "{out}");
    for pin in ["", "smollm2-135m-instruct@q8_0"] {
        let mut request = chat("Hi", 2);
        request.model = pin.into();
        let (_, done) = stream_all(&mut c, request).await;
        assert_eq!(
            done.model_version, "smollm2-135m-instruct@q4_1",
            "pin `{pin}` moved off the disabled version"
        );
    }
    let (ok, out) = models(&["rollback"]);
    let q8 = out
        .lines()
        .find(|l| l.trim_start().starts_with("q8_0"))
        .unwrap_or_default();
    assert!(ok && q8.contains("ready"), "{out}");
    let (ok, out) = models(&["history"]);
    assert!(
        ok && out.contains("ops-test") && out.contains("rollback") && out.contains("(a/b)"),
        "{out}"
    );
    // ListVersions: each worker reports its version's generation defaults over the worker protocol.
    let (ok, out) = models(&["list"]);
    let q8 = out
        .lines()
        .find(|l| l.trim_start().starts_with("q8_0"))
        .unwrap_or_default();
    assert!(
        ok && q8.contains("ready") && q8.contains("greedy; system \"You are a helpful assistant.\""),
        "{out}"
    );
    let plan = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/rollouts/canary.toml");
    let (ok, out) = models(&["rollout", "--plan", plan.to_str().unwrap()]);
    assert!(
        ok && out.contains("rollout: running (q4_1 -> q8_0)") && out.contains("step 1: canary q8_0 at 5 %"),
        "{out}"
    );
    let (ok, out) = models(&["rollout-status"]);
    assert!(ok && out.contains("running"), "{out}");
    let (ok, out) = models(&["split", "nightly=1"]);
    assert!(
        !ok && out.contains("no worker serves smollm2-135m-instruct@nightly"),
        "{out}"
    );

    let mut request = chat("Hi", 4);
    request.model = "smollm2-135m-instruct@q5_k".into();
    let status = c.generate(request).await.unwrap_err();
    assert!(
        matches!(status.code(), tonic::Code::NotFound | tonic::Code::Unavailable),
        "{status:?}"
    );
    assert!(status.message().contains("q5_k"), "{}", status.message());

    router.stop().await;
    v1.stop().await;
    v2.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
