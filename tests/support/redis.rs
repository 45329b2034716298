//! A real `redis-server` (the Debian package; `.ci/run` installs it) on a free 127.0.0.1 port, stopped when
//! dropped. Nothing persists: no RDB, no AOF. Self-contained, so that crate tests include it by path.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Upper bound on waiting for redis-server to start or stop.
const WAIT: Duration = Duration::from_secs(60);

/// One `redis-server` child.
pub struct Redis {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Redis {
    /// Starts one on a free port and waits (bounded) until it accepts connections.
    pub async fn start() -> Redis {
        Self::on(free_port()).await
    }

    /// Starts one on `port` (to bring a killed one back at the same address).
    pub async fn on(port: u16) -> Redis {
        let mut child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--loglevel", "notice"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server on PATH (Debian package redis-server; .ci/run installs it)");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout piped")).lines();
        let ready = tokio::time::timeout(WAIT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("Ready to accept connections") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(ready, Ok(true), "redis-server on port {port} did not become ready");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Redis { child, port }
    }

    /// `redis://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, and waits (bounded) until it is gone.
    pub async fn kill(mut self) -> u16 {
        self.child.start_kill().expect("SIGKILL redis-server");
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("redis-server gone in time")
            .expect("wait");
        self.port
    }
}
