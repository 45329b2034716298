//! Choosing the next token from logits: repetition, presence and frequency penalties, temperature, top-k,
//! top-p, seeded.

use std::collections::{HashMap, HashSet};

use ferroserve_core::Sampling;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Per-sequence sampler. Owns its random generator, so a seed reproduces the same tokens whatever else
/// the engine is running.
pub struct Sampler {
    /// The request's settings.
    params: Sampling,
    /// Seeded from `params.seed`.
    rng: StdRng,
    /// Distinct tokens of the context, for the repetition penalty.
    seen: HashSet<u32>,
    /// How often each token was generated, for the presence and frequency penalties.
    generated: HashMap<u32, u32>,
}

/// A chosen token and its log-probability under the model's unmodified distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    /// The token id.
    pub token: u32,
    /// `log softmax(logits)[token]`, before penalty, temperature or truncation.
    pub logprob: f32,
    /// Entropy in nats of the model's (unmodified) next-token distribution.
    pub entropy: f32,
}

impl Sampler {
    /// A sampler for one sequence whose context starts with `prompt`.
    pub fn new(params: Sampling, prompt: &[u32]) -> Sampler {
        Sampler {
            params,
            rng: StdRng::seed_from_u64(params.seed),
            seen: prompt.iter().copied().collect(),
            generated: HashMap::new(),
        }
    }

    /// Picks the next token from `logits` (modified in place) and records it in the context. Any logits
    /// are handled: NaN counts as impossible, +inf as the largest finite value, and when nothing is
    /// possible every token is equally likely, so the choice is always a token of the vocabulary and the
    /// reported figures are finite.
    pub fn sample(&mut self, logits: &mut [f32]) -> Sampled {
        self.sample_masked(logits, |_| {})
    }

    /// [`Sampler::sample`] among the tokens `mask` leaves possible: it sets the others to -inf (a
    /// constraint's mask), after the model's distribution is measured for the reported logprob and
    /// entropy. The mask must leave some token possible.
    pub fn sample_masked(&mut self, logits: &mut [f32], mask: impl FnOnce(&mut [f32])) -> Sampled {
        if logits.is_empty() {
            return Sampled {
                token: 0,
                logprob: 0.0,
                entropy: 0.0,
            };
        }
        sanitize(logits);
        let (lse, entropy) = lse_and_entropy(logits);
        mask(logits);
        // The penalties rewrite logits; keep the originals of the tokens they touch for the logprob.
        let originals = self.penalize(logits);
        let token = if self.draws() {
            self.sample_random(logits, 1.0 / self.params.temperature)
        } else {
            argmax(logits)
        };
        self.seen.insert(token);
        *self.generated.entry(token).or_default() += 1;
        let raw = originals
            .iter()
            .find(|(t, _)| *t == token)
            .map_or(logits[token as usize], |(_, l)| *l);
        let logprob = raw - lse;
        Sampled {
            token,
            logprob: if logprob.is_finite() {
                logprob.min(0.0)
            } else {
                f32::MIN
            },
            entropy,
        }
    }

    /// Applies the repetition penalty (to every token of the context), then the presence and frequency
    /// penalties (to the generated tokens); returns the original logits of the tokens it changed.
    fn penalize(&self, logits: &mut [f32]) -> Vec<(u32, f32)> {
        let mut originals: HashMap<u32, f32> = HashMap::new();
        let p = self.params.repetition_penalty;
        if p != 1.0 {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    originals.entry(t).or_insert(*l);
                    *l = if *l > 0.0 { *l / p } else { *l * p };
                }
            }
        }
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            for (&t, &n) in &self.generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    originals.entry(t).or_insert(*l);
                    *l -= presence + frequency * n as f32;
                }
            }
        }
        if !originals.is_empty() {
            sanitize(logits);
        }
        originals.into_iter().collect()
    }

    /// Advances the random stream as one [`Sampler::sample`] of `token` would, without logits: how a
    /// sequence that continues another worker's tokens gets the random state and penalties that worker
    /// had.
    pub fn skip_draw(&mut self, token: u32) {
        if self.draws() {
            let _: f32 = self.rng.random();
        }
        self.seen.insert(token);
        *self.generated.entry(token).or_default() += 1;
    }

    /// True when sampling draws from the random stream (exactly once per token).
    fn draws(&self) -> bool {
        !self.params.is_greedy() && (1.0 / self.params.temperature).is_finite()
    }

    fn sample_random(&mut self, logits: &[f32], inv_t: f32) -> u32 {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Candidates as (token, unnormalised probability), most likely first once truncated.
        let mut cands: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp()))
            // Impossible tokens (masked, or underflowed to zero) are never candidates, not even for the
            // rounding sliver at the end.
            .filter(|c| c.1 > 0.0)
            .collect();
        let by_prob_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = self.params.top_k as usize;
        if k > 0 && k < cands.len() {
            cands.select_nth_unstable_by(k - 1, by_prob_desc);
            cands.truncate(k);
        }
        if self.params.top_p < 1.0 {
            cands.sort_unstable_by(by_prob_desc);
            let total: f32 = cands.iter().map(|c| c.1).sum();
            let mut cum = 0.0;
            let mut keep = cands.len();
            for (i, c) in cands.iter().enumerate() {
                cum += c.1 / total;
                if cum >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep);
        }
        let total: f32 = cands.iter().map(|c| c.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for &(t, p) in &cands {
            if r < p {
                return t;
            }
            r -= p;
        }
        // Rounding left a sliver of mass past the end: the last candidate takes it.
        cands.last().map_or(0, |c| c.0)
    }
}

