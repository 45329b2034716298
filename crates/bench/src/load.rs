//! Load shapes: a closed loop at a fixed concurrency, or an open loop of arrivals at a target rate
//! (Poisson, or gamma with a burstiness factor, as `vllm bench serve`), one run per level of a sweep.
//!
//! Each level first sends its warm-up requests (not counted), then the measured phase, bounded by a
//! request count or a duration. Every request has a hard timeout. The level's duration runs from the
//! first measured send to the last completion.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

use crate::BenchError;
use crate::prompts::Prompts;
use crate::sample::{ErrorKind, Recorder, Sample};
use crate::target::{Client, Generation};

/// One level of a sweep.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Closed loop: this many requests in flight at all times.
    Concurrency(u32),
    /// Open loop: arrivals at this many requests per second (`inf`: all at once).
    Rate(f64),
}

impl Level {
    /// `c=4` or `rate=2.5`, for tables and legends.
    pub fn label(&self) -> String {
        match self {
            Level::Concurrency(c) => format!("c={c}"),
            Level::Rate(r) if r.is_infinite() => "rate=inf".into(),
            Level::Rate(r) => format!("rate={r}"),
        }
    }

    /// The number on a load axis.
    pub fn value(&self) -> f64 {
        match self {
            Level::Concurrency(c) => f64::from(*c),
            Level::Rate(r) => *r,
        }
    }
}

/// How a level ends.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    /// After this many measured requests.
    Requests(u32),
    /// No new request after this many seconds (those in flight finish and count).
    Seconds(f64),
}

/// Everything about how load is applied, recorded in the result file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadSettings {
    /// The levels of the sweep, in order.
    pub levels: Vec<Level>,
    /// When each level ends.
    pub bound: Bound,
    /// Requests sent before each level's measured phase, not counted.
    pub warmup: u32,
    /// Hard limit on one request, send to last byte.
    pub timeout_secs: f64,
    /// Open loop: gamma shape of inter-arrival times; 1 is Poisson, below 1 burstier, above 1 smoother.
    pub burstiness: f64,
    /// Open loop: the most requests in flight (arrivals past it wait for a slot); `None` is no cap.
    pub max_concurrency: Option<u32>,
    /// Seeds the arrival times (and, in the caller, prompt choice).
    pub seed: u64,
}

impl LoadSettings {
    /// Checks ranges, naming the flag to fix.
    pub fn validate(&self) -> Result<(), BenchError> {
        if self.levels.is_empty() {
            return Err(BenchError::setting("concurrency/rate", "give at least one level"));
        }
        for l in &self.levels {
            match *l {
                Level::Concurrency(0) => return Err(BenchError::setting("concurrency", "must be at least 1")),
                Level::Rate(r) if r.is_nan() || r <= 0.0 => {
                    return Err(BenchError::setting("rate", format!("must be > 0 or inf (got {r})")));
                }
                _ => {}
            }
        }
        match self.bound {
            Bound::Requests(0) => return Err(BenchError::setting("requests", "must be at least 1")),
            Bound::Seconds(s) if !(s.is_finite() && s > 0.0) => {
                return Err(BenchError::setting(
                    "duration",
                    format!("must be a positive number of seconds (got {s})"),
                ));
            }
            _ => {}
        }
        if !(self.timeout_secs.is_finite() && self.timeout_secs > 0.0) {
            return Err(BenchError::setting("timeout", "must be a positive number of seconds"));
        }
        if !(self.burstiness.is_finite() && self.burstiness > 0.0) {
            return Err(BenchError::setting("burstiness", "must be > 0 (1 is Poisson)"));
        }
        if self.max_concurrency == Some(0) {
            return Err(BenchError::setting("max-concurrency", "must be at least 1"));
        }
        Ok(())
    }
}

/// Inter-arrival gaps for an open loop: gamma(shape = burstiness, mean = 1 / rate), so burstiness 1 is a
/// Poisson process.
pub struct Arrivals {
    /// `None` for an infinite rate (every gap is zero).
    gamma: Option<Gamma<f64>>,
    /// Seeded.
    rng: StdRng,
}

