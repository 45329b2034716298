//! Summaries with `vllm bench serve`'s definitions, from hdrhistogram histograms:
//! TTFT, ITL, TPOT and e2e latency (mean, median, p90, p99, standard deviation, and a CDF for plots),
//! request / output-token / total-token throughput, goodput against an SLO, and errors by kind.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::BenchError;
use crate::load::{Level, LevelRun};
use crate::sample::{ErrorKind, Sample, TokenCount};

/// Points in each CDF written to the result file (quantiles 0, 0.01, ..., 1).
const CDF_POINTS: usize = 101;
/// Failure messages kept per level, for the report.
const KEPT_MESSAGES: usize = 5;

/// A latency distribution, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    /// Values recorded.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub std: f64,
    /// Median.
    pub median: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// `[value_ms, quantile]` pairs for quantiles 0 to 1 in steps of 0.01; empty when `count` is 0.
    pub cdf: Vec<[f64; 2]>,
}

impl Distribution {
    /// Summarizes durations: quantiles through a microsecond histogram (3 significant digits), mean and
    /// standard deviation exactly.
    pub fn of(values: impl IntoIterator<Item = Duration>) -> Self {
        // 1 µs to one hour; longer values are clamped to an hour (no request runs that long).
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
        let (mut sum, mut sum_sq) = (0.0, 0.0);
        for v in values {
            let ms = v.as_secs_f64() * 1000.0;
            sum += ms;
            sum_sq += ms * ms;
            h.saturating_record(v.as_micros().max(1) as u64);
        }
        if h.is_empty() {
            return Distribution::default();
        }
        let n = h.len() as f64;
        let mean = sum / n;
        let ms = |us: u64| us as f64 / 1000.0;
        Distribution {
            count: h.len(),
            mean,
            // Population standard deviation, as numpy's default (vLLM's report).
            std: (sum_sq / n - mean * mean).max(0.0).sqrt(),
            median: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            min: ms(h.min()),
            max: ms(h.max()),
            cdf: (0..CDF_POINTS)
                .map(|i| {
                    let q = i as f64 / (CDF_POINTS - 1) as f64;
                    [ms(h.value_at_quantile(q)), q]
                })
                .collect(),
        }
    }
}

/// Service-level objectives for goodput: a request counts when it succeeded and met every one given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    /// Time to first token, ms.
    pub ttft_ms: Option<f64>,
    /// Time per output token, ms.
    pub tpot_ms: Option<f64>,
    /// End-to-end latency, ms.
    pub e2e_ms: Option<f64>,
}

impl Slo {
    /// Parses `ttft=500ms,tpot=50ms,e2e=10s` (units `ms` or `s`; a bare number is milliseconds).
    pub fn parse(spec: &str) -> Result<Self, BenchError> {
        let bad = |m: String| BenchError::setting("slo", m);
        let mut slo = Slo::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?}: expected key=value, e.g. ttft=500ms")))?;
            let (number, scale) = if let Some(n) = value.strip_suffix("ms") {
                (n, 1.0)
            } else if let Some(n) = value.strip_suffix('s') {
                (n, 1000.0)
            } else {
                (value, 1.0)
            };
            let ms = number
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| bad(format!("{part:?}: the value must be a positive number of ms or s")))?
                * scale;
            match key.trim() {
                "ttft" => slo.ttft_ms = Some(ms),
                "tpot" => slo.tpot_ms = Some(ms),
                "e2e" | "e2el" => slo.e2e_ms = Some(ms),
                other => return Err(bad(format!("unknown metric {other:?}; use ttft, tpot or e2e"))),
            }
        }
        if slo == Slo::default() {
            return Err(bad("give at least one of ttft, tpot, e2e".into()));
        }
        Ok(slo)
    }

    /// Whether a successful sample meets every objective.
    pub fn met_by(&self, s: &Sample) -> bool {
        let within = |limit: Option<f64>, value: Option<Duration>| {
            limit.is_none_or(|l| value.is_some_and(|v| v.as_secs_f64() * 1000.0 <= l))
        };
        s.ok()
            && within(self.ttft_ms, s.ttft)
            && within(self.tpot_ms, s.tpot().or(s.ttft.map(|_| Duration::ZERO)))
            && within(self.e2e_ms, Some(s.e2e))
    }
}

/// One level's results, as written to the result file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LevelResult {
    /// The concurrency or rate.
    pub level: Level,
    /// First measured send to last completion, seconds.
    pub duration_s: f64,
    /// Measured requests sent.
    pub sent: u64,
    /// Requests that succeeded.
    pub completed: u64,
    /// Requests that failed, rate-limited ones excluded.
    pub failed: u64,
    /// Failed requests by kind (`rate_limited`, `unavailable`, `invalid`, `timeout`, `other`).
    pub errors: BTreeMap<String, u64>,
    /// The first few failure messages.
    pub error_samples: Vec<String>,
    /// Prompt tokens of completed requests.
    pub input_tokens: u64,
    /// Output tokens of completed requests.
    pub output_tokens: u64,
    /// How output tokens were counted: `usage`, `chunks`, or `mixed`.
    pub token_count: String,
    /// Completed requests per second.
    pub request_throughput: f64,
    /// Output tokens per second.
    pub output_throughput: f64,
    /// Prompt plus output tokens per second.
    pub total_token_throughput: f64,
    /// Open loop: requests actually sent per second (against the target rate).
    pub achieved_rate: f64,
    /// Requests per second that met the SLO; `None` without one.
    pub goodput: Option<f64>,
    /// Time to first token.
    pub ttft: Distribution,
    /// Time per output token, per request.
    pub tpot: Distribution,
    /// Inter-token latency, per gap.
    pub itl: Distribution,
    /// End-to-end latency of completed requests.
    pub e2e: Distribution,
}

