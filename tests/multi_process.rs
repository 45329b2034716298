//! `ferroserve router` in front of two `ferroserve worker` processes: separate processes on 127.0.0.1,
//! started from the real binary, each announcing its ephemeral port on stdout.

mod support;

use std::process::Stdio;

use ferroserve_proto::v1::ListWorkersRequest;
use ferroserve_proto::v1::admin_client::AdminClient;
use ferroserve_proto::worker::WatchStatsRequest;
use ferroserve_proto::worker::worker_client::WorkerClient;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A child process that is killed when dropped, so a failing test leaves nothing running.
struct Proc {
    child: Child,
    url: String,
}

async fn spawn(args: &[&str]) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferroserve"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start ferroserve");
    let stdout = child.stdout.take().expect("stdout piped");
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(addr) = line.split("listening on ").nth(1) {
                return addr.trim().to_string();
            }
        }
        panic!("process exited before announcing its address");
    })
    .await
    .expect("process announced its address in time");
    Proc {
        child,
        url: format!("http://{addr}"),
    }
}

impl Proc {
    /// SIGTERM, then wait (bounded) for a clean exit.
    async fn stop(mut self) {
        let pid = self.child.id().expect("running") as i32;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        assert!(status.is_ok_and(|s| s.success()));
        let exit = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("exited in time")
            .unwrap();
        assert!(exit.success(), "graceful exit status: {exit:?}");
    }
}

/// Follows the router's worker report (bounded) until `n` workers are healthy in its pool.
async fn wait_workers_healthy(router_url: &str, n: usize) {
    let mut admin = AdminClient::connect(router_url.to_string()).await.unwrap();
    let mut reports = admin.watch_workers(ListWorkersRequest {}).await.unwrap().into_inner();
    tokio::time::timeout(WAIT, async {
        while let Some(r) = reports.message().await.unwrap() {
            if r.workers.iter().filter(|w| w.healthy).count() >= n {
                return;
            }
        }
        panic!("worker report stream ended");
    })
    .await
    .expect("workers joined the router in time");
}

async fn completed_on(worker_url: &str) -> u64 {
    let mut w = WorkerClient::connect(worker_url.to_string()).await.unwrap();
    let mut stats = w.watch_stats(WatchStatsRequest {}).await.unwrap().into_inner();
    stats.message().await.unwrap().expect("a first snapshot").completed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_spreads_concurrent_requests_across_two_worker_processes() {
    let model = model_path();
    let model = model.to_str().unwrap();
    let w1 = spawn(&["worker", "--listen", "127.0.0.1:0", "--model-path", model]).await;
    let w2 = spawn(&["worker", "--listen", "127.0.0.1:0", "--model-path", model]).await;
    let router = spawn(&[
        "router",
        "--listen",
        "127.0.0.1:0",
        "--worker",
        &w1.url,
        "--worker",
        &w2.url,
    ])
    .await;
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
    let (a, b) = (completed_on(&w1.url).await, completed_on(&w2.url).await);
    assert_eq!(a + b, 6, "every request completed on some worker");
    assert!(a >= 1 && b >= 1, "both workers served requests: {a} and {b}");

    router.stop().await;
    w1.stop().await;
    w2.stop().await;
}
