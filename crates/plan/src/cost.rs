//! A whole plan: the fleet for the peak, what it costs, the cheapest on-demand/spot mix that still meets
//! the SLO when spot workers are taken away, the day under ideal autoscaling, and the cost against the SLO.

use serde::Serialize;

use crate::PlanError;
use crate::curve::ServiceCurve;
use crate::input::{PlanInput, Prices, SloTarget};
use crate::queue::poisson_quantile;
use crate::size::{Model, Prediction};

/// The share of time the spare spot workers must cover the ones being replaced.
pub const SPOT_COVER: f64 = 0.99;
/// TTFT SLOs of the cost curve, as multiples of the plan's.
const SLO_SCALES: [f64; 9] = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0];

/// The fleet for one rate.
#[derive(Debug, Clone, Serialize)]
pub struct Fleet {
    /// Workers and what they would show.
    pub workers: Prediction,
    /// Routers.
    pub routers: u64,
    /// $/hour, all on demand, Redis included.
    pub cost_per_hour: f64,
    /// $ per million tokens (prompt and output).
    pub cost_per_million_tokens: f64,
    /// $ per million output tokens.
    pub cost_per_million_output_tokens: f64,
}

/// One on-demand/spot split.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Mix {
    /// On-demand workers.
    pub on_demand: u64,
    /// Spot workers.
    pub spot: u64,
    /// Workers beyond what the SLO needs, covering spot workers being replaced.
    pub spares: u64,
    /// $/hour of the workers.
    pub workers_cost_per_hour: f64,
}

/// One point of the cost-against-SLO curve.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SloCost {
    /// The TTFT p99 objective, ms.
    pub ttft_p99_ms: f64,
    /// Workers needed at the peak.
    pub workers: u64,
    /// $/hour all on demand (routers and Redis included).
    pub on_demand_per_hour: f64,
    /// $/hour with the cheapest mix.
    pub cheapest_mix_per_hour: f64,
}

/// One hour of the day under ideal autoscaling.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Hour {
    /// Hour of the day.
    pub hour: u32,
    /// Requests per second.
    pub rate: f64,
    /// Workers needed.
    pub workers: u64,
}

/// Everything `ferroserve plan` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The input, echoed.
    pub input: PlanInput,
    /// The curve used.
    pub curve: ServiceCurve,
    /// One worker at its best batch size.
    pub one_worker: Prediction,
    /// The fleet for the busiest hour (bursts excluded), all on demand.
    pub peak: Fleet,
    /// On-demand/spot splits from all on demand to all spot (in tenths), then the cheapest of all.
    pub mixes: Vec<Mix>,
    /// The cheapest split that covers spot replacements.
    pub cheapest_mix: Mix,
    /// The day, hour by hour, with as many workers as each hour needs.
    pub day: Vec<Hour>,
    /// $ for the day with ideal autoscaling (on demand), and with a static fleet sized for the peak.
    pub autoscaled_cost_per_day: f64,
    /// See `autoscaled_cost_per_day`.
    pub static_cost_per_day: f64,
    /// The cost of tighter and looser TTFT objectives.
    pub slo_curve: Vec<SloCost>,
    /// The autoscaler's running-requests target per worker ([`running_target`]).
    pub running_target: f64,
    /// What the planner noticed about its inputs.
    pub warnings: Vec<String>,
}

