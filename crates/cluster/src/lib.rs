//! A fleet of router replicas that share one Redis, so that a tenant's limits hold across all of them.
//!
//! Without it every replica enforces each tenant's whole limit, and N replicas admit N times as much (the
//! leak LiteLLM's users report). With `cluster.redis_url` set:
//!
//! - **Tenant limits are decided in Redis**, in one atomic Lua script per request ([`scripts`]): the
//!   requests-per-second and tokens-per-minute buckets (GCRA, as governor keeps them locally, on Redis's
//!   clock), the reservation of prompt + `max_tokens`, and the tenant's in-flight cap summed over the live
//!   replicas. When the request ends, a second script reconciles the reservation with the real usage
//!   (refund or charge) and releases the slot. The local gate then applies only the replica's own server
//!   limits ([`ferroserve_admission::Scope::Cluster`]).
//! - **Each replica holds a lease** (a heartbeat every `heartbeat`, lasting `lease`) and restates how many
//!   requests it holds per tenant. A replica that dies gives its slots back when its lease ends, and after
//!   Redis restarts the holdings converge within one heartbeat.
//! - **If Redis is unreachable**, nothing waits on it beyond `timeout`: the replica decides locally at its
//!   share of each limit (1/N of the rates, bursts and caps, N being the replicas it last counted), reports
//!   itself degraded (`ferroserve_cluster_redis_up` 0, `GetLimits`), and goes back to Redis at the first
//!   heartbeat that reaches it.
//!
//! - **Control documents** (the traffic policy, the filter selection and Admin's limit changes, the
//!   rollouts) are stored whole with a revision, changed only by compare-and-set, announced by pub/sub and
//!   checked at every heartbeat; a change returns once every live replica has applied it ([`doc`]).
//! - **Leadership and shared logs**: one replica leads a role (a rollout's judge) under a lease with a
//!   fencing token, over outcomes every replica appends to a bounded log (lead.rs).
//! - **The server-wide limits** (`[admission]`: slots and server rates) describe the workers every replica
//!   fronts, so each replica takes its share: 1/N of the slots and rates. The waiting queue stays each
//!   replica's own.
#![forbid(unsafe_code)]

pub mod doc;
mod fleet;
mod lead;
mod scripts;
mod ticket;

use std::time::Duration;

pub use doc::{Cas, DocError, Replicated};
pub use fleet::{Cluster, ClusterState, Mode};
pub use ticket::{Reservation, Ticket};

/// How a replica joins the fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// `redis://host:port[/db]`, or `rediss://` for TLS.
    pub redis_url: String,
    /// The longest a request's decision waits for Redis before the replica decides locally.
    pub timeout: Duration,
    /// How often the replica renews its lease and recounts the fleet.
    pub heartbeat: Duration,
    /// How long a lease lasts: a replica silent this long is counted out and its slots freed.
    pub lease: Duration,
    /// The replicas assumed, for the local share, until this one has counted the fleet.
    pub fallback_replicas: u32,
    /// Prefix of every key, so that several fleets can share one Redis.
    pub key_prefix: String,
}

impl ClusterConfig {
    /// Defaults for everything but the URL.
    pub fn new(redis_url: impl Into<String>) -> ClusterConfig {
        ClusterConfig {
            redis_url: redis_url.into(),
            timeout: Duration::from_millis(50),
            heartbeat: Duration::from_secs(1),
            lease: Duration::from_secs(5),
            fallback_replicas: 1,
            key_prefix: "ferroserve".into(),
        }
    }
}

/// Why the fleet could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The URL does not parse.
    #[error("cluster.redis_url `{url}` is not a Redis URL ({reason}); write it as redis://host:port")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What the parser said.
        reason: String,
    },
    /// A setting that cannot work.
    #[error("{0}")]
    Invalid(String),
}
