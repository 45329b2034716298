//! Which version of a model takes an unpinned request: the traffic policy, changed live through `Admin`.
//!
//! Per model name, a policy holds weights per version (a canary at 5 % is `{stable: 95, canary: 5}`),
//! cohorts (the `x-ferroserve-cohort` header's value -> a version) and the disabled versions (the kill
//! switch). A choice is:
//! 1. a cohort's version, if the request names a cohort that maps to an enabled version;
//! 2. otherwise a weighted draw over the enabled versions with weight, keyed by a hash of the request's
//!    `session` (sticky: the same session lands on the same version while the split stays) or else of its
//!    request id;
//! 3. a pin (`name@version`) to a disabled version is moved by the same draw.
//!
//! A choice only names a version among those that have a healthy worker, so a disabled or unreachable
//! version never fails a request while another can serve it. Every change is recorded with who made it
//! and when; a rollback restores the policy before the last change.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use ferroserve_cluster::Cluster;
use ferroserve_core::VersionId;
use ferroserve_telemetry::names;
use tokio::sync::watch;

mod fleet;

pub use fleet::follow;

/// Changes kept in the history.
const HISTORY: usize = 256;
/// Earlier policies kept for rollback, per model.
const UNDO: usize = 64;

/// One model's policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Version -> relative weight of unpinned traffic. Empty: no split (any version, least loaded).
    pub weights: BTreeMap<String, u32>,
    /// Cohort name -> version.
    pub cohorts: BTreeMap<String, String>,
    /// Versions taken out of traffic.
    pub disabled: BTreeSet<String>,
    /// Version -> how many times its requests in flight were cancelled (a kill switch with
    /// `cancel_in_flight`): a replica that sees the count rise cancels its own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cancels: BTreeMap<String, u64>,
}

impl Policy {
    fn summary(&self) -> String {
        let weights: Vec<String> = self.weights.iter().map(|(v, w)| format!("{v}={w}")).collect();
        let mut s = if weights.is_empty() {
            "no split".to_string()
        } else {
            format!("split {}", weights.join(" "))
        };
        if !self.cohorts.is_empty() {
            let c: Vec<String> = self.cohorts.iter().map(|(k, v)| format!("{k}->{v}")).collect();
            s.push_str(&format!("; cohorts {}", c.join(" ")));
        }
        if !self.disabled.is_empty() {
            let d: Vec<&str> = self.disabled.iter().map(String::as_str).collect();
            s.push_str(&format!("; disabled {}", d.join(" ")));
        }
        s
    }
}

/// What a change of a traffic policy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyAction {
    /// Set the split and cohorts.
    Set,
    /// Took a version out of traffic (the kill switch).
    Disable,
    /// Put a version back.
    Enable,
    /// Restored the policy before the last change.
    Rollback,
    /// Removed an unloaded version from the policy.
    Unload,
    /// Applied the fleet's policy (metrics only; never recorded in the history).
    Sync,
    /// Restored the saved policy at startup (metrics only).
    Restore,
}

impl PolicyAction {
    /// The wire enum (`Sync` and `Restore` are never recorded, so never sent).
    pub fn to_wire(self) -> ferroserve_proto::v1::PolicyAction {
        use ferroserve_proto::v1::PolicyAction as W;
        match self {
            PolicyAction::Set => W::Set,
            PolicyAction::Disable => W::Disable,
            PolicyAction::Enable => W::Enable,
            PolicyAction::Rollback => W::Rollback,
            PolicyAction::Unload => W::Unload,
            PolicyAction::Sync | PolicyAction::Restore => W::Unspecified,
        }
    }

    /// The word in metrics, the history and the wire.
    pub fn label(self) -> &'static str {
        match self {
            PolicyAction::Set => "set",
            PolicyAction::Disable => "disable",
            PolicyAction::Enable => "enable",
            PolicyAction::Rollback => "rollback",
            PolicyAction::Unload => "unload",
            PolicyAction::Sync => "sync",
            PolicyAction::Restore => "restore",
        }
    }
}

/// One recorded change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// The operator.
    pub who: String,
    /// What the change did.
    pub action: PolicyAction,
    /// The model's policy after the change, and the reason.
    pub summary: String,
}

