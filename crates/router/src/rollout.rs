//! Automatic canary analysis. A rollout moves unpinned traffic from a baseline version to a canary in steps
//! (a weight and a minimum duration each). Every tick it compares the canary's requests in the current
//! step (or in a sliding window of the step's last `window_ms`) with the baseline's ([`Observations`]) on error rate, p95 TTFT and ITL, output-filter block rate
//! and token drift (mean sampled-token logprob and entropy, output length):
//! - a breach of any threshold rolls back at once: the canary is disabled, the baseline takes all
//!   traffic, and the reason goes into the traffic history and the rollout's decisions;
//! - a step that has lasted its minimum duration with enough requests on both sides promotes to the next;
//! - after the last step the canary has all traffic.
//!
//! One rollout per model; starting another supersedes it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use ferroserve_cluster::Cluster;
use ferroserve_core::VersionId;
use ferroserve_proto::v1 as pb;
use ferroserve_telemetry::names;
use serde::{Deserialize, Serialize};

mod fleet;

pub use fleet::share_observations;

use crate::observe::{Observations, Summary};
use crate::pool::Pool;
use crate::traffic::{Policy, PolicyAction, Traffic};
use crate::{ModelSelector, RouterError};

/// How often a running rollout is judged.
const TICK: Duration = Duration::from_millis(50);
/// The name rollouts write into the traffic history.
const WHO: &str = "canary-analysis";

/// A rollout's plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// Model name.
    pub model: String,
    /// The version traffic comes from.
    pub baseline: String,
    /// The version traffic goes to.
    pub canary: String,
    /// (canary weight in percent, minimum duration) per step.
    pub steps: Vec<(u32, Duration)>,
    /// Limits on the canary against the baseline.
    #[serde(with = "fleet::thresholds")]
    pub thresholds: pb::RolloutThresholds,
}

/// Why the canary breaches, if it does.
pub fn breach(t: &pb::RolloutThresholds, canary: &Summary, baseline: &Summary) -> Option<String> {
    let over = |limit: f64, value: f64| limit > 0.0 && value > limit;
    let ratio = |c: f64, b: f64| if b > 0.0 { c / b } else { 1.0 };
    if over(t.max_error_rate_increase, canary.error_rate - baseline.error_rate) {
        return Some(format!(
            "error rate {:.3} against baseline {:.3} (allowed +{})",
            canary.error_rate, baseline.error_rate, t.max_error_rate_increase
        ));
    }
    if over(t.max_ttft_p95_ratio, ratio(canary.ttft_p95_ms, baseline.ttft_p95_ms)) {
        return Some(format!(
            "TTFT p95 {:.1} ms against baseline {:.1} ms (allowed {}x)",
            canary.ttft_p95_ms, baseline.ttft_p95_ms, t.max_ttft_p95_ratio
        ));
    }
    if over(t.max_itl_p95_ratio, ratio(canary.itl_p95_ms, baseline.itl_p95_ms)) {
        return Some(format!(
            "ITL p95 {:.1} ms against baseline {:.1} ms (allowed {}x)",
            canary.itl_p95_ms, baseline.itl_p95_ms, t.max_itl_p95_ratio
        ));
    }
    if over(t.max_block_rate_increase, canary.block_rate - baseline.block_rate) {
        return Some(format!(
            "filter block rate {:.3} against baseline {:.3} (allowed +{})",
            canary.block_rate, baseline.block_rate, t.max_block_rate_increase
        ));
    }
    if over(t.max_logprob_drop, baseline.mean_logprob - canary.mean_logprob) {
        return Some(format!(
            "token drift: mean logprob {:.3} against baseline {:.3} (allowed -{})",
            canary.mean_logprob, baseline.mean_logprob, t.max_logprob_drop
        ));
    }
    if over(t.max_entropy_increase, canary.mean_entropy - baseline.mean_entropy) {
        return Some(format!(
            "token drift: mean entropy {:.3} nats against baseline {:.3} (allowed +{})",
            canary.mean_entropy, baseline.mean_entropy, t.max_entropy_increase
        ));
    }
    if over(
        t.max_length_change,
        (ratio(canary.mean_tokens, baseline.mean_tokens) - 1.0).abs(),
    ) {
        return Some(format!(
            "token drift: mean output length {:.1} against baseline {:.1} (allowed ±{})",
            canary.mean_tokens, baseline.mean_tokens, t.max_length_change
        ));
    }
    None
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Status {
    /// Judged every tick.
    Running,
    /// The canary has all traffic.
    Promoted,
    /// A threshold was breached: the canary is disabled.
    RolledBack,
    /// An operator disabled the canary.
    Stopped,
    /// Another rollout of the model replaced it.
    Superseded,
}

impl Status {
    /// The wire enum.
    pub(crate) fn to_wire(self) -> pb::RolloutStatus {
        match self {
            Status::Running => pb::RolloutStatus::Running,
            Status::Promoted => pb::RolloutStatus::Promoted,
            Status::RolledBack => pb::RolloutStatus::RolledBack,
            Status::Stopped => pb::RolloutStatus::Stopped,
            Status::Superseded => pb::RolloutStatus::Superseded,
        }
    }

    /// The wire word (`RolloutState.status`).
    pub(crate) fn label(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Promoted => "promoted",
            Status::RolledBack => "rolled_back",
            Status::Stopped => "stopped",
            Status::Superseded => "superseded",
        }
    }
}