impl Arrivals {
    /// Gaps for `rate` requests per second.
    pub fn new(rate: f64, burstiness: f64, seed: u64) -> Result<Self, BenchError> {
        let gamma = if rate.is_infinite() {
            None
        } else {
            Some(
                Gamma::new(burstiness, 1.0 / (rate * burstiness))
                    .map_err(|e| BenchError::setting("rate/burstiness", e.to_string()))?,
            )
        };
        Ok(Arrivals {
            gamma,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// The next gap.
    pub fn next_gap(&mut self) -> Duration {
        self.gamma
            .as_ref()
            .map_or(Duration::ZERO, |g| Duration::from_secs_f64(g.sample(&mut self.rng)))
    }
}

/// What one level produced.
#[derive(Debug, Clone)]
pub struct LevelRun {
    /// The level.
    pub level: Level,
    /// First measured send to last completion.
    pub duration: Duration,
    /// One per measured request.
    pub samples: Vec<Sample>,
}

/// Shared by the tasks of one phase.
struct Phase {
    /// The target.
    client: Client,
    /// What to generate.
    generation: Generation,
    /// Prompts, drawn in send order.
    prompts: Mutex<Prompts>,
    /// The hard per-request limit.
    timeout: Duration,
    /// Start of the phase.
    start: Instant,
    /// Progress display (hidden when quiet).
    bar: ProgressBar,
    /// Completed requests, for the running rate.
    done: AtomicU32,
    /// Failed requests other than rate-limited.
    errors: AtomicU32,
    /// Rate-limited requests.
    limited: AtomicU32,
    /// Output tokens so far.
    tokens: AtomicU64,
}

impl Phase {
    /// Sends one request and records it.
    async fn one(&self) -> Sample {
        let prompt = self.prompts.lock().await.next_prompt();
        let mut rec = Recorder::start(self.start.elapsed(), prompt.tokens);
        let sample =
            match tokio::time::timeout(self.timeout, self.client.send(&prompt, &self.generation, &mut rec)).await {
                Ok(Ok(())) => rec.finish(),
                Ok(Err((kind, message))) => rec.fail(kind, message),
                Err(_) => rec.fail(
                    ErrorKind::Timeout,
                    format!("no complete response within {:.1} s", self.timeout.as_secs_f64()),
                ),
            };
        self.progress(&sample);
        sample
    }

    fn progress(&self, s: &Sample) {
        match s.failure.as_ref().map(|f| f.kind) {
            None => {
                self.done.fetch_add(1, Ordering::Relaxed);
            }
            Some(ErrorKind::RateLimited) => {
                self.limited.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let tokens = self.tokens.fetch_add(u64::from(s.output_tokens), Ordering::Relaxed) + u64::from(s.output_tokens);
        if self.bar.is_hidden() {
            return;
        }
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let done = self.done.load(Ordering::Relaxed);
        self.bar.inc(1);
        self.bar.set_message(format!(
            "{:.2} req/s  {:.1} tok/s  errors {}  rate-limited {}",
            f64::from(done) / secs,
            tokens as f64 / secs,
            self.errors.load(Ordering::Relaxed),
            self.limited.load(Ordering::Relaxed),
        ));
    }
}

/// What every level of a run shares.
pub struct Sweep<'a> {
    /// The connected target.
    pub client: &'a Client,
    /// What each request asks for.
    pub generation: &'a Generation,
    /// Prompts, continued from level to level.
    pub prompts: &'a Mutex<Prompts>,
    /// Load shape and bounds.
    pub settings: &'a LoadSettings,
    /// Draw progress bars on stderr.
    pub show_progress: bool,
}

/// Runs one level: warm-up, then the measured phase.
pub async fn run_level(sweep: &Sweep<'_>, level: Level) -> Result<LevelRun, BenchError> {
    let Sweep {
        client,
        generation,
        prompts,
        settings,
        show_progress,
    } = *sweep;
    let timeout = Duration::from_secs_f64(settings.timeout_secs);
    let snapshot = prompts.lock().await.clone();
    let phase = |bar: ProgressBar, prompts: Prompts| {
        Arc::new(Phase {
            client: client.clone(),
            generation: generation.clone(),
            prompts: Mutex::new(prompts),
            timeout,
            start: Instant::now(),
            bar,
            done: AtomicU32::new(0),
            errors: AtomicU32::new(0),
            limited: AtomicU32::new(0),
            tokens: AtomicU64::new(0),
        })
    };
    let bar = |len: Option<u64>, what: String| {
        if !show_progress {
            return ProgressBar::hidden();
        }
        let bar = match len {
            Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()).with_style(
                ProgressStyle::with_template("{prefix:>14} [{bar:30}] {pos}/{len} {elapsed} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            ),
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
                ProgressStyle::with_template("{prefix:>14} {spinner} {pos} done {elapsed} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        };
        bar.set_prefix(what);
        bar
    };
    // Warm-up: a closed loop at the level's concurrency (capped by the warm-up count), in its own order
    // of prompts so that the measured phase sends the same prompts whatever the warm-up was.
    if settings.warmup > 0 {
        let width = match level {
            Level::Concurrency(c) => c,
            Level::Rate(_) => settings.max_concurrency.unwrap_or(settings.warmup),
        }
        .min(settings.warmup);
        let warm = phase(
            bar(Some(u64::from(settings.warmup)), "warm-up".into()),
            snapshot.for_warmup(),
        );
        closed(&warm, width, Bound::Requests(settings.warmup)).await;
        warm.bar.finish_and_clear();
    }
    let len = match settings.bound {
        Bound::Requests(n) => Some(u64::from(n)),
        Bound::Seconds(_) => None,
    };
    let measured = phase(bar(len, level.label()), snapshot);
    let samples = match level {
        Level::Concurrency(c) => closed(&measured, c, settings.bound).await,
        Level::Rate(r) => {
            let arrivals = Arrivals::new(r, settings.burstiness, settings.seed)?;
            open(&measured, arrivals, settings.bound, settings.max_concurrency).await
        }
    };
    let duration = measured.start.elapsed();
    measured.bar.finish_and_clear();
    // The next level continues the prompt sequence where this one left off.
    *prompts.lock().await = measured.prompts.lock().await.clone();
    Ok(LevelRun {
        level,
        duration,
        samples,
    })
}

/// Whether a phase may send one more request, given how many it has sent.
fn may_send(phase: &Phase, bound: Bound, sent: u32) -> bool {
    match bound {
        Bound::Requests(n) => sent < n,
        Bound::Seconds(s) => phase.start.elapsed().as_secs_f64() < s,
    }
}

/// `width` tasks, each sending its next request as soon as its last one ends.
async fn closed(phase: &Arc<Phase>, width: u32, bound: Bound) -> Vec<Sample> {
    let sent = Arc::new(AtomicU32::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..width {
        let (phase, sent) = (phase.clone(), sent.clone());
        tasks.spawn(async move {
            let mut mine = Vec::new();
            while may_send(&phase, bound, sent.fetch_add(1, Ordering::Relaxed)) {
                mine.push(phase.one().await);
            }
            mine
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done.expect("a load task panicked"));
    }
    all.sort_by_key(|s| s.sent_at);
    all
}

/// Sends at the arrival times, each request in its own task, optionally capped in flight.
async fn open(phase: &Arc<Phase>, mut arrivals: Arrivals, bound: Bound, cap: Option<u32>) -> Vec<Sample> {
    let slots = cap.map(|c| Arc::new(Semaphore::new(c as usize)));
    let mut tasks = JoinSet::new();
    let mut next = phase.start;
    let mut sent = 0;
    loop {
        next += arrivals.next_gap();
        let at = next.saturating_duration_since(phase.start).as_secs_f64();
        let in_bounds = match bound {
            Bound::Requests(n) => sent < n,
            Bound::Seconds(s) => at < s,
        };
        if !in_bounds {
            break;
        }
        tokio::time::sleep_until(next.into()).await;
        let (phase, slots) = (phase.clone(), slots.clone());
        tasks.spawn(async move {
            let _slot = match &slots {
                Some(s) => Some(s.clone().acquire_owned().await.expect("semaphore is never closed")),
                None => None,
            };
            phase.one().await
        });
        sent += 1;
    }
    let mut all = Vec::with_capacity(sent as usize);
    while let Some(done) = tasks.join_next().await {
        all.push(done.expect("a request task panicked"));
    }
    all.sort_by_key(|s| s.sent_at);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moments(rate: f64, burstiness: f64, n: usize) -> (f64, f64) {
        let mut a = Arrivals::new(rate, burstiness, 42).unwrap();
        let gaps: Vec<f64> = (0..n).map(|_| a.next_gap().as_secs_f64()).collect();
        let mean = gaps.iter().sum::<f64>() / n as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / (n as f64 - 1.0);
        (mean, var.sqrt() / mean)
    }

    #[test]
    fn poisson_arrivals_have_the_requested_rate() {
        // 20 000 exponential gaps: the sample mean's standard error is 1/sqrt(n) of the mean (0.7 %), so
        // 3 % is more than four standard errors; the coefficient of variation of an exponential is 1.
        let (mean, cv) = moments(8.0, 1.0, 20_000);
        assert!((mean * 8.0 - 1.0).abs() < 0.03, "mean gap {mean} s for 8 req/s");
        assert!((cv - 1.0).abs() < 0.05, "cv {cv}");
    }

    #[test]
    fn burstiness_changes_spread_not_rate() {
        // Gamma with shape k has cv = 1/sqrt(k).
        for k in [0.25, 4.0] {
            let (mean, cv) = moments(3.0, k, 20_000);
            assert!((mean * 3.0 - 1.0).abs() < 0.05, "k={k}: mean gap {mean}");
            assert!((cv - 1.0 / f64::sqrt(k)).abs() < 0.1 / f64::sqrt(k), "k={k}: cv {cv}");
        }
        let mut inf = Arrivals::new(f64::INFINITY, 1.0, 1).unwrap();
        assert_eq!(inf.next_gap(), Duration::ZERO);
    }

    #[test]
    fn settings_name_the_flag_to_fix() {
        let ok = LoadSettings {
            levels: vec![Level::Concurrency(1)],
            bound: Bound::Requests(1),
            warmup: 0,
            timeout_secs: 1.0,
            burstiness: 1.0,
            max_concurrency: None,
            seed: 0,
        };
        ok.validate().unwrap();
        let bad = |f: fn(&mut LoadSettings)| {
            let mut s = ok.clone();
            f(&mut s);
            s.validate().unwrap_err().to_string()
        };
        assert!(bad(|s| s.levels = vec![Level::Concurrency(0)]).contains("concurrency"));
        assert!(bad(|s| s.levels = vec![Level::Rate(-1.0)]).contains("rate"));
        assert!(bad(|s| s.bound = Bound::Seconds(0.0)).contains("duration"));
        assert!(bad(|s| s.burstiness = 0.0).contains("burstiness"));
        assert!(bad(|s| s.levels.clear()).contains("level"));
    }
}
