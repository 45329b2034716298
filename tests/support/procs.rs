//! The real binary as child processes on 127.0.0.1, each announcing its ephemeral port on stdout.

use std::process::Stdio;
use std::time::{Duration, Instant};

use ferroserve_proto::v1::admin_client::AdminClient;
use ferroserve_proto::v1::{ListWorkersRequest, ListWorkersResponse};
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
    /// Its stdout lines after the address, so far.
    stdout: tokio::sync::watch::Receiver<Vec<String>>,
    /// Its log lines (stderr), echoed to the test's stderr too.
    logs: tokio::sync::broadcast::Sender<String>,
}

/// Starts `ferroserve args...` and waits (bounded) for it to announce its address.
pub async fn spawn(args: &[&str]) -> Proc {
    spawn_with(args, &[]).await
}

/// [`spawn`] with extra environment variables.
pub async fn spawn_with(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferroserve"))
        .args(args)
        .env("RUST_LOG", "warn")
        // No HTTP API unless a test asks for one (`--http-listen 127.0.0.1:0`): the default port would
        // collide between tests running side by side.
        .env("FERROSERVE_HTTP_LISTEN", "")
        .envs(env.iter().copied())
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
    // Keep draining stdout so the child never writes into a closed pipe, and keep what it says.
    let (said, stdout) = tokio::sync::watch::channel(Vec::new());
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            said.send_modify(|lines| lines.push(line));
        }
    });
    Proc {
        child,
        url: format!("http://{addr}"),
        addr,
        stdout,
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

    /// `host:port` of its /metrics listener, from the line it prints after its address (bounded wait).
    pub async fn metrics_addr(&self) -> String {
        self.announced("metrics on http://", "/metrics").await
    }

    /// `host:port` of its OpenAI-compatible HTTP API, from the line it prints after its address.
    pub async fn http_addr(&self) -> String {
        self.announced("OpenAI API on http://", "/v1").await
    }

    /// The address in the stdout line with `marker` before it and `suffix` after (bounded wait).
    async fn announced(&self, marker: &str, suffix: &str) -> String {
        let mut stdout = self.stdout.clone();
        let find = |lines: &Vec<String>| {
            lines
                .iter()
                .find_map(|l| l.split(marker).nth(1).map(|m| m.trim_end_matches(suffix).to_string()))
        };
        let lines = tokio::time::timeout(WAIT, stdout.wait_for(|lines| find(lines).is_some()))
            .await
            .unwrap_or_else(|_| panic!("`{marker}` announced in time"))
            .expect("stdout open");
        find(&lines).expect("found")
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// SIGKILL, and waits (bounded) until it is gone.
    pub async fn kill9(&mut self) {
        self.child.start_kill().expect("SIGKILL");
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("killed in time")
            .expect("wait");
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
    until_workers(router_url, |r| r.workers.iter().filter(|w| w.healthy).count() >= n).await;
}

/// Follows the router's worker report (bounded) until `done` holds.
pub async fn until_workers(router_url: &str, done: impl Fn(&ListWorkersResponse) -> bool) -> Duration {
    let started = Instant::now();
    let mut admin = AdminClient::connect(router_url.to_string()).await.unwrap();
    let mut reports = admin.watch_workers(ListWorkersRequest {}).await.unwrap().into_inner();
    tokio::time::timeout(WAIT, async {
        while let Some(r) = reports.message().await.unwrap() {
            if done(&r) {
                return;
            }
        }
        panic!("worker report stream ended");
    })
    .await
    .expect("the pool changed in time");
    started.elapsed()
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
