//! One token bucket: governor's GCRA over a state cell that we can also refund and carry across a
//! change of rate.
//!
//! governor keeps a bucket as one number, the theoretical arrival time (TAT) of the next cell, relative to
//! the limiter's start. We give it that number through our own [`StateStore`], [`TatCell`], so that:
//! - a reservation that turns out too large can be refunded exactly (the TAT moves back by the refunded
//!   cells' worth of time);
//! - a new rate keeps the bucket's level: the cells in use are carried into a limiter built for the new rate.
//!
//! Everything else (the conformance test, burst, the time to wait) is governor's.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use governor::{Quota, RateLimiter};

/// The slowest rate a bucket takes: one cell a day. Slower ones overflow governor's clock arithmetic, and a
/// limit that low is a mistake; switch the limit off instead.
const MAX_INTERVAL: Duration = Duration::from_secs(86_400);

/// A rate with a burst: `amount` cells every `per`, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Cells replenished per `per`.
    pub amount: f64,
    /// The period `amount` is counted over (a second for requests, a minute for tokens).
    pub per: Duration,
    /// The bucket's size: the most cells that may be taken at once.
    pub burst: u32,
}

impl Rate {
    /// The time one cell takes to replenish; `None` when it overflows a `Duration` (a rate too small).
    fn checked_interval(&self) -> Option<Duration> {
        Duration::try_from_secs_f64(self.per.as_secs_f64() / self.amount).ok()
    }

    /// The time one cell takes to replenish. [`Rate::check`] guarantees it is representable.
    /// The time one cell takes to replenish.
    pub fn interval(&self) -> Duration {
        self.checked_interval().unwrap_or(MAX_INTERVAL)
    }

    /// governor's quota for this rate.
    fn quota(&self) -> Quota {
        let interval = self.interval().max(Duration::from_nanos(1));
        Quota::with_period(interval)
            .expect("a positive interval")
            .allow_burst(NonZeroU32::new(self.burst.max(1)).expect("at least 1"))
    }

    /// Checks that governor can represent the rate; the message names what to change.
    pub fn check(&self, what: &str) -> Result<(), String> {
        if !(self.amount.is_finite() && self.amount > 0.0) {
            return Err(format!("{what} must be a finite number above 0 (got {})", self.amount));
        }
        if self.burst == 0 {
            return Err(format!("{what} burst must be at least 1"));
        }
        match self.checked_interval() {
            Some(i) if i < Duration::from_nanos(1) => Err(format!(
                "{what} is too high to enforce (one cell per nanosecond at most)"
            )),
            Some(i) if i <= MAX_INTERVAL => Ok(()),
            _ => Err(format!(
                "{what} is too low to enforce (at least one per day; got {})",
                self.amount
            )),
        }
    }
}

/// The bucket's state as governor sees it: the TAT in nanoseconds since the limiter's start, 0 meaning
/// "never used" (a full bucket). Shared between the limiter and the [`Bucket`] that refunds into it.
#[derive(Debug, Clone, Default)]
struct TatCell(Arc<AtomicU64>);

impl StateStore for TatCell {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let decode = |raw: u64| (raw != 0).then(|| Nanos::from(raw));
        let mut prev = self.0.load(Ordering::Acquire);
        loop {
            let (out, next) = f(decode(prev))?;
            match self
                .0
                .compare_exchange_weak(prev, next.as_u64(), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(out),
                Err(actual) => prev = actual,
            }
        }
    }
}

/// Why a bucket refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not now: the cells will be there after this wait.
    Wait(Duration),
    /// Never: more cells were asked for than the bucket holds.
    TooLarge {
        /// The bucket's size.
        burst: u32,
    },
}

/// A GCRA token bucket with refunds and live rate changes.
pub struct Bucket<C: Clock> {
    /// The current rate.
    rate: Rate,
    /// governor's limiter for that rate, over `tat`.
    limiter: RateLimiter<NotKeyed, TatCell, C, NoOpMiddleware<C::Instant>>,
    /// The state the limiter reads and writes; refunds move it back.
    tat: TatCell,
    /// When the limiter started: governor's TAT is relative to this.
    start: C::Instant,
    /// The time source (a fake one in tests).
    clock: C,
}

impl<C: Clock + Clone> Bucket<C> {
    /// A full bucket with this rate.
    pub fn new(rate: Rate, clock: C) -> Bucket<C> {
        Self::with_state(rate, clock, TatCell::default())
    }

    fn with_state(rate: Rate, clock: C, tat: TatCell) -> Bucket<C> {
        let start = clock.now();
        let limiter = RateLimiter::new(rate.quota(), tat.clone(), clock.clone());
        Bucket {
            rate,
            limiter,
            tat,
            start,
            clock,
        }
    }

