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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferroserve_proto::v1 as pb;
use ferroserve_telemetry::names;

use crate::ModelSelector;
use crate::observe::{Observations, Summary};
use crate::pool::Pool;
use crate::traffic::Traffic;

/// How often a running rollout is judged.
const TICK: Duration = Duration::from_millis(50);
/// The name rollouts write into the traffic history.
const WHO: &str = "canary-analysis";

/// A rollout's plan.
#[derive(Debug, Clone)]
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

/// One model's rollout as it stands.
#[derive(Debug, Clone)]
struct Run {
    plan: Plan,
    /// Bumped by every start: a controller whose id is stale stops.
    id: u64,
    status: &'static str,
    step: usize,
    decisions: Vec<String>,
}

/// Every model's rollout.
#[derive(Default)]
pub struct Rollouts {
    runs: Mutex<HashMap<String, Run>>,
    next_id: Mutex<u64>,
}

impl Rollouts {
    /// Starts `plan` (replacing a running rollout of its model) and its controller task.
    pub async fn start(
        self: &Arc<Self>,
        plan: Plan,
        traffic: Arc<Traffic>,
        observations: Arc<Observations>,
        pool: Arc<Pool>,
    ) -> pb::RolloutState {
        let id = {
            let mut next = self.next_id.lock().expect("rollout lock");
            *next += 1;
            *next
        };
        let model = plan.model.clone();
        {
            let mut runs = self.runs.lock().expect("rollout lock");
            if let Some(old) = runs.get_mut(&model).filter(|r| r.status == "running") {
                old.status = "superseded";
            }
            runs.insert(
                model.clone(),
                Run {
                    plan,
                    id,
                    status: "running",
                    step: 0,
                    decisions: Vec::new(),
                },
            );
        }
        self.enter_step(&model, id, 0, &traffic).await;
        let state = self.state(&model);
        let rollouts = Arc::clone(self);
        tokio::spawn(async move { rollouts.control(model, id, traffic, observations, pool).await });
        state
    }

    /// The rollout of `model` ("none" when there never was one).
    pub fn state(&self, model: &str) -> pb::RolloutState {
        let runs = self.runs.lock().expect("rollout lock");
        let Some(r) = runs.get(model) else {
            return pb::RolloutState {
                model: model.to_string(),
                status: "none".into(),
                ..Default::default()
            };
        };
        pb::RolloutState {
            model: model.to_string(),
            baseline: r.plan.baseline.clone(),
            canary: r.plan.canary.clone(),
            status: r.status.into(),
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
        }
    }

    /// Sets the split for step `step` and records it.
    async fn enter_step(&self, model: &str, id: u64, step: usize, traffic: &Traffic) {
        let (weight, baseline, canary, decision) = {
            let mut runs = self.runs.lock().expect("rollout lock");
            let Some(run) = runs.get_mut(model).filter(|r| r.id == id) else {
                return;
            };
            let (weight, _) = run.plan.steps[step];
            let (baseline, canary) = (run.plan.baseline.clone(), run.plan.canary.clone());
            run.step = step;
            let decision = format!("step {}: canary {canary} at {weight} %", step + 1);
            run.decisions.push(decision.clone());
            (weight, baseline, canary, decision)
        };
        let set = traffic
            .commit(model, WHO, "set", &decision, |p| {
                p.weights = [(baseline.clone(), 100 - weight), (canary.clone(), weight)].into();
                p.disabled.remove(&canary);
            })
            .await;
        if let Err(e) = set {
            tracing::error!(%model, error = %e, "the rollout could not set its step's split");
        }
        metrics::gauge!(names::ROLLOUT_CANARY_WEIGHT, names::LABEL_MODEL => model.to_string()).set(f64::from(weight));
        if step > 0 {
            metrics::counter!(names::ROLLOUT_DECISIONS_TOTAL, names::LABEL_MODEL => model.to_string(), names::LABEL_DECISION => "promote").increment(1);
        }
    }

    /// Ends the rollout with `status`, recording `decision`.
    fn finish(&self, model: &str, id: u64, status: &'static str, decision: String) {
        let mut runs = self.runs.lock().expect("rollout lock");
        if let Some(run) = runs.get_mut(model).filter(|r| r.id == id) {
            run.status = status;
            run.decisions.push(decision);
        }
    }

    async fn control(
        self: Arc<Self>,
        model: String,
        id: u64,
        traffic: Arc<Traffic>,
        observations: Arc<Observations>,
        pool: Arc<Pool>,
    ) {
        let mut step_started = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            let Some(run) = self
                .runs
                .lock()
                .expect("rollout lock")
                .get(&model)
                .filter(|r| r.id == id)
                .cloned()
            else {
                return;
            };
            if run.status != "running" {
                return;
            }
            // An operator's kill switch wins: the rollout stops rather than re-enable the canary.
            if traffic.policy(&model).disabled.contains(&run.plan.canary) {
                let decision = format!("stopped at step {}: an operator disabled the canary", run.step + 1);
                metrics::gauge!(names::ROLLOUT_CANARY_WEIGHT, names::LABEL_MODEL => model.clone()).set(0.0);
                self.finish(&model, id, "stopped", decision);
                return;
            }
            let qualified = |v: &str| format!("{model}@{v}");
            let since = window_start(step_started, Instant::now(), run.plan.thresholds.window_ms);
            let canary = observations.summary(&qualified(&run.plan.canary), since);
            let baseline = observations.summary(&qualified(&run.plan.baseline), since);
            let min = run.plan.thresholds.min_requests.max(1) as usize;
            if canary.requests < min {
                continue;
            }
            if let Some(reason) = breach(&run.plan.thresholds, &canary, &baseline) {
                let decision = format!("rolled back at step {}: {reason}", run.step + 1);
                let (baseline_v, canary_v) = (run.plan.baseline.clone(), run.plan.canary.clone());
                let rolled_back = traffic
                    .commit(&model, WHO, "disable", &decision, |p| {
                        p.weights = [(baseline_v.clone(), 100)].into();
                        p.disabled.insert(canary_v.clone());
                    })
                    .await;
                if let Err(e) = rolled_back {
                    // Try again next tick: a breached canary must not stay in traffic.
                    tracing::error!(%model, error = %e, "could not roll the canary back; retrying");
                    continue;
                }
                tracing::warn!(%model, %decision, "canary rolled back");
                metrics::gauge!(names::ROLLOUT_CANARY_WEIGHT, names::LABEL_MODEL => model.clone()).set(0.0);
                metrics::counter!(names::ROLLOUT_DECISIONS_TOTAL, names::LABEL_MODEL => model.clone(), names::LABEL_DECISION => "rollback").increment(1);
                self.finish(&model, id, "rolled_back", decision);
                return;
            }
            let (_, min_duration) = run.plan.steps[run.step];
            // The baseline must be judged too, unless the canary already has all the traffic.
            let baseline_seen = baseline.requests >= min || run.plan.steps[run.step].0 >= 100;
            if step_started.elapsed() < min_duration || !baseline_seen {
                continue;
            }
            if run.step + 1 == run.plan.steps.len() {
                let baseline = take_drift_baseline(&pool, &model, &run.plan.canary).await;
                let decision = format!("promoted: canary {} has all traffic; {baseline}", run.plan.canary);
                self.finish(&model, id, "promoted", decision);
                return;
            }
            self.enter_step(&model, id, run.step + 1, &traffic).await;
            step_started = Instant::now();
        }
    }
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