/// What a request brings to the choice.
#[derive(Debug, Clone, Copy, Default)]
pub struct VersionAsk<'a> {
    /// A version the request pinned.
    pub pinned: Option<&'a str>,
    /// Its sticky key.
    pub session: Option<&'a str>,
    /// Its cohort header.
    pub cohort: Option<&'a str>,
    /// Its request id (the draw's key without a session).
    pub request_id: &'a str,
}

/// Everything a router must not forget across a restart: policies (the kill switch among them), their
/// undo stacks and the history. Saved whole as JSON after every change, and in a fleet shared whole in
/// Redis under a revision.
#[derive(Default, Clone, Serialize, Deserialize)]
struct State {
    policies: HashMap<String, Policy>,
    undo: HashMap<String, Vec<Policy>>,
    history: VecDeque<Change>,
    /// The fleet's revision of this state (0: never shared).
    #[serde(default)]
    revision: u64,
}

/// Every model's policy, its undo stack and the change history.
#[derive(Default)]
pub struct Traffic {
    state: RwLock<State>,
    /// Where the state is saved; `None` keeps it in memory only.
    store: Option<PathBuf>,
    /// The fleet the state is shared with, and the in-flight requests its kill switches cancel.
    fleet: OnceLock<(Arc<Cluster>, Arc<InFlight>)>,
}

/// FNV-1a: a stable hash, so a session keeps its version across router restarts and replicas.
fn stable_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Traffic {
    /// A traffic state saved to `store` after every change and read back from it now, so that a restart
    /// keeps a disabled version disabled. A file that cannot be read is set aside (`.unreadable`) with an
    /// error in the log, and the router starts with no policy.
    pub fn persisted(store: Option<PathBuf>) -> Traffic {
        let state = match &store {
            Some(path) if path.exists() => match std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<State>(&b).map_err(|e| e.to_string()))
            {
                Ok(state) => {
                    tracing::info!(path = %path.display(), models = state.policies.len(), "traffic policy restored");
                    for (model, policy) in &state.policies {
                        publish(model, PolicyAction::Restore, &Policy::default(), policy);
                    }
                    state
                }
                Err(e) => {
                    let aside = path.with_extension("unreadable");
                    let _ = std::fs::rename(path, &aside);
                    tracing::error!(path = %path.display(), aside = %aside.display(), error = %e, "the saved traffic policy is unreadable; starting without one");
                    State::default()
                }
            },
            _ => State::default(),
        };
        Traffic {
            state: RwLock::new(state),
            store,
            fleet: OnceLock::new(),
        }
    }

    /// Writes the state next to its file, flushes it to disk, and renames it over, so that a crash or a
    /// power loss leaves the old state or the new, never an empty file.
    fn save(&self, state: &State) {
        use std::io::Write;
        let Some(path) = &self.store else { return };
        let partial = path.with_extension("partial");
        let write = || -> std::io::Result<()> {
            let bytes = serde_json::to_vec_pretty(state)?;
            let mut file = std::fs::File::create(&partial)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&partial, path)
        };
        if let Err(e) = write() {
            tracing::error!(path = %path.display(), error = %e, "the traffic policy could not be saved; a restart would lose this change");
        }
    }

    /// The policy of `model` (empty when never set).
    pub fn policy(&self, model: &str) -> Policy {
        self.state
            .read()
            .expect("traffic lock")
            .policies
            .get(model)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether `model` has a policy at all (most servers have none: the pool alone chooses).
    pub fn has_policy(&self, model: &str) -> bool {
        self.state.read().expect("traffic lock").policies.contains_key(model)
    }

    /// The change history, oldest first.
    pub fn history(&self) -> Vec<Change> {
        self.state
            .read()
            .expect("traffic lock")
            .history
            .iter()
            .cloned()
            .collect()
    }

    /// Replaces `model`'s policy with `edit` applied to it, recording the change, in this router alone
    /// (see [`Traffic::commit`] for a fleet).
    pub fn change(
        &self,
        model: &str,
        who: &str,
        action: PolicyAction,
        reason: &str,
        edit: impl FnOnce(&mut Policy),
    ) -> Policy {
        let mut state = self.state.write().expect("traffic lock");
        let (before, after) = edit_state(&mut state, model, who, action, reason, edit);
        publish(model, action, &before, &after);
        self.save(&state);
        after
    }

    /// Restores the policy before the last change, in this router alone; `None` when there is nothing to
    /// undo.
    pub fn rollback(&self, model: &str, who: &str, reason: &str) -> Option<Policy> {
        let mut state = self.state.write().expect("traffic lock");
        let (current, previous) = rollback_state(&mut state, model, who, reason)?;
        publish(model, PolicyAction::Rollback, &current, &previous);
        self.save(&state);
        Some(previous)
    }

    /// The version to send a request to, among `serving` (versions with a healthy worker). `None`: the
    /// policy has no say (no split, or nothing it allows is serving) and any serving version will do.
    pub fn choose(&self, model: &str, ask: VersionAsk<'_>, serving: &[String]) -> Option<String> {
        let state = self.state.read().expect("traffic lock");
        let policy = state.policies.get(model)?;
        let usable = |v: &str| !policy.disabled.contains(v) && serving.iter().any(|s| s == v);
        if let Some(pinned) = ask.pinned.filter(|p| !policy.disabled.contains(*p)) {
            return Some(pinned.to_string());
        }
        if let Some(version) = ask.cohort.and_then(|c| policy.cohorts.get(c)).filter(|v| usable(v)) {
            return Some(version.clone());
        }
        let weighted: Vec<(&String, u64)> = policy
            .weights
            .iter()
            .filter(|(v, w)| **w > 0 && usable(v))
            .map(|(v, w)| (v, u64::from(*w)))
            .collect();
        let total: u64 = weighted.iter().map(|(_, w)| w).sum();
        if total == 0 {
            // Nothing the split names can serve: any enabled serving version, else let the pool choose.
            return serving.iter().find(|v| !policy.disabled.contains(*v)).cloned();
        }
        let mut point = stable_hash(ask.session.unwrap_or(ask.request_id)) % total;
        for (version, weight) in weighted {
            if point < weight {
                return Some(version.clone());
            }
            point -= weight;
        }
        unreachable!("the draw falls inside the total weight")
    }
}

