//! The listeners and how they are protected: `[server]`, `[worker]`, `[connections]`, and the router's
//! side of the internal plane (`[router]`'s worker TLS and token). Every file named here is checked to
//! exist before any port is bound; TLS files are parsed when the server starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ferroserve_net::{ClientTlsFiles, ConnectionLimits, TlsFiles, TokenHash};
use ferroserve_worker::WorkerClientConfig;
use serde::Deserialize;

use super::{ConfigError, err};

/// `[server]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Public gRPC address.
    pub listen: String,
    /// Seconds in-flight streams may run after SIGINT/SIGTERM (after the pre-stop delay).
    pub drain_timeout_secs: f64,
    /// Seconds after SIGTERM during which health reports NOT_SERVING but the listener still accepts, so
    /// that load balancers stop sending first (Kubernetes: at least the readiness probe period).
    pub drain_prestop_secs: f64,
    /// Prometheus `/metrics` address of `serve` and `router`; empty disables it.
    pub metrics_listen: String,
    /// The OpenAI-compatible HTTP API of `serve` and `router`; empty disables it.
    pub http_listen: String,
    /// The largest `n` (completions per request) the HTTP API accepts.
    pub http_max_n: u32,
    /// `max_tokens` of an HTTP request that sends none (OpenAI's default is "up to the context").
    pub http_default_max_tokens: u32,
    /// PEM certificate chain for TLS on the public listener and `/metrics` (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: "127.0.0.1:50051".into(),
            drain_timeout_secs: 30.0,
            drain_prestop_secs: 0.0,
            metrics_listen: "127.0.0.1:9464".into(),
            http_listen: "127.0.0.1:8080".into(),
            http_max_n: 8,
            http_default_max_tokens: 256,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// `[worker]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSection {
    /// Worker gRPC address for `ferroserve worker`.
    pub listen: String,
    /// Prometheus `/metrics` address of `ferroserve worker`; empty disables it.
    pub metrics_listen: String,
    /// sha256 (hex) of the internal-plane token routers must send; unset accepts any caller.
    pub token_sha256: Option<String>,
    /// A file holding `token_sha256` (a mounted Secret).
    pub token_sha256_file: Option<PathBuf>,
    /// PEM certificate chain for TLS on the worker listener (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) whose certificates routers must present: mTLS. Needs `tls_cert`.
    pub tls_client_ca: Option<PathBuf>,
}

impl Default for WorkerSection {
    fn default() -> Self {
        WorkerSection {
            listen: "127.0.0.1:50061".into(),
            metrics_listen: "127.0.0.1:9465".into(),
            token_sha256: None,
            token_sha256_file: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
        }
    }
}

/// `[connections]`: limits of every listener this process opens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionsSection {
    /// Connections open at once per listener.
    pub max_connections: usize,
    /// HTTP/2 streams open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Streams the server may reset for errors before it closes the connection.
    pub max_local_error_resets: usize,
    /// Streams a client may open and reset before the server accepts them.
    pub max_pending_accept_resets: usize,
    /// Largest request header block, in bytes.
    pub max_header_list_bytes: u32,
    /// Seconds of idle time before an HTTP/2 keepalive ping.
    pub keepalive_interval_secs: f64,
    /// Seconds a keepalive ping may go unanswered before the connection is closed.
    pub keepalive_timeout_secs: f64,
    /// Seconds of idle time before TCP keepalive probes.
    pub tcp_keepalive_secs: f64,
    /// Seconds after which a connection is asked to go away (GOAWAY); 0 keeps connections for ever.
    pub max_connection_age_secs: f64,
    /// Seconds a connection past its age may take to finish its streams.
    pub max_connection_age_grace_secs: f64,
    /// Seconds a client has for the TLS handshake and the HTTP/2 preface.
    pub handshake_timeout_secs: f64,
}

impl Default for ConnectionsSection {
    fn default() -> Self {
        let d = ConnectionLimits::default();
        ConnectionsSection {
            max_connections: d.max_connections,
            max_concurrent_streams: d.max_concurrent_streams,
            max_local_error_resets: d.max_local_error_resets,
            max_pending_accept_resets: d.max_pending_accept_resets,
            max_header_list_bytes: d.max_header_list_bytes,
            keepalive_interval_secs: d.keepalive_interval.as_secs_f64(),
            keepalive_timeout_secs: d.keepalive_timeout.as_secs_f64(),
            tcp_keepalive_secs: d.tcp_keepalive.as_secs_f64(),
            max_connection_age_secs: 0.0,
            max_connection_age_grace_secs: d.max_connection_age_grace.as_secs_f64(),
            handshake_timeout_secs: d.handshake_timeout.as_secs_f64(),
        }
    }
}

