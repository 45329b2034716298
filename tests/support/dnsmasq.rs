//! A real `dnsmasq` (Debian's `dnsmasq-base`; `.ci/run` installs it) answering on a free 127.0.0.1 port
//! from a hosts file the test rewrites, re-read on SIGHUP. Stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::WAIT;

/// One dnsmasq child and its hosts file.
pub struct Dnsmasq {
    child: Child,
    /// Its port on 127.0.0.1 (UDP and TCP).
    pub port: u16,
    hosts: PathBuf,
    lines: tokio::sync::mpsc::Receiver<String>,
}

impl Dnsmasq {
    /// Starts one answering `name` with `addresses` (no upstream, TTL 0, no negative cache).
    pub async fn start(dir: &Path, name: &str, addresses: &[&str]) -> Dnsmasq {
        let hosts = dir.join("dns-hosts");
        write_hosts(&hosts, name, addresses);
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new("dnsmasq")
            .args([
                "-k",
                "--log-facility=-",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
            ])
            .args([
                "--no-resolv",
                "--no-hosts",
                "--local-ttl=0",
                "--no-negcache",
                "--pid-file=",
                "--user=root",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--addn-hosts={}", hosts.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("dnsmasq on PATH (Debian package dnsmasq-base; .ci/run installs it)");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr piped")).lines();
        let (tx, mut lines) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                let _ = tx.try_send(line);
            }
        });
        // Started once it has read the hosts file.
        wait_line(&mut lines, "names").await;
        Dnsmasq {
            child,
            port,
            hosts,
            lines,
        }
    }

    /// `127.0.0.1:port`.
    pub fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Answers `name` with `addresses` from now on (rewrites the file, SIGHUP, waits until it is re-read).
    pub async fn set(&mut self, name: &str, addresses: &[&str]) {
        write_hosts(&self.hosts, name, addresses);
        let pid = self.child.id().expect("running");
        let sent = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -HUP dnsmasq");
        wait_line(&mut self.lines, "names").await;
    }
}

fn write_hosts(path: &Path, name: &str, addresses: &[&str]) {
    let text: String = addresses.iter().map(|a| format!("{a} {name}\n")).collect();
    std::fs::write(path, text).expect("write the hosts file");
}

async fn wait_line(lines: &mut tokio::sync::mpsc::Receiver<String>, needle: &str) {
    let found = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.recv().await {
            if line.contains(needle) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "dnsmasq never logged `{needle}`");
}
