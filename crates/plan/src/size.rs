//! Sizing a fleet at an SLO from a measured service curve.
//!
//! The model, in full (so that a team can check it against its own measurements):
//! - A worker runs at most `max_batch_seqs` = B requests at once; one request holds its slot for
//!   `service_s(c)`, its time to first token plus its other tokens at the measured median time per token
//!   at concurrency c.
//! - The router sends each request to a worker with a free slot, so N workers act as one pool of N x B slots
//!   (M/M/c): a request waits only when every slot is busy, and the wait's 99th percentile follows
//!   Erlang C, with each slot's service time taken at full batch (when all are busy, all are at B).
//! - Service times vary less than exponential ones (M/G/c): the wait is scaled by (1 + cs^2) / 2, cs being
//!   the service time's coefficient of variation, from the output tokens' (Allen-Cunneen).
//! - A worker's busy slots average rate x service / N (Little), and reach their 99th percentile
//!   (Poisson) at c99. The predicted TTFT p99 is the curve's median TTFT at c99 plus the wait's p99: the
//!   tail comes from the concurrency being at its 99th percentile and from the queue, not from the
//!   sweep's TTFT p99, which at a high level is the burst of its first c requests sent at once (a fleet in
//!   steady state never sees it). The predicted TPOT p99 is the curve's TPOT p99 at c99.
//! - No fleet runs above 95 % of its slots' capacity, whatever the formulas say.

use serde::Serialize;

use crate::curve::ServiceCurve;
use crate::input::{PlanInput, SloTarget};
use crate::queue::{normal_quantile, wait_quantile};

/// The highest share of its slots' capacity a fleet is planned to use.
pub const MAX_UTILIZATION: f64 = 0.95;
/// The most workers a plan considers.
pub const MAX_WORKERS: u64 = 1_000_000;

/// What a fleet would show at a rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prediction {
    /// Requests per second offered.
    pub rate: f64,
    /// Workers.
    pub workers: u64,
    /// Slots per worker.
    pub max_batch_seqs: u32,
    /// Predicted TTFT p99, ms.
    pub ttft_p99_ms: f64,
    /// Predicted TPOT p99, ms.
    pub tpot_p99_ms: f64,
    /// Busy slots over all slots.
    pub utilization: f64,
    /// Requests a worker runs on average (`ferroserve_running_requests`).
    pub busy_per_worker: f64,
}

impl Prediction {
    /// Whether it meets `slo`.
    pub fn meets(&self, slo: &SloTarget) -> bool {
        self.ttft_p99_ms <= slo.ttft_p99_ms && self.tpot_p99_ms <= slo.tpot_p99_ms
    }
}

/// The curve and the request shape a fleet serves.
#[derive(Debug, Clone)]
pub struct Model<'a> {
    /// The measured worker.
    pub curve: &'a ServiceCurve,
    /// Mean prompt tokens.
    pub input_tokens: f64,
    /// Mean output tokens.
    pub output_tokens: f64,
    /// Their coefficient of variation.
    pub output_cv: f64,
}

