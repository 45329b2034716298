//! A discrete-event simulation of a day of traffic through a fleet, calibrated by the measured service
//! curve, scaled by the same rules as the KEDA object (or held static), with spot interruptions.
//!
//! - Arrivals are Poisson at the workload's rate (its daily shape and bursts), token counts lognormal.
//! - The router sends a request to the least loaded ready worker with a free slot, else queues it.
//! - A request starting on a worker that then runs n requests takes a time to first token and a time per
//!   token drawn from the curve at n: lognormal through its measured median and 99th percentile.
//! - Every polling interval the autoscaler reads the signals (requests running and waiting, KV usage from
//!   the tokens running requests hold, TTFT p99 over 2 minutes) and applies the HPA algorithm; new workers
//!   are ready after a node's provisioning and a cold start, removed ones drain.
//! - A spot worker is interrupted at the spot rate: it stops taking work, what it has not finished when the
//!   notice runs out moves to another worker and continues there from the tokens already streamed (the
//!   client sees a pause), and a replacement starts at once.

mod fleet;

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, LogNormal};
use serde::Serialize;

use crate::curve::ServiceCurve;
use crate::input::{PlanInput, Tokens};
use crate::queue::normal_quantile;
use crate::scaling::{Autoscaler, ScalingRules, Signals};
use fleet::{Fleet, Request, Stage};

/// How the fleet's size is decided.
#[derive(Debug, Clone, Serialize)]
pub enum FleetPolicy {
    /// The autoscaler's rules.
    Autoscaled(ScalingRules),
    /// This many workers all day.
    Static(u64),
}

/// One simulation.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seconds in the simulated day (86 400 is a real one; shorter compresses it).
    pub day_s: f64,
    /// Seeds arrivals, token counts, latencies and interruptions.
    pub seed: u64,
    /// Autoscaled or static.
    pub policy: FleetPolicy,
    /// Slots per worker.
    pub max_batch_seqs: u32,
    /// The share of workers on spot capacity.
    pub spot_share: f64,
    /// Routers (for the cost).
    pub routers: u64,
    /// KV-cache positions per worker (`engine.kv_budget_tokens`).
    pub kv_pool_tokens: f64,
}

/// What a simulated day showed.
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    /// `autoscaled` or `static N`.
    pub policy: String,
    /// Requests that arrived.
    pub requests: u64,
    /// Requests that completed by the end of the day.
    pub completed: u64,
    /// The share of completed requests within both objectives.
    pub slo_attainment: f64,
    /// Time to first token over completed requests, ms.
    pub ttft_p50_ms: f64,
    /// See `ttft_p50_ms`.
    pub ttft_p99_ms: f64,
    /// Time per output token p99, ms.
    pub tpot_p99_ms: f64,
    /// Workers alive, averaged over the day (billed).
    pub workers_mean: f64,
    /// The most workers alive at once.
    pub workers_max: u64,
    /// Spot interruptions.
    pub interruptions: u64,
    /// Requests moved off an interrupted worker.
    pub migrations: u64,
    /// $ for the day: workers, routers, Redis.
    pub cost_usd: f64,
    /// $ per million tokens served.
    pub cost_per_million_tokens: f64,
    /// (hour, request rate, workers alive), every 5 simulated minutes.
    pub timeline: Vec<(f64, f64, u64)>,
}

/// An event at a time. Ordered so that the heap pops the earliest first.
#[derive(Debug, Clone, Copy, PartialEq)]
struct At(f64, u64, Event);

impl Eq for At {}
impl PartialOrd for At {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for At {
    fn cmp(&self, other: &Self) -> Ordering {
        other.0.total_cmp(&self.0).then(other.1.cmp(&self.1))
    }
}

/// What happens.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Event {
    /// The next request arrives.
    Arrival,
    /// Request `id`'s run `epoch` ends.
    Done { id: usize, epoch: u32 },
    /// Worker `w` finished starting.
    Ready(usize),
    /// The autoscaler evaluates.
    Poll,
    /// Spot worker `w` gets its notice.
    Interrupt(usize),
    /// Spot worker `w`'s notice ran out.
    Cutoff(usize),
    /// A timeline sample.
    Sample,
}

/// Seconds between timeline samples.
const SAMPLE_S: f64 = 300.0;
/// The TTFT signal's window, in polling intervals (2 minutes at 15 s).
const TTFT_WINDOW_POLLS: usize = 8;

/// Runs one simulated day.
pub fn simulate(curve: &ServiceCurve, input: &PlanInput, config: &SimConfig) -> SimReport {
    Sim::new(curve, input, config).run()
}

