//! One replica's membership of the fleet: its connection to Redis, its lease, whether it decides in Redis
//! or locally, and the requests it holds per tenant.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use ferroserve_admission::{Admission, Reason, Rejection, Scope, TenantLimits, count_refusal};
use ferroserve_telemetry::names;
use redis::aio::MultiplexedConnection;

use crate::scripts::{HEARTBEAT_SCRIPT, LEAVE_SCRIPT, RESERVE_SCRIPT};
use crate::ticket::{Reservation, Ticket};
use crate::{ClusterConfig, ClusterError};

/// Where tenant limits are decided now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// In Redis, for the whole fleet.
    Shared,
    /// Here, at this replica's share, because Redis is unreachable.
    Degraded,
}

impl Mode {
    /// A word for logs and the admin API.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Shared => "shared",
            Mode::Degraded => "degraded",
        }
    }
}

/// The fleet as this replica sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterState {
    /// Where limits are decided now.
    pub mode: Mode,
    /// For how long.
    pub since: Duration,
    /// Live replicas at the last count (this one included).
    pub replicas: u32,
    /// This replica's id in Redis.
    pub replica: String,
    /// What went wrong last, while degraded.
    pub last_error: Option<String>,
}

/// The kinds of call to Redis, for the error counter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Call {
    Reserve,
    Settle,
    Heartbeat,
}

impl Call {
    fn label(self) -> &'static str {
        match self {
            Call::Reserve => "reserve",
            Call::Settle => "settle",
            Call::Heartbeat => "heartbeat",
        }
    }
}