impl<'a> Model<'a> {
    /// The model of `input`'s workload on `curve`.
    pub fn new(curve: &'a ServiceCurve, input: &PlanInput) -> Model<'a> {
        Model {
            curve,
            input_tokens: input.workload.input_tokens.mean,
            output_tokens: input.workload.output_tokens.mean,
            output_cv: input.workload.output_tokens.cv,
        }
    }

    /// What `workers` workers with `batch` slots each would show at `rate`; `None` past the utilization
    /// limit.
    pub fn predict(&self, workers: u64, batch: u32, rate: f64) -> Option<Prediction> {
        let b = f64::from(batch);
        let full = self.curve.service_s(b, self.input_tokens, self.output_tokens);
        let slots = workers * u64::from(batch);
        let utilization = rate * full / slots as f64;
        if utilization > MAX_UTILIZATION {
            return None;
        }
        // Mean busy slots per worker: a fixed point, as service time depends on how many run.
        let mut busy = (rate * full / workers as f64).min(b);
        for _ in 0..8 {
            let s = self
                .curve
                .service_s(busy.max(1.0), self.input_tokens, self.output_tokens);
            busy = (rate * s / workers as f64).min(b);
        }
        let c99 = (busy + normal_quantile(0.99) * busy.sqrt()).clamp(1.0, b);
        let at = self.curve.at(c99);
        // Allen-Cunneen: an M/G/c wait is the M/M/c one times (1 + cs^2) / 2.
        let decode_share = 1.0 - at.ttft_p50_s * self.curve.prompt_scale(self.input_tokens) / full;
        let cs = self.output_cv * decode_share.clamp(0.0, 1.0);
        let wait = wait_quantile(slots, rate, full, 0.99) * (1.0 + cs * cs) / 2.0;
        Some(Prediction {
            rate,
            workers,
            max_batch_seqs: batch,
            ttft_p99_ms: (at.ttft_p50_s * self.curve.prompt_scale(self.input_tokens) + wait) * 1e3,
            tpot_p99_ms: at.tpot_p99_s * 1e3,
            utilization,
            busy_per_worker: busy,
        })
    }

    /// The highest rate `workers` workers with `batch` slots sustain within `slo`, and its prediction.
    pub fn max_rate(&self, workers: u64, batch: u32, slo: &SloTarget) -> Option<Prediction> {
        let full = self
            .curve
            .service_s(f64::from(batch), self.input_tokens, self.output_tokens);
        let mut hi = MAX_UTILIZATION * (workers * u64::from(batch)) as f64 / full;
        let mut lo = 0.0;
        let ok = |rate: f64| self.predict(workers, batch, rate).filter(|p| p.meets(slo));
        let mut best = ok(hi * 1e-6)?;
        if let Some(p) = ok(hi) {
            return Some(p);
        }
        for _ in 0..48 {
            let mid = 0.5 * (lo + hi);
            match ok(mid) {
                Some(p) => {
                    best = p;
                    lo = mid;
                }
                None => hi = mid,
            }
        }
        Some(best)
    }

    /// The best `max_batch_seqs` for `workers` workers: the measured level that sustains the highest rate
    /// within `slo`.
    pub fn best(&self, workers: u64, slo: &SloTarget) -> Option<Prediction> {
        self.curve
            .levels()
            .filter_map(|b| self.max_rate(workers, b, slo))
            .max_by(|a, b| a.rate.total_cmp(&b.rate))
    }

    /// The fewest workers that serve `rate` within `slo`, with the `max_batch_seqs` that gives the most
    /// headroom at that size, and the prediction at `rate`.
    pub fn workers_for(&self, rate: f64, slo: &SloTarget) -> Option<Prediction> {
        let one = self.best(1, slo)?;
        // Pooling only helps, so as many workers as one worker's rate needs are enough.
        let mut hi = ((rate / one.rate).ceil() as u64).clamp(1, MAX_WORKERS);
        if self.best(hi, slo).is_none_or(|p| p.rate < rate) {
            return None;
        }
        let mut lo = 0;
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.best(mid, slo).is_some_and(|p| p.rate >= rate) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        // At that size, the batch level with the lowest TTFT p99 at `rate` among those meeting the SLO.
        self.curve
            .levels()
            .filter_map(|b| self.predict(hi, b, rate).filter(|p| p.meets(slo)))
            .min_by(|a, b| a.ttft_p99_ms.total_cmp(&b.ttft_p99_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curve::tests::synthetic;

    fn slo(ttft: f64, tpot: f64) -> SloTarget {
        SloTarget {
            ttft_p99_ms: ttft,
            tpot_p99_ms: tpot,
        }
    }

    fn model(curve: &ServiceCurve) -> Model<'_> {
        Model {
            curve,
            input_tokens: curve.mean_input_tokens,
            output_tokens: curve.mean_output_tokens,
            output_cv: 1.0,
        }
    }

    #[test]
    fn a_tighter_tpot_slo_picks_a_smaller_batch() {
        let curve = synthetic();
        let m = model(&curve);
        let loose = m.best(1, &slo(5000.0, 100.0)).unwrap();
        let tight = m.best(1, &slo(5000.0, 16.0)).unwrap();
        assert_eq!(loose.max_batch_seqs, 16, "{loose:?}");
        assert!(tight.max_batch_seqs <= 4, "{tight:?}");
        assert!(tight.rate < loose.rate);
        assert!(m.best(1, &slo(5000.0, 5.0)).is_none(), "no level is that fast");
    }

    #[test]
    fn pooling_makes_n_workers_worth_more_than_n_times_one_and_sizing_is_minimal() {
        let curve = synthetic();
        let m = model(&curve);
        let s = slo(800.0, 60.0);
        let one = m.best(1, &s).unwrap();
        let ten = m.best(10, &s).unwrap();
        assert!(ten.rate >= 10.0 * one.rate * 0.999, "{} vs {}", ten.rate, one.rate);
        let rate = 37.0 * one.rate;
        let p = m.workers_for(rate, &s).unwrap();
        assert!(p.meets(&s) && p.rate == rate, "{p:?}");
        assert!(m.best(p.workers - 1, &s).unwrap().rate < rate, "one fewer would not do");
        assert!(p.workers <= 37, "{p:?}");
    }

    #[test]
    fn predictions_worsen_with_load() {
        let curve = synthetic();
        let m = model(&curve);
        let a = m.predict(2, 8, 5.0).unwrap();
        let b = m.predict(2, 8, 11.5).unwrap();
        assert!(
            b.ttft_p99_ms > a.ttft_p99_ms && b.tpot_p99_ms >= a.tpot_p99_ms,
            "{a:?} {b:?}"
        );
        assert!(m.predict(2, 8, 1e6).is_none());
    }
}
