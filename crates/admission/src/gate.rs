//! The admission gate: rate limits, concurrency caps, the waiting queue and deadline-aware shedding.
//!
//! Every decision is made under one short lock with no I/O, so a rejection costs microseconds and never
//! waits behind model work. A request that passes either runs at once (a [`Permit`]) or waits in a bounded
//! priority queue (a [`Waiting`]) until a running request ends.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferroserve_telemetry::names;
use governor::clock::{Clock, DefaultClock};
use tokio::sync::oneshot;

mod ticket;
mod view;

pub use ticket::{FinishHook, Generated, Permit, Waiting};
pub use view::{LimitsView, PatchError, Snapshot};
use view::{server_view, tenant_view};

use crate::bucket::{Bucket, Rate, Refusal};
use crate::estimate::ServiceEstimate;
use crate::keys::{Priority, Tenant};
use crate::limits::{AdmissionLimits, LimitsPatch, ServerLimits, TenantLimits};

/// Which limit turned a request away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The tenant's requests-per-second bucket is empty.
    TenantRequests,
    /// The tenant's tokens-per-minute bucket cannot cover the reservation.
    TenantTokens,
    /// The tenant already has its maximum of requests running or waiting.
    TenantConcurrency,
    /// The server's requests-per-second bucket is empty.
    ServerRequests,
    /// The server's tokens-per-minute bucket cannot cover the reservation.
    ServerTokens,
    /// The reservation is larger than a token bucket can ever hold.
    TooLarge,
    /// Every slot is busy and the waiting queue is full.
    QueueFull,
    /// The expected wait plus generation time would overrun the request's deadline.
    Deadline,
    /// A waiting request's deadline could no longer be met; it left the queue without running.
    QueueDeadline,
}

impl Reason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::TenantRequests => "tenant_requests",
            Reason::TenantTokens => "tenant_tokens",
            Reason::TenantConcurrency => "tenant_concurrency",
            Reason::ServerRequests => "server_requests",
            Reason::ServerTokens => "server_tokens",
            Reason::TooLarge => "too_large",
            Reason::QueueFull => "queue_full",
            Reason::Deadline => "deadline",
            Reason::QueueDeadline => "queue_deadline",
        }
    }

    /// Every reason, for parsing a label back.
    pub const ALL: [Reason; 9] = [
        Reason::TenantRequests,
        Reason::TenantTokens,
        Reason::TenantConcurrency,
        Reason::ServerRequests,
        Reason::ServerTokens,
        Reason::TooLarge,
        Reason::QueueFull,
        Reason::Deadline,
        Reason::QueueDeadline,
    ];

    /// The reason whose [`Reason::label`] is `label`.
    pub fn parse(label: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.label() == label)
    }

    /// True for a quota (the caller's to respect); false for a capacity condition of this server, which
    /// another replica might not share.
    pub fn is_quota(self) -> bool {
        !matches!(self, Reason::QueueFull | Reason::Deadline | Reason::QueueDeadline)
    }
}

/// A refused request: which limit, a message that names it, and when to try again.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Rejection {
    /// The limit.
    pub reason: Reason,
    /// What happened and what to change.
    pub message: String,
    /// When a retry could succeed; `None` when waiting would not help.
    pub retry_after: Option<Duration>,
}

/// Where a request's tenant limits were checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Here, against this gate's tenant buckets and caps (at this replica's share of them in a fleet).
    Local,
    /// Already, cluster-wide (by the shared store): the gate applies only the server's own limits.
    Cluster,
}

/// What a request asks of the gate.
#[derive(Debug, Clone)]
pub struct Ask {
    /// Who sends it.
    pub tenant: Tenant,
    /// Tokens to reserve: the prompt (estimated) plus `max_tokens`.
    pub tokens: u32,
    /// The request's `max_tokens`, for the generation-time estimate.
    pub max_tokens: u32,
    /// Time left before the client's deadline, if it set one.
    pub deadline: Option<Duration>,
}

