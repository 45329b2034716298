use super::*;
use crate::curve::tests::synthetic;
use crate::input::PlanInput;
use crate::input::tests::for_synthetic;

/// A day compressed into two hours, at a rate a few synthetic workers serve, with fast starts.
fn input() -> PlanInput {
    let mut i = for_synthetic(20.0);
    i.workload.bursts.clear();
    i.slo.ttft_p99_ms = 1500.0;
    i.slo.tpot_p99_ms = 60.0;
    i.prices.node_provision_s = 0.0;
    i.prices.worker_cold_start_s = 10.0;
    i
}

fn config(policy: FleetPolicy) -> SimConfig {
    SimConfig {
        day_s: 7200.0,
        seed: 7,
        policy,
        max_batch_seqs: 8,
        spot_share: 0.0,
        routers: 2,
        kv_pool_tokens: 32768.0,
    }
}

#[test]
fn a_fleet_sized_for_the_peak_meets_the_slo_and_a_small_one_does_not() {
    let (curve, input) = (synthetic(), input());
    let big = simulate(&curve, &input, &config(FleetPolicy::Static(6)));
    assert!(big.requests > 10_000, "{big:?}");
    assert!(big.slo_attainment > 0.99, "{}", big.slo_attainment);
    // Requests still running at the end are the only ones not completed.
    assert!(
        big.requests - big.completed < 100,
        "{} of {}",
        big.completed,
        big.requests
    );
    let small = simulate(&curve, &input, &config(FleetPolicy::Static(2)));
    assert!(small.slo_attainment < 0.9, "{}", small.slo_attainment);
    assert!(small.cost_usd < big.cost_usd);
    assert_eq!(big.workers_max, 6);
}

#[test]
fn the_autoscaler_follows_the_day_and_costs_less_than_the_static_peak_fleet() {
    let (curve, input) = (synthetic(), input());
    let mut rules = ScalingRules::default();
    // The running-requests target for 8 slots: 6 a worker.
    rules.triggers[0].threshold = 6.0;
    let auto = simulate(&curve, &input, &config(FleetPolicy::Autoscaled(rules)));
    let fixed = simulate(&curve, &input, &config(FleetPolicy::Static(6)));
    assert!(
        auto.cost_usd < fixed.cost_usd,
        "{} vs {}",
        auto.cost_usd,
        fixed.cost_usd
    );
    let at = |hour: f64| {
        auto.timeline
            .iter()
            .min_by(|a, b| (a.0 - hour).abs().total_cmp(&(b.0 - hour).abs()))
            .expect("samples")
            .2
    };
    assert!(
        at(4.0) < at(15.0),
        "fewer workers at night: {} vs {}",
        at(4.0),
        at(15.0)
    );
    assert!(auto.slo_attainment > 0.9, "{}", auto.slo_attainment);
}

#[test]
fn spot_interruptions_move_requests_and_lose_none_and_the_same_seed_gives_the_same_day() {
    let (curve, mut input) = (synthetic(), input());
    input.prices.spot_interruptions_per_hour = 20.0;
    input.prices.spot_notice_s = 2.0;
    let mut c = config(FleetPolicy::Static(6));
    c.spot_share = 1.0;
    let r = simulate(&curve, &input, &c);
    assert!(r.interruptions > 100 && r.migrations > 0, "{r:?}");
    assert!(r.requests - r.completed < 100, "{} of {}", r.completed, r.requests);
    let again = simulate(&curve, &input, &c);
    assert_eq!(
        (r.requests, r.completed, r.migrations),
        (again.requests, again.completed, again.migrations)
    );
    // Spot is cheaper per hour even with replacements starting.
    c.spot_share = 0.0;
    input.prices.spot_interruptions_per_hour = 0.0;
    let on_demand = simulate(&curve, &input, &c);
    assert!(r.cost_usd < on_demand.cost_usd);
}
