//! The traffic state shared by a fleet of routers: one replicated document in Redis
//! ([`ferroserve_cluster::doc`]).
//!
//! A change loads the latest revision, applies the operator's edit to it and writes it back only if no one
//! wrote in between (compare-and-set); on a conflict it re-applies the edit to the newer state, so two
//! operators' changes never overwrite each other. It then waits (bounded) until every live replica has
//! applied the new revision, so that when `DisableVersion` returns, no replica starts a new request on that
//! version. A replica that starts or reconnects loads the current state, and seeds it from its own when
//! Redis has none (a first start, or a Redis that lost its data).

use std::sync::Arc;

use ferroserve_cluster::{Cluster, DocError, Replicated};

use super::{InFlight, Policy, PolicyAction, State, Traffic, edit_state, publish, rollback_state};
use ferroserve_core::VersionId;

impl Replicated for Traffic {
    fn doc(&self) -> &'static str {
        "traffic"
    }

    fn revision(&self) -> u64 {
        self.state.read().expect("traffic lock").revision
    }

    fn seed(&self) -> Option<Vec<u8>> {
        let state = self.state.read().expect("traffic lock");
        (!state.policies.is_empty()).then(|| serde_json::to_vec(&*state).expect("the traffic state serializes"))
    }

    fn install(&self, revision: u64, bytes: &[u8]) {
        let mut next = parse(bytes);
        next.revision = revision;
        self.install_state(next);
    }
}

impl Traffic {
    /// Shares this state with the fleet from now on, starting from the fleet's current revision (or
    /// seeding the fleet with this state if it has none); the kill switch's cancellations reach
    /// `in_flight`. [`follow`] keeps it current afterwards.
    pub async fn join(&self, cluster: Arc<Cluster>, in_flight: Arc<InFlight>) {
        let _ = self.fleet.set((Arc::clone(&cluster), in_flight));
        if let Err(e) = cluster.sync_doc(self).await {
            tracing::warn!(error = %e, "could not load the fleet's traffic policy yet; following it from now on");
        }
    }

    /// [`Traffic::change`] for the whole fleet: alone, the same; in a fleet, compare-and-set on the shared
    /// state, then a bounded wait until every live replica applied it. Fails, changing nothing, when Redis
    /// is unreachable.
    pub async fn commit(
        &self,
        model: &str,
        who: &str,
        action: PolicyAction,
        reason: &str,
        edit: impl Fn(&mut Policy),
    ) -> Result<Policy, DocError> {
        let Some((cluster, _)) = self.fleet.get() else {
            return Ok(self.change(model, who, action, reason, edit));
        };
        let changed = self
            .commit_with(cluster, |state| {
                Some(edit_state(state, model, who, action, reason, &edit).1)
            })
            .await?;
        Ok(changed.expect("an edit always changes"))
    }

    /// [`Traffic::rollback`] for the whole fleet; `None` when there is nothing to undo.
    pub async fn commit_rollback(&self, model: &str, who: &str, reason: &str) -> Result<Option<Policy>, DocError> {
        let Some((cluster, _)) = self.fleet.get() else {
            return Ok(self.rollback(model, who, reason));
        };
        self.commit_with(cluster, |state| {
            rollback_state(state, model, who, reason).map(|(_, p)| p)
        })
        .await
    }

    async fn commit_with(
        &self,
        cluster: &Arc<Cluster>,
        edit: impl Fn(&mut State) -> Option<Policy>,
    ) -> Result<Option<Policy>, DocError> {
        cluster
            .commit_doc(self, |bytes| {
                let mut state = match bytes {
                    Some(b) => parse(b),
                    None => self.state.read().expect("traffic lock").clone(),
                };
                let after = edit(&mut state)?;
                Some((serde_json::to_vec(&state).expect("the traffic state serializes"), after))
            })
            .await
    }

    /// Takes `next` as this router's state if it is another revision: publishes each model's change, and
    /// cancels requests in flight on versions whose cancel count rose.
    fn install_state(&self, next: State) {
        let mut state = self.state.write().expect("traffic lock");
        if next.revision == state.revision {
            return;
        }
        let models: std::collections::BTreeSet<String> =
            state.policies.keys().chain(next.policies.keys()).cloned().collect();
        let empty = Policy::default();
        for model in models {
            let before = state.policies.get(&model).unwrap_or(&empty);
            let after = next.policies.get(&model).unwrap_or(&empty);
            if before == after {
                continue;
            }
            publish(&model, PolicyAction::Sync, before, after);
            if let Some((_, in_flight)) = self.fleet.get() {
                for (version, count) in &after.cancels {
                    if before.cancels.get(version).is_none_or(|c| c < count) {
                        in_flight.cancel(&VersionId::new(&model, version));
                    }
                }
            }
        }
        tracing::info!(revision = next.revision, "traffic policy from the fleet applied");
        *state = next;
        self.save(&state);
    }
}

/// The shared state, or an empty one (logged) if it does not parse: a bad write must not stop routing.
fn parse(bytes: &[u8]) -> State {
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        tracing::error!(error = %e, "the fleet's traffic state does not parse; treating it as empty");
        State::default()
    })
}

/// Keeps `traffic` at the fleet's revision until the task is aborted (nothing to do for a router alone).
pub async fn follow(traffic: Arc<Traffic>) {
    let Some((cluster, _)) = traffic.fleet.get().cloned() else {
        return;
    };
    cluster.follow_doc(traffic).await;
}
