//! The admission gate's queue, priorities, caps and shedding, on governor's fake clock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroserve_admission::{
    Admission, AdmissionLimits, Admitted, Ask, Generated, LimitsPatch, PatchError, Permit, Priority, Reason,
    ServerLimits, Tenant, TenantLimits, rate,
};
use governor::clock::FakeRelativeClock;

type Gate = Arc<Admission<FakeRelativeClock>>;

fn ask(name: &str, priority: Priority, tokens: u32) -> Ask {
    Ask {
        tenant: Tenant::new(name, priority),
        tokens,
        max_tokens: tokens,
        deadline: None,
    }
}

fn gate(slots: u32, queue: u32, tenants: &[(&str, TenantLimits)]) -> Gate {
    let limits = AdmissionLimits {
        server: ServerLimits {
            shared: TenantLimits {
                max_in_flight: Some(slots),
                ..TenantLimits::default()
            },
            max_queued_requests: queue,
            max_queued_tokens: 1000,
        },
        tenants: tenants
            .iter()
            .map(|(n, l)| (n.to_string(), l.clone()))
            .collect::<BTreeMap<_, _>>(),
    };
    Admission::with_clock(limits, FakeRelativeClock::default())
}

fn now(g: &Gate, a: Ask) -> Permit<FakeRelativeClock> {
    match g.admit(a) {
        Ok(Admitted::Now(p)) => p,
        Ok(Admitted::Queued(_)) => panic!("queued"),
        Err(e) => panic!("rejected: {e}"),
    }
}

/// Tokens that came `ms_per_token` apart, starting now.
fn generated(ms_per_token: u64, tokens: u32) -> Generated {
    let first = Instant::now();
    Generated {
        first,
        last: first + Duration::from_millis(ms_per_token * u64::from(tokens - 1)),
        tokens,
    }
}

#[tokio::test]
async fn a_waiter_whose_deadline_can_no_longer_be_met_is_refused_when_its_turn_comes() {
    let g = gate(1, 8, &[]);
    for _ in 0..3 {
        now(&g, ask("w", Priority::Interactive, 10)).settle(10, Some(generated(10, 10)));
    }
    let mut running = now(&g, ask("w", Priority::Interactive, 10));
    let mut waiting = ask("w", Priority::Interactive, 100);
    waiting.deadline = Some(Duration::from_secs(2));
    let Ok(Admitted::Queued(waiting)) = g.admit(waiting) else {
        panic!("fits at 10 ms a token")
    };
    // The running request shows the model has slowed down a hundredfold.
    running.settle(10, Some(generated(1000, 10)));
    drop(running);
    let refused = waiting.granted().await.err().expect("refused at its turn");
    assert_eq!(refused.reason, Reason::QueueDeadline);
    assert!(
        refused.message.contains("cannot cover generation"),
        "{}",
        refused.message
    );
    let s = g.snapshot();
    assert_eq!((s.server.running, s.queued_requests), (0, 0), "its slot is free again");
}

#[tokio::test]
async fn interactive_requests_go_ahead_of_batch_and_waiters_get_slots_in_order() {
    let g = gate(1, 8, &[]);
    let running = now(&g, ask("x", Priority::Batch, 1));
    let Ok(Admitted::Queued(batch)) = g.admit(ask("b", Priority::Batch, 1)) else {
        panic!()
    };
    let Ok(Admitted::Queued(interactive)) = g.admit(ask("i", Priority::Interactive, 1)) else {
        panic!()
    };
    assert_eq!(g.snapshot().queued_requests, 2);
    let batch = tokio::spawn(batch.granted());
    let interactive = tokio::spawn(interactive.granted());
    drop(running);
    let first = interactive.await.unwrap().expect("interactive gets the freed slot");
    assert!(!batch.is_finished());
    assert_eq!(g.snapshot().server.running, 1);
    drop(first);
    let second = batch.await.unwrap().expect("then batch");
    drop(second);
    let s = g.snapshot();
    assert_eq!((s.server.running, s.queued_requests), (0, 0));
}

#[test]
fn a_full_queue_and_a_tenant_at_its_cap_are_rejected_with_a_retry_hint() {
    let capped = TenantLimits {
        max_in_flight: Some(1),
        ..TenantLimits::default()
    };
    let g = gate(1, 1, &[("capped", capped)]);
    let _running = now(&g, ask("capped", Priority::Interactive, 1));
    let e = g.admit(ask("capped", Priority::Interactive, 1)).err().unwrap();
    assert_eq!(e.reason, Reason::TenantConcurrency);
    assert!(e.message.contains("capped") && e.retry_after.is_some(), "{e:?}");
    let _queued = g.admit(ask("other", Priority::Interactive, 1)).unwrap();
    let e = g.admit(ask("other", Priority::Interactive, 1)).err().unwrap();
    assert_eq!(e.reason, Reason::QueueFull);
    assert!(!e.reason.is_quota());
    assert!(e.retry_after.is_some());
}

#[test]
fn a_dropped_waiter_leaves_the_queue_and_gets_its_tokens_back() {
    let limited = TenantLimits {
        tokens: Some(rate(60.0, Duration::from_secs(60), Some(100), "t").unwrap()),
        ..TenantLimits::default()
    };
    let g = gate(1, 4, &[("t", limited)]);
    let running = now(&g, ask("t", Priority::Interactive, 30));
    let waiting = g.admit(ask("t", Priority::Interactive, 50)).unwrap();
    let tenant = |g: &Gate| g.snapshot().tenants.into_iter().find(|t| t.name == "t").unwrap();
    assert!((tenant(&g).remaining_tokens.unwrap() - 20.0).abs() < 1e-6);
    drop(waiting);
    assert_eq!(g.snapshot().queued_requests, 0);
    assert!((tenant(&g).remaining_tokens.unwrap() - 70.0).abs() < 1e-6);
    drop(running);
    assert!(
        (tenant(&g).remaining_tokens.unwrap() - 100.0).abs() < 1e-6,
        "unsettled: nothing charged"
    );
}

