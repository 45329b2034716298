//! What serving costs.
//!
//! The model: a worker costs its configured price per accelerator-hour (or per machine-hour on CPU) for
//! the time it is **busy**, that is while it runs at least one sequence. Idle time is not charged to
//! tokens, because an autoscaler (or a person) is expected to remove idle capacity; the idle share is
//! visible as the gap between wall-clock price and `ferroserve_cost_usd_total`.
//!
//! ```text
//! ferroserve_cost_usd_total{worker_kind}           = Σ busy_seconds · usd_per_hour / 3600
//! ferroserve_cost_per_million_tokens{worker_kind}  = cost_usd_total / generated_tokens · 1e6
//! ```
//!
//! Dollar amounts are fractional, and the `metrics` facade's counters are integers, so these two series
//! are kept here and appended to the exposition by the exporter.

use std::fmt::Write;
use std::sync::{Arc, Mutex, OnceLock};

use crate::names::{COST_PER_MILLION_TOKENS, COST_USD_TOTAL, LABEL_WORKER_KIND};

/// The price of one kind of worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Price {
    /// Label value, e.g. `cpu-2core` or `h200`.
    pub worker_kind: String,
    /// US dollars per busy hour.
    pub usd_per_hour: f64,
}

/// Accumulated busy time and tokens for one worker kind.
#[derive(Debug)]
pub struct CostMeter {
    /// The price that applies.
    price: Price,
    /// (busy seconds, generated tokens).
    totals: Mutex<(f64, u64)>,
}

impl CostMeter {
    /// Charges `busy_seconds` of work that generated `tokens`.
    pub fn charge(&self, busy_seconds: f64, tokens: u64) {
        let mut t = self.totals.lock().expect("cost lock");
        t.0 += busy_seconds.max(0.0);
        t.1 += tokens;
    }

    /// Dollars so far.
    pub fn usd_total(&self) -> f64 {
        self.totals.lock().expect("cost lock").0 * self.price.usd_per_hour / 3600.0
    }

    /// Dollars per million generated tokens so far (0 before the first token).
    pub fn usd_per_million_tokens(&self) -> f64 {
        let tokens = self.totals.lock().expect("cost lock").1;
        if tokens == 0 {
            0.0
        } else {
            self.usd_total() / tokens as f64 * 1e6
        }
    }
}

static METERS: OnceLock<Mutex<Vec<Arc<CostMeter>>>> = OnceLock::new();

/// The process-wide meter for `price.worker_kind`, created on first use. Engines of the same kind share it.
pub fn meter(price: &Price) -> Arc<CostMeter> {
    let mut meters = METERS.get_or_init(Default::default).lock().expect("meters lock");
    if let Some(m) = meters.iter().find(|m| m.price.worker_kind == price.worker_kind) {
        return Arc::clone(m);
    }
    let m = Arc::new(CostMeter {
        price: price.clone(),
        totals: Mutex::new((0.0, 0)),
    });
    meters.push(Arc::clone(&m));
    m
}

/// The cost series in Prometheus text format, for the exporter to append.
pub fn render() -> String {
    let Some(meters) = METERS.get() else {
        return String::new();
    };
    let meters = meters.lock().expect("meters lock");
    let mut out = String::new();
    if !meters.is_empty() {
        family(
            &mut out,
            COST_USD_TOTAL,
            "counter",
            "Busy-time cost in US dollars.",
            &meters,
            CostMeter::usd_total,
        );
        family(
            &mut out,
            COST_PER_MILLION_TOKENS,
            "gauge",
            "US dollars per million generated tokens, busy time only.",
            &meters,
            CostMeter::usd_per_million_tokens,
        );
    }
    out
}

/// Appends one metric family: its HELP and TYPE lines, then one sample per worker kind.
fn family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    meters: &[Arc<CostMeter>],
    value: fn(&CostMeter) -> f64,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for m in meters {
        let _ = writeln!(
            out,
            "{name}{{{LABEL_WORKER_KIND}=\"{}\"}} {}",
            m.price.worker_kind,
            value(m)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_is_priced_and_spread_over_tokens() {
        let m = meter(&Price {
            worker_kind: "test-kind-a".into(),
            usd_per_hour: 3.6,
        });
        assert_eq!(m.usd_per_million_tokens(), 0.0);
        m.charge(10.0, 1000);
        // 10 s at $3.60/h is $0.01; over 1000 tokens that is $10 per million.
        assert!((m.usd_total() - 0.01).abs() < 1e-12);
        assert!((m.usd_per_million_tokens() - 10.0).abs() < 1e-9);
        let same = meter(&Price {
            worker_kind: "test-kind-a".into(),
            usd_per_hour: 3.6,
        });
        assert!(Arc::ptr_eq(&m, &same));
        let text = render();
        assert!(text.contains("# TYPE ferroserve_cost_usd_total counter"));
        let value = |series: &str| -> f64 {
            let line = text.lines().find(|l| l.starts_with(series)).expect("series rendered");
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert!((value("ferroserve_cost_usd_total{worker_kind=\"test-kind-a\"}") - 0.01).abs() < 1e-12);
        assert!((value("ferroserve_cost_per_million_tokens{worker_kind=\"test-kind-a\"}") - 10.0).abs() < 1e-9);
    }
}
