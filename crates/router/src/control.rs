//! The live settings a fleet shares besides the traffic policy: which content filter enforces, which runs
//! in shadow and whether filtering is on, and the admission limits changed through `Admin.SetLimits`.
//!
//! Alone, a change applies here. In a fleet, the change is checked and applied here first (an invalid one
//! changes nothing anywhere), then committed to the replicated `control` document, which every replica
//! applies before the call returns. Limits set through Admin are kept as the fields each change set, per
//! tenant, and applied over each replica's config; a replica that starts applies them over its own.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use ferroserve_admission::{LimitsPatch, LimitsView};
use ferroserve_cluster::{Cluster, Replicated};
use ferroserve_filter::FilterHub;
use serde::{Deserialize, Serialize};

use crate::RouterError;
use crate::live::Live;

/// The shared document.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Control {
    /// The filter selection, once an operator changed it.
    filter: Option<FilterChoice>,
    /// Tenant (empty: the server) -> the limit fields set through Admin, later changes over earlier ones.
    limits: BTreeMap<String, PatchFields>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FilterChoice {
    active: Option<String>,
    shadow: Option<String>,
    enabled: bool,
}

/// The fields of a [`LimitsPatch`], as stored.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct PatchFields {
    requests_per_second: Option<f64>,
    request_burst: Option<u32>,
    tokens_per_minute: Option<f64>,
    token_burst: Option<u32>,
    max_in_flight: Option<u32>,
    max_queued_requests: Option<u32>,
    max_queued_tokens: Option<u64>,
}

impl PatchFields {
    fn merge(&mut self, p: &LimitsPatch) {
        fn over<T: Copy>(mine: &mut Option<T>, theirs: Option<T>) {
            if theirs.is_some() {
                *mine = theirs;
            }
        }
        over(&mut self.requests_per_second, p.requests_per_second);
        over(&mut self.request_burst, p.request_burst);
        over(&mut self.tokens_per_minute, p.tokens_per_minute);
        over(&mut self.token_burst, p.token_burst);
        over(&mut self.max_in_flight, p.max_in_flight);
        over(&mut self.max_queued_requests, p.max_queued_requests);
        over(&mut self.max_queued_tokens, p.max_queued_tokens);
    }

    fn patch(&self) -> LimitsPatch {
        LimitsPatch {
            requests_per_second: self.requests_per_second,
            request_burst: self.request_burst,
            tokens_per_minute: self.tokens_per_minute,
            token_burst: self.token_burst,
            max_in_flight: self.max_in_flight,
            max_queued_requests: self.max_queued_requests,
            max_queued_tokens: self.max_queued_tokens,
        }
    }
}

/// The filter and limit settings of this router, shared with its fleet if it has one.
pub struct SharedControl {
    live: Arc<Live>,
    filters: Arc<FilterHub>,
    /// The revision applied and the document as of it.
    state: Mutex<(u64, Control)>,
    fleet: OnceLock<Arc<Cluster>>,
}

impl Replicated for SharedControl {
    fn doc(&self) -> &'static str {
        "control"
    }

    fn revision(&self) -> u64 {
        self.state.lock().expect("control lock").0
    }

    fn seed(&self) -> Option<Vec<u8>> {
        None
    }

    fn install(&self, revision: u64, bytes: &[u8]) {
        let next: Control = serde_json::from_slice(bytes).unwrap_or_else(|e| {
            tracing::error!(error = %e, "the fleet's control document does not parse; keeping the settings as they are");
            self.state.lock().expect("control lock").1.clone()
        });
        let mut state = self.state.lock().expect("control lock");
        if state.0 == revision {
            return;
        }
        self.apply(&state.1, &next);
        *state = (revision, next);
    }
}

impl SharedControl {
    /// The settings of a router, not (yet) shared.
    pub fn new(live: Arc<Live>, filters: Arc<FilterHub>) -> Arc<SharedControl> {
        Arc::new(SharedControl {
            live,
            filters,
            state: Mutex::default(),
            fleet: OnceLock::new(),
        })
    }

    /// Shares the settings with the fleet from now on, starting from its current ones; keep them current
    /// with `cluster.follow_doc`.
    pub async fn join(&self, cluster: Arc<Cluster>) {
        let _ = self.fleet.set(Arc::clone(&cluster));
        if let Err(e) = cluster.sync_doc(self).await {
            tracing::warn!(error = %e, "could not load the fleet's filter and limit settings yet; following them from now on");
        }
    }

    /// Applies what changed between `before` and `after` here.
    fn apply(&self, before: &Control, after: &Control) {
        if let Some(choice) = after.filter.as_ref().filter(|c| before.filter.as_ref() != Some(*c)) {
            // Only what differs from this replica's selection: setting the same shadow again would reset
            // its agreement counts.
            let now = self.filters.selection();
            let id = |l: &Option<Arc<ferroserve_filter::Loaded>>| l.as_ref().map(|l| l.id.clone());
            if let Some(active) = choice.active.as_ref().filter(|a| id(&now.active).as_ref() != Some(*a))
                && let Err(e) = self.filters.swap_checked(active)
            {
                tracing::error!(filter = %active, error = %e, "the fleet's active filter is not loaded here");
            }
            if id(&now.shadow) != choice.shadow
                && let Err(e) = self.filters.set_shadow(choice.shadow.as_deref())
            {
                tracing::error!(error = %e, "the fleet's shadow filter is not loaded here");
            }
            if now.enabled != choice.enabled {
                self.filters.set_enabled(choice.enabled);
            }
        }
        for (tenant, fields) in &after.limits {
            if before.limits.get(tenant) == Some(fields) {
                continue;
            }
            let who = Some(tenant.as_str()).filter(|t| !t.is_empty());
            if let Err(e) = self.live.admission().patch(who, &fields.patch()) {
                tracing::error!(tenant = %tenant, error = %e, "the fleet's limits do not apply here");
            }
        }
    }

    /// `Admin.SetLimits`: checked and applied here, then, in a fleet, on every replica.
    pub async fn set_limits(&self, tenant: Option<&str>, patch: &LimitsPatch) -> Result<LimitsView, RouterError> {
        let applied = self.live.admission().patch(tenant, patch)?;
        self.commit(|c| {
            c.limits
                .entry(tenant.unwrap_or_default().to_string())
                .or_default()
                .merge(patch);
        })
        .await?;
        Ok(applied)
    }

    /// A change of the filter selection, made here by `local` (which checks it), then, in a fleet, on
    /// every replica.
    pub async fn select_filter(
        &self,
        local: impl FnOnce(&FilterHub) -> Result<(), RouterError>,
    ) -> Result<(), RouterError> {
        local(&self.filters)?;
        let selection = self.filters.selection();
        let choice = FilterChoice {
            active: selection.active.as_ref().map(|a| a.id.clone()),
            shadow: selection.shadow.as_ref().map(|s| s.id.clone()),
            enabled: selection.enabled,
        };
        self.commit(|c| c.filter = Some(choice.clone())).await
    }

    async fn commit(&self, edit: impl Fn(&mut Control)) -> Result<(), RouterError> {
        let Some(cluster) = self.fleet.get() else { return Ok(()) };
        cluster
            .commit_doc(self, |bytes| {
                let mut doc: Control = bytes.and_then(|b| serde_json::from_slice(b).ok()).unwrap_or_default();
                edit(&mut doc);
                Some((serde_json::to_vec(&doc).expect("the control document serializes"), ()))
            })
            .await?;
        Ok(())
    }
}