    /// The current rate.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes `n` cells, all or none.
    pub fn take(&self, n: u32) -> Result<(), Refusal> {
        let Some(n) = NonZeroU32::new(n) else { return Ok(()) };
        match self.limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Refusal::Wait(not_until.wait_time_from(self.clock.now()))),
            Err(_) => Err(Refusal::TooLarge { burst: self.rate.burst }),
        }
    }

    /// Gives back `n` cells taken earlier. The bucket never holds more than its burst.
    pub fn refund(&self, n: u32) {
        self.shift(-(f64::from(n)));
    }

    /// Takes `n` cells even if the bucket is empty: usage beyond a reservation is still charged, and the
    /// next request waits for it.
    pub fn force(&self, n: u32) {
        let now = self.now_ns();
        let step = self.interval_ns() * f64::from(n);
        let _ = self.tat.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |raw| {
            Some((raw.max(now) as f64 + step).round() as u64)
        });
    }

    /// Moves the TAT by `cells` intervals (negative: refund).
    fn shift(&self, cells: f64) {
        let step = self.interval_ns() * cells;
        let _ = self.tat.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |raw| {
            if raw == 0 {
                return None; // never used: nothing to refund
            }
            Some((raw as f64 + step).max(1.0).round() as u64)
        });
    }

    fn interval_ns(&self) -> f64 {
        self.rate.interval().as_nanos() as f64
    }

    fn now_ns(&self) -> u64 {
        self.clock.now().duration_since(self.start).as_u64()
    }

    /// Cells in use now: how far the TAT runs ahead of the clock, in intervals.
    fn in_use(&self) -> f64 {
        let tat = self.tat.0.load(Ordering::Acquire);
        tat.saturating_sub(self.now_ns()) as f64 / self.interval_ns()
    }

    /// Cells that could be taken now.
    pub fn available(&self) -> f64 {
        (f64::from(self.rate.burst) - self.in_use()).max(0.0)
    }

    /// The same bucket under a new rate. The cells in use are carried over (capped at the new burst), so a
    /// change neither refills a drained bucket nor drains a full one.
    pub fn with_rate(&self, rate: Rate) -> Bucket<C> {
        let used = self.in_use().min(f64::from(rate.burst));
        let next = Self::with_state(rate, self.clock.clone(), TatCell::default());
        if used > 0.0 {
            let tat = next.now_ns() as f64 + used * next.interval_ns();
            next.tat.0.store((tat.round() as u64).max(1), Ordering::Release);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn per_second(amount: f64, burst: u32) -> Rate {
        Rate {
            amount,
            per: Duration::from_secs(1),
            burst,
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_says_how_long_to_wait() {
        let clock = FakeRelativeClock::default();
        let b = Bucket::new(per_second(2.0, 2), clock.clone());
        assert_eq!(b.take(1), Ok(()));
        assert_eq!(b.take(1), Ok(()));
        assert_eq!(b.take(1), Err(Refusal::Wait(Duration::from_millis(500))));
        clock.advance(Duration::from_millis(500));
        assert_eq!(b.take(1), Ok(()));
        assert_eq!(b.take(3), Err(Refusal::TooLarge { burst: 2 }));
    }

    #[test]
    fn refunds_and_forced_charges_move_the_level_exactly() {
        let clock = FakeRelativeClock::default();
        let b = Bucket::new(per_second(10.0, 100), clock.clone());
        b.take(60).unwrap();
        assert!((b.available() - 40.0).abs() < 1e-6);
        b.refund(25);
        assert!((b.available() - 65.0).abs() < 1e-6);
        b.force(80);
        assert!(b.available() < 1e-6);
        assert!(matches!(b.take(1), Err(Refusal::Wait(_))));
        // A refund can never fill the bucket past its burst.
        clock.advance(Duration::from_secs(20));
        b.refund(50);
        assert!((b.available() - 100.0).abs() < 1e-6);
        assert_eq!(b.take(101), Err(Refusal::TooLarge { burst: 100 }));
    }

    #[test]
    fn a_new_rate_keeps_the_level() {
        let clock = FakeRelativeClock::default();
        let b = Bucket::new(per_second(1.0, 10), clock.clone());
        b.take(6).unwrap();
        let faster = b.with_rate(per_second(100.0, 20));
        assert!((faster.available() - 14.0).abs() < 1e-6);
        let smaller = b.with_rate(per_second(1.0, 4));
        assert!(smaller.available() < 1e-6, "in use is capped at the new burst");
        clock.advance(Duration::from_secs(1));
        assert!((smaller.available() - 1.0).abs() < 1e-6);
    }
}