/// A rate bucket of requests and one of tokens, either of which may be absent.
struct Buckets<C: Clock> {
    requests: Option<Bucket<C>>,
    tokens: Option<Bucket<C>>,
}

impl<C: Clock + Clone> Buckets<C> {
    fn new(limits: &TenantLimits, clock: &C) -> Self {
        let make = |r: Option<Rate>| r.map(|r| Bucket::new(r, clock.clone()));
        Buckets {
            requests: make(limits.requests),
            tokens: make(limits.tokens),
        }
    }

    /// The same buckets under new limits: unchanged rates keep their bucket, changed ones carry their level.
    fn reconfigure(self, limits: &TenantLimits, clock: &C) -> Self {
        let carry = |old: Option<Bucket<C>>, rate: Option<Rate>| match (old, rate) {
            (Some(b), Some(r)) if b.rate() == r => Some(b),
            (Some(b), Some(r)) => Some(b.with_rate(r)),
            (None, Some(r)) => Some(Bucket::new(r, clock.clone())),
            (_, None) => None,
        };
        Buckets {
            requests: carry(self.requests, limits.requests),
            tokens: carry(self.tokens, limits.tokens),
        }
    }

    fn refund(&self, requests: u32, tokens: u32) {
        if let Some(b) = &self.requests {
            b.refund(requests);
        }
        if let Some(b) = &self.tokens {
            b.refund(tokens);
        }
    }
}

/// One tenant's live state.
struct TenantState<C: Clock> {
    limits: TenantLimits,
    buckets: Buckets<C>,
    /// Requests running now.
    running: u32,
    /// Requests waiting in the queue.
    queued: u32,
}

/// A request waiting for a slot.
struct Waiter<C: Clock + Clone> {
    tenant: String,
    scope: Scope,
    reserved: u32,
    max_tokens: u32,
    /// Priority rank and place in line when it arrived, for learning queue waits.
    rank: u8,
    place: u32,
    enqueued: Instant,
    /// When its client's deadline passes.
    deadline: Option<Instant>,
    /// Where the permit (or a late refusal) goes when a slot frees.
    grant: oneshot::Sender<Result<Permit<C>, Rejection>>,
}

struct State<C: Clock + Clone> {
    server: ServerLimits,
    server_buckets: Buckets<C>,
    running: u32,
    tenants: HashMap<String, TenantState<C>>,
    /// Waiting requests by (priority rank, arrival number): interactive (0) before batch (1), FIFO within.
    queue: BTreeMap<(u8, u64), Waiter<C>>,
    queued_tokens: u64,
    next_seq: u64,
    estimate: ServiceEstimate,
    /// How many replicas enforce the tenant limits apart: the tenant buckets and caps hold 1/share of
    /// each limit (1 alone, or when a shared store enforces them).
    share: u32,
}

impl<C: Clock + Clone> TenantState<C> {
    /// Rebuilds the buckets for `effective` limits, carrying their levels.
    fn rebucket(&mut self, effective: &TenantLimits, clock: &C) {
        let old = std::mem::replace(&mut self.buckets, Buckets::new(&TenantLimits::default(), clock));
        self.buckets = old.reconfigure(effective, clock);
    }
}

/// The admission gate. Cheap to share; every method takes `&self`.
pub struct Admission<C: Clock + Clone = DefaultClock> {
    /// The time source for the rate buckets (governor's fake clock in tests).
    clock: C,
    /// Everything that changes, behind one lock held only for bookkeeping.
    state: Mutex<State<C>>,
}