/// Seconds in `(0, 1 day]` as a duration; `key` names the setting in an error.
fn seconds(key: &str, secs: f64) -> Result<Duration, ConfigError> {
    if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
        return Err(err(
            key,
            format!("must be a number of seconds above 0, at most 86400 (got {secs})"),
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl ConnectionsSection {
    /// The typed limits.
    pub fn validate(&self) -> Result<ConnectionLimits, ConfigError> {
        let k = |f: &str| format!("connections.{f}");
        for (field, value) in [
            ("max_connections", self.max_connections),
            ("max_concurrent_streams", self.max_concurrent_streams as usize),
            ("max_local_error_resets", self.max_local_error_resets),
            ("max_pending_accept_resets", self.max_pending_accept_resets),
            ("max_header_list_bytes", self.max_header_list_bytes as usize),
        ] {
            if value == 0 {
                return Err(err(&k(field), "must be at least 1"));
            }
        }
        Ok(ConnectionLimits {
            max_connections: self.max_connections,
            max_concurrent_streams: self.max_concurrent_streams,
            max_local_error_resets: self.max_local_error_resets,
            max_pending_accept_resets: self.max_pending_accept_resets,
            max_header_list_bytes: self.max_header_list_bytes,
            keepalive_interval: seconds(&k("keepalive_interval_secs"), self.keepalive_interval_secs)?,
            keepalive_timeout: seconds(&k("keepalive_timeout_secs"), self.keepalive_timeout_secs)?,
            tcp_keepalive: seconds(&k("tcp_keepalive_secs"), self.tcp_keepalive_secs)?,
            max_connection_age: match self.max_connection_age_secs {
                0.0 => None,
                s => Some(seconds(&k("max_connection_age_secs"), s)?),
            },
            max_connection_age_grace: seconds(&k("max_connection_age_grace_secs"), self.max_connection_age_grace_secs)?,
            handshake_timeout: seconds(&k("handshake_timeout_secs"), self.handshake_timeout_secs)?,
        })
    }
}

/// An optional file that must exist.
fn file(key: &str, path: &Option<PathBuf>) -> Result<Option<PathBuf>, ConfigError> {
    match path {
        Some(p) if !p.is_file() => Err(err(key, format!("{} is not a file", p.display()))),
        other => Ok(other.clone()),
    }
}

/// A server certificate and key, both or neither; `client_ca` needs them.
fn server_tls(
    prefix: &str,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    client_ca: &Option<PathBuf>,
) -> Result<Option<TlsFiles>, ConfigError> {
    let cert = file(&format!("{prefix}.tls_cert"), cert)?;
    let key = file(&format!("{prefix}.tls_key"), key)?;
    let client_ca = file(&format!("{prefix}.tls_client_ca"), client_ca)?;
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key, client_ca })),
        (None, None) if client_ca.is_some() => Err(err(
            &format!("{prefix}.tls_client_ca"),
            "verifying clients (mTLS) needs the server's own tls_cert and tls_key too",
        )),
        (None, None) => Ok(None),
        (Some(_), None) => Err(err(&format!("{prefix}.tls_key"), "set it with tls_cert, or neither")),
        (None, Some(_)) => Err(err(&format!("{prefix}.tls_cert"), "set it with tls_key, or neither")),
    }
}

impl ServerSection {
    /// The public listener's TLS files, checked to exist.
    pub(super) fn tls(&self) -> Result<Option<TlsFiles>, ConfigError> {
        server_tls("server", &self.tls_cert, &self.tls_key, &None)
    }
}

impl WorkerSection {
    /// The worker listener's TLS and token. A worker reachable beyond loopback must authenticate its
    /// callers (a token or mTLS) unless `allow_unauthenticated`: anyone who reaches its port could
    /// otherwise bypass keys, limits and the filter.
    pub(super) fn protection(
        &self,
        listen: SocketAddr,
        allow_unauthenticated: bool,
    ) -> Result<(Option<TlsFiles>, Option<TokenHash>), ConfigError> {
        let tls = server_tls("worker", &self.tls_cert, &self.tls_key, &self.tls_client_ca)?;
        let token = self
            .token_sha256
            .as_deref()
            .map(|h| TokenHash::from_hex(h).map_err(|m| err("worker.token_sha256", m)))
            .transpose()?;
        let mtls = tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if !listen.ip().is_loopback() && token.is_none() && !mtls && !allow_unauthenticated {
            return Err(err(
                "worker.token_sha256",
                format!(
                    "refusing to listen on {listen} with no internal-plane authentication: anyone who can reach it \
                     would bypass keys, limits and the filter; set worker.token_sha256 (and the router's \
                     router.worker_token_file) or worker.tls_client_ca, or pass --allow-unauthenticated"
                ),
            ));
        }
        Ok((tls, token))
    }
}

/// The router's side of the internal plane, from `[router]`.
pub(super) fn worker_client(
    ca: &Option<PathBuf>,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    token_file: &Option<PathBuf>,
) -> Result<WorkerClientConfig, ConfigError> {
    let tls = ClientTlsFiles {
        ca: file("router.worker_tls_ca", ca)?,
        cert: file("router.worker_tls_cert", cert)?,
        key: file("router.worker_tls_key", key)?,
    };
    if tls.cert.is_some() != tls.key.is_some() {
        return Err(err(
            "router.worker_tls_cert",
            "a client certificate needs both worker_tls_cert and worker_tls_key",
        ));
    }
    let token = match token_file {
        None => None,
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| err("router.worker_token_file", format!("cannot read {}: {e}", p.display())))?;
            let token = text.trim().to_string();
            if token.is_empty() || token.chars().any(|c| c.is_control() || c == ' ') {
                return Err(err(
                    "router.worker_token_file",
                    format!("{} must hold one token: printable, no spaces", p.display()),
                ));
            }
            Some(token)
        }
    };
    Ok(WorkerClientConfig {
        tls,
        token,
        ..WorkerClientConfig::default()
    })
}
