//! What a plan is for: the workload (rate, its daily shape and bursts, token distributions), the SLO, and
//! the prices. One TOML file (`configs/plan/workload.toml` is an example); unknown keys are refused.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::PlanError;

/// A whole plan input.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlanInput {
    /// The traffic.
    pub workload: Workload,
    /// The objective.
    pub slo: SloTarget,
    /// What things cost.
    pub prices: Prices,
}

/// The traffic to serve.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Requests per second at the busiest hour (bursts come on top).
    pub peak_rps: f64,
    /// The rate of each hour of the day as a share of `peak_rps`: 24 values, the largest usually 1.
    pub daily_shape: Vec<f64>,
    /// Prompt tokens per request.
    pub input_tokens: Tokens,
    /// Generated tokens per request.
    pub output_tokens: Tokens,
    /// Short surges above the daily shape.
    #[serde(default)]
    pub bursts: Vec<Burst>,
}

/// A token count distribution: lognormal with this mean and coefficient of variation (0: constant).
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tokens {
    /// Mean tokens.
    pub mean: f64,
    /// Standard deviation over mean.
    #[serde(default)]
    pub cv: f64,
    /// No request has more (the server's limit).
    #[serde(default = "Tokens::default_max")]
    pub max: f64,
}

impl Tokens {
    fn default_max() -> f64 {
        4096.0
    }
}

/// A surge: the rate is multiplied for a while.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Burst {
    /// When it starts, in hours after midnight (fractions allowed).
    pub hour: f64,
    /// How long it lasts.
    pub minutes: f64,
    /// The rate during it, times the daily shape's.
    pub multiplier: f64,
}

/// The service-level objective.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SloTarget {
    /// 99th percentile time to first token, ms.
    pub ttft_p99_ms: f64,
    /// 99th percentile time per output token, ms.
    pub tpot_p99_ms: f64,
}

/// Prices and the delays that cost money.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    /// $/hour of one worker's node share on demand.
    pub worker_on_demand_per_hour: f64,
    /// $/hour of the same on spot (preemptible) capacity.
    pub worker_spot_per_hour: f64,
    /// Interruptions per spot worker per hour.
    pub spot_interruptions_per_hour: f64,
    /// Seconds of warning a spot interruption gives (the pod's grace period).
    #[serde(default = "Prices::default_notice")]
    pub spot_notice_s: f64,
    /// Seconds from a new worker pod to ready: image, model fetch, load.
    pub worker_cold_start_s: f64,
    /// Seconds to get a node for a new worker (0 if nodes are kept warm).
    #[serde(default)]
    pub node_provision_s: f64,
    /// $/hour of one router.
    pub router_per_hour: f64,
    /// Requests per second one router handles at its CPU request.
    pub router_capacity_rps: f64,
    /// Routers, at least (availability).
    #[serde(default = "Prices::default_min_routers")]
    pub min_routers: u32,
    /// $/hour of Redis (managed or in-cluster).
    #[serde(default)]
    pub redis_per_hour: f64,
}

impl Prices {
    fn default_notice() -> f64 {
        25.0
    }
    fn default_min_routers() -> u32 {
        2
    }
}

impl PlanInput {
    /// Reads and checks a plan input file.
    pub fn read(path: &Path) -> Result<PlanInput, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let input: PlanInput = toml::from_str(&text).map_err(|e| PlanError::Input {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        input.validate()?;
        Ok(input)
    }

    /// Checks ranges, naming the key to fix.
    pub fn validate(&self) -> Result<(), PlanError> {
        let w = &self.workload;
        positive("workload.peak_rps", w.peak_rps)?;
        if w.daily_shape.len() != 24 || w.daily_shape.iter().any(|s| !(0.0..=10.0).contains(s)) {
            return Err(PlanError::setting(
                "workload.daily_shape",
                format!(
                    "give 24 shares of peak_rps between 0 and 10, one per hour (got {})",
                    w.daily_shape.len()
                ),
            ));
        }
        for (key, t) in [
            ("workload.input_tokens", w.input_tokens),
            ("workload.output_tokens", w.output_tokens),
        ] {
            if !(t.mean >= 1.0 && t.cv >= 0.0 && t.max >= t.mean) {
                return Err(PlanError::setting(key, "mean >= 1, cv >= 0 and max >= mean"));
            }
        }
        for b in &w.bursts {
            if !((0.0..24.0).contains(&b.hour) && b.minutes > 0.0 && b.multiplier > 0.0) {
                return Err(PlanError::setting(
                    "workload.bursts",
                    "hour in [0, 24), minutes > 0, multiplier > 0",
                ));
            }
        }
        positive("slo.ttft_p99_ms", self.slo.ttft_p99_ms)?;
        positive("slo.tpot_p99_ms", self.slo.tpot_p99_ms)?;
        let p = &self.prices;
        positive("prices.worker_on_demand_per_hour", p.worker_on_demand_per_hour)?;
        positive("prices.router_capacity_rps", p.router_capacity_rps)?;
        for (key, v) in [
            ("prices.worker_spot_per_hour", p.worker_spot_per_hour),
            ("prices.spot_interruptions_per_hour", p.spot_interruptions_per_hour),
            ("prices.spot_notice_s", p.spot_notice_s),
            ("prices.worker_cold_start_s", p.worker_cold_start_s),
            ("prices.node_provision_s", p.node_provision_s),
            ("prices.router_per_hour", p.router_per_hour),
            ("prices.redis_per_hour", p.redis_per_hour),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(PlanError::setting(key, "must be a finite number >= 0"));
            }
        }
        Ok(())
    }
}

