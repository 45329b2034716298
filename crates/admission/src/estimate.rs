//! How long requests take, learned from the ones that finished: the basis of deadline-aware shedding and
//! of the retry hints in rejections.

use std::time::Duration;

/// Weight of the newest sample in the moving averages.
const ALPHA: f64 = 0.2;
/// Samples needed before the gate sheds on a deadline: it never guesses from nothing.
const WARM_SAMPLES: u32 = 3;
/// The retry hint before anything was measured.
const COLD_SERVICE: Duration = Duration::from_secs(1);

/// Exponentially weighted averages of the service time and the time per output token.
#[derive(Debug, Clone, Default)]
pub(crate) struct ServiceEstimate {
    /// Seconds from admission to the end of a request.
    service_secs: Option<f64>,
    /// Seconds per generated token once generation runs (TPOT).
    token_secs: Option<f64>,
    /// Requests observed with a TPOT.
    samples: u32,
}

fn blend(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |o| o + ALPHA * (new - o))
}

impl ServiceEstimate {
    /// Learns from a finished request: its time from admission to the end, and its generation time after
    /// the first token with how many tokens that covered.
    pub(crate) fn observe(&mut self, service: Duration, decode: Option<(Duration, u32)>) {
        self.service_secs = Some(blend(self.service_secs, service.as_secs_f64()));
        if let Some((decode, tokens)) = decode
            && tokens > 1
        {
            let per = decode.as_secs_f64() / f64::from(tokens - 1);
            self.token_secs = Some(blend(self.token_secs, per));
            self.samples += 1;
        }
    }

    /// Expected time until one of `slots` running requests ends.
    pub(crate) fn slot_free_in(&self, slots: u32) -> Duration {
        let service = self.service_secs.map_or(COLD_SERVICE, Duration::from_secs_f64);
        service.div_f64(f64::from(slots.max(1)))
    }

    /// Expected time to generate `max_tokens`, once enough requests were measured.
    pub(crate) fn generation(&self, max_tokens: u32) -> Option<Duration> {
        (self.samples >= WARM_SAMPLES)
            .then(|| {
                self.token_secs
                    .map(|s| Duration::from_secs_f64(s * f64::from(max_tokens)))
            })
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_needs_samples_then_tracks_the_average() {
        let mut e = ServiceEstimate::default();
        assert_eq!(e.generation(100), None);
        assert_eq!(e.slot_free_in(2), COLD_SERVICE / 2);
        for _ in 0..WARM_SAMPLES {
            e.observe(Duration::from_secs(2), Some((Duration::from_millis(990), 100)));
        }
        assert_eq!(e.generation(100), Some(Duration::from_secs(1)));
        assert_eq!(e.slot_free_in(4), Duration::from_millis(500));
        e.observe(Duration::from_secs(2), Some((Duration::ZERO, 1)));
        assert_eq!(e.generation(100), Some(Duration::from_secs(1)), "one token has no TPOT");
    }
}
