//! `[router]`: request limits, remote workers and how the router reaches them, and the timeouts that
//! decide when a client or a worker has stopped.

use std::path::PathBuf;
use std::time::Duration;

use ferroserve_core::RequestLimits;
use serde::Deserialize;

use super::{ConfigError, err};

/// `[router]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterSection {
    /// Worker addresses for `ferroserve router`, e.g. `http://127.0.0.1:50061` (`https://` for TLS).
    pub workers: Vec<String>,
    /// Largest encoded request message, in bytes; refused before it is read.
    pub max_request_bytes: usize,
    /// Largest prompt, or all messages' contents together, in bytes.
    pub max_prompt_bytes: usize,
    /// Most chat messages per request.
    pub max_messages: usize,
    /// Longest `model` field.
    pub max_model_bytes: usize,
    /// Longest `session` field.
    pub max_session_bytes: usize,
    /// Longest client request id.
    pub max_request_id_bytes: usize,
    /// Most stop strings per request.
    pub max_stop_sequences: usize,
    /// Longest stop string in bytes.
    pub max_stop_bytes: usize,
    /// A file holding the internal-plane token sent to workers (their `worker.token_sha256`).
    pub worker_token_file: Option<PathBuf>,
    /// CA (PEM) that signed the workers' certificates, for `https://` workers [default: system roots].
    pub worker_tls_ca: Option<PathBuf>,
    /// The router's client certificate for mTLS to workers (with `worker_tls_key`).
    pub worker_tls_cert: Option<PathBuf>,
    /// The client certificate's key.
    pub worker_tls_key: Option<PathBuf>,
    /// Seconds a streaming client may take no message before it is given up on (its slot returns).
    pub client_stall_timeout_secs: f64,
    /// Seconds a worker may send no event for a request before the request moves to another worker.
    pub worker_stall_timeout_secs: f64,
    /// Seconds of silence on a worker's stats stream (a heartbeat every second) before it is unhealthy
    /// and its requests move to another worker.
    pub worker_heartbeat_timeout_secs: f64,
    /// Where the traffic policy (splits, kill switch, history) is saved so that a restart keeps it;
    /// unset keeps it in memory only.
    pub state_file: Option<PathBuf>,
    /// How a worker is chosen: `prefix_aware` (the worker that recently served the longest prefix of the
    /// prompt, unless overloaded) or `least_loaded`.
    pub routing: RoutingPolicy,
    /// Under `prefix_aware`: requests in flight a prefix match may cost over the least loaded worker.
    pub prefix_max_imbalance: u32,
    /// Milliseconds between lookups of each `dns://` worker name.
    pub dns_interval_ms: u64,
    /// The DNS server (`ip:port`) to resolve `dns://` worker names with; unset: the system's resolver
    /// (`/etc/resolv.conf`, as in a Kubernetes pod).
    pub dns_server: Option<String>,
}

/// `router.routing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingPolicy {
    /// Prefer the worker holding the prompt's prefix.
    PrefixAware,
    /// Always the least loaded worker.
    LeastLoaded,
}

impl Default for RouterSection {
    fn default() -> Self {
        let l = RequestLimits::default();
        RouterSection {
            workers: Vec::new(),
            max_request_bytes: l.max_request_bytes,
            max_prompt_bytes: l.max_prompt_bytes,
            max_messages: l.max_messages,
            max_model_bytes: l.max_model_bytes,
            max_session_bytes: l.max_session_bytes,
            max_request_id_bytes: l.max_request_id_bytes,
            max_stop_sequences: l.max_stop_sequences,
            max_stop_bytes: l.max_stop_bytes,
            worker_token_file: None,
            worker_tls_ca: None,
            worker_tls_cert: None,
            worker_tls_key: None,
            client_stall_timeout_secs: 30.0,
            worker_stall_timeout_secs: 120.0,
            worker_heartbeat_timeout_secs: 5.0,
            state_file: None,
            routing: RoutingPolicy::PrefixAware,
            prefix_max_imbalance: 4,
            dns_interval_ms: 5000,
            dns_server: None,
        }
    }
}

impl RouterSection {
    /// The routing policy.
    pub(super) fn routing(&self) -> ferroserve_router::Routing {
        match self.routing {
            RoutingPolicy::PrefixAware => ferroserve_router::Routing::PrefixAware {
                max_imbalance: self.prefix_max_imbalance,
            },
            RoutingPolicy::LeastLoaded => ferroserve_router::Routing::LeastLoaded,
        }
    }

    /// How `dns://` worker names are resolved.
    pub(super) fn dns(&self) -> Result<crate::discovery::DnsSettings, ConfigError> {
        if self.dns_interval_ms == 0 {
            return Err(err("router.dns_interval_ms", "must be at least 1"));
        }
        let server = match &self.dns_server {
            None => None,
            Some(s) => Some(s.parse().map_err(|_| {
                err(
                    "router.dns_server",
                    format!("`{s}` is not an ip:port, e.g. 10.96.0.10:53; leave it unset for the system's resolver"),
                )
            })?),
        };
        Ok(crate::discovery::DnsSettings {
            every: Duration::from_millis(self.dns_interval_ms),
            server,
        })
    }

    /// The stall timeouts and the heartbeat timeout: client, worker, heartbeat.
    pub(super) fn timeouts(&self) -> Result<(Duration, Duration, Duration), ConfigError> {
        let secs = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 && v <= 86_400.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(err(
                    key,
                    format!("must be a number of seconds above 0, at most 86400 (got {v})"),
                ))
            }
        };
        Ok((
            secs("router.client_stall_timeout_secs", self.client_stall_timeout_secs)?,
            secs("router.worker_stall_timeout_secs", self.worker_stall_timeout_secs)?,
            secs(
                "router.worker_heartbeat_timeout_secs",
                self.worker_heartbeat_timeout_secs,
            )?,
        ))
    }

    /// The request shape limits; each must be at least 1.
    pub(super) fn limits(&self) -> Result<RequestLimits, ConfigError> {
        let limits = RequestLimits {
            max_request_bytes: self.max_request_bytes,
            max_prompt_bytes: self.max_prompt_bytes,
            max_messages: self.max_messages,
            max_model_bytes: self.max_model_bytes,
            max_session_bytes: self.max_session_bytes,
            max_request_id_bytes: self.max_request_id_bytes,
            max_stop_sequences: self.max_stop_sequences,
            max_stop_bytes: self.max_stop_bytes,
        };
        for (key, value) in [
            ("router.max_request_bytes", limits.max_request_bytes),
            ("router.max_prompt_bytes", limits.max_prompt_bytes),
            ("router.max_messages", limits.max_messages),
            ("router.max_model_bytes", limits.max_model_bytes),
            ("router.max_session_bytes", limits.max_session_bytes),
            ("router.max_request_id_bytes", limits.max_request_id_bytes),
            ("router.max_stop_sequences", limits.max_stop_sequences),
            ("router.max_stop_bytes", limits.max_stop_bytes),
        ] {
            if value == 0 {
                return Err(err(key, "must be at least 1"));
            }
        }
        if limits.max_prompt_bytes >= limits.max_request_bytes {
            return Err(err(
                "router.max_prompt_bytes",
                format!(
                    "must be below max_request_bytes ({}), which bounds the whole encoded request",
                    limits.max_request_bytes
                ),
            ));
        }
        Ok(limits)
    }
}
