//! The control plane's one home: the versions this router knows, how traffic splits between them, their
//! loads, rollouts and recent outcomes, and the handles that cancel their requests in flight. The request
//! path asks it one thing, [`Catalog::choose`]: which version serves this request. `Admin` reads and
//! changes it through conversion code (versions.rs, admin.rs); in a fleet, [`Catalog::join`] shares it.

use std::sync::Arc;

use ferroserve_cluster::Cluster;
use tokio::task::JoinHandle;

use crate::ModelSelector;
use crate::observe::Observations;
use crate::pool::Pool;
use crate::registry::Registry;
use crate::rollout::{Rollouts, share_observations};
use crate::traffic::{InFlight, Traffic, VersionAsk};

/// Everything the router knows about its models' versions.
pub(crate) struct Catalog {
    /// The traffic policy: splits, cohorts, the kill switch, their history.
    pub traffic: Arc<Traffic>,
    /// The automatic canary analyses.
    pub rollouts: Arc<Rollouts>,
    /// Load phases of the versions loaded or unloaded here.
    pub registry: Arc<Registry>,
    /// Each version's recent outcomes, which rollouts judge.
    pub observations: Arc<Observations>,
    /// Requests in flight per version, for a kill switch that cancels them.
    pub in_flight: Arc<InFlight>,
}

/// What a request brings to the choice of its version.
pub(crate) struct Asking<'a> {
    /// The model (and maybe version) it named.
    pub selector: &'a ModelSelector,
    /// Its sticky key, if any.
    pub session: Option<&'a str>,
    /// Its A/B cohort header, if any.
    pub cohort: Option<&'a str>,
    /// Its id (the draw's key without a session).
    pub request_id: &'a str,
}

impl Catalog {
    /// A catalog over `traffic` (restored from its state file, if any), with nothing else yet.
    pub(crate) fn new(traffic: Arc<Traffic>) -> Arc<Catalog> {
        Arc::new(Catalog {
            traffic,
            rollouts: Arc::default(),
            registry: Arc::default(),
            observations: Arc::default(),
            in_flight: Arc::default(),
        })
    }

    /// Which version serves a request: the traffic policy's choice among the versions with a healthy
    /// worker, as a pin; the request's own selector when its model has no policy (or the policy has no
    /// say).
    pub(crate) fn choose(&self, pool: &Pool, asking: Asking<'_>) -> ModelSelector {
        let selector = asking.selector.clone();
        let (name, pinned) = match &selector {
            ModelSelector::Default => match pool.default_name() {
                Some(name) => (name, None),
                None => return selector,
            },
            ModelSelector::Name(name) => (name.clone(), None),
            ModelSelector::Pinned { name, version } => (name.clone(), Some(version.as_str())),
        };
        // The common case, no policy: skip collecting the serving versions.
        if !self.traffic.has_policy(&name) {
            return selector;
        }
        let ask = VersionAsk {
            pinned,
            session: asking.session,
            cohort: asking.cohort,
            request_id: asking.request_id,
        };
        match self.traffic.choose(&name, ask, &pool.healthy_versions(&name)) {
            Some(version) => ModelSelector::Pinned { name, version },
            None => selector,
        }
    }

    /// Shares the traffic policy, the rollouts and the outcomes with the fleet, starting from its current
    /// state; returns the tasks that keep them current.
    pub(crate) async fn join(&self, cluster: &Arc<Cluster>, pool: &Arc<Pool>) -> Vec<JoinHandle<()>> {
        self.traffic
            .join(Arc::clone(cluster), Arc::clone(&self.in_flight))
            .await;
        self.rollouts
            .join(
                Arc::clone(cluster),
                Arc::clone(&self.traffic),
                Arc::clone(&self.observations),
                Arc::clone(pool),
            )
            .await;
        vec![
            tokio::spawn(crate::traffic::follow(Arc::clone(&self.traffic))),
            tokio::spawn(Arc::clone(cluster).follow_doc(Arc::clone(&self.rollouts))),
            tokio::spawn(share_observations(Arc::clone(&self.observations), Arc::clone(cluster))),
        ]
    }
}
