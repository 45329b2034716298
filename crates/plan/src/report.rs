//! What `ferroserve plan` prints and draws.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use ferroserve_bench::plot::{Line, line_chart};

use crate::PlanError;
use crate::cost::Plan;
use crate::sim::SimReport;

/// The plan as text.
pub fn plan_table(p: &Plan) -> String {
    let mut s = String::new();
    let w = &p.input.workload;
    let slo = &p.input.slo;
    let _ = writeln!(s, "calibrated by: {}", p.curve.source);
    let _ = writeln!(
        s,
        "measured worker: {} levels, c={}..{}, {:.0} prompt / {:.0} output tokens a request",
        p.curve.points.len(),
        p.curve.points[0].concurrency,
        p.curve.points.last().map_or(0.0, |x| x.concurrency),
        p.curve.mean_input_tokens,
        p.curve.mean_output_tokens
    );
    let _ = writeln!(
        s,
        "objective: TTFT p99 <= {} ms, TPOT p99 <= {} ms; workload {:.0} prompt / {:.0} output tokens",
        slo.ttft_p99_ms, slo.tpot_p99_ms, w.input_tokens.mean, w.output_tokens.mean
    );
    let one = &p.one_worker;
    let _ = writeln!(
        s,
        "one worker: {:.3} req/s at the SLO with max_batch_seqs = {} (TTFT p99 {:.0} ms, TPOT p99 {:.1} ms)",
        one.rate, one.max_batch_seqs, one.ttft_p99_ms, one.tpot_p99_ms
    );
    let f = &p.peak;
    let _ = writeln!(
        s,
        "\npeak {:.2} req/s: {} workers (max_batch_seqs = {}), {} routers\n  expected TTFT p99 {:.0} ms, TPOT p99 \
         {:.1} ms, slot utilization {:.0} %\n  on demand: ${:.3}/hour, ${:.4} per 1M tokens (${:.4} per 1M output \
         tokens)",
        f.workers.rate,
        f.workers.workers,
        f.workers.max_batch_seqs,
        f.routers,
        f.workers.ttft_p99_ms,
        f.workers.tpot_p99_ms,
        f.workers.utilization * 100.0,
        f.cost_per_hour,
        f.cost_per_million_tokens,
        f.cost_per_million_output_tokens
    );
    let _ = writeln!(
        s,
        "  autoscaling: running-requests target {:.1} per worker (the first trigger of \
         deploy/k8s/components/keda)",
        p.running_target
    );
    costs(p, &mut s);
    for warning in &p.warnings {
        let _ = writeln!(s, "\nwarning: {warning}");
    }
    s
}

/// The plan's cost sections: on-demand/spot splits, the day, and cost against the objective.
fn costs(p: &Plan, s: &mut String) {
    let slo = &p.input.slo;
    let _ = writeln!(
        s,
        "\nworkers on demand + spot (spares cover spot replacements 99 % of the time):"
    );
    let _ = writeln!(
        s,
        "  {:>9} {:>5} {:>7} {:>12}",
        "on demand", "spot", "spares", "workers $/h"
    );
    for m in &p.mixes {
        let _ = writeln!(
            s,
            "  {:>9} {:>5} {:>7} {:>12.3}",
            m.on_demand, m.spot, m.spares, m.workers_cost_per_hour
        );
    }
    let c = &p.cheapest_mix;
    let _ = writeln!(
        s,
        "  cheapest: {} on demand + {} spot ({} spares): ${:.3}/hour for workers",
        c.on_demand, c.spot, c.spares, c.workers_cost_per_hour
    );
    let _ = writeln!(
        s,
        "\nthe day: ${:.2} autoscaled hour by hour (ideal) vs ${:.2} static for the peak",
        p.autoscaled_cost_per_day, p.static_cost_per_day
    );
    let _ = writeln!(
        s,
        "\ncost against the TTFT objective (TPOT p99 <= {} ms):",
        slo.tpot_p99_ms
    );
    let _ = writeln!(
        s,
        "  {:>10} {:>8} {:>12} {:>12}",
        "TTFT p99", "workers", "on demand $/h", "cheapest $/h"
    );
    for pt in &p.slo_curve {
        let _ = writeln!(
            s,
            "  {:>8.0}ms {:>8} {:>13.3} {:>12.3}",
            pt.ttft_p99_ms, pt.workers, pt.on_demand_per_hour, pt.cheapest_mix_per_hour
        );
    }
}

