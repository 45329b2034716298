//! Token drift: has a version's output distribution moved away from a known-good baseline?
//!
//! Each sampled token contributes its log-probability and the entropy of the distribution it came from.
//! Both are binned with the catalogue's buckets. A sliding window holds the most recent tokens; a baseline is
//! a frozen copy of the window, taken on command (or when a version is promoted).
//!
//! The score is the population stability index (PSI) between window and baseline, taken for each signal;
//! the larger of the two is reported:
//!
//! ```text
//! PSI = Σ_i (w_i - b_i) · ln(w_i / b_i)     w_i, b_i: bin shares, each floored at 1e-4
//! ```
//!
//! Conventional reading: below 0.1 stable, 0.1 to 0.25 a moderate shift worth a look, above 0.25 a
//! significant shift (the alert threshold in `deploy/prometheus/alerts.yml`). With no baseline the score is 0.

use std::collections::VecDeque;

use crate::names::{ENTROPY_BUCKETS, LOGPROB_BUCKETS};

/// Smallest bin share, so that empty bins do not make the logarithm infinite.
const FLOOR: f64 = 1e-4;

/// PSI above which drift is significant.
pub const PSI_SIGNIFICANT: f64 = 0.25;
/// PSI above which drift is moderate.
pub const PSI_MODERATE: f64 = 0.1;

/// Counts of one signal over bins; the last bin holds values above every bound.
#[derive(Debug, Clone, PartialEq)]
struct Bins {
    bounds: &'static [f64],
    counts: Vec<u64>,
}

impl Bins {
    fn new(bounds: &'static [f64]) -> Bins {
        Bins {
            bounds,
            counts: vec![0; bounds.len() + 1],
        }
    }

    fn index(&self, v: f64) -> usize {
        self.bounds.iter().position(|&b| v <= b).unwrap_or(self.bounds.len())
    }

    fn shares(&self) -> Vec<f64> {
        let total: u64 = self.counts.iter().sum();
        self.counts
            .iter()
            .map(|&c| if total == 0 { 0.0 } else { c as f64 / total as f64 }.max(FLOOR))
            .collect()
    }
}

/// Population stability index of `live` against `base`, both bin shares.
fn psi(live: &[f64], base: &[f64]) -> f64 {
    live.iter().zip(base).map(|(w, b)| (w - b) * (w / b).ln()).sum()
}

/// A sliding window of recent tokens and an optional frozen baseline.
#[derive(Debug, Clone)]
pub struct DriftMonitor {
    /// Most tokens the window holds.
    capacity: usize,
    /// Bin indices of the window's tokens, oldest first, so they can leave in order.
    window: VecDeque<(u8, u8)>,
    /// Window counts of sampled-token log-probabilities.
    logprob: Bins,
    /// Window counts of entropies.
    entropy: Bins,
    /// Frozen window counts, if a baseline was taken.
    baseline: Option<(Bins, Bins)>,
}

impl DriftMonitor {
    /// A monitor over the last `capacity` tokens.
    pub fn new(capacity: usize) -> DriftMonitor {
        DriftMonitor {
            capacity: capacity.max(1),
            window: VecDeque::with_capacity(capacity.max(1)),
            logprob: Bins::new(LOGPROB_BUCKETS),
            entropy: Bins::new(ENTROPY_BUCKETS),
            baseline: None,
        }
    }

    /// Adds one sampled token's log-probability and its distribution's entropy.
    pub fn observe(&mut self, logprob: f64, entropy: f64) {
        let (l, e) = (self.logprob.index(logprob), self.entropy.index(entropy));
        self.logprob.counts[l] += 1;
        self.entropy.counts[e] += 1;
        self.window.push_back((l as u8, e as u8));
        if self.window.len() > self.capacity
            && let Some((ol, oe)) = self.window.pop_front()
        {
            self.logprob.counts[ol as usize] -= 1;
            self.entropy.counts[oe as usize] -= 1;
        }
    }

    /// Tokens in the window.
    pub fn window_len(&self) -> usize {
        self.window.len()
    }

    /// Freezes the current window as the baseline. Returns how many tokens it holds.
    pub fn snapshot_baseline(&mut self) -> usize {
        self.baseline = Some((self.logprob.clone(), self.entropy.clone()));
        self.window.len()
    }

    /// The drift score: the larger PSI of the two signals, or 0 without a baseline or data.
    pub fn score(&self) -> f64 {
        match &self.baseline {
            Some((bl, be)) if !self.window.is_empty() => {
                let l = psi(&self.logprob.shares(), &bl.shares());
                let e = psi(&self.entropy.shares(), &be.shares());
                l.max(e)
            }
            _ => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(m: &mut DriftMonitor, n: usize, lp: f64, ent: f64) {
        for _ in 0..n {
            m.observe(lp, ent);
        }
    }

    #[test]
    fn no_baseline_means_no_drift() {
        let mut m = DriftMonitor::new(100);
        fill(&mut m, 50, -1.0, 2.0);
        assert_eq!(m.score(), 0.0);
    }

    #[test]
    fn the_same_distribution_scores_near_zero_and_a_shift_scores_high() {
        let mut m = DriftMonitor::new(1000);
        for i in 0..1000 {
            m.observe(-(i % 5) as f64, (i % 7) as f64 * 0.5);
        }
        assert_eq!(m.snapshot_baseline(), 1000);
        for i in 0..1000 {
            m.observe(-(i % 5) as f64, (i % 7) as f64 * 0.5);
        }
        assert!(m.score() < 1e-9, "identical window: {}", m.score());
        // Now the model becomes far less sure of itself: low logprobs, high entropy.
        fill(&mut m, 1000, -12.0, 9.0);
        assert!(m.score() > PSI_SIGNIFICANT, "shifted window: {}", m.score());
    }

    #[test]
    fn the_window_slides() {
        let mut m = DriftMonitor::new(10);
        fill(&mut m, 10, -0.1, 0.1);
        m.snapshot_baseline();
        fill(&mut m, 10, -15.0, 10.0);
        let shifted = m.score();
        fill(&mut m, 10, -0.1, 0.1);
        assert_eq!(m.window_len(), 10);
        assert!(m.score() < 1e-9 && shifted > PSI_SIGNIFICANT);
    }

    #[test]
    fn psi_matches_a_hand_computation() {
        // Two bins, 50/50 against 90/10.
        let v = psi(&[0.5, 0.5], &[0.9, 0.1]);
        let expected = (0.5f64 - 0.9) * (0.5f64 / 0.9).ln() + (0.5f64 - 0.1) * (0.5f64 / 0.1).ln();
        assert!((v - expected).abs() < 1e-12);
    }
}
