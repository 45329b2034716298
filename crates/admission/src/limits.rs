//! What the limits are: per tenant and for the whole server, and how an operator changes them.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::bucket::Rate;

/// One tenant's limits. `None` means no limit of that kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantLimits {
    /// Requests per second, with a burst.
    pub requests: Option<Rate>,
    /// Tokens (prompt + max_tokens reserved, then reconciled) per minute, with a burst.
    pub tokens: Option<Rate>,
    /// Requests running or waiting at once.
    pub max_in_flight: Option<u32>,
}

/// The whole server's limits.
///
/// The default here admits 1 request at once; the binary's config sets workers x the engine's batch size.
/// Requests admitted beyond what the workers run at once would wait inside them, where the gate cannot
/// see, estimate or shed them. The overload benchmark measured the difference on the sequential engine:
/// with 2 slots in front of it, 10 of 26 admitted requests missed a 3 s deadline; with 1, none did.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerLimits {
    /// Rates and concurrency over all tenants together.
    pub shared: TenantLimits,
    /// Requests that may wait for a slot when `shared.max_in_flight` are running.
    pub max_queued_requests: u32,
    /// Reserved tokens those waiting requests may hold together.
    pub max_queued_tokens: u64,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            shared: TenantLimits {
                requests: None,
                tokens: None,
                max_in_flight: Some(1),
            },
            max_queued_requests: 16,
            max_queued_tokens: 65_536,
        }
    }
}

/// Every limit the admission stage enforces.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdmissionLimits {
    /// Whole-server limits.
    pub server: ServerLimits,
    /// Per-tenant limits, by tenant name. A tenant not listed has no limits of its own.
    pub tenants: BTreeMap<String, TenantLimits>,
}

/// A change to some limits: fields left `None` keep their value; a rate or a concurrency of 0 removes
/// that limit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LimitsPatch {
    /// New requests per second (0: no limit).
    pub requests_per_second: Option<f64>,
    /// New request burst.
    pub request_burst: Option<u32>,
    /// New tokens per minute (0: no limit).
    pub tokens_per_minute: Option<f64>,
    /// New token burst.
    pub token_burst: Option<u32>,
    /// New concurrency cap (0: no limit).
    pub max_in_flight: Option<u32>,
    /// New waiting-queue size in requests (server only).
    pub max_queued_requests: Option<u32>,
    /// New waiting-queue size in tokens (server only).
    pub max_queued_tokens: Option<u64>,
}

/// Builds a rate from an amount per `per` and an optional burst; the default burst is one period's worth.
pub fn rate(amount: f64, per: Duration, burst: Option<u32>, what: &str) -> Result<Rate, String> {
    let burst = burst.unwrap_or_else(|| amount.ceil().clamp(1.0, f64::from(u32::MAX)) as u32);
    let r = Rate { amount, per, burst };
    r.check(what)?;
    Ok(r)
}

fn patch_rate(
    current: Option<Rate>,
    amount: Option<f64>,
    burst: Option<u32>,
    per: Duration,
    what: &str,
) -> Result<Option<Rate>, String> {
    match (amount, burst, current) {
        (None, None, c) => Ok(c),
        (Some(0.0), _, _) => Ok(None),
        (Some(a), b, c) => rate(a, per, b.or(c.map(|c| c.burst)), what).map(Some),
        (None, Some(b), Some(c)) => rate(c.amount, per, Some(b), what).map(Some),
        (None, Some(_), None) => Err(format!("{what} is not limited; set the rate as well as the burst")),
    }
}

impl TenantLimits {
    /// These limits with `patch` applied, or a message naming the field to fix.
    pub fn patched(&self, patch: &LimitsPatch) -> Result<TenantLimits, String> {
        Ok(TenantLimits {
            requests: patch_rate(
                self.requests,
                patch.requests_per_second,
                patch.request_burst,
                Duration::from_secs(1),
                "requests_per_second",
            )?,
            tokens: patch_rate(
                self.tokens,
                patch.tokens_per_minute,
                patch.token_burst,
                Duration::from_secs(60),
                "tokens_per_minute",
            )?,
            max_in_flight: match patch.max_in_flight {
                None => self.max_in_flight,
                Some(0) => None,
                Some(n) => Some(n),
            },
        })
    }
}

impl TenantLimits {
    /// One replica's part of these limits when `replicas` replicas enforce them apart (a fleet whose shared
    /// store is unreachable): each rate and burst divided, the concurrency cap divided rounding up.
    pub fn shared_by(&self, replicas: u32) -> TenantLimits {
        if replicas <= 1 {
            return self.clone();
        }
        let n = f64::from(replicas);
        let part = |r: Rate| Rate {
            amount: r.amount / n,
            per: r.per,
            burst: (f64::from(r.burst) / n).ceil().max(1.0) as u32,
        };
        TenantLimits {
            requests: self.requests.map(part),
            tokens: self.tokens.map(part),
            max_in_flight: self.max_in_flight.map(|m| m.div_ceil(replicas).max(1)),
        }
    }

