//! What an admitted request holds: a [`Permit`] to run, or a [`Waiting`] place in the queue.

use std::sync::Arc;
use std::time::Instant;

use ferroserve_telemetry::names;
use governor::clock::{Clock, DefaultClock};
use tokio::sync::oneshot;

use super::{Admission, Reason, Rejection, Scope, count_refusal, publish_queue};
use crate::estimate::Timing;

/// The right to run one request. Dropping it frees the slot and reconciles the token reservation with
/// what [`Permit::settle`] reported (nothing settled: nothing used, everything refunded).
pub struct Permit<C: Clock + Clone = DefaultClock> {
    pub(super) admission: Arc<Admission<C>>,
    pub(super) tenant: String,
    pub(super) scope: Scope,
    pub(super) reserved: u32,
    pub(super) used: Option<u32>,
    pub(super) timing: Option<Timing>,
    pub(super) started: Instant,
    /// Told what the request used when the permit ends (a shared store's reservation to settle).
    pub(super) on_finish: Option<FinishHook>,
}

/// What a permit's end tells a hook: the tokens it used, if it reported them.
pub type FinishHook = Box<dyn FnOnce(Option<u32>) + Send + Sync>;

/// When a request's tokens came, as the router saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generated {
    /// The first token.
    pub first: Instant,
    /// The last token.
    pub last: Instant,
    /// How many tokens.
    pub tokens: u32,
}

impl<C: Clock + Clone> Permit<C> {
    /// Records what the request really used (prompt plus generated tokens) and, when it generated, when
    /// its tokens came: the gate learns its time estimates from these.
    pub fn settle(&mut self, used_tokens: u32, generated: Option<Generated>) {
        self.used = Some(used_tokens);
        self.timing = generated.map(|g| Timing {
            startup: g.first.saturating_duration_since(self.started),
            decode: g.last.saturating_duration_since(g.first),
            tokens: g.tokens,
        });
    }

    /// Tokens reserved at admission.
    pub fn reserved(&self) -> u32 {
        self.reserved
    }

    /// Runs `hook` with the tokens used (as [`Permit::settle`] reported them) when the permit ends.
    pub fn on_finish(&mut self, hook: FinishHook) {
        self.on_finish = Some(hook);
    }
}

impl<C: Clock + Clone> Drop for Permit<C> {
    fn drop(&mut self) {
        let admission = Arc::clone(&self.admission);
        admission.finish(self);
        if let Some(hook) = self.on_finish.take() {
            hook(self.used);
        }
    }
}

/// A place in the waiting queue. Dropping it (the client left, or its deadline passed) gives the place up
/// and refunds the reserved tokens.
pub struct Waiting<C: Clock + Clone = DefaultClock> {
    pub(super) admission: Arc<Admission<C>>,
    pub(super) key: (u8, u64),
    pub(super) rx: Option<oneshot::Receiver<Result<Permit<C>, Rejection>>>,
    pub(super) since: Instant,
    /// The client's deadline, if any: the wait ends once it can no longer be met.
    pub(super) deadline: Option<Instant>,
    pub(super) max_tokens: u32,
}

impl<C: Clock + Clone> Waiting<C> {
    /// Waits for a slot. With a deadline, gives up (leaving the queue and refunding the reservation) as
    /// soon as the expected generation time no longer fits before it, rather than at the deadline.
    pub async fn granted(mut self) -> Result<Permit<C>, Rejection> {
        let mut rx = self.rx.take().expect("granted once");
        let result = loop {
            let give_up = self.give_up_at();
            tokio::select! {
                // A decision already made (a slot, or a refusal at its turn) wins over the timer.
                biased;
                result = &mut rx => break result,
                () = until(give_up) => {
                    // The estimate may have moved since the timer was set; give up only if it still says so.
                    if self.give_up_at().is_some_and(|at| at <= Instant::now()) {
                        self.gave_up();
                        return Err(self.too_late());
                    }
                }
            }
        };
        metrics::histogram!(names::ADMISSION_WAIT_SECONDS).record(self.since.elapsed().as_secs_f64());
        result.unwrap_or_else(|_| {
            Err(Rejection {
                reason: Reason::QueueFull,
                message: "the server dropped the waiting queue (shutting down); retry on another replica".into(),
                retry_after: None,
            })
        })
    }

    /// The last moment a slot would still let the request finish by its deadline.
    fn give_up_at(&self) -> Option<Instant> {
        let deadline = self.deadline?;
        let generate = self.admission.lock().estimate.generation(self.max_tokens)?;
        Some(deadline.checked_sub(generate).unwrap_or(self.since))
    }

    fn gave_up(&self) {
        let tenant = self
            .admission
            .lock()
            .queue
            .get(&self.key)
            .map(|w| w.tenant.clone())
            .unwrap_or_default();
        count_refusal(tenant, Reason::QueueDeadline);
    }

    fn too_late(&self) -> Rejection {
        Rejection {
            reason: Reason::QueueDeadline,
            message: format!(
                "waited {} ms for a slot and can no longer generate up to {} tokens before the deadline; retry with a \
                 longer deadline or on a less loaded replica",
                self.since.elapsed().as_millis(),
                self.max_tokens
            ),
            retry_after: None,
        }
    }
}

/// Waits until `at`, or forever when there is none.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl<C: Clock + Clone> Drop for Waiting<C> {
    fn drop(&mut self) {
        let mut guard = self.admission.lock();
        let st = &mut *guard;
        if let Some(w) = st.queue.remove(&self.key) {
            st.queued_tokens -= u64::from(w.reserved);
            if let Some(t) = st.tenants.get_mut(&w.tenant) {
                t.queued = t.queued.saturating_sub(1);
            }
            st.refund(&w.tenant, w.scope, 0, w.reserved);
            publish_queue(st);
        }
    }
}