impl Workload {
    /// The rate at `t` seconds into a day of `day_s` seconds: the hour's share of the peak (linear between
    /// hour midpoints, so the day has no steps), times any burst running then.
    pub fn rate_at(&self, t: f64, day_s: f64) -> f64 {
        let hour = (t / day_s * 24.0).rem_euclid(24.0);
        let x = hour - 0.5;
        let i = x.floor();
        let frac = x - i;
        let at = |h: f64| self.daily_shape[h.rem_euclid(24.0) as usize];
        let base = at(i) * (1.0 - frac) + at(i + 1.0) * frac;
        let burst: f64 = self
            .bursts
            .iter()
            .filter(|b| hour >= b.hour && hour < b.hour + b.minutes / 60.0)
            .map(|b| b.multiplier)
            .product();
        self.peak_rps * base * burst
    }

    /// The highest rate of the day, bursts included (sampled each simulated minute).
    pub fn max_rate(&self) -> f64 {
        (0..24 * 60)
            .map(|m| self.rate_at(f64::from(m) * 60.0 + 30.0, 86_400.0))
            .fold(0.0, f64::max)
    }

    /// The busiest hour's rate, bursts excluded: what a static fleet is sized for.
    pub fn peak_of_shape(&self) -> f64 {
        self.peak_rps * self.daily_shape.iter().copied().fold(0.0, f64::max)
    }
}

fn positive(key: &'static str, v: f64) -> Result<(), PlanError> {
    if v > 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(PlanError::setting(key, format!("must be a positive number (got {v})")))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn example() -> PlanInput {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/plan/workload.toml"))
            .expect("the example plan input");
        let input: PlanInput = toml::from_str(&text).expect("the example parses");
        input.validate().expect("the example is valid");
        input
    }

    /// The example input with requests shaped as the synthetic curve's (100 prompt, 64 output tokens), at
    /// `peak_rps`.
    pub(crate) fn for_synthetic(peak_rps: f64) -> PlanInput {
        let mut input = example();
        input.workload.input_tokens.mean = 100.0;
        input.workload.output_tokens.mean = 64.0;
        input.workload.peak_rps = peak_rps;
        input
    }

    #[test]
    fn the_daily_shape_is_continuous_and_bursts_multiply() {
        let mut w = example().workload;
        w.bursts = vec![Burst {
            hour: 10.0,
            minutes: 30.0,
            multiplier: 3.0,
        }];
        let day = 86_400.0;
        let before = w.rate_at(10.0 * 3600.0 - 1.0, day);
        let during = w.rate_at(10.0 * 3600.0 + 1.0, day);
        assert!((during / before - 3.0).abs() < 0.01, "{before} {during}");
        // Midpoint of an hour is exactly its share.
        assert!((w.rate_at(3.5 * 3600.0, day) - w.peak_rps * w.daily_shape[3]).abs() < 1e-9);
        // Across midnight there is no step.
        let (a, b) = (w.rate_at(day - 1.0, day), w.rate_at(0.0, day));
        assert!((a - b).abs() < 0.01 * w.peak_rps, "{a} {b}");
    }

    #[test]
    fn a_bad_input_names_its_key() {
        let mut input = example();
        input.workload.daily_shape.pop();
        let e = input.validate().unwrap_err().to_string();
        assert!(e.contains("workload.daily_shape"), "{e}");
        let mut input = example();
        input.prices.router_capacity_rps = 0.0;
        assert!(
            input
                .validate()
                .unwrap_err()
                .to_string()
                .contains("prices.router_capacity_rps")
        );
    }
}
