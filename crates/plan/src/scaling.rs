//! The worker autoscaling rules of `deploy/k8s/components/keda` (and the equivalent HPA), as data, and
//! the Horizontal Pod Autoscaler's algorithm that applies them. The simulator scales with these; a test
//! (`tests/deploy.rs`) checks that the manifests say the same.

use std::collections::VecDeque;

use serde::Serialize;

/// How a trigger's value becomes a replica count (KEDA's `metricType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MetricType {
    /// The fleet total divided by the threshold: replicas = ceil(value / threshold).
    AverageValue,
    /// A fleet-wide value held at the threshold: replicas = ceil(current x value / threshold).
    Value,
}

/// Which signal a trigger reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Signal {
    /// Requests the engines run, over the fleet (`ferroserve_running_requests`): the load itself, which
    /// holds the fleet at a size while nothing waits.
    Running,
    /// Requests waiting for a slot, over the fleet (`ferroserve_waiting_requests`).
    Waiting,
    /// Mean KV-cache usage of the workers (`ferroserve_kv_cache_usage_ratio`).
    KvUsage,
    /// TTFT p99 over the last 2 minutes, seconds (`ferroserve_time_to_first_token_seconds`).
    TtftP99,
}

/// One trigger.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Trigger {
    /// What it reads.
    pub signal: Signal,
    /// How it counts.
    pub metric_type: MetricType,
    /// Its target.
    pub threshold: f64,
    /// The value is capped here before use (`clamp_max` in the query), so that one bad interval cannot
    /// multiply the fleet.
    pub cap: Option<f64>,
}

/// One HPA scaling policy: at most `value` pods or percent per `period_s`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Policy {
    /// Percent of the current replicas.
    Percent { value: f64, period_s: f64 },
    /// Pods.
    Pods { value: f64, period_s: f64 },
}

/// The rules.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScalingRules {
    /// Seconds between evaluations (KEDA `pollingInterval`).
    pub polling_interval_s: f64,
    /// KEDA `cooldownPeriod` (only scaling to zero uses it; kept so the manifests can be compared).
    pub cooldown_s: f64,
    /// Fewest workers.
    pub min_replicas: u64,
    /// Most workers.
    pub max_replicas: u64,
    /// The triggers; the largest recommendation wins.
    pub triggers: Vec<Trigger>,
    /// Scale-up stabilization window (the lowest recommendation over it is used).
    pub scale_up_window_s: f64,
    /// Scale-up limits; the most permissive applies (`selectPolicy: Max`).
    pub scale_up: Vec<Policy>,
    /// Scale-down stabilization window (the highest recommendation over it is used).
    pub scale_down_window_s: f64,
    /// Scale-down limits.
    pub scale_down: Vec<Policy>,
    /// Ratios within this of 1 change nothing (the HPA's tolerance).
    pub tolerance: f64,
}

impl Default for ScalingRules {
    /// The values in `deploy/k8s/components/keda/scaledobject.yaml`.
    fn default() -> Self {
        ScalingRules {
            polling_interval_s: 15.0,
            cooldown_s: 300.0,
            min_replicas: 2,
            max_replicas: 20,
            triggers: vec![
                Trigger {
                    signal: Signal::Running,
                    metric_type: MetricType::AverageValue,
                    threshold: 4.0,
                    cap: None,
                },
                Trigger {
                    signal: Signal::Waiting,
                    metric_type: MetricType::AverageValue,
                    threshold: 4.0,
                    cap: None,
                },
                Trigger {
                    signal: Signal::KvUsage,
                    metric_type: MetricType::Value,
                    threshold: 0.8,
                    cap: None,
                },
                Trigger {
                    signal: Signal::TtftP99,
                    metric_type: MetricType::Value,
                    threshold: 2.0,
                    cap: Some(4.0),
                },
            ],
            scale_up_window_s: 0.0,
            scale_up: vec![
                Policy::Percent {
                    value: 100.0,
                    period_s: 15.0,
                },
                Policy::Pods {
                    value: 4.0,
                    period_s: 15.0,
                },
            ],
            scale_down_window_s: 300.0,
            scale_down: vec![Policy::Percent {
                value: 10.0,
                period_s: 60.0,
            }],
            tolerance: 0.1,
        }
    }
}

/// The signals at one evaluation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Signals {
    /// Requests running, fleet total.
    pub running: f64,
    /// Requests waiting, fleet total.
    pub waiting: f64,
    /// Mean KV usage, 0 to 1.
    pub kv_usage: f64,
    /// TTFT p99, seconds (0 without traffic).
    pub ttft_p99_s: f64,
}

/// The autoscaler's memory: past recommendations and past changes, as the HPA keeps them.
#[derive(Debug, Default)]
pub struct Autoscaler {
    /// (time, recommendation).
    recommendations: VecDeque<(f64, u64)>,
    /// (time, replicas added (+) or removed (-)).
    changes: VecDeque<(f64, i64)>,
}