/// The kill switch's second half: requests in flight on a version watch its channel, and a disable with
/// `cancel_in_flight` fires it.
#[derive(Default)]
pub struct InFlight {
    versions: Mutex<HashMap<VersionId, watch::Sender<u64>>>,
}

impl InFlight {
    /// A receiver that changes when requests on `version` are to be cancelled.
    pub fn watch(&self, version: &VersionId) -> watch::Receiver<u64> {
        let mut versions = self.versions.lock().expect("in-flight lock");
        versions
            .entry(version.clone())
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe()
    }

    /// Cancels every request in flight on `version`.
    pub fn cancel(&self, version: &VersionId) {
        if let Some(tx) = self.versions.lock().expect("in-flight lock").get(version) {
            tx.send_modify(|n| *n += 1);
        }
    }
}

/// Publishes a change of `model`'s policy: the change counter, and each version's share and disabled gauge
/// (versions that left the policy read 0).
fn publish(model: &str, action: PolicyAction, before: &Policy, after: &Policy) {
    metrics::counter!(
        names::TRAFFIC_POLICY_CHANGES_TOTAL,
        names::LABEL_MODEL => model.to_string(),
        names::LABEL_ACTION => action.label(),
    )
    .increment(1);
    let enabled = |v: &str| {
        if after.disabled.contains(v) {
            0
        } else {
            after.weights.get(v).copied().unwrap_or(0)
        }
    };
    let total: u64 = after.weights.keys().map(|v| u64::from(enabled(v))).sum();
    let versions: BTreeSet<&String> = [before, after]
        .iter()
        .flat_map(|p| p.weights.keys().chain(&p.disabled))
        .collect();
    for v in versions {
        let labels = [
            (names::LABEL_MODEL, model.to_string()),
            (names::LABEL_VERSION, v.clone()),
        ];
        let share = if total == 0 {
            0.0
        } else {
            f64::from(enabled(v)) / total as f64
        };
        metrics::gauge!(names::VERSION_TRAFFIC_SHARE_RATIO, &labels).set(share);
        metrics::gauge!(names::VERSION_DISABLED, &labels).set(if after.disabled.contains(v) { 1.0 } else { 0.0 });
    }
}

