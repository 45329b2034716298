//! What every server command binds and reloads: its listeners, their TLS, `/metrics`, and SIGHUP.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use ferroserve_net::{ConnectionLimits, Listen, ServerTls, TlsFiles};
use ferroserve_router::Live;
use tokio::net::TcpListener;

use crate::running::Stop;

/// Binds `addr` for `what`, saying what to do when the port is taken.
pub(crate) async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the {what}; is another server using it?"))
}

/// A listener's TLS, read now so that a bad file stops the server before it serves, naming the file.
pub(crate) fn load_tls(
    files: &Option<TlsFiles>,
    alpn: &[&'static [u8]],
    key: &str,
) -> anyhow::Result<Option<Arc<ServerTls>>> {
    files
        .clone()
        .map(|f| ServerTls::load(f, alpn).with_context(|| format!("{key}: TLS not set up")))
        .transpose()
}

/// Starts `/metrics` on `addr` if enabled, with TLS when `tls` is set; it stops with the server.
pub(crate) async fn metrics(
    addr: Option<SocketAddr>,
    tls: Option<Arc<ServerTls>>,
    limits: ConnectionLimits,
    stop: &Stop,
) -> anyhow::Result<Option<SocketAddr>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for /metrics; set another address or \"\" to disable"))?;
    let bound = listener.local_addr()?;
    ferroserve_telemetry::exporter::install();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listen = Listen {
        name: "metrics",
        limits,
        tls,
        first_bytes: 0,
    };
    tokio::spawn(ferroserve_net::metrics::serve_metrics(
        listener,
        listen,
        Arc::new(ferroserve_telemetry::exporter::render),
        stop.wait(),
    ));
    tracing::info!(%bound, "metrics at {scheme}://{bound}/metrics");
    Ok(Some(bound))
}

/// What a SIGHUP reloads: the config's keys and limits (when the settings came from a file) and every
/// listener's certificate. A bad file is refused and logged; what runs stays.
#[derive(Default)]
pub(crate) struct Hangup {
    /// The router's live settings, when a config file can be read again.
    pub live: Option<Arc<Live>>,
    /// Certificates by listener name.
    pub certs: Vec<(&'static str, Arc<ServerTls>)>,
}

impl Hangup {
    /// Handles SIGHUP until `stopped`, when there is anything to reload.
    pub(crate) fn spawn(self, stopped: impl Future<Output = ()> + Send + 'static) {
        if self.live.is_some() || !self.certs.is_empty() {
            tokio::spawn(self.run(stopped));
        }
    }

    /// Reloads everything once.
    pub(crate) fn reload(&self) {
        if let Some(live) = &self.live {
            match live.reload() {
                Ok(summary) => tracing::info!(%summary, "SIGHUP: configuration reloaded"),
                Err(e) => tracing::error!(error = %e, "SIGHUP: configuration not reloaded; the running settings stay"),
            }
        }
        for (listener, tls) in &self.certs {
            match tls.reload(listener) {
                Ok(()) => tracing::info!(listener, cert = %tls.files().cert.display(), "SIGHUP: certificate reloaded"),
                Err(e) => {
                    tracing::error!(listener, error = %e, "SIGHUP: certificate not reloaded; the running one stays")
                }
            }
        }
    }

    async fn run(self, stopped: impl Future<Output = ()>) {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hangups) = signal(SignalKind::hangup()) else {
                tracing::warn!("cannot listen for SIGHUP; reload with Admin.ReloadConfig instead");
                return;
            };
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    () = &mut stopped => return,
                    Some(()) = hangups.recv() => self.reload(),
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = stopped;
        }
    }
}
