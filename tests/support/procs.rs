//! The real binary as child processes on 127.0.0.1, each announcing its ephemeral port on stdout.

use std::process::Stdio;

use ferroserve_proto::v1::ListWorkersRequest;
use ferroserve_proto::v1::admin_client::AdminClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::WAIT;

/// A child process that is killed when dropped, so a failing test leaves nothing running.
pub struct Proc {
    pub child: Child,
    /// `http://host:port` of its gRPC listener.
    pub url: String,
    /// `host:port` of its gRPC listener.
    pub addr: String,
    /// Its log lines (stderr), echoed to the test's stderr too.
    logs: tokio::sync::broadcast::Sender<String>,
}

/// Starts `ferroserve args...` and waits (bounded) for it to announce its address.
pub async fn spawn(args: &[&str]) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferroserve"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start ferroserve");
    let (logs, _) = tokio::sync::broadcast::channel(1024);
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr piped")).lines();
    let forward = logs.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            eprintln!("{line}");
            let _ = forward.send(line);
        }
    });
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
    // Keep draining stdout so the child never writes into a closed pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Proc {
        child,
        url: format!("http://{addr}"),
        addr,
        logs,
    }
}

impl Proc {
    /// Sends `signal` (a name for kill(1): TERM, HUP).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running") as i32;
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {pid}");
    }

    /// Follows its log lines from now on.
    pub fn logs(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.logs.subscribe()
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    pub async fn stop(mut self) {
        self.signal("TERM");
        let exit = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("exited in time")
            .unwrap();
        assert!(exit.success(), "graceful exit status: {exit:?}");
    }
}

/// Runs the binary to completion (bounded) and returns its exit status, stdout and stderr.
pub async fn run_to_end(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = tokio::time::timeout(
        WAIT,
        Command::new(env!("CARGO_BIN_EXE_ferroserve"))
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("exited in time")
    .expect("ran");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Follows a router's worker report (bounded) until `n` workers are healthy in its pool.
pub async fn wait_workers_healthy(router_url: &str, n: usize) {
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

/// Waits (bounded) for a log line containing `needle`.
pub async fn wait_log(logs: &mut tokio::sync::broadcast::Receiver<String>, needle: &str) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            match logs.recv().await {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("log stream ended before {needle:?}: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no log line with {needle:?} in time"))
}