#[test]
fn rate_limits_name_the_limit_and_give_the_wait() {
    let alpha = TenantLimits {
        requests: Some(rate(2.0, Duration::from_secs(1), Some(2), "r").unwrap()),
        tokens: Some(rate(1000.0, Duration::from_secs(60), Some(100), "t").unwrap()),
        max_in_flight: None,
    };
    let g = gate(100, 4, &[("alpha", alpha)]);
    drop(now(&g, ask("alpha", Priority::Interactive, 1)));
    drop(now(&g, ask("alpha", Priority::Interactive, 1)));
    let e = g.admit(ask("alpha", Priority::Interactive, 1)).err().unwrap();
    assert_eq!(e.reason, Reason::TenantRequests);
    assert!(e.message.contains("2 requests per second (burst 2)"), "{}", e.message);
    assert_eq!(e.retry_after, Some(Duration::from_millis(500)));
    let e = g.admit(ask("alpha", Priority::Interactive, 101)).err().unwrap();
    assert_eq!(e.reason, Reason::TenantRequests, "the request bucket is checked first");
    g.patch(
        Some("alpha"),
        &LimitsPatch {
            requests_per_second: Some(0.0),
            ..LimitsPatch::default()
        },
    )
    .unwrap();
    let e = g.admit(ask("alpha", Priority::Interactive, 101)).err().unwrap();
    assert_eq!(e.reason, Reason::TooLarge);
    assert!(
        e.retry_after.is_none() && e.message.contains("lower max_tokens"),
        "{e:?}"
    );
}

#[test]
fn invalid_or_unknown_changes_leave_the_limits_as_they_were() {
    let g = gate(2, 2, &[("alpha", TenantLimits::default())]);
    let before = g.snapshot();
    let e = g
        .patch(
            Some("nobody"),
            &LimitsPatch {
                max_in_flight: Some(1),
                ..LimitsPatch::default()
            },
        )
        .unwrap_err();
    assert!(matches!(&e, PatchError::UnknownTenant(m) if m.contains("alpha")), "{e}");
    let e = g
        .patch(
            Some("alpha"),
            &LimitsPatch {
                requests_per_second: Some(f64::NAN),
                ..LimitsPatch::default()
            },
        )
        .unwrap_err();
    assert!(matches!(e, PatchError::Invalid(_)));
    let e = g
        .patch(
            None,
            &LimitsPatch {
                max_in_flight: Some(0),
                ..LimitsPatch::default()
            },
        )
        .unwrap_err();
    assert!(matches!(e, PatchError::Invalid(_)));
    assert_eq!(g.snapshot(), before);
}

#[test]
fn a_deadline_that_cannot_be_met_is_shed_once_the_service_time_is_known() {
    let g = gate(1, 8, &[]);
    let mut deadline_ask = ask("d", Priority::Interactive, 100);
    deadline_ask.deadline = Some(Duration::from_millis(50));
    // Nothing measured yet: no guessing, the request runs.
    drop(now(&g, deadline_ask.clone()));
    for _ in 0..3 {
        let mut p = now(&g, ask("d", Priority::Interactive, 100));
        // 10 ms per token, measured.
        p.settle(100, Some(generated(10, 100)));
    }
    let e = g.admit(deadline_ask.clone()).err().unwrap();
    assert_eq!(e.reason, Reason::Deadline);
    assert!(e.message.contains("deadline (50 ms)"), "{}", e.message);
    deadline_ask.max_tokens = 2;
    assert!(matches!(g.admit(deadline_ask), Ok(Admitted::Now(_))));
}

#[tokio::test]
async fn a_fleet_replica_runs_its_share_of_the_slots_and_checks_only_the_server_for_cluster_decided_asks() {
    let capped = TenantLimits {
        max_in_flight: Some(1),
        ..TenantLimits::default()
    };
    let g = gate(4, 8, &[("t", capped)]);
    g.set_share(2);
    // Two of the four slots are this replica's; the third request waits.
    let a = now(&g, ask("other", Priority::Interactive, 1));
    let b = now(&g, ask("other", Priority::Interactive, 1));
    assert!(matches!(
        g.admit(ask("other", Priority::Interactive, 1)),
        Ok(Admitted::Queued(_))
    ));
    drop((a, b));
    // A tenant decided in the shared store is not held to the local share of its own cap (1 of 1 here).
    let g = gate(
        4,
        8,
        &[(
            "t",
            TenantLimits {
                max_in_flight: Some(1),
                ..TenantLimits::default()
            },
        )],
    );
    g.set_share(2);
    let first = g.admit_in(ask("t", Priority::Interactive, 1), ferroserve_admission::Scope::Cluster);
    let second = g.admit_in(ask("t", Priority::Interactive, 1), ferroserve_admission::Scope::Cluster);
    assert!(matches!(
        (&first, &second),
        (Ok(Admitted::Now(_)), Ok(Admitted::Now(_)))
    ));
    // Decided here, it is.
    drop((first, second));
    let local = now(&g, ask("t", Priority::Interactive, 1));
    let e = g
        .admit(ask("t", Priority::Interactive, 1))
        .err()
        .expect("over the tenant's cap");
    assert_eq!(e.reason, Reason::TenantConcurrency);
    drop(local);
}
