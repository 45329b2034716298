//! The chaos suite: faults a production fleet meets, injected into the real binaries on 127.0.0.1 with the
//! real model. Each case is bounded in time (every wait is), runs alone (they share two cores), and ends by
//! checking that admission's in-flight count returned to zero, so that a leaked slot fails it.
//!
//! | case | expected |
//! |---|---|
//! | `kill -9` of a worker under 14 streams | every stream completes (continued on the other worker), none ends with INTERNAL, UNKNOWN, or OK without a completion; a seeded stream is the same stream it would have been |
//! | SIGSTOP of a worker; a partition (an in-test proxy stops forwarding) | its streams move on; it turns unhealthy; traffic goes elsewhere; it rejoins after SIGCONT / the partition heals |
//! | a raw HTTP/2 client with a 16-byte window holding every admission slot | the slots come back after the stall timeout; another client is served; reading at last, the client gets what was sent, then UNAVAILABLE saying why |
//! | an engine-thread panic (test-only fault hook) | clear UNAVAILABLE; the engine restarts; repeated panics turn health NOT_SERVING; nothing hangs |
//! | an embedding-thread panic (test-only fault hook) | counted; fails open or closed as the filter config says |
//! | SIGTERM under load, worker then router | NOT_SERVING first while the listener still accepts; streams finish, move on, or end with UNAVAILABLE saying how far they got; exit 0 |
//! | a spot notice: SIGTERM with a 5 s grace period | the worker stops taking work, streams still running at its 3 s drain deadline continue on the other worker, every stream completes; the worker exits 0 before the kubelet's SIGKILL |
//! | router restart after a kill switch | the version stays disabled |

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::admin_client::AdminClient;
use support::faults::*;
use support::procs::{spawn_with, until_workers, wait_log};
use support::proxy::Proxy;
use support::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// The cases share two cores and real model processes: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A scratch directory, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("ferroserve-chaos-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// Writes `text` to `name` in the directory; returns the path as a string.
    fn file(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every stream completed with every token it was asked for, the completion's count matching what the
/// client received; or ended with UNAVAILABLE. Returns how many completed.
fn assert_clean(outcomes: &[Outcome], max_tokens: u32) -> usize {
    let mut completed = 0;
    for (i, o) in outcomes.iter().enumerate() {
        match &o.end {
            End::Complete(c) => {
                let usage = c.usage.unwrap();
                assert_eq!(usage.completion_tokens, max_tokens, "stream {i}: {o:?}");
                assert_eq!(
                    o.ids.len(),
                    max_tokens as usize,
                    "stream {i}: every token reached the client once"
                );
                completed += 1;
            }
            End::Status(s) => {
                assert_eq!(s.code(), Code::Unavailable, "stream {i}: {s:?}");
                assert!(!s.message().contains("127.0.0.1"), "no internal address: {s:?}");
            }
            End::NoCompletion => panic!("stream {i} ended OK without a completion: {o:?}"),
        }
    }
    completed
}

fn healthy(r: &pb::ListWorkersResponse, address: &str) -> bool {
    r.workers.iter().any(|w| w.address.contains(address) && w.healthy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_worker_under_load_loses_no_stream() {
    let _one = SERIAL.lock().await;
    let dir = Scratch::new("kill");
    let (wcfg, rcfg) = (dir.file("w.toml", WORKER_CONFIG), dir.file("r.toml", &router_config()));
    let mut w1 = start_worker(&wcfg, &[]).await;
    let w2 = start_worker(&wcfg, &[]).await;
    let router = start_router(&rcfg, &[&w1.url, &w2.url]).await;

    // 14 streams over two workers that batch 4 each: some run, some wait in a worker's queue.
    let max_tokens = 24;
    let requests: Vec<_> = (0..14).map(|i| seeded(i, max_tokens)).collect();
    let (handles, mut tokens) = start_streams(&router.url, requests.clone());
    until_tokens(&mut tokens, 16).await;
    w1.kill9().await;
    let killed = Instant::now();
    let got = outcomes(handles).await;
    let completed = assert_clean(&got, max_tokens);
    assert_eq!(completed, 14, "the other worker took over every stream: {got:?}");
    eprintln!(
        "kill -9: 14/14 streams completed; the last {:.0} ms after the kill",
        killed.elapsed().as_secs_f64() * 1e3
    );

    // Seeded streams are exact: each stream, continued on the other worker or not, is the stream the
    // same request gives on a healthy worker now.
    let (again, _) = start_streams(&router.url, requests);
    for (i, (before, after)) in got.iter().zip(outcomes(again).await).enumerate() {
        assert!(matches!(after.end, End::Complete(_)), "new requests succeed: {after:?}");
        assert_eq!(
            before.ids, after.ids,
            "stream {i}: {:?} then {:?}",
            before.text, after.text
        );
    }
    wait_admission_idle(&router.url).await;
    router.stop().await;
    w2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_or_partitioned_worker_is_ejected_and_rejoins() {
    let _one = SERIAL.lock().await;
    let dir = Scratch::new("hang");
    let (wcfg, rcfg) = (dir.file("w.toml", WORKER_CONFIG), dir.file("r.toml", &router_config()));
    let w1 = start_worker(&wcfg, &[]).await;
    let w2 = start_worker(&wcfg, &[]).await;
    // The router reaches w1 through a proxy that can stop forwarding.
    let proxy = Proxy::start(&w1.addr).await;
    let via_proxy = format!("http://{}", proxy.addr);
    let router = start_router(&rcfg, &[&via_proxy, &w2.url]).await;
    let max_tokens = 32;

    for fault in ["SIGSTOP", "partition"] {
        let (handles, mut tokens) = start_streams(&router.url, (0..6).map(|i| seeded(i, max_tokens)).collect());
        until_tokens(&mut tokens, 8).await;
        let at = Instant::now();
        match fault {
            "SIGSTOP" => w1.signal("STOP"),
            _ => proxy.partition(),
        }
        let ejected = until_workers(&router.url, |r| !healthy(r, &proxy.addr)).await;
        let got = outcomes(handles).await;
        assert_eq!(
            assert_clean(&got, max_tokens),
            6,
            "{fault}: every stream moved on: {got:?}"
        );
        eprintln!(
            "{fault}: ejected after {:.0} ms; all 6 streams completed within {:.0} ms",
            ejected.as_secs_f64() * 1e3,
            at.elapsed().as_secs_f64() * 1e3
        );
        // Meanwhile traffic goes to the other worker.
        let (more, _) = start_streams(&router.url, (6..9).map(|i| seeded(i, 4)).collect());
        assert_eq!(assert_clean(&outcomes(more).await, 4), 3);
        match fault {
            "SIGSTOP" => w1.signal("CONT"),
            _ => proxy.heal(),
        }
        until_workers(&router.url, |r| healthy(r, &proxy.addr) && healthy(r, &w2.addr)).await;
        wait_admission_idle(&router.url).await;
    }
    router.stop().await;
    w1.stop().await;
    w2.stop().await;
}

/// Opens `n` GenerateStream calls on one raw HTTP/2 connection whose stream windows are 16 bytes: the
/// server can send a fraction of one message, and then nothing until the client reads. Returns the
/// responses, to read later.
async fn small_window_streams(
    addr: std::net::SocketAddr,
    n: usize,
    request: &pb::GenerateRequest,
) -> Vec<h2::client::ResponseFuture> {
    use prost::Message;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(16)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut frame = vec![0u8];
    let body = request.encode_to_vec();
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    let mut responses = Vec::new();
    for _ in 0..n {
        let mut send = send.clone().ready().await.unwrap();
        let call = http::Request::post(format!("http://{addr}/ferroserve.v1.Inference/GenerateStream"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (response, mut stream) = send.send_request(call, false).unwrap();
        stream.send_data(bytes::Bytes::from(frame.clone()), true).unwrap();
        responses.push(response);
    }
    responses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_gives_its_slots_back() {
    let _one = SERIAL.lock().await;
    let mut file = ferroserve::config::FileConfig::default();
    file.server.listen = "127.0.0.1:0".into();
    file.server.metrics_listen = String::new();
    file.server.http_listen = String::new();
    file.admission.max_in_flight = Some(4);
    file.router.client_stall_timeout_secs = 1.0;
    let server = ferroserve::commands::servers::start_serve(file.validate().unwrap(), model_path())
        .await
        .unwrap();
    wait_serving(&server.url()).await;

    // Four streams that are not read hold every admission slot; each would generate 400 tokens.
    let mut long = seeded(1, 400);
    long.max_tokens = 400;
    let held = small_window_streams(server.addr, 4, &long).await;
    let mut admin = AdminClient::connect(server.url()).await.unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            let limits = admin.get_limits(pb::GetLimitsRequest {}).await.unwrap().into_inner();
            if limits.server.unwrap_or_default().running == 4 {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the silent client took every slot");

    // Another client is served once the stall timeout gives the slots back, while the silent connection
    // is still open.
    let started = Instant::now();
    let mut c = client(&server.url()).await;
    let (_, done) = stream_all(&mut c, chat("Say hello.", 4)).await;
    assert_eq!(done.usage.unwrap().completion_tokens, 4);
    eprintln!(
        "small-window client: another client served after {:.0} ms (stall timeout 1 s)",
        started.elapsed().as_secs_f64() * 1e3
    );
    wait_admission_idle(&server.url()).await;

    // When the silent client reads at last, it gets what had been sent, then a status saying why the
    // stream ended: not an OK that would pass for a finished stream.
    let mut response = tokio::time::timeout(WAIT, held.into_iter().next().unwrap())
        .await
        .unwrap()
        .unwrap();
    let body = response.body_mut();
    let mut received = 0;
    tokio::time::timeout(WAIT, async {
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            received += chunk.len();
            body.flow_control().release_capacity(chunk.len()).unwrap();
        }
    })
    .await
    .expect("the body ends");
    let trailers = tokio::time::timeout(WAIT, body.trailers())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(trailers["grpc-status"], "14", "UNAVAILABLE: {trailers:?}");
    let why = trailers["grpc-message"].to_str().unwrap().to_string();
    assert!(
        why.contains("took%20no%20message") || why.contains("took no message"),
        "{why}"
    );
    assert!(received > 0, "the messages sent before the stall came first");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_panic_ends_its_requests_clearly_and_repeated_panics_turn_health_off() {
    let _one = SERIAL.lock().await;
    const MARKER: &str = "chaos-engine-panic-marker";
    let mut settings = settings();
    settings.engine.test_fault_marker = Some(MARKER.into());
    let server = ferroserve::commands::servers::start_serve(settings, model_path())
        .await
        .unwrap();
    wait_serving(&server.url()).await;
    let mut c = client(&server.url()).await;
    let fine = || chat("What is the capital of France?", 4);

    // A panic ends the request that caused it with UNAVAILABLE; the engine restarts and serves.
    for _ in 0..3 {
        let status = c
            .generate(chat(MARKER, 4))
            .await
            .expect_err("the panicking request fails");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("retry"), "{status:?}");
        let ok = c.generate(fine()).await.expect("served after a restart").into_inner();
        assert_eq!(ok.usage.unwrap().completion_tokens, 4);
    }
    assert_eq!(health_status(&server.url(), "").await, ServingStatus::Serving as i32);

    // A fourth panic within the minute: the engine is given up on, health says so, requests fail fast.
    let status = c.generate(chat(MARKER, 4)).await.expect_err("fails");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let mut watch = health_watch(&server.url()).await;
    until_not_serving(&mut watch).await;
    let status = tokio::time::timeout(WAIT, c.generate(fine()))
        .await
        .expect("no hang")
        .expect_err("no engine");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    wait_admission_idle(&server.url()).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedding_panic_is_counted_and_fails_open_or_closed_as_configured() {
    let _one = SERIAL.lock().await;
    const MARKER: &str = "chaos-embed-panic-marker";
    let dir = Scratch::new("embed");
    let filters = dir.0.join("filters");
    std::fs::create_dir_all(&filters).unwrap();
    let default = std::fs::read_to_string(repo("configs/filters/default.toml")).unwrap();
    for (name, on_error) in [("open", "allow"), ("closed", "block")] {
        let text = default
            .replace("name = \"default\"", &format!("name = \"{name}\""))
            .replace("on_error = \"block\"", &format!("on_error = \"{on_error}\""));
        assert!(text.contains(&format!("on_error = \"{on_error}\"")));
        std::fs::write(filters.join(format!("{name}.toml")), text).unwrap();
    }
    std::fs::copy(
        repo("configs/filters/default.classifier.safetensors"),
        filters.join("default.classifier.safetensors"),
    )
    .unwrap();
    let cfg = dir.file(
        "serve.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\nhttp_listen = \"\"\n[filter]\ndir = \"{}\"\nactive = \"open\"\nwatch_interval_secs = 0.0\n",
            filters.display()
        ),
    );
    let model = model_path();
    let server = spawn_with(
        &["serve", "--config", &cfg, "--model-path", model.to_str().unwrap()],
        &[("FERROSERVE_TEST_FAULT", &format!("embed-panic:{MARKER}"))],
    )
    .await;
    wait_serving(&server.url).await;
    let mut c = client(&server.url).await;
    let mut admin = AdminClient::connect(server.url.clone()).await.unwrap();
    let marked = || chat(&format!("Tell me about cats. {MARKER}"), 4);
    let failures = |listed: &pb::ListFiltersResponse, id: &str| {
        let f = listed.loaded.iter().find(|f| f.id.starts_with(id)).expect("loaded");
        (f.failures, f.on_failure.clone())
    };

    // Fail open: the text could not be embedded, and passes on the rules' verdict.
    let open = c.generate(marked()).await.unwrap().into_inner();
    assert_ne!(open.finish_reason, pb::FinishReason::Filtered as i32, "{open:?}");
    let listed = admin
        .list_filters(pb::ListFiltersRequest {})
        .await
        .unwrap()
        .into_inner();
    let (n, on) = failures(&listed, "open@");
    assert!(n >= 1 && on == "allow", "{listed:?}");

    // Fail closed: the same text is refused, saying why.
    admin
        .swap_filter(pb::SwapFilterRequest { name: "closed".into() })
        .await
        .unwrap();
    let closed = c.generate(marked()).await.unwrap().into_inner();
    assert_eq!(closed.finish_reason, pb::FinishReason::Filtered as i32, "{closed:?}");
    assert_eq!(closed.filtered.unwrap().category, "filter_unavailable");
    let listed = admin
        .list_filters(pb::ListFiltersRequest {})
        .await
        .unwrap()
        .into_inner();
    let (n, on) = failures(&listed, "closed@");
    assert!(n >= 1 && on == "block", "{listed:?}");
    // The thread survived: a text without the marker is embedded and judged as usual.
    let fine = c
        .generate(chat("What is the capital of France?", 4))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(fine.finish_reason, pb::FinishReason::Filtered as i32);

    let (_, metrics) = http_get(server.metrics_addr().await.parse().unwrap(), "/metrics").await;
    let panics = sample(&metrics, "ferroserve_embedding_panics_total").unwrap_or(0.0);
    assert!(panics >= 2.0, "each panic is counted: {panics}");
    let closed_failures = sample(
        &metrics,
        "ferroserve_filter_failures_total{stage=\"classifier\",action=\"block\"}",
    )
    .unwrap_or(0.0);
    assert!(closed_failures >= 1.0, "{closed_failures}");
    wait_admission_idle(&server.url).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_worker_then_a_router_under_load() {
    let _one = SERIAL.lock().await;
    let dir = Scratch::new("drain");
    let wcfg = dir.file(
        "w.toml",
        &format!("{WORKER_CONFIG}[server]\ndrain_prestop_secs = 0.5\ndrain_timeout_secs = 60.0\n"),
    );
    let rcfg = dir.file(
        "r.toml",
        &router_config().replace(
            "drain_timeout_secs = 30.0",
            "drain_timeout_secs = 2.0\ndrain_prestop_secs = 1.0",
        ),
    );
    let w1 = start_worker(&wcfg, &[]).await;
    let w2 = start_worker(&wcfg, &[]).await;
    let router = start_router(&rcfg, &[&w1.url, &w2.url]).await;

    // A worker: what runs finishes there, what waits in its queue goes to the other worker.
    let max_tokens = 24;
    let (handles, mut tokens) = start_streams(&router.url, (0..12).map(|i| seeded(i, max_tokens)).collect());
    until_tokens(&mut tokens, 8).await;
    let mut health = health_watch(&w1.url).await;
    let mut logs = w1.logs();
    let sent = Instant::now();
    w1.signal("TERM");
    until_not_serving(&mut health).await;
    let got = outcomes(handles).await;
    assert_eq!(assert_clean(&got, max_tokens), 12, "{got:?}");
    let mut w1 = w1;
    let exit = tokio::time::timeout(WAIT, w1.child.wait())
        .await
        .expect("worker exited")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    while let Ok(line) = logs.try_recv() {
        assert!(
            !line.contains("drain timeout passed"),
            "the worker drained before its deadline: {line}"
        );
    }
    eprintln!(
        "worker SIGTERM under 12 streams: all completed; exit 0 after {:.0} ms",
        sent.elapsed().as_secs_f64() * 1e3
    );

    // The router: NOT_SERVING while still accepting, then streams still open at the deadline end with
    // UNAVAILABLE saying how many tokens they got; exit 0.
    wait_admission_idle(&router.url).await;
    let (short, _) = start_streams(&router.url, vec![seeded(20, 8)]);
    let (long, mut tokens) = start_streams(&router.url, vec![seeded(21, 3000), seeded(22, 3000)]);
    until_tokens(&mut tokens, 2).await;
    let mut router = router;
    let sent = Instant::now();
    router.signal("TERM");
    tokio::time::timeout(WAIT, async {
        // A new connection each time, during the pre-stop delay: accepted, and told NOT_SERVING.
        while health_status(&router.url, "ferroserve.v1.Inference").await != ServingStatus::NotServing as i32 {}
    })
    .await
    .expect("the router turned NOT_SERVING while accepting");
    assert!(matches!(outcomes(short).await[0].end, End::Complete(_)));
    for o in outcomes(long).await {
        let End::Status(s) = &o.end else {
            panic!("cut off at the deadline: {o:?}")
        };
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        assert!(s.message().contains(&format!("after {} tokens", o.ids.len())), "{s:?}");
    }
    let exit = tokio::time::timeout(WAIT, router.child.wait())
        .await
        .expect("router exited")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    eprintln!(
        "router SIGTERM (pre-stop 1 s, drain 2 s): exit 0 after {:.0} ms",
        sent.elapsed().as_secs_f64() * 1e3
    );
    w2.stop().await;
}

/// A spot notice: the node is going away and the pod has 5 s (`terminationGracePeriodSeconds: 5`). The
/// worker's drain fits it (0.5 s NOT_SERVING while accepting, 2.5 s for streams, at most 1 s to send the
/// cut-off statuses); what is still running at its deadline moves to the other worker and continues there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_notice_with_a_5_s_grace_moves_what_runs_and_the_worker_exits_in_time() {
    const GRACE: std::time::Duration = std::time::Duration::from_secs(5);
    let _one = SERIAL.lock().await;
    let dir = Scratch::new("spot");
    let spot = dir.file(
        "spot.toml",
        &format!("{WORKER_CONFIG}[server]\ndrain_prestop_secs = 0.5\ndrain_timeout_secs = 2.5\n"),
    );
    let (wcfg, rcfg) = (dir.file("w.toml", WORKER_CONFIG), dir.file("r.toml", &router_config()));
    let w1 = start_worker(&spot, &[]).await;
    let w2 = start_worker(&wcfg, &[]).await;
    let router = start_router(&rcfg, &[&w1.url, &w2.url]).await;

    // Streams long enough that those on the spot worker are still running at its deadline.
    let max_tokens = 256;
    let (handles, mut tokens) = start_streams(&router.url, (0..8).map(|i| seeded(i, max_tokens)).collect());
    until_tokens(&mut tokens, 16).await;
    let mut health = health_watch(&w1.url).await;
    let mut worker_logs = w1.logs();
    let mut router_logs = router.logs();
    let mut w1 = w1;
    let noticed = Instant::now();
    w1.signal("TERM");
    until_not_serving(&mut health).await;
    // The kubelet's side: SIGKILL once the grace period is over.
    let exit = match tokio::time::timeout(GRACE.saturating_sub(noticed.elapsed()), w1.child.wait()).await {
        Ok(exit) => exit.unwrap(),
        Err(_) => {
            w1.kill9().await;
            panic!("the worker was still running when the {GRACE:?} grace period ended");
        }
    };
    assert!(exit.success(), "{exit:?}");
    let exited_ms = noticed.elapsed().as_secs_f64() * 1e3;
    let cut = wait_log(&mut worker_logs, "drain timeout passed").await;
    assert!(cut.contains("UNAVAILABLE"), "{cut}");

    let got = outcomes(handles).await;
    assert_eq!(assert_clean(&got, max_tokens), 8, "every stream completed: {got:?}");
    let moved = wait_log(&mut router_logs, "continuing it on another").await;
    assert!(
        moved.contains("drain deadline passed"),
        "moved at the spot worker's deadline: {moved}"
    );
    eprintln!(
        "spot notice (grace 5 s): worker exit 0 after {exited_ms:.0} ms; 8/8 streams completed, those cut off continued on the other worker"
    );
    wait_admission_idle(&router.url).await;
    router.stop().await;
    w2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_switch_survives_a_router_restart() {
    let _one = SERIAL.lock().await;
    let dir = Scratch::new("state");
    let state = dir.0.join("traffic.json");
    let wcfg = dir.file("w.toml", WORKER_CONFIG);
    let rcfg = dir.file(
        "r.toml",
        &router_config().replace("[router]", &format!("[router]\nstate_file = \"{}\"", state.display())),
    );
    let a = start_worker(&wcfg, &["--model-version", "a"]).await;
    let b = start_worker(&wcfg, &["--model-version", "b"]).await;
    let router = start_router(&rcfg, &[&a.url, &b.url]).await;
    let mut admin = AdminClient::connect(router.url.clone()).await.unwrap();
    let model = "smollm2-135m-instruct".to_string();
    admin
        .set_traffic(pb::SetTrafficRequest {
            model: model.clone(),
            weights: [("a".to_string(), 50), ("b".to_string(), 50)].into(),
            reason: "chaos".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .disable_version(pb::VersionRequest {
            model: model.clone(),
            version: "b".into(),
            reason: "bad canary".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    router.stop().await;

    let router = start_router(&rcfg, &[&a.url, &b.url]).await;
    let mut admin = AdminClient::connect(router.url.clone()).await.unwrap();
    let traffic = admin
        .get_traffic(pb::GetTrafficRequest { model: model.clone() })
        .await
        .unwrap()
        .into_inner();
    let b_state = traffic.versions.iter().find(|v| v.version == "b").expect("b listed");
    assert!(b_state.disabled, "{traffic:?}");
    assert_eq!(traffic.history.len(), 2, "the history came back too: {traffic:?}");
    let mut c = client(&router.url).await;
    for i in 0..4 {
        let mut r = chat("Say hi.", 2);
        r.session = format!("user-{i}");
        let done = c.generate(r).await.unwrap().into_inner();
        assert_eq!(
            done.model_version,
            format!("{model}@a"),
            "no traffic to the disabled version"
        );
    }
    wait_admission_idle(&router.url).await;
    router.stop().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_restarted_with_another_version_replaces_its_pool_member() {
    let _one = SERIAL.lock().await;
    let dir = Scratch::new("restart");
    let (wcfg, rcfg) = (dir.file("w.toml", WORKER_CONFIG), dir.file("r.toml", &router_config()));
    let mut w = start_worker(&wcfg, &["--model-version", "a"]).await;
    let router = start_router(&rcfg, &[&w.url]).await;
    let mut c = client(&router.url).await;
    let done = c.generate(chat("Say hi.", 2)).await.unwrap().into_inner();
    assert_eq!(done.model_version, "smollm2-135m-instruct@a");

    // The same address comes back serving version b: the router asks who it is and believes the answer.
    let addr = w.addr.clone();
    w.kill9().await;
    let w = start_worker(&wcfg, &["--listen", &addr, "--model-version", "b"]).await;
    until_workers(&router.url, |r| {
        r.workers
            .iter()
            .any(|w| w.healthy && w.models.iter().any(|m| m.version == "b"))
    })
    .await;
    let listed = AdminClient::connect(router.url.clone())
        .await
        .unwrap()
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.workers.len(), 1, "replaced, not added: {listed:?}");
    let done = c.generate(chat("Say hi.", 2)).await.unwrap().into_inner();
    assert_eq!(done.model_version, "smollm2-135m-instruct@b");
    wait_admission_idle(&router.url).await;
    router.stop().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_queue_bound_counts_every_waiting_request_and_overload_is_refused_at_once() {
    let _one = SERIAL.lock().await;
    let mut file = ferroserve::config::FileConfig::default();
    file.server.listen = "127.0.0.1:0".into();
    file.server.metrics_listen = String::new();
    file.server.http_listen = String::new();
    // One sequence at a time and room for two waiting; admission lets eight through to the engine.
    file.engine.max_batch_seqs = 1;
    file.engine.queue_capacity = 2;
    file.admission.max_in_flight = Some(8);
    let server = ferroserve::commands::servers::start_serve(file.validate().unwrap(), model_path())
        .await
        .unwrap();
    wait_serving(&server.url()).await;
    let backend = server.backend.get().expect("the engine is loaded");
    let mut stats = backend.watch_stats();
    let most_waiting = tokio::spawn(async move {
        use futures::StreamExt;
        let mut most = 0;
        while let Some(s) = stats.next().await {
            most = most.max(s.waiting);
            if s.completed >= 3 && s.running == 0 && s.waiting == 0 {
                break;
            }
        }
        most
    });
    // A long request holds the one batch place while the others arrive, so that none of them can find a
    // place freed by an early finish: two wait, five are refused.
    let (long, mut tokens) = start_streams(&server.url(), vec![seeded(0, 120)]);
    until_tokens(&mut tokens, 1).await;
    let (handles, _) = start_streams(&server.url(), (1..8).map(|i| seeded(i, 48)).collect());
    let got = outcomes(handles).await;
    let completed = assert_clean(&got, 48) + assert_clean(&outcomes(long).await, 120);
    let refused: Vec<_> = got
        .iter()
        .filter_map(|o| match &o.end {
            End::Status(s) => Some(s.message().to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(completed, 3, "one running and two waiting were taken: {got:?}");
    assert_eq!(refused.len(), 5, "{got:?}");
    assert!(refused.iter().all(|m| m.contains("queue is full")), "{refused:?}");
    let most = tokio::time::timeout(WAIT, most_waiting).await.unwrap().unwrap();
    assert!(most <= 2, "at most queue_capacity requests ever waited: {most}");
    wait_admission_idle(&server.url()).await;
    server.shutdown().await.unwrap();
}

/// Runs `request` on `backend` to its end (bounded): the token chunks streamed, and the completion or
/// error.
async fn on_engine(
    backend: &Arc<dyn ferroserve_core::Backend>,
    request: ferroserve_core::ValidRequest,
) -> (
    Vec<ferroserve_core::TokenChunk>,
    Result<ferroserve_core::Completion, ferroserve_core::BackendError>,
) {
    use ferroserve_core::Event;
    use futures::StreamExt;
    let mut events = match backend.generate(request).await {
        Ok(e) => e,
        Err(e) => return (Vec::new(), Err(e)),
    };
    let mut chunks = Vec::new();
    let end = tokio::time::timeout(WAIT, async {
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Token(t)) => chunks.push(t),
                Ok(Event::Complete(c)) => return Ok(c),
                Err(e) => return Err(e),
            }
        }
        panic!("the engine ended a stream without a completion");
    })
    .await
    .expect("the engine answered in time");
    (chunks, end)
}

/// The engine's generated-token total once it has counted `completed` requests (it counts each just after
/// sending its completion), following its counters (bounded).
async fn generated_tokens(backend: &Arc<dyn ferroserve_core::Backend>, completed: u64) -> u64 {
    use futures::StreamExt;
    let mut stats = backend.watch_stats();
    tokio::time::timeout(WAIT, async {
        while let Some(s) = stats.next().await {
            if s.completed >= completed && s.running == 0 {
                return s.generated_tokens;
            }
        }
        panic!("stats ended");
    })
    .await
    .expect("counted in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_ends_at_once_where_the_failed_worker_had_ended_it() {
    use ferroserve_core::{BackendError, FinishReason, ValidRequest};
    let _one = SERIAL.lock().await;
    let server = start_serve().await;
    let backend = server.backend.get().expect("the engine is loaded");
    let fresh = |max_tokens| ValidRequest::greedy_prompt("cont", "The capital of France is", max_tokens);
    let (chunks, done) = on_engine(backend, fresh(8)).await;
    assert_eq!(done.expect("a first run").usage.completion_tokens, 8);
    let ids: Vec<u32> = chunks.iter().flat_map(|c| c.token_ids.clone()).collect();
    let before = generated_tokens(backend, 1).await;

    // The failed worker had streamed every token but not the completion: nothing is left to generate.
    let mut all = fresh(8);
    all.continuation = ids.clone();
    let (more, end) = on_engine(backend, all).await;
    let end = end.expect("completes");
    assert!(more.is_empty(), "no token generated again: {more:?}");
    assert_eq!((end.finish, end.usage.completion_tokens), (FinishReason::Length, 8));

    // The streamed tokens had completed a stop string: it ends with STOP at once.
    let first_three: String = chunks[..3].iter().map(|c| c.text.as_str()).collect();
    assert!(!first_three.trim().is_empty(), "{first_three:?}");
    let mut stopped = fresh(8);
    stopped.continuation = ids[..3].to_vec();
    stopped.stop = vec![first_three];
    let (more, end) = on_engine(backend, stopped).await;
    let end = end.expect("completes");
    assert!(
        more.iter().all(|c| c.token_ids.is_empty()),
        "no token generated again: {more:?}"
    );
    assert_eq!((end.finish, end.usage.completion_tokens), (FinishReason::Stop, 3));

    // Tokens generated on the failed worker are not counted again in this worker's totals.
    assert_eq!(generated_tokens(backend, 3).await, before);

    // A continuation id outside the vocabulary is refused by name, before it reaches the model.
    let mut bad = fresh(8);
    bad.continuation = vec![u32::MAX];
    let (_, end) = on_engine(backend, bad).await;
    assert!(
        matches!(&end, Err(BackendError::InvalidRequest { field, .. }) if field == "continuation"),
        "{end:?}"
    );
    server.shutdown().await.unwrap();
}
