//! A request's hold on the fleet's limits, from its reservation until it ends.

use std::sync::Arc;

use ferroserve_admission::{FinishHook, Scope, TenantLimits};
use ferroserve_telemetry::names;
use redis::ScriptInvocation;
use redis::aio::MultiplexedConnection;

use crate::fleet::{Call, Cluster, bucket};
use crate::scripts::SETTLE_SCRIPT;

/// What the fleet decided for a request: where its tenant limits were checked, and the ticket to settle.
pub struct Reservation {
    /// Where the tenant limits were checked: the gate checks them itself when `Local`.
    pub scope: Scope,
    /// The hold to settle when the request ends; `None` for a tenant without limits.
    pub ticket: Option<Ticket>,
}

impl Reservation {
    pub(crate) fn new(scope: Scope, ticket: Ticket) -> Reservation {
        Reservation {
            scope,
            ticket: Some(ticket),
        }
    }

    /// A tenant with no limits: nothing to hold.
    pub(crate) fn unlimited() -> Reservation {
        Reservation {
            scope: Scope::Local,
            ticket: None,
        }
    }
}

/// A request's hold for its tenant. Dropping it releases the hold: a reservation made in Redis is settled
/// there (from a task, so that no caller waits on Redis), by [`Ticket::finished`]'s usage if the request
/// ran, or refunded whole (request cell and tokens) if it never did.
pub struct Ticket {
    cluster: Arc<Cluster>,
    tenant: String,
    pub(crate) limits: TenantLimits,
    reserved: u32,
    /// Reserved in Redis (else decided locally: only the holding to give back).
    pub(crate) shared: bool,
    /// `Some` once the request ran: the tokens it reported using.
    ran: Option<Option<u32>>,
    /// The hold was given back already.
    released: bool,
}

/// A settlement to send: the script call and the connection to send it on.
type Settlement = (ScriptInvocation<'static>, MultiplexedConnection);

impl Ticket {
    /// A hold on one more request of `tenant`.
    pub(crate) fn new(cluster: Arc<Cluster>, tenant: &str, limits: TenantLimits, reserved: u32) -> Ticket {
        cluster.hold(tenant);
        Ticket {
            cluster,
            tenant: tenant.to_string(),
            limits,
            reserved,
            shared: false,
            ran: None,
            released: false,
        }
    }

    /// The request ran and used `used` tokens (`None`: it reported none, so the reservation is refunded).
    pub fn finished(mut self, used: Option<u32>) {
        self.ran = Some(used);
    }

    /// [`Ticket::finished`] as a hook for the admission permit, which calls it when the request ends.
    pub fn into_hook(self) -> FinishHook {
        Box::new(move |used| self.finished(used))
    }

    /// Settles now, on this task, at a given time (µs; 0 is Redis's clock): `ran` is the tokens used if
    /// the request ran. For tests that drive the shared buckets on a fake clock.
    #[doc(hidden)]
    pub async fn settle_at(mut self, ran: Option<Option<u32>>, clock_us: u64) {
        self.ran = ran;
        if let Some((call, mut conn)) = self.release(clock_us)
            && let Err(e) = call.invoke_async::<i64>(&mut conn).await
        {
            self.cluster.failed(Call::Settle, e.to_string());
        }
    }

    /// Gives the hold back; returns the settlement to send to Redis, if the reservation was made there
    /// and Redis is reachable.
    fn release(&mut self, clock_us: u64) -> Option<Settlement> {
        if std::mem::replace(&mut self.released, true) {
            return None;
        }
        self.cluster.release(&self.tenant);
        if !self.shared {
            return None;
        }
        // Never ran: the request cell and every token back. Ran: the tokens it did not use back, or those
        // it used beyond the reservation charged.
        let (cells, tokens) = match self.ran {
            None => (1, i64::from(self.reserved)),
            Some(used) => (0, i64::from(self.reserved) - i64::from(used.unwrap_or(0))),
        };
        let conn = self.cluster.connection()?;
        let (rq_interval, _) = bucket(self.limits.requests);
        let (tk_interval, _) = bucket(self.limits.tokens);
        let mut call = SETTLE_SCRIPT.prepare_invoke();
        call.key(self.cluster.key(&self.tenant, "rq"))
            .key(self.cluster.key(&self.tenant, "tk"))
            .key(self.cluster.key(&self.tenant, "inflight"))
            .arg(clock_us)
            .arg(rq_interval)
            .arg(cells)
            .arg(tk_interval)
            .arg(tokens)
            .arg(&self.cluster.replica)
            .arg(u8::from(self.limits.max_in_flight.is_some()));
        Some((call, conn))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.release(0);
            return;
        };
        let Some((call, mut conn)) = self.release(0) else {
            return;
        };
        let cluster = Arc::clone(&self.cluster);
        runtime.spawn(async move {
            let timeout = cluster.config.timeout * 4;
            match tokio::time::timeout(timeout, call.invoke_async::<i64>(&mut conn)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => cluster.failed(Call::Settle, e.to_string()),
                Err(_) => {
                    metrics::counter!(names::CLUSTER_REDIS_ERRORS_TOTAL, names::LABEL_KIND => "settle").increment(1);
                }
            }
        });
    }
}