impl Autoscaler {
    /// The replica count the rules want at `now`, from `current` replicas (those counted by the scale
    /// subresource: starting ones too) and `signals`.
    pub fn desired(&mut self, rules: &ScalingRules, now: f64, current: u64, s: Signals) -> u64 {
        let cur = current.max(1) as f64;
        let recommendation = rules
            .triggers
            .iter()
            .map(|t| {
                let value = match t.signal {
                    Signal::Running => s.running,
                    Signal::Waiting => s.waiting,
                    Signal::KvUsage => s.kv_usage,
                    Signal::TtftP99 => s.ttft_p99_s,
                };
                let value = t.cap.map_or(value, |cap| value.min(cap));
                let wanted = match t.metric_type {
                    MetricType::AverageValue => value / t.threshold,
                    MetricType::Value => cur * value / t.threshold,
                };
                if (wanted / cur - 1.0).abs() <= rules.tolerance {
                    current
                } else {
                    wanted.ceil() as u64
                }
            })
            .max()
            .unwrap_or(current)
            .clamp(rules.min_replicas, rules.max_replicas);
        self.recommendations.push_back((now, recommendation));
        let keep = rules.scale_up_window_s.max(rules.scale_down_window_s);
        while self.recommendations.front().is_some_and(|&(t, _)| t < now - keep) {
            self.recommendations.pop_front();
        }
        let within = |w: f64| {
            self.recommendations
                .iter()
                .filter(move |&&(t, _)| t >= now - w)
                .map(|&(_, r)| r)
        };
        let up_floor = within(rules.scale_up_window_s).min().unwrap_or(recommendation);
        let down_ceiling = within(rules.scale_down_window_s).max().unwrap_or(recommendation);
        let target = if up_floor > current {
            up_floor.min(current + self.allowed(&rules.scale_up, now, current, 1))
        } else if down_ceiling < current {
            down_ceiling.max(current.saturating_sub(self.allowed(&rules.scale_down, now, current, -1)))
        } else {
            current
        };
        if target != current {
            self.changes.push_back((now, target as i64 - current as i64));
        }
        while self.changes.front().is_some_and(|&(t, _)| t < now - 3600.0) {
            self.changes.pop_front();
        }
        target
    }

    /// Replicas the policies still allow in `direction` (+1 up, -1 down): the most permissive policy,
    /// less what was already changed in its period.
    fn allowed(&self, policies: &[Policy], now: f64, current: u64, direction: i64) -> u64 {
        policies
            .iter()
            .map(|p| {
                let (limit, period) = match *p {
                    Policy::Percent { value, period_s } => ((current as f64 * value / 100.0).ceil(), period_s),
                    Policy::Pods { value, period_s } => (value, period_s),
                };
                let done: i64 = self
                    .changes
                    .iter()
                    .filter(|&&(t, d)| t > now - period && d.signum() == direction)
                    .map(|&(_, d)| d.abs())
                    .sum();
                (limit as i64 - done).max(0) as u64
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_up_at_once_within_the_policies_and_down_slowly() {
        let rules = ScalingRules::default();
        let mut a = Autoscaler::default();
        let busy = Signals {
            waiting: 400.0,
            ..Signals::default()
        };
        // 100 waiting / 4 = 100 wanted; from 2, doubling or +4 per 15 s: 6.
        assert_eq!(a.desired(&rules, 0.0, 2, busy), 6);
        assert_eq!(a.desired(&rules, 15.0, 6, busy), 12);
        assert_eq!(a.desired(&rules, 30.0, 12, busy), 20, "capped at max_replicas");
        // Idle: nothing happens until the 300 s window has only low recommendations.
        let idle = Signals::default();
        assert_eq!(a.desired(&rules, 45.0, 20, idle), 20);
        assert_eq!(a.desired(&rules, 200.0, 20, idle), 20);
        let after = a.desired(&rules, 340.0, 20, idle);
        assert_eq!(after, 18, "10 % per minute");
        assert_eq!(a.desired(&rules, 355.0, after, idle), 18, "one step per 60 s");
    }

    #[test]
    fn each_trigger_scales_and_the_tolerance_holds_still() {
        let rules = ScalingRules::default();
        let slow = Signals {
            ttft_p99_s: 40.0,
            ..Signals::default()
        };
        assert_eq!(
            Autoscaler::default().desired(&rules, 0.0, 4, slow),
            8,
            "capped at 4 s: twice the fleet"
        );
        let steady = Signals {
            running: 40.0,
            ttft_p99_s: 0.3,
            ..Signals::default()
        };
        assert_eq!(
            Autoscaler::default().desired(&rules, 0.0, 10, steady),
            10,
            "the load holds the fleet"
        );
        let full = Signals {
            kv_usage: 0.86,
            ..Signals::default()
        };
        assert_eq!(Autoscaler::default().desired(&rules, 0.0, 10, full), 10, "within 10 %");
    }
}
