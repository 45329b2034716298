//! What each model version did lately, as the router saw it: one sample per finished request (failed or
//! not, time to first token, mean inter-token gap, stopped by the output filter, mean sampled-token
//! logprob and entropy, output length), kept in a bounded window per version. The canary analysis compares two
//! versions' windows.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Samples kept per version.
const KEEP: usize = 4096;

/// One finished request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// When it finished.
    pub at: Instant,
    /// It ended with an error status.
    pub failed: bool,
    /// Time to first token, when there was one.
    pub ttft: Option<Duration>,
    /// Mean gap between its tokens, when there were two or more.
    pub itl: Option<Duration>,
    /// The output filter stopped it.
    pub filtered: bool,
    /// Mean log-probability of its sampled tokens, when it produced any.
    pub mean_logprob: Option<f64>,
    /// Mean entropy (nats) of the distributions its tokens were sampled from.
    pub mean_entropy: Option<f64>,
    /// Tokens it produced.
    pub tokens: u32,
}

/// A version's window summarized.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    /// Requests in the window.
    pub requests: usize,
    /// Share that failed.
    pub error_rate: f64,
    /// 95th percentile time to first token, in ms (0 without samples).
    pub ttft_p95_ms: f64,
    /// 95th percentile mean inter-token gap, in ms.
    pub itl_p95_ms: f64,
    /// Share the output filter stopped.
    pub block_rate: f64,
    /// Mean of the requests' mean sampled-token logprob.
    pub mean_logprob: f64,
    /// Mean of the requests' mean next-token entropy.
    pub mean_entropy: f64,
    /// Mean output length in tokens.
    pub mean_tokens: f64,
}

fn p95(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * 0.95).round() as usize]
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// Recent samples per `name@version`.
#[derive(Default)]
pub struct Observations {
    windows: Mutex<HashMap<String, Window>>,
}

/// One version's recent samples, and how many of them were handed to the fleet already.
#[derive(Default)]
struct Window {
    samples: VecDeque<Sample>,
    /// Samples recorded but not yet taken by [`Observations::take_new`] (at most the window's length).
    unshared: usize,
}

/// The summary of a set of samples.
pub fn summarize(samples: &[Sample]) -> Summary {
    let n = samples.len();
    if n == 0 {
        return Summary::default();
    }
    let share = |f: fn(&Sample) -> bool| samples.iter().filter(|s| f(s)).count() as f64 / n as f64;
    Summary {
        requests: n,
        error_rate: share(|s| s.failed),
        ttft_p95_ms: p95(samples
            .iter()
            .filter_map(|s| s.ttft)
            .map(|d| d.as_secs_f64() * 1e3)
            .collect()),
        itl_p95_ms: p95(samples
            .iter()
            .filter_map(|s| s.itl)
            .map(|d| d.as_secs_f64() * 1e3)
            .collect()),
        block_rate: share(|s| s.filtered),
        mean_logprob: mean(samples.iter().filter_map(|s| s.mean_logprob)),
        mean_entropy: mean(samples.iter().filter_map(|s| s.mean_entropy)),
        mean_tokens: mean(samples.iter().filter(|s| !s.failed).map(|s| f64::from(s.tokens))),
    }
}

impl Observations {
    /// Adds a finished request of `version` (`name@version`).
    pub fn record(&self, version: &str, sample: Sample) {
        let mut windows = self.windows.lock().expect("observations lock");
        let w = windows.entry(version.to_string()).or_default();
        w.samples.push_back(sample);
        if w.samples.len() > KEEP {
            w.samples.pop_front();
        }
        w.unshared = (w.unshared + 1).min(w.samples.len());
    }

    /// `version`'s requests that finished after `since`.
    pub fn summary(&self, version: &str, since: Instant) -> Summary {
        let windows = self.windows.lock().expect("observations lock");
        let samples: Vec<Sample> = windows
            .get(version)
            .map(|w| w.samples.iter().filter(|s| s.at >= since).copied().collect())
            .unwrap_or_default();
        summarize(&samples)
    }

    /// The samples recorded since the last call, per version, for the fleet's shared windows.
    pub fn take_new(&self) -> Vec<(String, Vec<Sample>)> {
        let mut windows = self.windows.lock().expect("observations lock");
        windows
            .iter_mut()
            .filter(|(_, w)| w.unshared > 0)
            .map(|(version, w)| {
                let new = w.samples.iter().skip(w.samples.len() - w.unshared).copied().collect();
                w.unshared = 0;
                (version.clone(), new)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: Instant, failed: bool, ttft_ms: u64, logprob: f64) -> Sample {
        Sample {
            at,
            failed,
            ttft: Some(Duration::from_millis(ttft_ms)),
            itl: None,
            filtered: false,
            mean_logprob: Some(logprob),
            mean_entropy: Some(-logprob / 2.0),
            tokens: 10,
        }
    }

    #[test]
    fn a_summary_covers_only_the_window_and_its_version() {
        let o = Observations::default();
        let start = Instant::now();
        o.record("m@a", sample(start, true, 900, -9.0));
        let later = start + Duration::from_millis(1);
        for i in 0..100 {
            o.record("m@a", sample(later, i % 10 == 0, i, -1.0));
        }
        o.record("m@b", sample(later, true, 1, 0.0));
        let s = o.summary("m@a", later);
        assert_eq!(s.requests, 100);
        assert!((s.error_rate - 0.1).abs() < 1e-9);
        assert_eq!(s.ttft_p95_ms, 94.0);
        assert!((s.mean_logprob + 1.0).abs() < 1e-9);
        assert!((s.mean_entropy - 0.5).abs() < 1e-9);
        assert_eq!(s.mean_tokens, 10.0);
        assert_eq!(o.summary("m@c", start), Summary::default());
    }
}