/// One model's rollout as it stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Run {
    plan: Plan,
    /// Random per start: a judge whose id is stale stops.
    id: u64,
    status: Status,
    step: usize,
    decisions: Vec<String>,
    /// When the current step began (wall clock, so that another replica's judge can continue it).
    step_started: SystemTime,
    /// The fencing token of the judge that last wrote (0 alone): a deposed judge's write is refused.
    judge: u64,
    /// The replica whose judge last wrote (empty alone).
    #[serde(default)]
    judged_by: String,
}

/// What a judge needs: where traffic goes, what each version did, the workers.
#[derive(Clone)]
struct Judging {
    traffic: Arc<Traffic>,
    observations: Arc<Observations>,
    pool: Arc<Pool>,
}

/// Every model's rollout.
#[derive(Default)]
pub struct Rollouts {
    runs: Mutex<HashMap<String, Run>>,
    /// In a fleet: the shared state's revision, the judges running here, and what they need.
    fleet: OnceLock<fleet::Shared>,
}

impl Rollouts {
    /// Starts `plan` (replacing a running rollout of its model). Alone, its judge runs here; in a fleet, on
    /// whichever replica leads the model's judging.
    pub async fn start(
        self: &Arc<Self>,
        plan: Plan,
        traffic: Arc<Traffic>,
        observations: Arc<Observations>,
        pool: Arc<Pool>,
    ) -> Result<pb::RolloutState, RouterError> {
        let model = plan.model.clone();
        let run = Run {
            plan,
            id: rand::random::<u64>() >> 1,
            status: Status::Running,
            step: 0,
            decisions: Vec::new(),
            step_started: SystemTime::now(),
            judge: 0,
            judged_by: String::new(),
        };
        let id = run.id;
        self.put(run).await?;
        self.enter_step(&model, id, 0, 0, &traffic).await;
        if self.fleet.get().is_none() {
            let (rollouts, judged) = (Arc::clone(self), model.clone());
            let judging = Judging {
                traffic,
                observations,
                pool,
            };
            tokio::spawn(async move { rollouts.control(judged, id, judging, None).await });
        }
        Ok(self.state(&model))
    }

    /// Records a new run, superseding a running one of its model.
    async fn put(&self, run: Run) -> Result<(), RouterError> {
        let supersede = |runs: &mut HashMap<String, Run>| {
            if let Some(old) = runs.get_mut(&run.plan.model).filter(|r| r.status == Status::Running) {
                old.status = Status::Superseded;
            }
            runs.insert(run.plan.model.clone(), run.clone());
        };
        match self.fleet.get() {
            None => supersede(&mut self.runs.lock().expect("rollout lock")),
            Some(shared) => {
                shared
                    .cluster
                    .commit_doc(self, |bytes| {
                        let mut runs = fleet::parse(bytes);
                        supersede(&mut runs);
                        Some((fleet::encode(&runs), ()))
                    })
                    .await?;
            }
        }
        Ok(())
    }

