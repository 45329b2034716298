//! A worker's service curve, measured: throughput and latency against the requests it runs at once, read
//! from `ferroserve bench` result files of a closed-loop concurrency sweep against one worker.

use ferroserve_bench::load::Level;
use ferroserve_bench::report::RunResult;
use serde::Serialize;

use crate::PlanError;

/// One measured concurrency level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// Requests in flight.
    pub concurrency: f64,
    /// Completed requests per second.
    pub req_per_s: f64,
    /// Output tokens per second.
    pub output_tok_per_s: f64,
    /// Time to first token, median and 99th percentile, seconds.
    pub ttft_p50_s: f64,
    /// See `ttft_p50_s`.
    pub ttft_p99_s: f64,
    /// Time per output token (per request), median and 99th percentile, seconds.
    pub tpot_p50_s: f64,
    /// See `tpot_p50_s`.
    pub tpot_p99_s: f64,
}

impl Point {
    /// Linear interpolation between `self` (at t = 0) and `other` (t = 1).
    fn lerp(&self, other: &Point, t: f64) -> Point {
        let l = |a: f64, b: f64| a + (b - a) * t;
        Point {
            concurrency: l(self.concurrency, other.concurrency),
            req_per_s: l(self.req_per_s, other.req_per_s),
            output_tok_per_s: l(self.output_tok_per_s, other.output_tok_per_s),
            ttft_p50_s: l(self.ttft_p50_s, other.ttft_p50_s),
            ttft_p99_s: l(self.ttft_p99_s, other.ttft_p99_s),
            tpot_p50_s: l(self.tpot_p50_s, other.tpot_p50_s),
            tpot_p99_s: l(self.tpot_p99_s, other.tpot_p99_s),
        }
    }
}

/// The measured curve of one worker.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceCurve {
    /// Levels, by increasing concurrency.
    pub points: Vec<Point>,
    /// Mean prompt tokens of the measured requests.
    pub mean_input_tokens: f64,
    /// Mean output tokens of the measured requests.
    pub mean_output_tokens: f64,
    /// Where it came from (the runs' labels).
    pub source: String,
}

/// A level is used only if at least this share of its requests completed.
const MIN_COMPLETED_SHARE: f64 = 0.95;

impl ServiceCurve {
    /// The curve from one or more runs' concurrency levels (a level measured twice keeps the later run's).
    pub fn from_runs(runs: &[RunResult]) -> Result<ServiceCurve, PlanError> {
        let mut points: Vec<Point> = Vec::new();
        let (mut input, mut output, mut completed) = (0u64, 0u64, 0u64);
        for run in runs {
            for l in &run.levels {
                let Level::Concurrency(c) = l.level else {
                    return Err(PlanError::Curve(format!(
                        "{}: level {} is an open-loop rate; calibrate with a concurrency sweep \
                         (ferroserve bench --concurrency 1,2,4,8,...) against one worker",
                        run.label,
                        l.level.label()
                    )));
                };
                if l.sent == 0 || (l.completed as f64) < MIN_COMPLETED_SHARE * l.sent as f64 {
                    return Err(PlanError::Curve(format!(
                        "{}: c={c} completed {} of {} requests; a curve needs levels that completed at \
                         least {:.0} % (see its errors: {:?})",
                        run.label,
                        l.completed,
                        l.sent,
                        MIN_COMPLETED_SHARE * 100.0,
                        l.errors
                    )));
                }
                input += l.input_tokens;
                output += l.output_tokens;
                completed += l.completed;
                points.retain(|p| p.concurrency != f64::from(c));
                points.push(Point {
                    concurrency: f64::from(c),
                    req_per_s: l.request_throughput,
                    output_tok_per_s: l.output_throughput,
                    ttft_p50_s: l.ttft.median / 1e3,
                    ttft_p99_s: l.ttft.p99 / 1e3,
                    tpot_p50_s: l.tpot.median / 1e3,
                    tpot_p99_s: l.tpot.p99 / 1e3,
                });
            }
        }
        if points.is_empty() || completed == 0 {
            return Err(PlanError::Curve("no concurrency level with completed requests".into()));
        }
        points.sort_by(|a, b| a.concurrency.total_cmp(&b.concurrency));
        let source = runs.iter().map(|r| r.label.as_str()).collect::<Vec<_>>().join(", ");
        Ok(ServiceCurve {
            points,
            mean_input_tokens: input as f64 / completed as f64,
            mean_output_tokens: output as f64 / completed as f64,
            source,
        })
    }