/// Builds the plan.
pub fn plan(curve: ServiceCurve, input: PlanInput) -> Result<Plan, PlanError> {
    let model = Model::new(&curve, &input);
    let slo = input.slo;
    let one_worker = model.best(1, &slo).ok_or_else(|| {
        PlanError::Infeasible(format!(
            "no measured level meets TTFT p99 {} ms and TPOT p99 {} ms even alone; the fastest level \
             measured has TTFT p99 {:.0} ms and TPOT p99 {:.1} ms",
            slo.ttft_p99_ms,
            slo.tpot_p99_ms,
            curve.points[0].ttft_p99_s * 1e3,
            curve.points[0].tpot_p99_s * 1e3
        ))
    })?;
    let peak_rate = input.workload.peak_of_shape();
    let peak = fleet(&model, &input, peak_rate, &slo)?;
    let (splits, cheapest_mix) = mixes(peak.workers.workers, &input.prices);
    let day: Vec<Hour> = (0..24u32)
        .map(|h| {
            let rate = input.workload.peak_rps * input.workload.daily_shape[h as usize];
            let workers = if rate > 0.0 {
                model
                    .workers_for(rate, &slo)
                    .map_or(peak.workers.workers, |p| p.workers)
            } else {
                0
            };
            Hour { hour: h, rate, workers }
        })
        .collect();
    let fixed = fixed_per_hour(peak.routers, &input.prices);
    let price = input.prices.worker_on_demand_per_hour;
    let autoscaled_cost_per_day = day.iter().map(|h| h.workers as f64 * price + fixed).sum();
    let static_cost_per_day = 24.0 * peak.cost_per_hour;
    let slo_curve = SLO_SCALES
        .iter()
        .filter_map(|k| {
            let s = SloTarget {
                ttft_p99_ms: slo.ttft_p99_ms * k,
                ..slo
            };
            let f = fleet(&model, &input, peak_rate, &s).ok()?;
            let (_, mix) = mixes(f.workers.workers, &input.prices);
            Some(SloCost {
                ttft_p99_ms: s.ttft_p99_ms,
                workers: f.workers.workers,
                on_demand_per_hour: f.cost_per_hour,
                cheapest_mix_per_hour: mix.workers_cost_per_hour + fixed_per_hour(f.routers, &input.prices),
            })
        })
        .collect();
    let warnings = warnings(&curve, &input);
    let running_target = running_target(&model, peak.workers.workers, &slo);
    Ok(Plan {
        input,
        curve,
        one_worker,
        peak,
        mixes: splits,
        cheapest_mix,
        day,
        autoscaled_cost_per_day,
        static_cost_per_day,
        slo_curve,
        running_target,
        warnings,
    })
}

/// The share of a worker's highest measured throughput at which the running-requests target holds it.
pub const TARGET_THROUGHPUT_SHARE: f64 = 0.8;

/// The running-requests target for `workers` workers: what each runs at the knee of its curve (where its
/// throughput reaches 80 % of the most measured), and at most 90 % of what each runs at the most the fleet
/// sustains within `slo`. Past the knee more requests add latency, not throughput: a target there leaves a
/// worker no room for a surge while new workers start, and the fleet swings between queueing and scaling.
pub fn running_target(model: &Model<'_>, workers: u64, slo: &SloTarget) -> f64 {
    let curve = model.curve;
    let best = curve.points.iter().map(|p| p.req_per_s).fold(0.0, f64::max);
    let knee = (1..=160)
        .map(|tenth| f64::from(tenth) / 10.0)
        .find(|&c| curve.at(c).req_per_s >= TARGET_THROUGHPUT_SHARE * best)
        .unwrap_or(1.0);
    let at_slo = model.best(workers, slo).map_or(knee, |p| 0.9 * p.busy_per_worker);
    (knee.min(at_slo) * 10.0).floor().max(10.0) / 10.0
}

/// The on-demand fleet for `rate` within `slo`.
pub fn fleet(model: &Model<'_>, input: &PlanInput, rate: f64, slo: &SloTarget) -> Result<Fleet, PlanError> {
    let workers = model.workers_for(rate, slo).ok_or_else(|| {
        PlanError::Infeasible(format!(
            "no fleet of up to {} workers serves {rate:.2} req/s within TTFT p99 {} ms, TPOT p99 {} ms",
            crate::size::MAX_WORKERS,
            slo.ttft_p99_ms,
            slo.tpot_p99_ms
        ))
    })?;
    let p = &input.prices;
    let routers = (rate / p.router_capacity_rps).ceil().max(f64::from(p.min_routers)) as u64;
    let cost_per_hour = workers.workers as f64 * p.worker_on_demand_per_hour + fixed_per_hour(routers, p);
    let w = &input.workload;
    let per_hour = |tokens: f64| rate * 3600.0 * tokens / 1e6;
    Ok(Fleet {
        workers,
        routers,
        cost_per_hour,
        cost_per_million_tokens: cost_per_hour / per_hour(w.input_tokens.mean + w.output_tokens.mean),
        cost_per_million_output_tokens: cost_per_hour / per_hour(w.output_tokens.mean),
    })
}

/// $/hour of what does not scale with workers: routers and Redis.
fn fixed_per_hour(routers: u64, p: &Prices) -> f64 {
    routers as f64 * p.router_per_hour + p.redis_per_hour
}

/// Spot workers are down from an interruption until their replacement is ready (a node, then a cold
/// start). With `spot` of them, the number down at once is Poisson; spares cover its 99th percentile.
fn spares(spot: u64, p: &Prices) -> u64 {
    let down_s = p.node_provision_s + p.worker_cold_start_s;
    poisson_quantile(
        spot as f64 * p.spot_interruptions_per_hour * down_s / 3600.0,
        SPOT_COVER,
    )
}

