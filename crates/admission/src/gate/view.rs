//! Read-outs of the gate's limits and budgets, and the errors of a limit change.

use governor::clock::Clock;

use super::{Buckets, State, TenantState};
use crate::bucket::Bucket;
use crate::limits::TenantLimits;

/// Why a limit change was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PatchError {
    /// No such tenant.
    #[error("{0}")]
    UnknownTenant(String),
    /// The new value is not valid; the old limits stay.
    #[error("{0}")]
    Invalid(String),
}

/// One set of limits and its state now.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsView {
    /// Tenant name, or empty for the server.
    pub name: String,
    /// The limits.
    pub limits: TenantLimits,
    /// Requests that could be admitted now by rate, if limited.
    pub remaining_requests: Option<f64>,
    /// Tokens that could be reserved now, if limited.
    pub remaining_tokens: Option<f64>,
    /// Requests running.
    pub running: u32,
    /// Requests waiting.
    pub queued: u32,
}

/// All limits and queue state at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The server's limits and budgets.
    pub server: LimitsView,
    /// Each tenant's, by name.
    pub tenants: Vec<LimitsView>,
    /// Requests waiting for a slot.
    pub queued_requests: u32,
    /// Tokens those requests reserved.
    pub queued_tokens: u64,
}

pub(super) fn view<C: Clock + Clone>(
    name: &str,
    limits: &TenantLimits,
    b: &Buckets<C>,
    running: u32,
    queued: u32,
) -> LimitsView {
    LimitsView {
        name: name.to_string(),
        limits: limits.clone(),
        remaining_requests: b.requests.as_ref().map(Bucket::available),
        remaining_tokens: b.tokens.as_ref().map(Bucket::available),
        running,
        queued,
    }
}

pub(super) fn tenant_view<C: Clock + Clone>(name: &str, t: &TenantState<C>) -> LimitsView {
    view(name, &t.limits, &t.buckets, t.running, t.queued)
}

pub(super) fn server_view<C: Clock + Clone>(st: &State<C>) -> LimitsView {
    view(
        "",
        &st.server.shared,
        &st.server_buckets,
        st.running,
        st.queue.len() as u32,
    )
}