/// One replica's handle on the fleet. Cheap to share.
pub struct Cluster {
    pub(crate) config: ClusterConfig,
    client: redis::Client,
    /// The live connection; `None` until connected and after a failure (the heartbeat reconnects).
    conn: Mutex<Option<MultiplexedConnection>>,
    pub(crate) replica: String,
    admission: Arc<Admission>,
    up: AtomicBool,
    /// When the mode last changed, and the error that made it degraded.
    changed: Mutex<(Instant, Option<String>)>,
    replicas: AtomicU32,
    /// Requests this replica holds per tenant (running or queued), decided here or in Redis.
    held: Mutex<HashMap<String, u32>>,
    /// Heartbeats stopped (a test's crashed replica).
    frozen: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cluster {
    /// Joins the fleet: checks the settings, makes a first heartbeat (bounded by the heartbeat interval;
    /// a replica that cannot reach Redis starts degraded and keeps trying), and starts the heartbeat. The
    /// admission gate's share follows the fleet's size from then on.
    pub async fn start(config: ClusterConfig, admission: Arc<Admission>) -> Result<Arc<Cluster>, ClusterError> {
        let client = redis::Client::open(config.redis_url.as_str()).map_err(|e| ClusterError::BadUrl {
            url: config.redis_url.clone(),
            reason: e.to_string(),
        })?;
        if config.lease <= config.heartbeat * 2 {
            return Err(ClusterError::Invalid(format!(
                "cluster.lease_ms ({} ms) must exceed twice cluster.heartbeat_ms ({} ms), or a slow heartbeat \
                 counts a live replica out",
                config.lease.as_millis(),
                config.heartbeat.as_millis()
            )));
        }
        admission.set_share(config.fallback_replicas.max(1));
        let cluster = Arc::new(Cluster {
            replica: format!("router-{:016x}", rand::random::<u64>()),
            replicas: AtomicU32::new(config.fallback_replicas.max(1)),
            config,
            client,
            conn: Mutex::new(None),
            admission,
            up: AtomicBool::new(false),
            changed: Mutex::new((Instant::now(), Some("not connected yet".into()))),
            held: Mutex::new(HashMap::new()),
            frozen: AtomicBool::new(false),
        });
        metrics::gauge!(names::CLUSTER_REDIS_UP).set(0.0);
        cluster.beat().await;
        tokio::spawn(heartbeats(Arc::downgrade(&cluster)));
        Ok(cluster)
    }

    /// The fleet as this replica sees it now.
    pub fn state(&self) -> ClusterState {
        let (at, error) = lock(&self.changed).clone();
        let mode = self.mode();
        ClusterState {
            mode,
            since: at.elapsed(),
            replicas: self.replicas.load(Ordering::Relaxed),
            replica: self.replica.clone(),
            last_error: if mode == Mode::Degraded { error } else { None },
        }
    }

    /// Where limits are decided now.
    pub fn mode(&self) -> Mode {
        if self.up.load(Ordering::Acquire) {
            Mode::Shared
        } else {
            Mode::Degraded
        }
    }

    /// Reserves a request for `tenant` (one request cell, `tokens` tokens, one in-flight slot) across the
    /// fleet. Redis's refusal is final; if Redis cannot answer within the timeout the reservation is made
    /// locally instead ([`Scope::Local`]: the gate checks the replica's share).
    pub async fn reserve(self: &Arc<Self>, tenant: &str, tokens: u32) -> Result<Reservation, Rejection> {
        let Some(limits) = self.admission.tenant_limits(tenant) else {
            return Ok(Reservation::unlimited());
        };
        self.reserve_at(tenant, limits, tokens, 0).await
    }

    /// [`Cluster::reserve`] against given limits at a given time (µs; 0 is Redis's clock): for tests that
    /// drive the shared buckets on a fake clock.
    #[doc(hidden)]
    pub async fn reserve_at(
        self: &Arc<Self>,
        tenant: &str,
        limits: TenantLimits,
        tokens: u32,
        clock_us: u64,
    ) -> Result<Reservation, Rejection> {
        let mut ticket = Ticket::new(Arc::clone(self), tenant, limits, tokens);
        let Some(mut conn) = self.connection() else {
            metrics::counter!(names::CLUSTER_DECISIONS_TOTAL, names::LABEL_OUTCOME => "local").increment(1);
            return Ok(Reservation::new(Scope::Local, ticket));
        };
        let started = Instant::now();
        let invocation = self.reserve_call(tenant, &ticket.limits, tokens, clock_us);
        let call = invocation.invoke_async::<(i64, u64)>(&mut conn);
        match tokio::time::timeout(self.config.timeout, call).await {
            Ok(Ok((0, _))) => {
                metrics::histogram!(names::CLUSTER_DECISION_SECONDS).record(started.elapsed().as_secs_f64());
                metrics::counter!(names::CLUSTER_DECISIONS_TOTAL, names::LABEL_OUTCOME => "shared_admitted")
                    .increment(1);
                ticket.shared = true;
                Ok(Reservation::new(Scope::Cluster, ticket))
            }
            Ok(Ok((code, wait_us))) => {
                metrics::histogram!(names::CLUSTER_DECISION_SECONDS).record(started.elapsed().as_secs_f64());
                metrics::counter!(names::CLUSTER_DECISIONS_TOTAL, names::LABEL_OUTCOME => "shared_refused")
                    .increment(1);
                let rejection = refusal(tenant, &ticket.limits, tokens, code, wait_us);
                count_refusal(tenant.to_string(), rejection.reason);
                Err(rejection)
            }
            Ok(Err(e)) => {
                self.failed(Call::Reserve, e.to_string());
                metrics::counter!(names::CLUSTER_DECISIONS_TOTAL, names::LABEL_OUTCOME => "local").increment(1);
                Ok(Reservation::new(Scope::Local, ticket))
            }
            Err(_) => {
                self.failed(
                    Call::Reserve,
                    format!("no answer within {} ms", self.config.timeout.as_millis()),
                );
                metrics::counter!(names::CLUSTER_DECISIONS_TOTAL, names::LABEL_OUTCOME => "local").increment(1);
                Ok(Reservation::new(Scope::Local, ticket))
            }
        }
    }

    fn reserve_call(
        &self,
        tenant: &str,
        limits: &TenantLimits,
        tokens: u32,
        clock_us: u64,
    ) -> redis::ScriptInvocation<'static> {
        let (rq_interval, rq_burst) = bucket(limits.requests);
        let (tk_interval, tk_burst) = bucket(limits.tokens);
        let mut call = RESERVE_SCRIPT.prepare_invoke();
        call.key(self.key(tenant, "rq"))
            .key(self.key(tenant, "tk"))
            .key(self.key(tenant, "inflight"))
            .key(self.replicas_key())
            .arg(clock_us)
            .arg(rq_interval)
            .arg(rq_burst)
            .arg(tk_interval)
            .arg(tk_burst)
            .arg(tokens)
            .arg(limits.max_in_flight.unwrap_or(0))
            .arg(&self.replica);
        call
    }

