//! How long requests take, learned from the ones that finished: the basis of deadline-aware shedding and
//! of the retry hints in rejections.
//!
//! A request's time splits into three parts, each learned separately:
//! - the wait in the admission queue, per place in line and per priority class (batch requests also wait
//!   for interactive ones that arrive after them, which a count of those ahead cannot see);
//! - the start-up from its slot to its first token (prefill, plus any wait inside the worker);
//! - the time per output token once generation runs (TPOT), times `max_tokens`.

use std::time::Duration;

/// Weight of the newest sample in the moving averages.
const ALPHA: f64 = 0.2;
/// Generations needed before the gate sheds on a deadline: it never guesses from nothing.
const WARM_SAMPLES: u32 = 3;
/// The retry hint before anything was measured.
const COLD_SERVICE: Duration = Duration::from_secs(1);

/// What one finished generation tells the estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// From its slot to its first token.
    pub startup: Duration,
    /// From its first token to its last.
    pub decode: Duration,
    /// Tokens generated.
    pub tokens: u32,
}

/// An exponentially weighted average.
#[derive(Debug, Clone, Copy, Default)]
struct Ewma(Option<f64>);

impl Ewma {
    fn add(&mut self, sample: f64) {
        self.0 = Some(self.0.map_or(sample, |old| old + ALPHA * (sample - old)));
    }

    fn get(&self) -> Option<Duration> {
        self.0.map(Duration::from_secs_f64)
    }
}

/// The learned times.
#[derive(Debug, Clone, Default)]
pub(crate) struct ServiceEstimate {
    /// From slot to end of a request.
    service: Ewma,
    /// From slot to first token.
    startup: Ewma,
    /// Per generated token after the first.
    token: Ewma,
    /// Queue wait divided by the place in line at arrival, per priority rank.
    wait_per_place: [Ewma; 2],
    /// Generations measured with a TPOT.
    samples: u32,
}

impl ServiceEstimate {
    /// Learns from a finished request: its time from slot to end, and its generation timing if it had one.
    pub(crate) fn observe(&mut self, service: Duration, timing: Option<Timing>) {
        self.service.add(service.as_secs_f64());
        if let Some(t) = timing {
            self.startup.add(t.startup.as_secs_f64());
            if t.tokens > 1 {
                self.token.add(t.decode.as_secs_f64() / f64::from(t.tokens - 1));
                self.samples += 1;
            }
        }
    }

    /// Learns from a request that waited `waited` for a slot after arriving at `place` in line.
    pub(crate) fn observe_wait(&mut self, rank: u8, place: u32, waited: Duration) {
        self.wait_per_place[usize::from(rank.min(1))].add(waited.as_secs_f64() / f64::from(place.max(1)));
    }

    /// Expected time until one of `slots` running requests ends.
    pub(crate) fn slot_free_in(&self, slots: u32) -> Duration {
        self.service
            .get()
            .unwrap_or(COLD_SERVICE)
            .div_f64(f64::from(slots.max(1)))
    }

    /// Expected wait for a slot at `place` in line (1 = next), for a request of priority `rank`.
    pub(crate) fn wait(&self, rank: u8, place: u32, slots: u32) -> Duration {
        let per_place = self.wait_per_place[usize::from(rank.min(1))]
            .get()
            .unwrap_or_else(|| self.slot_free_in(slots));
        per_place.mul_f64(f64::from(place))
    }

    /// Expected time from a slot to the last of `max_tokens` tokens, once enough requests were measured.
    pub(crate) fn generation(&self, max_tokens: u32) -> Option<Duration> {
        if self.samples < WARM_SAMPLES {
            return None;
        }
        let token = self.token.get()?;
        Some(self.startup.get().unwrap_or_default() + token.mul_f64(f64::from(max_tokens)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(startup_ms: u64, decode_ms: u64, tokens: u32) -> Option<Timing> {
        Some(Timing {
            startup: Duration::from_millis(startup_ms),
            decode: Duration::from_millis(decode_ms),
            tokens,
        })
    }

    #[test]
    fn the_estimate_needs_samples_then_tracks_the_averages() {
        let mut e = ServiceEstimate::default();
        assert_eq!(e.generation(100), None);
        assert_eq!(e.slot_free_in(2), COLD_SERVICE / 2);
        for _ in 0..WARM_SAMPLES {
            e.observe(Duration::from_secs(2), timing(100, 990, 100));
        }
        // 100 ms to start, then 10 ms per token.
        assert_eq!(e.generation(100), Some(Duration::from_millis(1100)));
        assert_eq!(e.slot_free_in(4), Duration::from_millis(500));
        e.observe(Duration::from_secs(2), timing(100, 0, 1));
        assert_eq!(
            e.generation(100),
            Some(Duration::from_millis(1100)),
            "one token has no TPOT"
        );
    }

    #[test]
    fn queue_waits_are_learned_per_place_and_per_class() {
        let mut e = ServiceEstimate::default();
        assert_eq!(
            e.wait(1, 3, 2),
            COLD_SERVICE / 2 * 3,
            "before any wait was seen: service time per slot"
        );
        e.observe_wait(0, 2, Duration::from_secs(2));
        e.observe_wait(1, 2, Duration::from_secs(6));
        assert_eq!(e.wait(0, 3, 2), Duration::from_secs(3));
        assert_eq!(e.wait(1, 3, 2), Duration::from_secs(9), "batch waits longer per place");
    }
}