fn rank(p: Priority) -> u8 {
    match p {
        Priority::Interactive => 0,
        Priority::Batch => 1,
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis().max(1)
}

/// What the gate decided for an admitted request.
pub enum Admitted<C: Clock + Clone = DefaultClock> {
    /// Run now.
    Now(Permit<C>),
    /// Wait for a slot.
    Queued(Waiting<C>),
}

impl Admission<DefaultClock> {
    /// A gate with these limits on the real clock.
    pub fn new(limits: AdmissionLimits) -> Arc<Self> {
        Self::with_clock(limits, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Admission<C> {
    /// A gate with these limits on `clock`.
    pub fn with_clock(limits: AdmissionLimits, clock: C) -> Arc<Self> {
        let tenants = limits
            .tenants
            .iter()
            .map(|(name, l)| {
                let state = TenantState {
                    buckets: Buckets::new(l, &clock),
                    limits: l.clone(),
                    running: 0,
                    queued: 0,
                };
                (name.clone(), state)
            })
            .collect();
        let state = State {
            server_buckets: Buckets::new(&limits.server.shared, &clock),
            server: limits.server,
            running: 0,
            tenants,
            queue: BTreeMap::new(),
            queued_tokens: 0,
            next_seq: 0,
            estimate: ServiceEstimate::default(),
            share: 1,
        };
        Arc::new(Admission {
            clock,
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<C>> {
        // The lock guards plain bookkeeping; a panic mid-update is a bug, but serving must go on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides at once: a permit, a place in the queue, or a rejection naming the limit.
    pub fn admit(self: &Arc<Self>, ask: Ask) -> Result<Admitted<C>, Rejection> {
        self.admit_in(ask, Scope::Local)
    }

    /// [`Admission::admit`] for a request whose tenant limits were checked `scope`.
    pub fn admit_in(self: &Arc<Self>, ask: Ask, scope: Scope) -> Result<Admitted<C>, Rejection> {
        let started = Instant::now();
        let name = ask.tenant.name.clone();
        let result = self.decide(ask, scope);
        metrics::histogram!(names::ADMISSION_DECISION_SECONDS).record(started.elapsed().as_secs_f64());
        if let Err(r) = &result {
            count_refusal(name, r.reason);
        }
        result
    }

    fn decide(self: &Arc<Self>, ask: Ask, scope: Scope) -> Result<Admitted<C>, Rejection> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let share = st.share;
        let name = ask.tenant.name.as_str();
        let tenant = st.tenants.entry(name.to_string()).or_insert_with(|| TenantState {
            limits: TenantLimits::default(),
            buckets: Buckets::new(&TenantLimits::default(), &self.clock),
            running: 0,
            queued: 0,
        });
        let local = scope == Scope::Local;
        if local {
            check_tenant(tenant, name, share, &ask, &st.estimate)?;
        }
        if let Err(e) = take_all(&st.server_buckets, &ask, "the server", false) {
            if local {
                tenant.buckets.refund(1, ask.tokens);
            }
            return Err(e);
        }
        let slots = st.slots();
        let must_wait = st.running >= slots || !st.queue.is_empty();
        let ahead = if must_wait {
            let mine = rank(ask.tenant.priority);
            st.queue.keys().filter(|(r, _)| *r <= mine).count() as u32
        } else {
            0
        };
        let wait = if must_wait {
            st.estimate.wait(rank(ask.tenant.priority), ahead + 1, slots)
        } else {
            Duration::ZERO
        };
        let refuse = |st: &State<C>, rejection: Rejection| {
            st.refund(name, scope, 1, ask.tokens);
            Err(rejection)
        };
        if let (Some(deadline), Some(generate)) = (ask.deadline, st.estimate.generation(ask.max_tokens))
            && wait + generate > deadline
        {
            let rejection = Rejection {
                reason: Reason::Deadline,
                message: format!(
                    "the deadline ({} ms) is shorter than the expected wait ({} ms) plus generation of up to {} \
                     tokens ({} ms); retry later, raise the deadline or lower max_tokens",
                    ms(deadline),
                    wait.as_millis(),
                    ask.max_tokens,
                    generate.as_millis()
                ),
                retry_after: must_wait.then_some(wait),
            };
            return refuse(st, rejection);
        }
        if !must_wait {
            return Ok(Admitted::Now(self.start(st, name, scope, ask.tokens)));
        }
        if st.queue.len() as u32 >= st.server.max_queued_requests
            || st.queued_tokens + u64::from(ask.tokens) > st.server.max_queued_tokens
        {
            let rejection = Rejection {
                reason: Reason::QueueFull,
                message: format!(
                    "the server is at capacity: {} running and {} waiting ({} tokens reserved), the most it queues \
                     is {} requests or {} tokens; retry, or send to another replica",
                    st.running,
                    st.queue.len(),
                    st.queued_tokens,
                    st.server.max_queued_requests,
                    st.server.max_queued_tokens
                ),
                retry_after: Some(st.estimate.slot_free_in(slots)),
            };
            return refuse(st, rejection);
        }
        let key = (rank(ask.tenant.priority), st.next_seq);
        st.next_seq += 1;
        let (grant, rx) = oneshot::channel();
        let now = Instant::now();
        st.queue.insert(
            key,
            Waiter {
                tenant: name.to_string(),
                scope,
                reserved: ask.tokens,
                max_tokens: ask.max_tokens,
                rank: key.0,
                place: ahead + 1,
                enqueued: now,
                deadline: ask.deadline.map(|d| now + d),
                grant,
            },
        );
        st.queued_tokens += u64::from(ask.tokens);
        if let Some(t) = st.tenants.get_mut(name) {
            t.queued += 1;
        }
        publish_queue(st);
        Ok(Admitted::Queued(Waiting {
            admission: Arc::clone(self),
            key,
            rx: Some(rx),
            since: now,
            deadline: ask.deadline.map(|d| now + d),
            max_tokens: ask.max_tokens,
        }))
    }

    /// Marks a request as running and hands out its permit.
    fn start(self: &Arc<Self>, st: &mut State<C>, tenant: &str, scope: Scope, reserved: u32) -> Permit<C> {
        st.running += 1;
        if let Some(t) = st.tenants.get_mut(tenant) {
            t.running += 1;
            metrics::gauge!(names::ADMISSION_IN_FLIGHT, names::LABEL_TENANT => tenant.to_string())
                .set(f64::from(t.running));
        }
        Permit {
            admission: Arc::clone(self),
            tenant: tenant.to_string(),
            scope,
            reserved,
            used: None,
            on_finish: None,
            timing: None,
            started: Instant::now(),
        }
    }

    /// Ends a running request: reconciles its tokens, frees its slot and starts whoever waits next.
    fn finish(self: &Arc<Self>, permit: &Permit<C>) {
        let mut grants = Vec::new();
        let mut refusals = Vec::new();
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            let used = permit.used.unwrap_or(0);
            if let Some(t) = st.tenants.get_mut(&permit.tenant) {
                if permit.scope == Scope::Local {
                    reconcile(&t.buckets, permit.reserved, used);
                }
                t.running = t.running.saturating_sub(1);
                metrics::gauge!(names::ADMISSION_IN_FLIGHT, names::LABEL_TENANT => permit.tenant.clone())
                    .set(f64::from(t.running));
                publish_remaining(&permit.tenant, t);
            }
            reconcile(&st.server_buckets, permit.reserved, used);
            st.running = st.running.saturating_sub(1);
            if permit.used.is_some() {
                st.estimate.observe(permit.started.elapsed(), permit.timing);
            }
            let slots = st.slots();
            while st.running < slots {
                let Some((_, w)) = st.queue.pop_first() else { break };
                st.queued_tokens -= u64::from(w.reserved);
                if let Some(t) = st.tenants.get_mut(&w.tenant) {
                    t.queued = t.queued.saturating_sub(1);
                }
                let now = Instant::now();
                st.estimate.observe_wait(w.rank, w.place, now - w.enqueued);
                // A waiter whose deadline can no longer be met is refused now, not run to fail later:
                // its slot goes to one that can still make it.
                let left = w.deadline.map(|d| d.saturating_duration_since(now));
                if let (Some(left), Some(generate)) = (left, st.estimate.generation(w.max_tokens))
                    && generate > left
                {
                    st.refund(&w.tenant, w.scope, 1, w.reserved);
                    count_refusal(w.tenant.clone(), Reason::QueueDeadline);
                    let rejection = Rejection {
                        reason: Reason::QueueDeadline,
                        message: format!(
                            "waited {} ms for a slot; the {} ms left before the deadline cannot cover generation of \
                             up to {} tokens ({} ms); retry with a longer deadline or on a less loaded replica",
                            (now - w.enqueued).as_millis(),
                            left.as_millis(),
                            w.max_tokens,
                            generate.as_millis()
                        ),
                        retry_after: None,
                    };
                    refusals.push((w.grant, rejection));
                    continue;
                }
                let next = self.start(st, &w.tenant, w.scope, w.reserved);
                grants.push((w.grant, next));
            }
            publish_queue(st);
        }
        // Outside the lock: a permit whose waiter has gone is dropped here, which frees its slot in turn.
        for (grant, next) in grants {
            drop(grant.send(Ok(next)));
        }
        for (grant, rejection) in refusals {
            drop(grant.send(Err(rejection)));
        }
    }

    /// Replaces every limit, as a config reload does. Tenants whose limits did not change keep their
    /// buckets untouched; changed ones keep their level under the new rates; running requests go on.
    pub fn set_limits(&self, limits: AdmissionLimits) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let old = std::mem::replace(
            &mut st.server_buckets,
            Buckets::new(&TenantLimits::default(), &self.clock),
        );
        st.server_buckets = old.reconfigure(&limits.server.shared.shared_by(st.share), &self.clock);
        st.server = limits.server;
        st.tenants
            .retain(|name, t| limits.tenants.contains_key(name) || t.running + t.queued > 0);
        for (name, l) in limits.tenants {
            self.apply(st, &name, l);
        }
    }

    fn apply(&self, st: &mut State<C>, name: &str, limits: TenantLimits) {
        let share = st.share;
        match st.tenants.get_mut(name) {
            Some(t) if t.limits == limits => {}
            Some(t) => {
                t.rebucket(&limits.shared_by(share), &self.clock);
                t.limits = limits;
            }
            None => {
                let state = TenantState {
                    buckets: Buckets::new(&limits.shared_by(share), &self.clock),
                    limits,
                    running: 0,
                    queued: 0,
                };
                st.tenants.insert(name.to_string(), state);
            }
        }
    }

    /// Changes one tenant's limits (`None`: the server's). An invalid change leaves everything as it was.
    pub fn patch(&self, tenant: Option<&str>, patch: &LimitsPatch) -> Result<LimitsView, PatchError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        match tenant {
            None => {
                let next = st.server.patched(patch).map_err(PatchError::Invalid)?;
                let old = std::mem::replace(
                    &mut st.server_buckets,
                    Buckets::new(&TenantLimits::default(), &self.clock),
                );
                st.server_buckets = old.reconfigure(&next.shared.shared_by(st.share), &self.clock);
                st.server = next;
                Ok(server_view(st))
            }
            Some(name) => {
                if patch.has_server_fields() {
                    return Err(PatchError::Invalid(
                        "max_queued_requests and max_queued_tokens are server limits; leave the tenant empty".into(),
                    ));
                }
                let Some(t) = st.tenants.get(name) else {
                    let mut known: Vec<_> = st.tenants.keys().cloned().collect();
                    known.sort();
                    return Err(PatchError::UnknownTenant(format!(
                        "no tenant `{name}`; known tenants: {}",
                        known.join(", ")
                    )));
                };
                let next = t.limits.patched(patch).map_err(PatchError::Invalid)?;
                self.apply(st, name, next);
                Ok(tenant_view(name, &st.tenants[name]))
            }
        }
    }

    /// Sets how many replicas share this gate's limits: the server's rates and slots become 1/`replicas`
    /// of its limits (the replicas front the same workers), and so do each tenant's buckets and cap, which
    /// only apply while the shared store is unreachable (levels carried). A fleet sets this to its live
    /// replica count.
    pub fn set_share(&self, replicas: u32) {
        let replicas = replicas.max(1);
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.share == replicas {
            return;
        }
        st.share = replicas;
        let old = std::mem::replace(
            &mut st.server_buckets,
            Buckets::new(&TenantLimits::default(), &self.clock),
        );
        st.server_buckets = old.reconfigure(&st.server.shared.shared_by(replicas), &self.clock);
        for t in st.tenants.values_mut() {
            let effective = t.limits.shared_by(replicas);
            t.rebucket(&effective, &self.clock);
        }
    }

    /// The replicas the tenant limits are divided among (1: not divided).
    pub fn share(&self) -> u32 {
        self.lock().share
    }

    /// One tenant's configured limits (whole, not a replica's share); `None` for a tenant with none.
    pub fn tenant_limits(&self, name: &str) -> Option<TenantLimits> {
        self.lock()
            .tenants
            .get(name)
            .map(|t| t.limits.clone())
            .filter(|l| !l.is_unlimited())
    }

    /// The waiting queue's bounds: requests and reserved tokens.
    pub fn queue_limits(&self) -> (u32, u64) {
        let guard = self.lock();
        (guard.server.max_queued_requests, guard.server.max_queued_tokens)
    }

    /// Every limit, with what remains of each budget now.
    pub fn snapshot(&self) -> Snapshot {
        let guard = self.lock();
        let mut tenants: Vec<_> = guard.tenants.iter().map(|(n, t)| tenant_view(n, t)).collect();
        tenants.sort_by(|a, b| a.name.cmp(&b.name));
        Snapshot {
            server: server_view(&guard),
            tenants,
            queued_requests: guard.queue.len() as u32,
            queued_tokens: guard.queued_tokens,
        }
    }

    /// The server's own limits and budgets now.
    pub fn server_view(&self) -> LimitsView {
        server_view(&self.lock())
    }

    /// One tenant's limits and budgets now; `None` for a tenant with no limits of its own.
    pub fn tenant_view(&self, name: &str) -> Option<LimitsView> {
        self.lock().tenants.get(name).map(|t| tenant_view(name, t))
    }

    /// Sets the remaining-budget gauges from the buckets' levels now (they refill between requests).
    pub fn publish(&self) {
        let guard = self.lock();
        for (name, t) in &guard.tenants {
            publish_remaining(name, t);
        }
        publish_queue(&guard);
    }
}

impl<C: Clock + Clone> State<C> {
    /// The requests this replica runs at once: the server's cap, or its share of it in a fleet.
    fn slots(&self) -> u32 {
        self.server
            .shared
            .shared_by(self.share)
            .max_in_flight
            .unwrap_or(u32::MAX)
    }

    /// Gives request cells and tokens back to the server's buckets, and to the tenant's when they were
    /// taken from them (`Scope::Local`).
    fn refund(&self, tenant: &str, scope: Scope, requests: u32, tokens: u32) {
        if scope == Scope::Local
            && let Some(t) = self.tenants.get(tenant)
        {
            t.buckets.refund(requests, tokens);
        }
        self.server_buckets.refund(requests, tokens);
    }
}

/// The tenant's own limits, here: its concurrency cap, then its buckets. Under a replica's share (a fleet
/// cut off from its shared store), a reservation that only the whole bucket could cover waits rather than
/// being refused for good.
fn check_tenant<C: Clock + Clone>(
    tenant: &TenantState<C>,
    name: &str,
    share: u32,
    ask: &Ask,
    estimate: &ServiceEstimate,
) -> Result<(), Rejection> {
    if let Some(max) = tenant.limits.shared_by(share).max_in_flight
        && tenant.running + tenant.queued >= max
    {
        let part = if share > 1 {
            format!(" (this replica's share, 1/{share}, while the fleet's shared store is unreachable)")
        } else {
            String::new()
        };
        return Err(Rejection {
            reason: Reason::TenantConcurrency,
            message: format!(
                "tenant `{name}` already has {max} requests in flight, its limit{part}; wait for one to finish"
            ),
            retry_after: Some(estimate.slot_free_in(1)),
        });
    }
    take_all(&tenant.buckets, ask, &format!("tenant `{name}`"), true).map_err(|e| {
        let whole = tenant.limits.tokens.map_or(0, |r| r.burst);
        if e.reason == Reason::TooLarge && share > 1 && ask.tokens <= whole {
            let wait = tenant.limits.tokens.map_or(Duration::from_secs(1), |r| r.interval());
            return Rejection {
                reason: Reason::TenantTokens,
                message: format!(
                    "tenant `{name}` reserves {} tokens, more than this replica's share (1/{share}) of its token \
                     bucket while the fleet's shared store is unreachable; retry shortly",
                    ask.tokens
                ),
                retry_after: Some(wait.max(Duration::from_secs(1))),
            };
        }
        e
    })
}

/// Counts a refusal by tenant and the limit that made it.
pub fn count_refusal(tenant: String, reason: Reason) {
    metrics::counter!(names::RATE_LIMITED_TOTAL, names::LABEL_TENANT => tenant, names::LABEL_REASON => reason.label())
        .increment(1);
}

/// Takes one request cell and the token reservation from `buckets`, or neither.
fn take_all<C: Clock + Clone>(buckets: &Buckets<C>, ask: &Ask, who: &str, tenant: bool) -> Result<(), Rejection> {
    let (req_reason, tok_reason) = if tenant {
        (Reason::TenantRequests, Reason::TenantTokens)
    } else {
        (Reason::ServerRequests, Reason::ServerTokens)
    };
    if let Some(b) = &buckets.requests
        && let Err(refusal) = b.take(1)
    {
        let r = b.rate();
        return Err(refused(refusal, req_reason, || {
            format!(
                "{who} is over its limit of {} requests per second (burst {})",
                r.amount, r.burst
            )
        }));
    }
    if let Some(b) = &buckets.tokens
        && let Err(refusal) = b.take(ask.tokens)
    {
        if let Some(req) = &buckets.requests {
            req.refund(1);
        }
        let r = b.rate();
        return Err(refused(refusal, tok_reason, || {
            format!(
                "{who} is over its limit of {} tokens per minute (burst {}); this request reserves {} tokens \
                 (prompt + max_tokens, reconciled when it ends)",
                r.amount, r.burst, ask.tokens
            )
        }));
    }
    Ok(())
}

fn refused(refusal: Refusal, reason: Reason, what: impl FnOnce() -> String) -> Rejection {
    match refusal {
        Refusal::Wait(wait) => Rejection {
            reason,
            message: format!("{}; retry in {} ms", what(), ms(wait)),
            retry_after: Some(wait),
        },
        Refusal::TooLarge { burst } => Rejection {
            reason: Reason::TooLarge,
            message: format!(
                "{}, and a bucket of {burst} can never cover it; lower max_tokens or shorten the prompt",
                what()
            ),
            retry_after: None,
        },
    }
}

/// Refunds what a request reserved but did not use, or charges what it used beyond that.
fn reconcile<C: Clock + Clone>(buckets: &Buckets<C>, reserved: u32, used: u32) {
    if let Some(b) = &buckets.tokens {
        if used < reserved {
            b.refund(reserved - used);
        } else if used > reserved {
            b.force(used - reserved);
        }
    }
}

fn publish_queue<C: Clock + Clone>(st: &State<C>) {
    metrics::gauge!(names::ADMISSION_QUEUE_REQUESTS).set(st.queue.len() as f64);
    metrics::gauge!(names::ADMISSION_QUEUE_TOKENS).set(st.queued_tokens as f64);
}

fn publish_remaining<C: Clock + Clone>(name: &str, t: &TenantState<C>) {
    if let Some(b) = &t.buckets.requests {
        metrics::gauge!(names::TENANT_REMAINING_REQUESTS, names::LABEL_TENANT => name.to_string()).set(b.available());
    }
    if let Some(b) = &t.buckets.tokens {
        metrics::gauge!(names::TENANT_REMAINING_TOKENS, names::LABEL_TENANT => name.to_string()).set(b.available());
    }
}