/// The simulation's state.
struct Sim<'a> {
    curve: &'a ServiceCurve,
    input: &'a PlanInput,
    config: &'a SimConfig,
    rng: StdRng,
    events: BinaryHeap<At>,
    seq: u64,
    fleet: Fleet,
    autoscaler: Autoscaler,
    /// The most the arrival rate reaches (for thinning).
    max_rate: f64,
    /// TTFTs (s) of the current and recent polling intervals, for the TTFT signal.
    ttft_window: VecDeque<Vec<f64>>,
    ttft: Histogram<u64>,
    tpot: Histogram<u64>,
    stats: Counts,
    timeline: Vec<(f64, f64, u64)>,
}

/// Running totals.
#[derive(Debug, Default)]
struct Counts {
    requests: u64,
    completed: u64,
    met: u64,
    tokens: f64,
    interruptions: u64,
    migrations: u64,
    workers_max: u64,
}

impl<'a> Sim<'a> {
    fn new(curve: &'a ServiceCurve, input: &'a PlanInput, config: &'a SimConfig) -> Sim<'a> {
        let w = &input.workload;
        let bursts: f64 = w.bursts.iter().map(|b| b.multiplier.max(1.0)).product();
        Sim {
            curve,
            input,
            config,
            rng: StdRng::seed_from_u64(config.seed),
            events: BinaryHeap::new(),
            seq: 0,
            fleet: Fleet::new(config.max_batch_seqs),
            autoscaler: Autoscaler::default(),
            max_rate: w.peak_rps * w.daily_shape.iter().copied().fold(0.0, f64::max) * bursts,
            ttft_window: VecDeque::from(vec![Vec::new()]),
            ttft: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            tpot: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            stats: Counts::default(),
            timeline: Vec::new(),
        }
    }

    fn push(&mut self, t: f64, e: Event) {
        self.seq += 1;
        self.events.push(At(t, self.seq, e));
    }

    fn run(mut self) -> SimReport {
        let initial = match &self.config.policy {
            FleetPolicy::Autoscaled(rules) => {
                // The day starts with what its first hour needs, as a fleet running for days would.
                let rate = self.input.workload.rate_at(0.0, self.config.day_s);
                let w = &self.input.workload;
                let b = f64::from(self.config.max_batch_seqs);
                let cap = self
                    .curve
                    .rate_at(b, w.input_tokens.mean, w.output_tokens.mean)
                    .max(1e-9);
                ((rate / cap / 0.7).ceil() as u64).clamp(rules.min_replicas, rules.max_replicas)
            }
            FleetPolicy::Static(n) => *n,
        };
        for _ in 0..initial {
            self.add_worker(0.0, Stage::Ready);
        }
        self.push(0.0, Event::Arrival);
        self.push(0.0, Event::Sample);
        if let FleetPolicy::Autoscaled(r) = &self.config.policy {
            self.push(r.polling_interval_s, Event::Poll);
        }
        while let Some(At(now, _, event)) = self.events.pop() {
            if now > self.config.day_s {
                break;
            }
            match event {
                Event::Arrival => self.arrive(now),
                Event::Done { id, epoch } => self.done(now, id, epoch),
                Event::Ready(w) => {
                    self.fleet.set_ready(w);
                    self.dispatch(now);
                }
                Event::Poll => self.poll(now),
                Event::Interrupt(w) => self.interrupt(now, w),
                Event::Cutoff(w) => self.cutoff(now, w),
                Event::Sample => {
                    let rate = self.input.workload.rate_at(now, self.config.day_s);
                    self.timeline
                        .push((now / self.config.day_s * 24.0, rate, self.fleet.alive() as u64));
                    self.push(now + SAMPLE_S * self.config.day_s / 86_400.0, Event::Sample);
                }
            }
        }
        self.report()
    }

    /// A worker pod is created: ready at once at the start, else after a node and a cold start.
    fn add_worker(&mut self, now: f64, stage: Stage) {
        let spots = self.fleet.replicas().filter(|&w| self.fleet.workers[w].spot).count() as f64;
        let total = self.fleet.replicas().count() as f64 + 1.0;
        let spot = spots < (self.config.spot_share * total).round();
        let w = self.fleet.add_worker(now, spot, stage);
        let p = &self.input.prices;
        if stage == Stage::Starting {
            self.push(now + p.node_provision_s + p.worker_cold_start_s, Event::Ready(w));
        }
        if spot && p.spot_interruptions_per_hour > 0.0 {
            let life = Exp::new(p.spot_interruptions_per_hour / 3600.0).expect("a positive rate");
            let at = now + life.sample(&mut self.rng);
            self.push(at, Event::Interrupt(w));
        }
        self.stats.workers_max = self.stats.workers_max.max(self.fleet.alive() as u64);
    }

    fn arrive(&mut self, now: f64) {
        // Thinning: candidates at the highest rate, each kept with the rate's share of it.
        let next = now + Exp::new(self.max_rate).expect("a positive rate").sample(&mut self.rng);
        self.push(next, Event::Arrival);
        let rate = self.input.workload.rate_at(now, self.config.day_s);
        if self.rng.random::<f64>() * self.max_rate > rate {
            return;
        }
        self.stats.requests += 1;
        let w = &self.input.workload;
        let (input, output) = (
            tokens(&mut self.rng, w.input_tokens),
            tokens(&mut self.rng, w.output_tokens),
        );
        let id = self.fleet.admit(Request {
            arrival: now,
            input,
            output,
            streamed: 0.0,
            first_token: None,
            run_first: now,
            tpot: 0.0,
            worker: usize::MAX,
            epoch: 0,
        });
        self.fleet.queue.push_back(id);
        self.dispatch(now);
    }

    /// Starts queued requests while workers have free slots.
    fn dispatch(&mut self, now: f64) {
        while !self.fleet.queue.is_empty() {
            let Some(w) = self.fleet.pick() else { return };
            let id = self.fleet.queue.pop_front().expect("not empty");
            let n = f64::from(self.fleet.start(id, w));
            let at = self.curve.at(n);
            let r = *self.fleet.request(id);
            let scale = self.curve.prompt_scale(r.input + r.streamed);
            let prefill = draw(&mut self.rng, at.ttft_p50_s * scale, at.ttft_p99_s * scale);
            let tpot = draw(&mut self.rng, at.tpot_p50_s, at.tpot_p99_s);
            let req = self.fleet.request(id);
            req.run_first = now + prefill;
            req.tpot = tpot;
            if req.first_token.is_none() {
                req.first_token = Some(req.run_first);
                req.streamed = 1.0;
                let ttft = req.run_first - req.arrival;
                self.ttft_window.back_mut().expect("a current interval").push(ttft);
            }
            let left = (req.output - req.streamed).max(0.0);
            let (end, epoch) = (req.run_first + left * tpot, req.epoch);
            self.push(end, Event::Done { id, epoch });
        }
    }

    fn done(&mut self, now: f64, id: usize, epoch: u32) {
        if self.fleet.request(id).epoch != epoch {
            return;
        }
        let w = self.fleet.request(id).worker;
        self.fleet.leave(now, id, w);
        let r = self.fleet.finish(id);
        let first = r.first_token.expect("a finished request had a first token");
        let ttft = first - r.arrival;
        let tpot = if r.output > 1.0 {
            (now - first) / (r.output - 1.0)
        } else {
            0.0
        };
        self.stats.completed += 1;
        self.stats.tokens += r.input + r.output;
        let slo = &self.input.slo;
        if ttft * 1e3 <= slo.ttft_p99_ms && tpot * 1e3 <= slo.tpot_p99_ms {
            self.stats.met += 1;
        }
        self.ttft.saturating_record((ttft * 1e6).max(1.0) as u64);
        self.tpot.saturating_record((tpot * 1e6).max(1.0) as u64);
        self.dispatch(now);
    }

    fn poll(&mut self, now: f64) {
        // The config outlives the simulation's borrows: its rules need no copy.
        let config = self.config;
        let FleetPolicy::Autoscaled(rules) = &config.policy else {
            return;
        };
        let mut recent: Vec<f64> = self.ttft_window.iter().flatten().copied().collect();
        let ttft_p99_s = if recent.is_empty() {
            0.0
        } else {
            let k = ((recent.len() as f64 * 0.99).ceil() as usize).clamp(1, recent.len()) - 1;
            *recent.select_nth_unstable_by(k, f64::total_cmp).1
        };
        self.ttft_window.push_back(Vec::new());
        if self.ttft_window.len() > TTFT_WINDOW_POLLS {
            self.ttft_window.pop_front();
        }
        let signals = Signals {
            running: self.fleet.running() as f64,
            waiting: self.fleet.queue.len() as f64,
            kv_usage: self.fleet.kv_usage(now, self.config.kv_pool_tokens),
            ttft_p99_s,
        };
        let replicas: Vec<usize> = self.fleet.replicas().collect();
        let current = replicas.len() as u64;
        let target = self.autoscaler.desired(rules, now, current, signals);
        for _ in current..target {
            self.add_worker(now, Stage::Starting);
        }
        if target < current {
            // Starting pods go first, then the least loaded.
            let mut victims = replicas;
            victims.sort_by_key(|&w| {
                let worker = &self.fleet.workers[w];
                (worker.stage == Stage::Ready, worker.running.len())
            });
            for &w in victims.iter().take((current - target) as usize) {
                self.fleet.drain(now, w);
            }
        }
        self.push(now + rules.polling_interval_s, Event::Poll);
    }

    fn interrupt(&mut self, now: f64, w: usize) {
        if self.fleet.workers[w].stage == Stage::Gone || self.fleet.workers[w].stage == Stage::Draining {
            return;
        }
        self.stats.interruptions += 1;
        // The Deployment replaces the pod at once; the old one drains within its notice.
        self.fleet.drain(now, w);
        self.add_worker(now, Stage::Starting);
        self.push(now + self.input.prices.spot_notice_s, Event::Cutoff(w));
    }

    fn cutoff(&mut self, now: f64, w: usize) {
        let running = std::mem::take(&mut self.fleet.workers[w].running);
        if self.fleet.workers[w].stage != Stage::Gone {
            self.fleet.end(now, w);
        }
        for &id in running.iter().rev() {
            let r = self.fleet.request(id);
            if now < r.run_first && r.first_token == Some(r.run_first) {
                // Its first token never reached the client: it starts over.
                r.first_token = None;
                r.streamed = 0.0;
            } else if now > r.run_first {
                r.streamed = (r.streamed + ((now - r.run_first) / r.tpot).floor()).min(r.output);
            }
            r.epoch += 1;
            self.stats.migrations += 1;
            self.fleet.queue.push_front(id);
        }
        self.dispatch(now);
    }

    fn report(self) -> SimReport {
        let day = self.config.day_s;
        let p = &self.input.prices;
        let worker_cost: f64 = self
            .fleet
            .workers
            .iter()
            .map(|w| {
                let hours = (w.ended.unwrap_or(day).min(day) - w.created) / 3600.0 * 86_400.0 / day;
                hours
                    * if w.spot {
                        p.worker_spot_per_hour
                    } else {
                        p.worker_on_demand_per_hour
                    }
            })
            .sum();
        let worker_seconds: f64 = self
            .fleet
            .workers
            .iter()
            .map(|w| w.ended.unwrap_or(day).min(day) - w.created)
            .sum();
        let fixed = 24.0 * (self.config.routers as f64 * p.router_per_hour + p.redis_per_hour);
        let cost_usd = worker_cost + fixed;
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
        // Tokens per real day: a compressed day carries the same requests per second, so scale up.
        let tokens_per_day = self.stats.tokens * 86_400.0 / day;
        SimReport {
            policy: match &self.config.policy {
                FleetPolicy::Autoscaled(_) => "autoscaled".into(),
                FleetPolicy::Static(n) => format!("static {n}"),
            },
            requests: self.stats.requests,
            completed: self.stats.completed,
            slo_attainment: self.stats.met as f64 / self.stats.completed.max(1) as f64,
            ttft_p50_ms: ms(&self.ttft, 0.5),
            ttft_p99_ms: ms(&self.ttft, 0.99),
            tpot_p99_ms: ms(&self.tpot, 0.99),
            workers_mean: worker_seconds / day,
            workers_max: self.stats.workers_max,
            interruptions: self.stats.interruptions,
            migrations: self.stats.migrations,
            cost_usd,
            cost_per_million_tokens: cost_usd / (tokens_per_day / 1e6).max(1e-12),
            timeline: self.timeline,
        }
    }
}

/// A lognormal draw through `median` and `p99` (the median itself when they are equal).
fn draw(rng: &mut StdRng, median: f64, p99: f64) -> f64 {
    let sigma = ((p99 / median).ln() / normal_quantile(0.99)).max(0.0);
    if median.is_nan() || median <= 0.0 || sigma == 0.0 {
        return median.max(0.0);
    }
    LogNormal::new(median.ln(), sigma)
        .expect("finite parameters")
        .sample(rng)
}

/// A token count: lognormal with the given mean and coefficient of variation, at least 1, at most `max`.
fn tokens(rng: &mut StdRng, t: Tokens) -> f64 {
    if t.cv <= 0.0 {
        return t.mean.round();
    }
    let sigma2 = (1.0 + t.cv * t.cv).ln();
    let d = LogNormal::new(t.mean.ln() - sigma2 / 2.0, sigma2.sqrt()).expect("finite parameters");
    d.sample(rng).round().clamp(1.0, t.max)
}

#[cfg(test)]
mod tests;