/// Applies `edit` to `model`'s policy in `state`, keeping the old one for undo and recording the change;
/// returns the policy before and after.
fn edit_state(
    state: &mut State,
    model: &str,
    who: &str,
    action: PolicyAction,
    reason: &str,
    edit: impl FnOnce(&mut Policy),
) -> (Policy, Policy) {
    let before = state.policies.get(model).cloned().unwrap_or_default();
    let mut after = before.clone();
    edit(&mut after);
    let undo = state.undo.entry(model.to_string()).or_default();
    undo.push(before.clone());
    if undo.len() > UNDO {
        undo.remove(0);
    }
    state.policies.insert(model.to_string(), after.clone());
    record(state, model, who, action, &after, reason);
    (before, after)
}

/// Restores `model`'s policy before its last change in `state`; the policy before and after.
fn rollback_state(state: &mut State, model: &str, who: &str, reason: &str) -> Option<(Policy, Policy)> {
    let previous = state.undo.get_mut(model)?.pop()?;
    let current = state.policies.get(model).cloned().unwrap_or_default();
    state.policies.insert(model.to_string(), previous.clone());
    record(state, model, who, PolicyAction::Rollback, &previous, reason);
    Some((current, previous))
}

fn record(state: &mut State, model: &str, who: &str, action: PolicyAction, policy: &Policy, reason: &str) {
    let at_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut summary = format!("{model}: {}", policy.summary());
    if !reason.is_empty() {
        summary.push_str(&format!(" ({reason})"));
    }
    tracing::info!(%who, action = action.label(), %summary, "traffic policy changed");
    state.history.push_back(Change {
        at_unix_ms,
        who: who.to_string(),
        action,
        summary,
    });
    if state.history.len() > HISTORY {
        state.history.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versions() -> Vec<String> {
        vec!["stable".into(), "canary".into()]
    }

    fn split(t: &Traffic, stable: u32, canary: u32) {
        t.change("m", "test", PolicyAction::Set, "", |p| {
            p.weights = [("stable".to_string(), stable), ("canary".to_string(), canary)].into();
        });
    }

    fn ask(id: &str) -> VersionAsk<'_> {
        VersionAsk {
            request_id: id,
            ..VersionAsk::default()
        }
    }

    #[test]
    fn the_observed_split_follows_the_weights() {
        let t = Traffic::default();
        split(&t, 95, 5);
        let n = 20_000;
        let canary = (0..n)
            .filter(|i| t.choose("m", ask(&format!("req-{i}")), &versions()).as_deref() == Some("canary"))
            .count();
        // Binomial(20000, 0.05): sd = 30.8; 5 sd either side.
        assert!((846..=1154).contains(&canary), "canary got {canary} of {n}");
    }

    #[test]
    fn a_session_keeps_its_version_and_sessions_spread() {
        let t = Traffic::default();
        split(&t, 50, 50);
        let pick = |s: &str, id: &str| {
            t.choose(
                "m",
                VersionAsk {
                    session: Some(s),
                    ..ask(id)
                },
                &versions(),
            )
        };
        let mut seen = BTreeSet::new();
        for user in 0..200 {
            let session = format!("user-{user}");
            let first = pick(&session, "a").unwrap();
            for i in 0..20 {
                assert_eq!(pick(&session, &format!("r{i}")).unwrap(), first, "{session}");
            }
            seen.insert(first);
        }
        assert_eq!(seen.len(), 2, "sessions land on both versions");
    }

    #[test]
    fn disable_moves_every_request_and_rollback_restores_the_split() {
        let t = Traffic::default();
        split(&t, 50, 50);
        t.change("m", "ops", PolicyAction::Disable, "bad canary", |p| {
            p.disabled.insert("canary".into());
        });
        for i in 0..500 {
            let id = format!("r{i}");
            assert_eq!(t.choose("m", ask(&id), &versions()).unwrap(), "stable");
            // A pin to the disabled version moves too.
            let pinned = VersionAsk {
                pinned: Some("canary"),
                ..ask(&id)
            };
            assert_eq!(t.choose("m", pinned, &versions()).unwrap(), "stable");
        }
        let restored = t.rollback("m", "ops", "fixed").unwrap();
        assert!(restored.disabled.is_empty());
        assert_eq!(restored.weights["canary"], 50);
        let history = t.history();
        let actions: Vec<&str> = history.iter().map(|c| c.action.label()).collect();
        assert_eq!(actions, ["set", "disable", "rollback"]);
        assert_eq!(history[1].who, "ops");
        assert!(history[1].summary.contains("disabled canary") && history[1].summary.contains("bad canary"));
        assert!(t.rollback("m", "ops", "").is_some());
        assert!(t.rollback("m", "ops", "").is_none(), "nothing left to undo");
    }

    #[test]
    fn cohorts_and_unavailable_versions() {
        let t = Traffic::default();
        split(&t, 100, 0);
        t.change("m", "ops", PolicyAction::Set, "", |p| {
            p.cohorts.insert("beta".into(), "canary".into());
        });
        let beta = VersionAsk {
            cohort: Some("beta"),
            ..ask("x")
        };
        assert_eq!(t.choose("m", beta, &versions()).unwrap(), "canary");
        // The cohort's version has no healthy worker: the split decides.
        assert_eq!(t.choose("m", beta, &["stable".to_string()]).unwrap(), "stable");
        // Nothing the split names is serving: another enabled version that is.
        assert_eq!(t.choose("m", ask("y"), &["canary".to_string()]).unwrap(), "canary");
        // No policy for a model: the pool decides.
        assert_eq!(t.choose("other", ask("z"), &versions()), None);
    }

    #[test]
    fn shares_and_the_kill_switch_are_published_per_version() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let t = Traffic::default();
        let gauges = || {
            let mut g: Vec<(String, String, f64)> = snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .filter_map(|(k, _, _, v)| {
                    let key = k.key();
                    let version = key
                        .labels()
                        .find(|l| l.key() == names::LABEL_VERSION)?
                        .value()
                        .to_string();
                    match v {
                        DebugValue::Gauge(x) => Some((key.name().to_string(), version, x.into_inner())),
                        _ => None,
                    }
                })
                .collect();
            g.sort_by(|a, b| a.partial_cmp(b).unwrap());
            g
        };
        let (share, disabled) = (names::VERSION_TRAFFIC_SHARE_RATIO, names::VERSION_DISABLED);
        metrics::with_local_recorder(&recorder, || split(&t, 75, 25));
        assert_eq!(
            gauges(),
            [
                (disabled.into(), "canary".into(), 0.0),
                (disabled.into(), "stable".into(), 0.0),
                (share.into(), "canary".into(), 0.25),
                (share.into(), "stable".into(), 0.75),
            ]
        );
        metrics::with_local_recorder(&recorder, || {
            t.change("m", "ops", PolicyAction::Disable, "", |p| {
                p.disabled.insert("canary".into());
            })
        });
        let after_disable = gauges();
        assert!(after_disable.contains(&(disabled.into(), "canary".into(), 1.0)));
        assert!(after_disable.contains(&(share.into(), "canary".into(), 0.0)));
        assert!(after_disable.contains(&(share.into(), "stable".into(), 1.0)));
        metrics::with_local_recorder(&recorder, || t.rollback("m", "ops", ""));
        assert!(gauges().contains(&(share.into(), "canary".into(), 0.25)));
        let changes = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, _, _, _)| k.key().name() == names::TRAFFIC_POLICY_CHANGES_TOTAL)
            .count();
        assert_eq!(changes, 3, "one counter per action: set, disable, rollback");
    }

    #[test]
    fn a_saved_policy_survives_a_restart_and_an_unreadable_file_is_set_aside() {
        let dir = std::env::temp_dir().join(format!("ferroserve-traffic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("traffic.json");
        let _ = std::fs::remove_file(&path);
        let t = Traffic::persisted(Some(path.clone()));
        t.change("m", "ops", PolicyAction::Set, "canary", |p| {
            p.weights = BTreeMap::from([("a".into(), 9), ("b".into(), 1)]);
        });
        t.change("m", "ops", PolicyAction::Disable, "bad canary", |p| {
            p.disabled.insert("b".into());
        });
        drop(t);
        let again = Traffic::persisted(Some(path.clone()));
        assert!(
            again.policy("m").disabled.contains("b"),
            "the kill switch holds across a restart"
        );
        assert_eq!(again.history().len(), 2);
        assert_eq!(
            again.rollback("m", "ops", "").map(|p| p.disabled.len()),
            Some(0),
            "undo survives too"
        );
        std::fs::write(&path, "{ not json").unwrap();
        let fresh = Traffic::persisted(Some(path.clone()));
        assert!(!fresh.has_policy("m"));
        assert!(path.with_extension("unreadable").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