    /// The rollout of `model` ("none" when there never was one).
    pub fn state(&self, model: &str) -> pb::RolloutState {
        let runs = self.runs.lock().expect("rollout lock");
        let Some(r) = runs.get(model) else {
            return pb::RolloutState {
                model: model.to_string(),
                status: "none".into(),
                status_code: pb::RolloutStatus::None as i32,
                ..Default::default()
            };
        };
        pb::RolloutState {
            model: model.to_string(),
            baseline: r.plan.baseline.clone(),
            canary: r.plan.canary.clone(),
            status: r.status.label().into(),
            status_code: r.status.to_wire() as i32,
            step: r.step as u32,
            steps: r
                .plan
                .steps
                .iter()
                .map(|(w, d)| pb::RolloutStep {
                    weight: *w,
                    min_duration_ms: d.as_millis() as u64,
                })
                .collect(),
            decisions: r.decisions.clone(),
            judge: r.judged_by.clone(),
        }
    }

    /// The run `id` of `model`, if it is still the model's.
    fn run(&self, model: &str, id: u64) -> Option<Run> {
        self.runs
            .lock()
            .expect("rollout lock")
            .get(model)
            .filter(|r| r.id == id)
            .cloned()
    }

    /// Changes run `id` of `model` with `change` if it is still running at step `at_step` and no newer
    /// judge wrote it; true when changed. In a fleet the change is a compare-and-set on the shared state,
    /// fenced by `token`.
    async fn transition(&self, model: &str, id: u64, token: u64, at_step: usize, change: impl Fn(&mut Run)) -> bool {
        let me = self.fleet.get().map(|s| s.cluster.state().replica).unwrap_or_default();
        let apply = |runs: &mut HashMap<String, Run>| {
            let run = runs
                .get_mut(model)
                .filter(|r| r.id == id && r.status == Status::Running && r.judge <= token && r.step == at_step)?;
            run.judge = token;
            if token > 0 {
                run.judged_by = me.clone();
            }
            change(run);
            Some(())
        };
        match self.fleet.get() {
            None => apply(&mut self.runs.lock().expect("rollout lock")).is_some(),
            Some(shared) => {
                let committed = shared
                    .cluster
                    .commit_doc(self, |bytes| {
                        let mut runs = fleet::parse(bytes);
                        apply(&mut runs)?;
                        Some((fleet::encode(&runs), ()))
                    })
                    .await;
                match committed {
                    Ok(done) => done.is_some(),
                    Err(e) => {
                        tracing::warn!(%model, error = %e, "the rollout's decision could not be recorded; judging again");
                        false
                    }
                }
            }
        }
    }

    /// Moves run `id` to step `step` (recording it) and sets its split.
    async fn enter_step(&self, model: &str, id: u64, step: usize, token: u64, traffic: &Traffic) -> bool {
        let Some(run) = self.run(model, id) else { return false };
        let (weight, _) = run.plan.steps[step];
        let (baseline, canary) = (run.plan.baseline.clone(), run.plan.canary.clone());
        let decision = format!("step {}: canary {canary} at {weight} %", step + 1);
        let at = step.saturating_sub(1);
        // Claim the step (fenced), set its split, then record it: whoever reads the step sees its split.
        if !self.transition(model, id, token, at, |_| {}).await {
            return false;
        }
        // Only the start re-enables the canary: later steps must not undo an operator's kill switch made
        // meanwhile (the next judgement then stops the rollout).
        commit_retrying(traffic, model, PolicyAction::Set, &decision, |p| {
            p.weights = [(baseline.clone(), 100 - weight), (canary.clone(), weight)].into();
            if step == 0 {
                p.disabled.remove(&canary);
            }
        })
        .await;
        let entered = self
            .transition(model, id, token, at, |r| {
                r.step = step;
                r.step_started = SystemTime::now();
                r.decisions.push(decision.clone());
            })
            .await;
        if !entered {
            return false;
        }
        metrics::gauge!(names::ROLLOUT_CANARY_WEIGHT, names::LABEL_MODEL => model.to_string()).set(f64::from(weight));
        if step > 0 {
            metrics::counter!(names::ROLLOUT_DECISIONS_TOTAL, names::LABEL_MODEL => model.to_string(), names::LABEL_DECISION => "promote").increment(1);
        }
        true
    }

    /// Ends run `id` with `status`, recording `decision`.
    async fn finish(&self, model: &str, run: &Run, token: u64, status: Status, decision: String) -> bool {
        self.transition(model, run.id, token, run.step, |r| {
            r.status = status;
            r.decisions.push(decision.clone());
        })
        .await
    }

