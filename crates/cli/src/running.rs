//! A server started in the background: its addresses, its engine slot, and a way to stop it and wait.
//! The binary stops it on SIGINT/SIGTERM; tests stop it directly.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context;
use ferroserve_worker::BackendSlot;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Broadcasts the shutdown to every part of one server (gRPC, /metrics).
#[derive(Clone)]
pub struct Stop {
    /// Flips to true once.
    rx: watch::Receiver<bool>,
}

impl Stop {
    /// A new stop signal and its trigger.
    pub fn new() -> (watch::Sender<bool>, Stop) {
        let (tx, rx) = watch::channel(false);
        (tx, Stop { rx })
    }

    /// Resolves once shutdown begins (or its trigger is dropped).
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.rx.clone();
        async move {
            let _ = rx.wait_for(|stopped| *stopped).await;
        }
    }
}

/// A running router or worker.
pub struct Running {
    /// The gRPC address it bound (useful with port 0).
    pub addr: SocketAddr,
    /// The `/metrics` address it bound, if metrics are enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// The OpenAI-compatible HTTP API's address, if enabled.
    pub http_addr: Option<SocketAddr>,
    /// The in-process engine once loaded (empty for a router with remote workers).
    pub backend: BackendSlot,
    /// Fires the graceful shutdown.
    stop: watch::Sender<bool>,
    /// The server; ends after drain, or early on a fatal error such as a model that fails to load.
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub(crate) fn new(
        addr: SocketAddr,
        metrics_addr: Option<SocketAddr>,
        backend: BackendSlot,
        stop: watch::Sender<bool>,
        task: JoinHandle<anyhow::Result<()>>,
    ) -> Running {
        Running {
            addr,
            metrics_addr,
            http_addr: None,
            backend,
            stop,
            task,
        }
    }

    /// With the HTTP API bound at `addr`.
    pub(crate) fn with_http(mut self, addr: Option<SocketAddr>) -> Running {
        self.http_addr = addr;
        self
    }

    /// `http://addr`, for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts a graceful shutdown: no new requests, in-flight ones drain.
    pub fn begin_shutdown(&mut self) {
        let _ = self.stop.send(true);
    }

    /// Shuts down gracefully and waits until the server has stopped.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.begin_shutdown();
        self.task.await.context("server task panicked")?
    }

    /// Runs until a `signal` fires, then drains; a second signal during the drain exits at once (status
    /// 1). Ends early if the server fails on its own.
    pub async fn run_until<F: Future<Output = ()>>(mut self, signal: impl Fn() -> F) -> anyhow::Result<()> {
        tokio::select! {
            r = &mut self.task => return r.context("server task panicked")?,
            () = signal() => {}
        }
        self.begin_shutdown();
        tokio::select! {
            r = &mut self.task => r.context("server task panicked")?,
            () = signal() => {
                tracing::warn!("second signal during the drain: exiting now");
                std::process::exit(1);
            }
        }
    }
}

/// Resolves when the process receives SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