/// Simulated days side by side.
pub fn sim_table(reports: &[SimReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<18} {:>9} {:>8} {:>10} {:>10} {:>10} {:>8} {:>7} {:>8} {:>9} {:>9} {:>10}",
        "fleet",
        "requests",
        "SLO met",
        "TTFT p50",
        "TTFT p99",
        "TPOT p99",
        "workers",
        "max",
        "spot int",
        "migrated",
        "$ / day",
        "$ / 1M tok"
    );
    for r in reports {
        let _ = writeln!(
            s,
            "{:<18} {:>9} {:>7.2}% {:>8.0}ms {:>8.0}ms {:>8.1}ms {:>8.1} {:>7} {:>8} {:>9} {:>9.2} {:>10.4}",
            r.policy,
            r.requests,
            r.slo_attainment * 100.0,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.tpot_p99_ms,
            r.workers_mean,
            r.workers_max,
            r.interruptions,
            r.migrations,
            r.cost_usd,
            r.cost_per_million_tokens
        );
    }
    s
}

/// `cost_vs_slo.png/.svg`: $/hour against the TTFT objective, on demand and with the cheapest mix.
pub fn plot_plan(p: &Plan, dir: &Path) -> Result<Vec<PathBuf>, PlanError> {
    let line = |name: &str, f: &dyn Fn(&crate::cost::SloCost) -> f64, dashed| Line {
        name: name.into(),
        points: p.slo_curve.iter().map(|c| (c.ttft_p99_ms / 1e3, f(c))).collect(),
        dashed,
        markers: true,
    };
    Ok(line_chart(
        dir,
        "cost_vs_slo",
        "Fleet cost against the TTFT objective",
        ["TTFT p99 objective (s)", "$ / hour"],
        vec![
            line("all on demand", &|c| c.on_demand_per_hour, false),
            line("cheapest on-demand/spot mix", &|c| c.cheapest_mix_per_hour, true),
        ],
    )?)
}

/// `sim_workers.png/.svg`: workers alive over the simulated day, for each fleet, with the request rate.
pub fn plot_sim(reports: &[SimReport], dir: &Path) -> Result<Vec<PathBuf>, PlanError> {
    let mut lines: Vec<Line> = reports
        .iter()
        .map(|r| Line {
            name: format!("workers, {}", r.policy),
            points: r.timeline.iter().map(|&(h, _, w)| (h, w as f64)).collect(),
            dashed: false,
            markers: false,
        })
        .collect();
    if let Some(r) = reports.first() {
        let peak_workers = reports.iter().map(|r| r.workers_max).max().unwrap_or(1) as f64;
        let peak_rate = r.timeline.iter().map(|t| t.1).fold(0.0, f64::max).max(1e-9);
        lines.push(Line {
            name: format!("request rate (peak {peak_rate:.1} req/s = {peak_workers:.0})"),
            points: r
                .timeline
                .iter()
                .map(|&(h, rate, _)| (h, rate / peak_rate * peak_workers))
                .collect(),
            dashed: true,
            markers: false,
        });
    }
    Ok(line_chart(
        dir,
        "sim_workers",
        "Simulated day: workers against traffic",
        ["hour of the day", "workers"],
        lines,
    )?)
}

#[cfg(test)]
mod tests {
    use crate::curve::tests::synthetic;
    use crate::input::tests::for_synthetic;

    #[test]
    fn the_table_says_what_to_run_and_what_it_costs() {
        let plan = crate::plan(synthetic(), for_synthetic(40.0)).unwrap();
        let text = super::plan_table(&plan);
        let peak = format!(
            "{} workers (max_batch_seqs = {})",
            plan.peak.workers.workers, plan.peak.workers.max_batch_seqs
        );
        for line in [
            peak.as_str(),
            "running-requests target",
            "cheapest:",
            "autoscaled hour by hour",
            "TTFT p99",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
    }
}
