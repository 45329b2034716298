//! `[cluster]`: the fleet this router shares tenant limits with, through Redis.

use std::time::Duration;

use ferroserve_cluster::ClusterConfig;
use serde::Deserialize;

use super::{ConfigError, err};

/// `[cluster]`. Without `redis_url` the router is on its own, as before.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// `redis://host:port`: share tenant limits with every router that uses the same Redis (also
    /// `--redis-url`, `FERROSERVE_REDIS_URL`). Empty: this router alone.
    pub redis_url: String,
    /// Milliseconds a request's limit decision waits for Redis before this replica decides locally.
    pub timeout_ms: u64,
    /// Milliseconds between heartbeats (lease renewal, fleet count, reconnection).
    pub heartbeat_ms: u64,
    /// Milliseconds a replica's lease lasts; a replica silent this long is counted out and its slots freed.
    pub lease_ms: u64,
    /// Replicas assumed, for the local share of each limit, until this one has counted the fleet in Redis.
    pub fallback_replicas: u32,
    /// Prefix of every Redis key, so that several fleets can share one Redis.
    pub key_prefix: String,
}

impl Default for ClusterSection {
    fn default() -> Self {
        let d = ClusterConfig::new("");
        ClusterSection {
            redis_url: String::new(),
            timeout_ms: d.timeout.as_millis() as u64,
            heartbeat_ms: d.heartbeat.as_millis() as u64,
            lease_ms: d.lease.as_millis() as u64,
            fallback_replicas: d.fallback_replicas,
            key_prefix: d.key_prefix,
        }
    }
}

impl ClusterSection {
    /// The fleet settings, checked; `None` without a Redis URL.
    pub(super) fn settings(self) -> Result<Option<ClusterConfig>, ConfigError> {
        let url = self.redis_url.trim();
        if url.is_empty() {
            return Ok(None);
        }
        if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://")) {
            return Err(err(
                "cluster.redis_url",
                format!("`{url}` is not a Redis URL; write it as redis://host:port (rediss:// for TLS)"),
            ));
        }
        if self.timeout_ms == 0 || self.heartbeat_ms == 0 {
            return Err(err(
                "cluster.timeout_ms",
                "cluster.timeout_ms and cluster.heartbeat_ms must be at least 1",
            ));
        }
        if self.lease_ms <= 2 * self.heartbeat_ms {
            return Err(err(
                "cluster.lease_ms",
                format!(
                    "{} ms must exceed twice cluster.heartbeat_ms ({} ms), or a slow heartbeat counts a live replica out",
                    self.lease_ms, self.heartbeat_ms
                ),
            ));
        }
        if self.fallback_replicas == 0 {
            return Err(err("cluster.fallback_replicas", "must be at least 1"));
        }
        if self.key_prefix.is_empty() {
            return Err(err("cluster.key_prefix", "must not be empty"));
        }
        Ok(Some(ClusterConfig {
            redis_url: url.to_string(),
            timeout: Duration::from_millis(self.timeout_ms),
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            lease: Duration::from_millis(self.lease_ms),
            fallback_replicas: self.fallback_replicas,
            key_prefix: self.key_prefix,
        }))
    }
}