    /// The curve at concurrency `c`: interpolated between measured levels, the first level below them
    /// (latency cannot fall below one request's), and beyond the last level latencies grow in proportion
    /// to `c` at the last level's throughput (a saturated worker only queues).
    pub fn at(&self, c: f64) -> Point {
        let first = self.points[0];
        let last = *self.points.last().expect("a curve has points");
        if c <= first.concurrency {
            return Point {
                concurrency: c,
                req_per_s: first.req_per_s * c / first.concurrency,
                output_tok_per_s: first.output_tok_per_s * c / first.concurrency,
                ..first
            };
        }
        if c >= last.concurrency {
            let k = c / last.concurrency;
            return Point {
                concurrency: c,
                ttft_p50_s: last.ttft_p50_s * k,
                ttft_p99_s: last.ttft_p99_s * k,
                tpot_p50_s: last.tpot_p50_s * k,
                tpot_p99_s: last.tpot_p99_s * k,
                ..last
            };
        }
        let i = self
            .points
            .iter()
            .position(|p| p.concurrency >= c)
            .expect("c is inside the curve");
        let (a, b) = (self.points[i - 1], self.points[i]);
        a.lerp(&b, (c - a.concurrency) / (b.concurrency - a.concurrency))
    }

    /// Seconds one request of `input` prompt and `output` generated tokens occupies a slot at concurrency
    /// `c`, by the medians: its time to first token (scaled by its prompt against the measured mean) and
    /// its other tokens at the median time per token.
    pub fn service_s(&self, c: f64, input: f64, output: f64) -> f64 {
        let p = self.at(c);
        p.ttft_p50_s * self.prompt_scale(input) + (output - 1.0).max(0.0) * p.tpot_p50_s
    }

    /// How much longer a prompt of `input` tokens takes to prefill than the measured mean (at least 1/4:
    /// a short prompt still waits for a step).
    pub fn prompt_scale(&self, input: f64) -> f64 {
        (input / self.mean_input_tokens.max(1.0)).max(0.25)
    }

    /// Requests per second one worker completes at concurrency `c` for requests of this shape: the
    /// measured throughput, scaled by how much longer (or shorter) this shape holds a slot.
    pub fn rate_at(&self, c: f64, input: f64, output: f64) -> f64 {
        let measured = self.service_s(c, self.mean_input_tokens, self.mean_output_tokens);
        let this = self.service_s(c, input, output);
        self.at(c).req_per_s * measured / this.max(1e-9)
    }

    /// The measured concurrency levels: the `max_batch_seqs` values a plan may choose.
    pub fn levels(&self) -> impl Iterator<Item = u32> + '_ {
        self.points.iter().map(|p| p.concurrency as u32)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A curve shaped like a batching engine's: throughput rises and flattens, latency rises.
    pub(crate) fn synthetic() -> ServiceCurve {
        let point = |c: f64, tpot: f64, ttft: f64| {
            let service = ttft + 63.0 * tpot;
            Point {
                concurrency: c,
                req_per_s: c / service,
                output_tok_per_s: 64.0 * c / service,
                ttft_p50_s: ttft,
                ttft_p99_s: ttft * 2.0,
                tpot_p50_s: tpot,
                tpot_p99_s: tpot * 1.3,
            }
        };
        ServiceCurve {
            points: vec![
                point(1.0, 0.010, 0.05),
                point(2.0, 0.011, 0.06),
                point(4.0, 0.013, 0.08),
                point(8.0, 0.018, 0.12),
                point(16.0, 0.030, 0.25),
            ],
            mean_input_tokens: 100.0,
            mean_output_tokens: 64.0,
            source: "synthetic".into(),
        }
    }

    #[test]
    fn interpolates_inside_and_saturates_beyond() {
        let c = synthetic();
        let mid = c.at(3.0);
        assert!((mid.tpot_p50_s - 0.012).abs() < 1e-12, "{mid:?}");
        let beyond = c.at(32.0);
        assert_eq!(
            beyond.req_per_s, c.points[4].req_per_s,
            "no more throughput past the last level"
        );
        assert!((beyond.ttft_p99_s - 2.0 * c.points[4].ttft_p99_s).abs() < 1e-12);
        let below = c.at(0.5);
        assert_eq!(below.ttft_p50_s, c.points[0].ttft_p50_s);
    }

    #[test]
    fn a_longer_output_lowers_the_request_rate_in_proportion() {
        let c = synthetic();
        let same = c.rate_at(8.0, 100.0, 64.0);
        assert!((same - c.points[3].req_per_s).abs() < 1e-9);
        let double = c.rate_at(8.0, 100.0, 127.0);
        assert!(double < same * 0.55 && double > same * 0.45, "{double} vs {same}");
    }
}