    /// The key of one of a tenant's values.
    pub(crate) fn key(&self, tenant: &str, what: &str) -> String {
        format!("{}:{{{tenant}}}:{what}", self.config.key_prefix)
    }

    fn replicas_key(&self) -> String {
        format!("{}:replicas", self.config.key_prefix)
    }

    /// How often this replica renews its lease: the bound on how stale a periodic check leaves it.
    pub fn heartbeat_interval(&self) -> Duration {
        self.config.heartbeat
    }

    /// The Redis client, for connections of their own (pub/sub).
    pub(crate) fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The connection, while Redis is reachable.
    pub(crate) fn connection(&self) -> Option<MultiplexedConnection> {
        if !self.up.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.conn).clone()
    }

    /// Counts one more request held for `tenant` (restated to Redis at each heartbeat).
    pub(crate) fn hold(&self, tenant: &str) {
        *lock(&self.held).entry(tenant.to_string()).or_insert(0) += 1;
    }

    /// Counts one request fewer held for `tenant`.
    pub(crate) fn release(&self, tenant: &str) {
        if let Some(n) = lock(&self.held).get_mut(tenant) {
            *n = n.saturating_sub(1);
        }
    }

    /// A call to Redis failed: decide locally until the next heartbeat reaches it.
    pub(crate) fn failed(&self, call: Call, error: String) {
        metrics::counter!(names::CLUSTER_REDIS_ERRORS_TOTAL, names::LABEL_KIND => call.label()).increment(1);
        lock(&self.conn).take();
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(kind = call.label(), %error, share = self.replicas.load(Ordering::Relaxed),
                "Redis unreachable: deciding tenant limits locally at this replica's share");
            metrics::gauge!(names::CLUSTER_REDIS_UP).set(0.0);
            *lock(&self.changed) = (Instant::now(), Some(error));
        } else {
            lock(&self.changed).1 = Some(error);
        }
    }

    /// One heartbeat: connect if needed, renew the lease, restate the holdings, count the fleet.
    async fn beat(&self) {
        // A heartbeat may take up to half a lease: a slow one delays the next, and only a lease that
        // runs out counts a replica out.
        let bound = self.config.lease / 2;
        let conn = lock(&self.conn).clone();
        let mut conn = match conn {
            Some(c) => c,
            None => {
                let connect = self.client.get_multiplexed_async_connection();
                match tokio::time::timeout(bound, connect).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => return self.failed(Call::Heartbeat, e.to_string()),
                    Err(_) => return self.failed(Call::Heartbeat, "connecting timed out".into()),
                }
            }
        };
        let holdings: Vec<(String, u32)> = {
            let mut held = lock(&self.held);
            let all = held.iter().map(|(t, n)| (t.clone(), *n)).collect();
            held.retain(|_, n| *n > 0);
            all
        };
        let mut call = HEARTBEAT_SCRIPT.prepare_invoke();
        call.key(self.replicas_key())
            .arg(0)
            .arg(&self.replica)
            .arg(self.config.lease.as_millis() as u64);
        for (tenant, n) in &holdings {
            call.key(self.key(tenant, "inflight")).arg(*n);
        }
        match tokio::time::timeout(bound, call.invoke_async::<u32>(&mut conn)).await {
            Ok(Ok(replicas)) => {
                let replicas = replicas.max(1);
                self.replicas.store(replicas, Ordering::Relaxed);
                self.admission.set_share(replicas);
                metrics::gauge!(names::CLUSTER_REPLICAS).set(f64::from(replicas));
                *lock(&self.conn) = Some(conn);
                if !self.up.swap(true, Ordering::AcqRel) {
                    tracing::info!(replicas, replica = %self.replica, "deciding tenant limits in Redis");
                    metrics::gauge!(names::CLUSTER_REDIS_UP).set(1.0);
                    *lock(&self.changed) = (Instant::now(), None);
                }
            }
            Ok(Err(e)) => self.failed(Call::Heartbeat, e.to_string()),
            Err(_) => self.failed(Call::Heartbeat, "heartbeat timed out".into()),
        }
    }

    /// Stops heartbeating, as a crashed replica would: its lease ends on its own and its slots come back.
    #[doc(hidden)]
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::Release);
    }

    /// Leaves the fleet (at shutdown): its lease and holdings go at once instead of at the lease's end.
    pub async fn leave(&self) {
        let Some(mut conn) = self.connection() else { return };
        let tenants: Vec<String> = lock(&self.held).keys().cloned().collect();
        let mut call = LEAVE_SCRIPT.prepare_invoke();
        call.key(self.replicas_key()).arg(0).arg(&self.replica);
        for t in &tenants {
            call.key(self.key(t, "inflight"));
        }
        let _ = tokio::time::timeout(self.config.timeout, call.invoke_async::<i64>(&mut conn)).await;
    }
}