/// NaN becomes impossible (-inf) and +inf the largest finite logit; when no token is possible, all are
/// equally likely (0).
fn sanitize(logits: &mut [f32]) {
    let mut any = false;
    for l in logits.iter_mut() {
        if l.is_nan() {
            *l = f32::NEG_INFINITY;
        } else if *l == f32::INFINITY {
            *l = f32::MAX;
        }
        any |= *l > f32::NEG_INFINITY;
    }
    if !any {
        logits.fill(0.0);
    }
}

/// `log Σ exp(l)` and the entropy `-Σ p log p` of `softmax(logits)`, in one pass over the vocabulary:
/// with `m = max l`, `Z = Σ e^(l-m)` and `S = Σ e^(l-m)·(l-m)`, `lse = m + ln Z` and `H = ln Z - S/Z`.
/// Impossible tokens (-inf) add nothing. Expects [`sanitize`]d logits (some finite).
fn lse_and_entropy(logits: &[f32]) -> (f32, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (z, s) = logits
        .iter()
        .filter(|l| **l > f32::NEG_INFINITY)
        .fold((0.0f32, 0.0f32), |(z, s), &l| {
            let d = l - max;
            let e = d.exp();
            (z + e, s + e * d)
        });
    let lse = max + z.ln();
    let entropy = z.ln() - s / z;
    (lse, if entropy.is_finite() { entropy.max(0.0) } else { 0.0 })
}