    /// The judge of run `id`: every tick, if this replica leads the model's judging (always, alone),
    /// compares canary and baseline over the step's window and promotes, rolls back or waits.
    async fn control(self: Arc<Self>, model: String, id: u64, judging: Judging, cluster: Option<Arc<Cluster>>) {
        let every = cluster.as_ref().map_or(TICK, |c| c.heartbeat_interval().max(TICK));
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let Some(run) = self.run(&model, id) else { return };
            if run.status != Status::Running {
                return;
            }
            let token = match &cluster {
                None => 0,
                Some(c) => match c.lead(&format!("judge:{model}")).await {
                    Some(token) => token,
                    None => continue,
                },
            };
            if !self.judge(&model, &run, token, &judging, cluster.as_deref()).await {
                return;
            }
        }
    }

    /// One judgement of `run`; false once it ended.
    async fn judge(&self, model: &str, run: &Run, token: u64, j: &Judging, cluster: Option<&Cluster>) -> bool {
        let id = run.id;
        // An operator's kill switch wins: the rollout stops rather than re-enable the canary.
        if j.traffic.policy(model).disabled.contains(&run.plan.canary) {
            let decision = format!("stopped at step {}: an operator disabled the canary", run.step + 1);
            metrics::gauge!(names::ROLLOUT_CANARY_WEIGHT, names::LABEL_MODEL => model.to_string()).set(0.0);
            // Not recorded (Redis, or another judge): judge again; the run's state decides.
            return !self.finish(model, run, token, Status::Stopped, decision).await;
        }
        let qualified = |v: &str| VersionId::new(model, v).to_string();
        let step_started = instant_of(run.step_started);
        let since = window_start(step_started, Instant::now(), run.plan.thresholds.window_ms);
        let (canary, baseline) = match cluster {
            None => (
                j.observations.summary(&qualified(&run.plan.canary), since),
                j.observations.summary(&qualified(&run.plan.baseline), since),
            ),
            Some(c) => (
                fleet::summary(c, &qualified(&run.plan.canary), since).await,
                fleet::summary(c, &qualified(&run.plan.baseline), since).await,
            ),
        };
        let min = run.plan.thresholds.min_requests.max(1) as usize;
        if canary.requests < min {
            return true;
        }
        if let Some(reason) = breach(&run.plan.thresholds, &canary, &baseline) {
            let decision = format!("rolled back at step {}: {reason}", run.step + 1);
            // Claim the decision (fenced), take the canary out of traffic, then record it: whoever reads
            // "rolled_back" finds the canary disabled.
            if !self.transition(model, id, token, run.step, |_| {}).await {
                return true;
            }
            let (baseline_v, canary_v) = (run.plan.baseline.clone(), run.plan.canary.clone());
            commit_retrying(&j.traffic, model, PolicyAction::Disable, &decision, |p| {
                p.weights = [(baseline_v.clone(), 100)].into();
                p.disabled.insert(canary_v.clone());
            })
            .await;
            if !self
                .finish(model, run, token, Status::RolledBack, decision.clone())
                .await
            {
                return true;
            }
            tracing::warn!(%model, %decision, "canary rolled back");
            metrics::gauge!(names::ROLLOUT_CANARY_WEIGHT, names::LABEL_MODEL => model.to_string()).set(0.0);
            metrics::counter!(names::ROLLOUT_DECISIONS_TOTAL, names::LABEL_MODEL => model.to_string(), names::LABEL_DECISION => "rollback").increment(1);
            return false;
        }
        let (_, min_duration) = run.plan.steps[run.step];
        // The baseline must be judged too, unless the canary already has all the traffic.
        let baseline_seen = baseline.requests >= min || run.plan.steps[run.step].0 >= 100;
        if step_started.elapsed() < min_duration || !baseline_seen {
            return true;
        }
        if run.step + 1 == run.plan.steps.len() {
            let taken = take_drift_baseline(&j.pool, model, &run.plan.canary).await;
            let decision = format!("promoted: canary {} has all traffic; {taken}", run.plan.canary);
            return !self.finish(model, run, token, Status::Promoted, decision).await;
        }
        self.enter_step(model, id, run.step + 1, token, &j.traffic).await;
        true
    }
}

/// A rollout's traffic change, tried again for a few seconds if the fleet's store does not take it: a
/// recorded decision must reach traffic.
async fn commit_retrying(
    traffic: &Traffic,
    model: &str,
    action: PolicyAction,
    decision: &str,
    edit: impl Fn(&mut Policy),
) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    for attempt in 1..=20 {
        tick.tick().await;
        match traffic.commit(model, WHO, action, decision, &edit).await {
            Ok(_) => return,
            Err(e) => {
                tracing::error!(%model, attempt, error = %e, "the rollout's traffic change did not commit; retrying")
            }
        }
    }
}

