//! `ferroserve plan`: sizes and prices a fleet from `ferroserve bench` result files (a concurrency sweep
//! of one worker) and a workload file, and optionally simulates the day under the autoscaling rules.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ferroserve_bench::report::RunResult;
use ferroserve_plan::scaling::{ScalingRules, Signal};
use ferroserve_plan::sim::{FleetPolicy, SimConfig, SimReport, simulate};
use ferroserve_plan::size::Model;
use ferroserve_plan::{PlanInput, ServiceCurve, report};

/// KV positions per worker in the simulation: `engine.kv_budget_tokens`'s default.
const KV_POOL_TOKENS: f64 = 32_768.0;

/// `ferroserve plan --bench sweep.json --workload configs/plan/workload.toml`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Result files of `ferroserve bench --concurrency ...` against one worker (repeatable).
    #[arg(long = "bench", required = true)]
    pub bench: Vec<PathBuf>,
    /// The workload, SLO and prices.
    #[arg(long, default_value = "configs/plan/workload.toml")]
    pub workload: PathBuf,
    /// Folder for plan.json, the charts and (with --simulate) sim.json.
    #[arg(long, default_value = "plan-out")]
    pub out: PathBuf,
    /// Also print the highest rate this many workers behind a router sustain at the SLO (repeatable).
    #[arg(long = "predict-workers")]
    pub predict_workers: Vec<u64>,
    /// Simulate a day at fleets whose static peak size is each of these worker counts (comma-separated):
    /// autoscaled, autoscaled with the cheapest mix's spot share, static for the peak hour, and static for
    /// the bursts too.
    #[arg(long, value_delimiter = ',')]
    pub simulate: Vec<u64>,
    /// Length of the simulated day in hours (shorter compresses the daily shape; starts are not).
    #[arg(long, default_value_t = 24.0)]
    pub day_hours: f64,
    /// Seeds the simulation.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Runs `ferroserve plan`.
pub fn run(a: PlanArgs) -> anyhow::Result<()> {
    let runs = a
        .bench
        .iter()
        .map(|p| RunResult::read(p))
        .collect::<Result<Vec<_>, _>>()?;
    let curve = ServiceCurve::from_runs(&runs)?;
    let input = PlanInput::read(&a.workload)?;
    let plan = ferroserve_plan::plan(curve.clone(), input.clone())?;
    let prices = input.prices.clone();
    print!("{}", report::plan_table(&plan));
    let model = Model::new(&curve, &input);
    for &n in &a.predict_workers {
        match model.best(n.max(1), &input.slo) {
            Some(p) => println!(
                "prediction: {n} workers sustain {:.3} req/s at the SLO (max_batch_seqs = {}, TTFT p99 {:.0} ms, \
                 TPOT p99 {:.1} ms)",
                p.rate, p.max_batch_seqs, p.ttft_p99_ms, p.tpot_p99_ms
            ),
            None => println!("prediction: {n} workers cannot meet the SLO at any rate"),
        }
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    write_json(&a.out.join("plan.json"), &plan)?;
    let mut files = report::plot_plan(&plan, &a.out)?;
    if !a.simulate.is_empty() {
        let mut all = Vec::new();
        for &size in &a.simulate {
            let m = ferroserve_plan::cost::cheapest_mix(size, &prices);
            let spot_share = m.spot as f64 / (m.spot + m.on_demand).max(1) as f64;
            let reports = simulate_scale(&curve, &input, &a, size, spot_share)?;
            println!("\nsimulated day, static fleet sized for the peak = {size} workers:");
            print!("{}", report::sim_table(&reports));
            let dir = a.out.join(format!("sim-{size}"));
            files.extend(report::plot_sim(&reports, &dir)?);
            all.push((size, reports));
        }
        write_json(&a.out.join("sim.json"), &all)?;
    }
    println!(
        "\nwrote {} and {} charts",
        a.out.join("plan.json").display(),
        files.len()
    );
    Ok(())
}

/// The day at a fleet whose static peak size is `size` workers: the workload's rate scaled to what `size`
/// workers sustain at the SLO, then autoscaled (on demand, and with the cheapest mix's spot share) and
/// static.
fn simulate_scale(
    curve: &ServiceCurve,
    input: &PlanInput,
    a: &PlanArgs,
    size: u64,
    spot_share: f64,
) -> anyhow::Result<Vec<SimReport>> {
    let model = Model::new(curve, input);
    let best = model
        .best(size, &input.slo)
        .with_context(|| format!("{size} workers cannot meet the SLO"))?;
    let mut input = input.clone();
    let shape_peak = input.workload.daily_shape.iter().copied().fold(0.0, f64::max);
    input.workload.peak_rps = best.rate / shape_peak;
    let routers =
        ((best.rate / input.prices.router_capacity_rps).ceil() as u64).max(u64::from(input.prices.min_routers));
    let mut rules = ScalingRules {
        // The manifests' ceiling is for the example fleet; a bigger one needs room for its bursts.
        max_replicas: ScalingRules::default().max_replicas.max(size * 2),
        ..ScalingRules::default()
    };
    // The running-requests target is the one the plan recommends for this fleet.
    let target = ferroserve_plan::cost::running_target(&model, size, &input.slo);
    for t in rules.triggers.iter_mut().filter(|t| t.signal == Signal::Running) {
        t.threshold = target;
    }
    println!(
        "\nsimulated fleet of {size}: running-requests target {target:.1}, max_replicas {}",
        rules.max_replicas
    );
    let config = |policy, spot_share| SimConfig {
        day_s: a.day_hours * 3600.0,
        seed: a.seed,
        policy,
        max_batch_seqs: best.max_batch_seqs,
        spot_share,
        routers,
        kv_pool_tokens: KV_POOL_TOKENS,
    };
    // A static fleet that also covers the bursts, for comparison.
    let burst_size = model
        .workers_for(input.workload.max_rate(), &input.slo)
        .map_or(size, |p| p.workers);
    let mut reports = vec![
        simulate(curve, &input, &config(FleetPolicy::Autoscaled(rules.clone()), 0.0)),
        simulate(curve, &input, &config(FleetPolicy::Autoscaled(rules), spot_share)),
        simulate(curve, &input, &config(FleetPolicy::Static(size), 0.0)),
        simulate(curve, &input, &config(FleetPolicy::Static(burst_size), 0.0)),
    ];
    reports[1].policy = format!("auto {:.0}% spot", spot_share * 100.0);
    reports[3].policy = format!("static {burst_size} (bursts)");
    Ok(reports)
}

fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).expect("plans serialize");
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