/// The `k` most likely tokens of `logits` (before any penalty or temperature), most likely first, with
/// their log-probabilities; ties go to the lower id. Non-finite logits are skipped. Only a request that
/// asks for logprobs pays for this pass.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let finite = || logits.iter().enumerate().filter(|(_, l)| l.is_finite());
    let max = finite().map(|(_, l)| *l).fold(f32::NEG_INFINITY, f32::max);
    if k == 0 || max == f32::NEG_INFINITY {
        return Vec::new();
    }
    let lse = max + finite().map(|(_, l)| (l - max).exp()).sum::<f32>().ln();
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &l) in finite() {
        if best.len() == k && l <= best[k - 1].1 {
            continue;
        }
        let at = best.partition_point(|(_, b)| *b >= l);
        best.insert(at, (i as u32, l));
        best.truncate(k);
    }
    best.into_iter().map(|(t, l)| (t, (l - lse).min(0.0))).collect()
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: u32, top_p: f32, seed: u64) -> Sampling {
        Sampling {
            temperature,
            top_p,
            top_k,
            seed,
            repetition_penalty: 1.0,
            ..Sampling::GREEDY
        }
    }

    #[test]
    fn top_logprobs_are_the_k_largest_in_order_and_normalized() {
        let logits = [1.0, 3.0, f32::NAN, 2.0, 3.0, f32::NEG_INFINITY];
        let top = top_logprobs(&logits, 3);
        assert_eq!(
            top.iter().map(|t| t.0).collect::<Vec<_>>(),
            [1, 4, 3],
            "ties to the lower id"
        );
        let lse = (1f32.exp() + 2.0 * 3f32.exp() + 2f32.exp()).ln();
        assert!((top[0].1 - (3.0 - lse)).abs() < 1e-5);
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(top_logprobs(&logits, 0).is_empty());
        assert_eq!(top_logprobs(&[0.5], 20).len(), 1);
    }

    #[test]
    fn greedy_takes_the_max_and_reports_its_logprob() {
        let mut s = Sampler::new(Sampling::GREEDY, &[]);
        let mut logits = vec![0.0, 2.0, 1.0];
        let out = s.sample(&mut logits);
        assert_eq!(out.token, 1);
        let expected = 2.0 - (1.0f32 + 2.0f32.exp() + 1.0f32.exp()).ln();
        assert!((out.logprob - expected).abs() < 1e-5);
        let p: Vec<f32> = [0.0f32, 2.0, 1.0].iter().map(|l| (l + expected - 2.0).exp()).collect();
        let h: f32 = -p.iter().map(|p| p * p.ln()).sum::<f32>();
        assert!((out.entropy - h).abs() < 1e-5, "{} vs {h}", out.entropy);
        // A one-hot distribution has (near) zero entropy; a uniform one has ln(n).
        assert!(Sampler::new(Sampling::GREEDY, &[]).sample(&mut [0.0, 100.0]).entropy < 1e-5);
        let uniform = Sampler::new(Sampling::GREEDY, &[]).sample(&mut [1.0; 8]).entropy;
        assert!((uniform - 8f32.ln()).abs() < 1e-5);
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed), &[]);
            (0..50).map(|_| s.sample(&mut logits.clone()).token).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_k_limits_choices() {
        let logits: Vec<f32> = vec![0.1, 3.0, 2.9, 0.2, 2.8];
        let mut s = Sampler::new(params(5.0, 1, 1.0, 1), &[]);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits.clone()).token, 1);
        }
        let mut s = Sampler::new(params(5.0, 3, 1.0, 1), &[]);
        for _ in 0..200 {
            assert!([1, 2, 4].contains(&s.sample(&mut logits.clone()).token));
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Token 0 holds ~88% of the mass: top_p 0.5 must always pick it.
        let logits = vec![4.0, 1.0, 1.0, 0.5];
        let mut s = Sampler::new(params(1.0, 0, 0.5, 3), &[]);
        for _ in 0..100 {
            assert_eq!(s.sample(&mut logits.clone()).token, 0);
        }
    }

    #[test]
    fn repetition_penalty_discourages_seen_tokens() {
        let mut p = Sampling::GREEDY;
        p.repetition_penalty = 2.0;
        let mut s = Sampler::new(p, &[0]);
        // 0 is seen: 3.0 / 2 = 1.5 < 2.0.
        assert_eq!(s.sample(&mut [3.0, 2.0]).token, 1);
        // Now 1 is seen too; a negative logit is pushed further down.
        assert_eq!(s.sample(&mut [-1.0, -0.6, -1.0]).token, 2);
    }

    #[test]
    fn presence_and_frequency_penalties_weigh_generated_tokens() {
        let mut p = Sampling::GREEDY;
        p.presence_penalty = 0.5;
        p.frequency_penalty = 1.0;
        // The prompt's tokens are not penalized: only generated ones.
        let mut s = Sampler::new(p, &[0]);
        assert_eq!(s.sample(&mut [3.0, 2.0, 0.0]).token, 0);
        // 0 generated once: 3.0 - 0.5 - 1.0 = 1.5 < 2.0; the logprob is still the unpenalized one's.
        let second = s.sample(&mut [3.0, 2.0, 0.0]);
        assert_eq!(second.token, 1);
        let lse = (3f32.exp() + 2f32.exp() + 1.0).ln();
        assert!((second.logprob - (2.0 - lse)).abs() < 1e-5, "{second:?}");
        // 0 once, 1 once: 1.5 vs 0.5 vs 0.0; then 0 twice: 0.5 vs 0.5 (tie to the lower id).
        assert_eq!(s.sample(&mut [3.0, 2.0, 0.0]).token, 0);
        assert_eq!(s.sample(&mut [3.0, 2.0, 0.0]).token, 0);
        // A negative presence penalty encourages repeats.
        let mut p = Sampling::GREEDY;
        p.presence_penalty = -2.0;
        let mut s = Sampler::new(p, &[]);
        assert_eq!(s.sample(&mut [1.0, 2.0]).token, 1);
        assert_eq!(s.sample(&mut [2.5, 2.0]).token, 1);
    }

    #[test]
    fn skipping_draws_continues_the_same_random_stream() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 5) as f32 * 0.4).collect();
        let mut p = params(1.0, 0, 1.0, 11);
        p.frequency_penalty = 0.3;
        let mut whole = Sampler::new(p, &[]);
        let all: Vec<u32> = (0..20).map(|_| whole.sample(&mut logits.clone()).token).collect();
        let mut resumed = Sampler::new(p, &[]);
        for &t in &all[..12] {
            resumed.skip_draw(t);
        }
        let rest: Vec<u32> = (0..8).map(|_| resumed.sample(&mut logits.clone()).token).collect();
        assert_eq!(rest, all[12..]);
    }

    #[test]
    fn hostile_logits_and_settings_still_give_a_token_and_finite_figures() {
        let cases: Vec<Vec<f32>> = vec![
            vec![f32::NAN; 5],
            vec![f32::NEG_INFINITY; 5],
            vec![f32::INFINITY, 1.0, f32::INFINITY],
            vec![f32::MIN_POSITIVE / 4.0, f32::NAN, -3.0],
            vec![f32::MAX, -f32::MAX, 0.0],
        ];
        for temperature in [0.0, 1e-38, 1e-5, 1.0, 100.0] {
            for penalty in [1.0, 1e-30, 100.0] {
                for logits in &cases {
                    let p = Sampling {
                        temperature,
                        repetition_penalty: penalty,
                        top_p: 0.9,
                        top_k: 2,
                        ..Sampling::GREEDY
                    };
                    let out = Sampler::new(p, &[0, 1]).sample(&mut logits.clone());
                    assert!(
                        (out.token as usize) < logits.len(),
                        "{logits:?} t={temperature} p={penalty}"
                    );
                    assert!(out.logprob.is_finite() && out.logprob <= 0.0, "{out:?} {logits:?}");
                    assert!(out.entropy.is_finite() && out.entropy >= 0.0, "{out:?} {logits:?}");
                }
            }
        }
    }
}