/// The mix with `spot` spot workers that still leaves `needed` workers up.
fn mix(needed: u64, spot: u64, p: &Prices) -> Mix {
    let spares = spares(spot, p);
    let on_demand = (needed + spares).saturating_sub(spot);
    Mix {
        on_demand,
        spot,
        spares,
        workers_cost_per_hour: on_demand as f64 * p.worker_on_demand_per_hour + spot as f64 * p.worker_spot_per_hour,
    }
}

/// The cheapest on-demand/spot split that leaves `needed` workers up.
pub fn cheapest_mix(needed: u64, p: &Prices) -> Mix {
    mixes(needed, p).1
}

/// Splits in tenths of spot, and the cheapest split of all.
fn mixes(needed: u64, p: &Prices) -> (Vec<Mix>, Mix) {
    let limit = needed + spares(needed * 2, p) + 1;
    let cheapest = (0..=limit)
        .map(|s| mix(needed, s, p))
        .min_by(|a, b| a.workers_cost_per_hour.total_cmp(&b.workers_cost_per_hour))
        .expect("at least the all on-demand mix");
    let tenths = (0..=10)
        .map(|t| {
            // Enough spot workers that they are this share of the fleet, spares included.
            let mut s = (needed as f64 * t as f64 / 10.0).round() as u64;
            while t == 10 && mix(needed, s, p).on_demand > 0 {
                s += 1;
            }
            mix(needed, s, p)
        })
        .collect();
    (tenths, cheapest)
}

/// Where the inputs make the plan less trustworthy.
fn warnings(curve: &ServiceCurve, input: &PlanInput) -> Vec<String> {
    let mut w = Vec::new();
    let shape = |measured: f64, planned: f64| (planned / measured - 1.0).abs();
    for (what, measured, planned) in [
        ("prompt", curve.mean_input_tokens, input.workload.input_tokens.mean),
        ("output", curve.mean_output_tokens, input.workload.output_tokens.mean),
    ] {
        if shape(measured, planned) > 0.25 {
            w.push(format!(
                "the bench measured {measured:.0} {what} tokens per request and the workload has {planned:.0}: \
                 the plan rescales service times, which is less exact than measuring this shape"
            ));
        }
    }
    if curve.points.len() < 3 {
        w.push("fewer than 3 concurrency levels measured: batch sizes between them are guessed".into());
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curve::tests::synthetic;
    use crate::input::tests::{example, for_synthetic};

    #[test]
    fn spot_is_used_when_it_is_cheaper_and_spares_cover_interruptions() {
        let mut input = example();
        input.prices.worker_spot_per_hour = input.prices.worker_on_demand_per_hour * 0.3;
        input.prices.spot_interruptions_per_hour = 0.5;
        let (tenths, cheapest) = mixes(100, &input.prices);
        assert_eq!(tenths[0].spot, 0);
        assert_eq!(tenths[0].on_demand, 100);
        assert!(tenths[10].on_demand == 0 && tenths[10].spares > 0, "{:?}", tenths[10]);
        assert!(cheapest.spot > 0 && cheapest.workers_cost_per_hour < tenths[0].workers_cost_per_hour);
        // With spot as dear as on demand, spares only add cost: none is used.
        input.prices.worker_spot_per_hour = input.prices.worker_on_demand_per_hour;
        assert_eq!(mixes(100, &input.prices).1.spares, 0);
    }

    #[test]
    fn a_plan_costs_less_autoscaled_and_more_for_a_tighter_slo() {
        let mut input = for_synthetic(40.0);
        input.slo.ttft_p99_ms = 1000.0;
        input.slo.tpot_p99_ms = 60.0;
        let p = plan(synthetic(), input).unwrap();
        assert!(p.peak.workers.meets(&p.input.slo));
        assert!(p.autoscaled_cost_per_day < p.static_cost_per_day);
        let costs: Vec<f64> = p.slo_curve.iter().map(|c| c.on_demand_per_hour).collect();
        assert!(
            costs.windows(2).all(|w| w[0] >= w[1]),
            "looser objectives never cost more: {costs:?}"
        );
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let slots = f64::from(p.peak.workers.max_batch_seqs);
        assert!(
            p.running_target >= 1.0 && p.running_target < slots,
            "{} of {slots}",
            p.running_target
        );
    }
}