/// Heartbeats until the cluster is dropped.
async fn heartbeats(cluster: Weak<Cluster>) {
    let every = match cluster.upgrade() {
        Some(c) => c.config.heartbeat,
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(c) = cluster.upgrade() else { return };
        if c.frozen.load(Ordering::Acquire) {
            return;
        }
        c.beat().await;
    }
}

/// A bucket's interval in microseconds (fractional: 40M tokens a minute is 1.5 µs a token) and burst, or
/// zeros for no limit.
pub(crate) fn bucket(rate: Option<ferroserve_admission::Rate>) -> (f64, u32) {
    rate.map_or((0.0, 0), |r| ((r.interval().as_secs_f64() * 1e6).max(1e-3), r.burst))
}

/// The rejection for a refusal code of the reserve script.
fn refusal(tenant: &str, limits: &TenantLimits, tokens: u32, code: i64, wait_us: u64) -> Rejection {
    let wait = Duration::from_micros(wait_us).max(Duration::from_millis(1));
    let retry = format!("retry in {} ms", wait.as_millis().max(1));
    match code {
        1 => {
            let r = limits.requests.expect("refused by the request bucket");
            Rejection {
                reason: Reason::TenantRequests,
                message: format!(
                    "tenant `{tenant}` is over its limit of {} requests per second (burst {}) across the fleet; {retry}",
                    r.amount, r.burst
                ),
                retry_after: Some(wait),
            }
        }
        2 => {
            let r = limits.tokens.expect("refused by the token bucket");
            Rejection {
                reason: Reason::TenantTokens,
                message: format!(
                    "tenant `{tenant}` is over its limit of {} tokens per minute (burst {}) across the fleet; this \
                     request reserves {tokens} tokens (prompt + max_tokens, reconciled when it ends); {retry}",
                    r.amount, r.burst
                ),
                retry_after: Some(wait),
            }
        }
        3 => Rejection {
            reason: Reason::TenantConcurrency,
            message: format!(
                "tenant `{tenant}` already has {} requests in flight across the fleet, its limit; wait for one to \
                 finish",
                limits.max_in_flight.unwrap_or(0)
            ),
            retry_after: Some(Duration::from_millis(100)),
        },
        _ => Rejection {
            reason: Reason::TooLarge,
            message: format!(
                "tenant `{tenant}` reserves {tokens} tokens, and its token bucket of {} can never cover it; lower \
                 max_tokens or shorten the prompt",
                limits.tokens.map_or(0, |r| r.burst)
            ),
            retry_after: None,
        },
    }
}
