//! The traffic state shared by a fleet of routers: one document in Redis under a revision.
//!
//! A change loads the latest revision, applies the operator's edit to it and writes it back only if no one
//! wrote in between (compare-and-set); on a conflict it re-applies the edit to the newer state, so two
//! operators' changes never overwrite each other. It then waits (bounded) until every live replica has
//! applied the new revision, so that when `DisableVersion` returns, no replica starts a new request on that
//! version. Replicas learn of a revision by pub/sub, and check it at every heartbeat in case a message was
//! lost; a replica that starts or reconnects loads the current state, and seeds it from its own when Redis
//! has none (a first start, or a Redis that lost its data).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ferroserve_cluster::{Cas, Cluster, DocError};
use futures::StreamExt;

use super::{InFlight, Policy, State, Traffic, edit_state, publish, rollback_state};

/// The traffic document's name in the fleet's store.
const DOC: &str = "traffic";
/// Compare-and-set attempts before a change gives up under contention.
const ATTEMPTS: usize = 16;
/// How long a change waits for every live replica to apply it.
const APPLY_WITHIN: Duration = Duration::from_secs(2);

impl Traffic {
    /// Shares this state with the fleet from now on, starting from the fleet's current revision (or
    /// seeding the fleet with this state if it has none); the kill switch's cancellations reach
    /// `in_flight`. [`follow`] keeps it current afterwards.
    pub async fn join(&self, cluster: Arc<Cluster>, in_flight: Arc<InFlight>) {
        let _ = self.fleet.set((Arc::clone(&cluster), in_flight));
        if let Err(e) = self.sync(&cluster).await {
            tracing::warn!(error = %e, "could not load the fleet's traffic policy yet; following it from now on");
        }
    }

    /// The fleet revision this router has applied (0 alone).
    pub fn revision(&self) -> u64 {
        self.state.read().expect("traffic lock").revision
    }

    /// [`Traffic::change`] for the whole fleet: alone, the same; in a fleet, compare-and-set on the shared
    /// state, then a bounded wait until every live replica applied it. Fails, changing nothing, when Redis
    /// is unreachable.
    pub async fn commit(
        &self,
        model: &str,
        who: &str,
        action: &str,
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
        for _ in 0..ATTEMPTS {
            let (revision, bytes) = cluster.load_doc(DOC).await?;
            let mut state = match bytes {
                Some(b) => parse(&b),
                None => self.state.read().expect("traffic lock").clone(),
            };
            let Some(after) = edit(&mut state) else { return Ok(None) };
            let bytes = serde_json::to_vec(&state).expect("the traffic state serializes");
            if let Cas::Written(new) = cluster.compare_and_set(DOC, revision, &bytes).await? {
                state.revision = new;
                self.install(state);
                cluster.ack_doc(DOC, new).await;
                let lagging = cluster.wait_applied(DOC, new, APPLY_WITHIN).await;
                if !lagging.is_empty() {
                    tracing::warn!(
                        revision = new,
                        ?lagging,
                        "traffic change committed, but these replicas have not applied it yet"
                    );
                }
                return Ok(Some(after));
            }
        }
        Err(DocError::Unreachable(format!(
            "{ATTEMPTS} attempts lost to concurrent changes"
        )))
    }

    /// Takes `next` as this router's state if it is another revision: publishes each model's change, and
    /// cancels requests in flight on versions whose cancel count rose.
    fn install(&self, next: State) {
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
            publish(&model, "sync", before, after);
            if let Some((_, in_flight)) = self.fleet.get() {
                for (version, count) in &after.cancels {
                    if before.cancels.get(version).is_none_or(|c| c < count) {
                        in_flight.cancel(&format!("{model}@{version}"));
                    }
                }
            }
        }
        tracing::info!(revision = next.revision, "traffic policy from the fleet applied");
        *state = next;
        self.save(&state);
    }

    /// Brings this router up to the fleet's revision (seeding the fleet from this router's state when it
    /// has none), and acknowledges it.
    async fn sync(&self, cluster: &Cluster) -> Result<(), DocError> {
        let revision = cluster.doc_revision(DOC).await?;
        if revision == 0 {
            let local = self.state.read().expect("traffic lock").clone();
            if !local.policies.is_empty() {
                let bytes = serde_json::to_vec(&local).expect("the traffic state serializes");
                if let Cas::Written(new) = cluster.compare_and_set(DOC, 0, &bytes).await? {
                    tracing::info!(
                        revision = new,
                        "the fleet had no traffic policy: seeded it with this router's"
                    );
                    self.state.write().expect("traffic lock").revision = new;
                    cluster.ack_doc(DOC, new).await;
                    return Ok(());
                }
            }
        }
        if revision != self.revision() {
            let (revision, bytes) = cluster.load_doc(DOC).await?;
            if let Some(b) = bytes {
                let mut next = parse(&b);
                next.revision = revision;
                self.install(next);
            }
        }
        cluster.ack_doc(DOC, self.revision()).await;
        Ok(())
    }
}

/// The shared state, or an empty one (logged) if it does not parse: a bad write must not stop routing.
fn parse(bytes: &[u8]) -> State {
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        tracing::error!(error = %e, "the fleet's traffic state does not parse; treating it as empty");
        State::default()
    })
}

/// Keeps `traffic` at the fleet's revision until `stop`: follows the announcements, and checks the
/// revision every heartbeat whether or not one came.
pub async fn follow(traffic: Arc<Traffic>, stop: impl Future<Output = ()>) {
    let Some((cluster, _)) = traffic.fleet.get().cloned() else {
        return;
    };
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(cluster.heartbeat_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let _ = traffic.sync(&cluster).await;
        let mut messages = match cluster.subscribe_doc(DOC).await {
            Ok(pubsub) => Some(pubsub.into_on_message()),
            Err(_) => None,
        };
        loop {
            let message = async {
                match messages.as_mut() {
                    Some(m) => m.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut stop => return,
                m = message => {
                    if m.is_none() {
                        break; // the subscription dropped: resubscribe
                    }
                    let _ = traffic.sync(&cluster).await;
                }
                _ = tick.tick() => {
                    if traffic.sync(&cluster).await.is_err() || messages.is_none() {
                        break;
                    }
                }
            }
        }
        // Before resubscribing, wait a heartbeat, so that an unreachable Redis is not hammered.
        tokio::select! {
            () = &mut stop => return,
            _ = tick.tick() => {}
        }
    }
}