/// The instant a wall-clock time corresponds to on this machine's monotonic clock.
fn instant_of(at: SystemTime) -> Instant {
    let ago = SystemTime::now().duration_since(at).unwrap_or_default();
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

/// Where the judged window starts: the step's start, or `window_ms` before `now` when that is later.
fn window_start(step_started: Instant, now: Instant, window_ms: u64) -> Instant {
    if window_ms == 0 {
        return step_started;
    }
    now.checked_sub(Duration::from_millis(window_ms))
        .map_or(step_started, |w| w.max(step_started))
}

/// Takes the promoted version's drift baseline on each of its workers, so that token drift is measured
/// against the distribution it was promoted with; says what was taken.
async fn take_drift_baseline(pool: &Pool, model: &str, version: &str) -> String {
    let selector = ModelSelector::Pinned {
        name: model.to_string(),
        version: version.to_string(),
    };
    let (mut workers, mut tokens, mut failed) = (0, 0, 0);
    for backend in pool.matching(&selector).unwrap_or_default() {
        match backend.snapshot_drift_baseline().await {
            Ok(n) => (workers, tokens) = (workers + 1, tokens + n),
            Err(e) => {
                failed += 1;
                tracing::warn!(%model, %version, worker = backend.location(), error = %e, "drift baseline not taken");
            }
        }
    }
    let mut said = format!("drift baseline taken on {workers} worker(s) ({tokens} tokens)");
    if failed > 0 {
        said.push_str(&format!(", {failed} worker(s) failed"));
    }
    said
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(error_rate: f64, ttft: f64, logprob: f64, tokens: f64) -> Summary {
        with_entropy(error_rate, ttft, logprob, tokens, 1.0)
    }

    fn with_entropy(error_rate: f64, ttft: f64, logprob: f64, tokens: f64, entropy: f64) -> Summary {
        Summary {
            requests: 100,
            error_rate,
            ttft_p95_ms: ttft,
            itl_p95_ms: 10.0,
            block_rate: 0.0,
            mean_logprob: logprob,
            mean_entropy: entropy,
            mean_tokens: tokens,
        }
    }

    #[test]
    fn each_threshold_names_its_breach_and_zero_turns_it_off() {
        let t = pb::RolloutThresholds {
            min_requests: 10,
            max_error_rate_increase: 0.02,
            max_ttft_p95_ratio: 1.5,
            max_logprob_drop: 0.5,
            max_length_change: 0.5,
            max_entropy_increase: 0.5,
            ..Default::default()
        };
        let base = summary(0.01, 100.0, -1.0, 50.0);
        assert_eq!(breach(&t, &summary(0.02, 120.0, -1.2, 60.0), &base), None);
        assert!(
            breach(&t, &summary(0.10, 100.0, -1.0, 50.0), &base)
                .unwrap()
                .contains("error rate")
        );
        assert!(
            breach(&t, &summary(0.01, 200.0, -1.0, 50.0), &base)
                .unwrap()
                .contains("TTFT p95")
        );
        assert!(
            breach(&t, &summary(0.01, 100.0, -3.0, 50.0), &base)
                .unwrap()
                .contains("mean logprob")
        );
        assert!(
            breach(&t, &summary(0.01, 100.0, -1.0, 10.0), &base)
                .unwrap()
                .contains("output length")
        );
        assert!(
            breach(&t, &with_entropy(0.01, 100.0, -1.0, 50.0, 2.0), &base)
                .unwrap()
                .contains("mean entropy")
        );
        assert_eq!(breach(&t, &with_entropy(0.01, 100.0, -1.0, 50.0, 0.2), &base), None);
        let off = pb::RolloutThresholds::default();
        assert_eq!(breach(&off, &summary(0.9, 1e6, -50.0, 1.0), &base), None);
    }

    #[test]
    fn the_window_slides_within_the_step() {
        let start = Instant::now();
        let now = start + Duration::from_secs(300);
        assert_eq!(window_start(start, now, 0), start, "0: the whole step");
        assert_eq!(window_start(start, now, 60_000), now - Duration::from_secs(60));
        assert_eq!(window_start(start, now, 600_000), start, "never before the step began");
    }
}