    /// True when no limit of any kind is set.
    pub fn is_unlimited(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none() && self.max_in_flight.is_none()
    }
}

impl ServerLimits {
    /// These limits with `patch` applied, or a message naming the field to fix.
    pub fn patched(&self, patch: &LimitsPatch) -> Result<ServerLimits, String> {
        let shared = self.shared.patched(patch)?;
        if shared.max_in_flight.is_none() {
            return Err("max_in_flight cannot be removed for the server: waiting and shedding need it".into());
        }
        let max_queued_requests = patch.max_queued_requests.unwrap_or(self.max_queued_requests);
        let max_queued_tokens = patch.max_queued_tokens.unwrap_or(self.max_queued_tokens);
        Ok(ServerLimits {
            shared,
            max_queued_requests,
            max_queued_tokens,
        })
    }
}

impl LimitsPatch {
    /// True when the patch changes a field that only the server has.
    pub fn has_server_fields(&self) -> bool {
        self.max_queued_requests.is_some() || self.max_queued_tokens.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_keep_unset_fields_and_zero_removes_a_limit() {
        let base = TenantLimits {
            requests: Some(rate(2.0, Duration::from_secs(1), Some(2), "r").unwrap()),
            tokens: Some(rate(1000.0, Duration::from_secs(60), None, "t").unwrap()),
            max_in_flight: Some(3),
        };
        let p = base
            .patched(&LimitsPatch {
                requests_per_second: Some(5.0),
                ..LimitsPatch::default()
            })
            .unwrap();
        assert_eq!(p.requests.unwrap().amount, 5.0);
        assert_eq!(p.requests.unwrap().burst, 2, "the burst is kept");
        assert_eq!(p.tokens, base.tokens);
        let p = base
            .patched(&LimitsPatch {
                tokens_per_minute: Some(0.0),
                max_in_flight: Some(0),
                ..LimitsPatch::default()
            })
            .unwrap();
        assert_eq!((p.tokens, p.max_in_flight), (None, None));
        let e = TenantLimits::default()
            .patched(&LimitsPatch {
                token_burst: Some(5),
                ..LimitsPatch::default()
            })
            .unwrap_err();
        assert!(e.contains("tokens_per_minute"), "{e}");
        let e = base
            .patched(&LimitsPatch {
                requests_per_second: Some(-1.0),
                ..LimitsPatch::default()
            })
            .unwrap_err();
        assert!(e.contains("requests_per_second"), "{e}");
    }

    #[test]
    fn rates_too_small_or_too_large_are_refused_not_panicked_on() {
        for amount in [1e-300, 1e-9, f64::MIN_POSITIVE, 1e300, f64::MAX] {
            let r = rate(amount, Duration::from_secs(1), Some(1), "requests_per_second");
            assert!(r.is_err(), "{amount}");
        }
        let patch = LimitsPatch {
            requests_per_second: Some(1e-300),
            ..LimitsPatch::default()
        };
        assert!(TenantLimits::default().patched(&patch).is_err());
        assert!(rate(1.0 / 86_400.0, Duration::from_secs(1), Some(1), "x").is_ok());
    }

    #[test]
    fn a_replica_share_divides_rates_bursts_and_caps() {
        let full = TenantLimits {
            requests: Some(rate(9.0, Duration::from_secs(1), Some(10), "r").unwrap()),
            tokens: Some(rate(600.0, Duration::from_secs(60), Some(1000), "t").unwrap()),
            max_in_flight: Some(4),
        };
        assert_eq!(full.shared_by(1), full);
        let third = full.shared_by(3);
        assert_eq!(third.requests.unwrap().amount, 3.0);
        assert_eq!(third.requests.unwrap().burst, 4, "10 / 3 rounds up");
        assert_eq!(third.tokens.unwrap().amount, 200.0);
        assert_eq!(third.tokens.unwrap().burst, 334);
        assert_eq!(third.max_in_flight, Some(2));
        assert_eq!(full.shared_by(100).max_in_flight, Some(1), "a cap never falls to 0");
        assert!(TenantLimits::default().is_unlimited() && !full.is_unlimited());
    }

    #[test]
    fn the_server_keeps_a_concurrency_cap() {
        let e = ServerLimits::default()
            .patched(&LimitsPatch {
                max_in_flight: Some(0),
                ..LimitsPatch::default()
            })
            .unwrap_err();
        assert!(e.contains("max_in_flight"));
    }
}