impl LevelResult {
    /// Summarizes one level's samples.
    pub fn of(run: &LevelRun, slo: Option<&Slo>) -> Self {
        let secs = run.duration.as_secs_f64().max(1e-9);
        let ok: Vec<&Sample> = run.samples.iter().filter(|s| s.ok()).collect();
        let mut errors: BTreeMap<String, u64> = ErrorKind::ALL.iter().map(|k| (k.label().to_string(), 0)).collect();
        let mut error_samples = Vec::new();
        for f in run.samples.iter().filter_map(|s| s.failure.as_ref()) {
            *errors.entry(f.kind.label().to_string()).or_default() += 1;
            if error_samples.len() < KEPT_MESSAGES {
                error_samples.push(format!("{}: {}", f.kind.label(), f.message));
            }
        }
        let limited = errors[ErrorKind::RateLimited.label()];
        let failed = run.samples.len() as u64 - ok.len() as u64 - limited;
        let input_tokens: u64 = ok.iter().map(|s| u64::from(s.input_tokens)).sum();
        let output_tokens: u64 = ok.iter().map(|s| u64::from(s.output_tokens)).sum();
        let by_usage = ok.iter().filter(|s| s.counted_by == TokenCount::Usage).count();
        let token_count = match by_usage {
            0 if ok.is_empty() => "none",
            0 => "chunks",
            n if n == ok.len() => "usage",
            _ => "mixed",
        };
        let last_send = run.samples.iter().map(|s| s.sent_at).max().unwrap_or_default();
        LevelResult {
            level: run.level,
            duration_s: secs,
            sent: run.samples.len() as u64,
            completed: ok.len() as u64,
            failed,
            errors,
            error_samples,
            input_tokens,
            output_tokens,
            token_count: token_count.to_string(),
            request_throughput: ok.len() as f64 / secs,
            output_throughput: output_tokens as f64 / secs,
            total_token_throughput: (input_tokens + output_tokens) as f64 / secs,
            achieved_rate: if run.samples.len() > 1 {
                (run.samples.len() - 1) as f64 / last_send.as_secs_f64().max(1e-9)
            } else {
                0.0
            },
            goodput: slo.map(|slo| ok.iter().filter(|s| slo.met_by(s)).count() as f64 / secs),
            ttft: Distribution::of(ok.iter().filter_map(|s| s.ttft)),
            tpot: Distribution::of(ok.iter().filter_map(|s| s.tpot())),
            itl: Distribution::of(ok.iter().flat_map(|s| s.itl.iter().copied())),
            e2e: Distribution::of(ok.iter().map(|s| s.e2e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::Failure;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn sample(ttft: u64, e2e: u64, tokens: u32) -> Sample {
        Sample {
            sent_at: Duration::ZERO,
            e2e: ms(e2e),
            ttft: Some(ms(ttft)),
            itl: vec![ms((e2e - ttft) / u64::from(tokens - 1)); tokens as usize - 1],
            output_tokens: tokens,
            input_tokens: 10,
            counted_by: TokenCount::Usage,
            failure: None,
        }
    }

    #[test]
    fn distribution_matches_known_values() {
        let d = Distribution::of((1..=100).map(ms));
        assert_eq!(d.count, 100);
        assert!((d.mean - 50.5).abs() < 0.1, "{}", d.mean);
        assert!((d.median - 50.0).abs() < 0.1, "{d:?}");
        assert!((d.p90 - 90.0).abs() < 0.1);
        assert!((d.p99 - 99.0).abs() < 0.1);
        assert!((d.std - 28.87).abs() < 0.1, "{}", d.std);
        assert_eq!(d.cdf.len(), CDF_POINTS);
        assert!(d.cdf.windows(2).all(|w| w[0][0] <= w[1][0] && w[0][1] < w[1][1]));
        assert_eq!(Distribution::of([]).count, 0);
    }

    #[test]
    fn level_summary_counts_and_goodput() {
        let mut samples = vec![sample(100, 1100, 11), sample(300, 3300, 11)];
        for kind in [ErrorKind::RateLimited, ErrorKind::Timeout] {
            let mut s = sample(1, 2, 2);
            s.failure = Some(Failure {
                kind,
                message: "x".into(),
            });
            samples.push(s);
        }
        let run = LevelRun {
            level: Level::Concurrency(2),
            duration: Duration::from_secs(2),
            samples,
        };
        let slo = Slo::parse("ttft=200ms,tpot=150ms").unwrap();
        let r = LevelResult::of(&run, Some(&slo));
        assert_eq!((r.sent, r.completed, r.failed), (4, 2, 1));
        assert_eq!(
            (r.errors["rate_limited"], r.errors["timeout"], r.errors["other"]),
            (1, 1, 0)
        );
        assert_eq!((r.input_tokens, r.output_tokens), (20, 22));
        assert_eq!(r.request_throughput, 1.0);
        assert_eq!(r.output_throughput, 11.0);
        assert_eq!(r.total_token_throughput, 21.0);
        assert_eq!(r.goodput, Some(0.5), "only the first request meets ttft 200 ms");
        assert!((r.tpot.mean - 200.0).abs() < 1.0, "{:?}", r.tpot);
        assert_eq!(r.token_count, "usage");
    }

    #[test]
    fn slo_specs() {
        let s = Slo::parse("ttft=0.5s, tpot=50ms,e2e=10s").unwrap();
        assert_eq!(
            (s.ttft_ms, s.tpot_ms, s.e2e_ms),
            (Some(500.0), Some(50.0), Some(10_000.0))
        );
        for bad in ["", "ttft", "ttft=-1ms", "speed=3ms", "ttft=abc"] {
            assert!(Slo::parse(bad).is_err(), "{bad:?}");
        }
    }
}
