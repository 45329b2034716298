//! Property tests of the admission gate on governor's fake clock: the rate limits hold over every window,
//! reconciliation refunds exactly what went unused, and a live change to one tenant leaves the others be.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ferroserve_admission::{
    Admission, AdmissionLimits, Admitted, Ask, LimitsPatch, Priority, ServerLimits, Tenant, TenantLimits, rate,
};
use governor::clock::FakeRelativeClock;
use proptest::prelude::*;

const RPS: f64 = 5.0;
const REQUEST_BURST: u32 = 3;
const TPM: f64 = 6000.0;
const TOKEN_BURST: u32 = 500;

fn tenant(name: &str) -> Tenant {
    Tenant::new(name, Priority::Interactive)
}

fn limited() -> TenantLimits {
    TenantLimits {
        requests: Some(rate(RPS, Duration::from_secs(1), Some(REQUEST_BURST), "r").unwrap()),
        tokens: Some(rate(TPM, Duration::from_secs(60), Some(TOKEN_BURST), "t").unwrap()),
        max_in_flight: None,
    }
}

fn gate(tenants: &[&str], clock: &FakeRelativeClock) -> Arc<Admission<FakeRelativeClock>> {
    let limits = AdmissionLimits {
        server: ServerLimits {
            shared: TenantLimits {
                max_in_flight: Some(1000),
                ..TenantLimits::default()
            },
            ..ServerLimits::default()
        },
        tenants: tenants
            .iter()
            .map(|t| (t.to_string(), limited()))
            .collect::<BTreeMap<_, _>>(),
    };
    Admission::with_clock(limits, clock.clone())
}

fn ask(name: &str, tokens: u32) -> Ask {
    Ask {
        tenant: tenant(name),
        tokens,
        max_tokens: tokens,
        deadline: None,
    }
}

fn remaining_tokens(g: &Admission<FakeRelativeClock>, name: &str) -> f64 {
    let s = g.snapshot();
    s.tenants
        .iter()
        .find(|t| t.name == name)
        .unwrap()
        .remaining_tokens
        .unwrap()
}

/// One step of a random workload: wait, then ask for tokens and use a fraction of them.
#[derive(Debug, Clone)]
struct Step {
    advance_ms: u64,
    tokens: u32,
    used_per_mille: u32,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (0u64..400, 1u32..300, 0u32..=1000).prop_map(|(advance_ms, tokens, used_per_mille)| Step {
            advance_ms,
            tokens,
            used_per_mille,
        }),
        1..120,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn admitted_requests_and_tokens_stay_within_rate_times_time_plus_burst(steps in steps()) {
        let clock = FakeRelativeClock::default();
        let g = gate(&["a"], &clock);
        let mut now_ms = 0u64;
        // (time, requests admitted, tokens charged net of refunds)
        let mut events: Vec<(u64, u32, i64)> = Vec::new();
        for s in &steps {
            clock.advance(Duration::from_millis(s.advance_ms));
            now_ms += s.advance_ms;
            if let Ok(Admitted::Now(mut permit)) = g.admit(ask("a", s.tokens)) {
                let used = s.tokens * s.used_per_mille / 1000;
                permit.settle(used, None);
                drop(permit);
                events.push((now_ms, 1, i64::from(s.tokens)));
                events.push((now_ms, 0, -i64::from(s.tokens - used)));
            }
        }
        for i in 0..events.len() {
            let (mut requests, mut tokens) = (0u32, 0i64);
            for e in &events[i..] {
                requests += e.1;
                tokens += e.2;
                let secs = (e.0 - events[i].0) as f64 / 1000.0;
                prop_assert!(f64::from(requests) <= RPS * secs + f64::from(REQUEST_BURST) + 1e-9,
                    "{requests} requests in {secs} s");
                prop_assert!(tokens as f64 <= TPM / 60.0 * secs + f64::from(TOKEN_BURST) + 1.0,
                    "{tokens} tokens in {secs} s");
            }
        }
    }

    #[test]
    fn reconciliation_refunds_exactly_the_unused_tokens(reserve in 1u32..=TOKEN_BURST, used_per_mille in 0u32..=1000) {
        let clock = FakeRelativeClock::default();
        let g = gate(&["a"], &clock);
        let Ok(Admitted::Now(mut permit)) = g.admit(ask("a", reserve)) else { panic!("a fresh tenant is admitted") };
        prop_assert!((remaining_tokens(&g, "a") - f64::from(TOKEN_BURST - reserve)).abs() < 1e-6);
        let used = reserve * used_per_mille / 1000;
        permit.settle(used, None);
        drop(permit);
        prop_assert!((remaining_tokens(&g, "a") - f64::from(TOKEN_BURST - used)).abs() < 1e-6,
            "reserved {reserve}, used {used}, remaining {}", remaining_tokens(&g, "a"));
    }

    #[test]
    fn a_live_change_keeps_the_other_tenants_state(
        a_tokens in 1u32..=TOKEN_BURST,
        b_tokens in 1u32..=TOKEN_BURST,
        new_tpm in 60.0f64..100_000.0,
        new_burst in 1u32..2000,
    ) {
        let clock = FakeRelativeClock::default();
        let g = gate(&["a", "b"], &clock);
        let Ok(Admitted::Now(pa)) = g.admit(ask("a", a_tokens)) else { panic!() };
        let Ok(Admitted::Now(pb)) = g.admit(ask("b", b_tokens)) else { panic!() };
        let before = g.snapshot();
        let view = g.patch(Some("a"), &LimitsPatch {
            tokens_per_minute: Some(new_tpm),
            token_burst: Some(new_burst),
            ..LimitsPatch::default()
        }).unwrap();
        let after = g.snapshot();
        let b_before = before.tenants.iter().find(|t| t.name == "b").unwrap();
        let b_after = after.tenants.iter().find(|t| t.name == "b").unwrap();
        prop_assert_eq!(b_before, b_after);
        // Tenant a keeps the tokens it has in use, up to its new bucket size.
        let in_use = f64::from(a_tokens.min(new_burst));
        prop_assert!((view.remaining_tokens.unwrap() - (f64::from(new_burst) - in_use)).abs() < 1e-3,
            "{view:?}");
        prop_assert_eq!(view.running, 1, "the in-flight request is undisturbed");
        drop((pa, pb));
    }
}
