//! The shared limits against a real `redis-server` on 127.0.0.1 (`.ci/run` installs the Debian package).
//!
//! The admission gate's property tests, run against the Redis scripts on a fake clock and through several
//! replicas at once: the rate limits hold over every window across the fleet, and reconciliation refunds
//! exactly what went unused. Then the in-flight cap across replicas, a dead replica's slots coming back
//! when its lease ends, and a replica that cannot reach Redis deciding locally at its share.

#[path = "../../../tests/support/redis.rs"]
mod redis_server;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ferroserve_admission::{Admission, AdmissionLimits, Reason, Scope, TenantLimits, rate};
use ferroserve_cluster::{Cluster, ClusterConfig, Mode, Reservation};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use redis_server::Redis;

const RPS: f64 = 5.0;
const REQUEST_BURST: u32 = 3;
const TPM: f64 = 6000.0;
const TOKEN_BURST: u32 = 500;
/// A fake clock's start, in µs since the epoch (2026-01-01).
const T0: u64 = 1_767_225_600_000_000;

fn limited() -> TenantLimits {
    TenantLimits {
        requests: Some(rate(RPS, Duration::from_secs(1), Some(REQUEST_BURST), "r").unwrap()),
        tokens: Some(rate(TPM, Duration::from_secs(60), Some(TOKEN_BURST), "t").unwrap()),
        max_in_flight: None,
    }
}

fn config(redis: &Redis) -> ClusterConfig {
    ClusterConfig {
        heartbeat: Duration::from_millis(100),
        lease: Duration::from_millis(500),
        // Generous for a loaded 2-core test machine; production keeps the default 50 ms.
        timeout: Duration::from_millis(500),
        ..ClusterConfig::new(redis.url())
    }
}

async fn replicas(redis: &Redis, n: usize) -> Vec<Arc<Cluster>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let admission = Admission::new(AdmissionLimits::default());
        let c = Cluster::start(config(redis), admission).await.expect("join the fleet");
        assert_eq!(c.mode(), Mode::Shared, "{:?}", c.state());
        out.push(c);
    }
    out
}

/// A tenant name no earlier case used, so that every case starts from full buckets.
fn fresh_tenant() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("t{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

#[derive(Debug, Clone)]
struct Step {
    replica: usize,
    advance_ms: u64,
    tokens: u32,
    used_per_mille: u32,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (0usize..3, 0u64..400, 1u32..300, 0u32..=1000).prop_map(|(replica, advance_ms, tokens, used_per_mille)| Step {
            replica,
            advance_ms,
            tokens,
            used_per_mille,
        }),
        1..40,
    )
}

/// Every window of `events` (time µs, requests, net tokens) stays within rate x time + burst.
fn within_rates(events: &[(u64, u32, i64)]) -> Result<(), TestCaseError> {
    for i in 0..events.len() {
        let (mut requests, mut tokens) = (0u32, 0i64);
        for e in &events[i..] {
            requests += e.1;
            tokens += e.2;
            let secs = (e.0 - events[i].0) as f64 / 1e6;
            prop_assert!(
                f64::from(requests) <= RPS * secs + f64::from(REQUEST_BURST) + 1e-9,
                "{} requests in {} s",
                requests,
                secs
            );
            prop_assert!(
                tokens as f64 <= TPM / 60.0 * secs + f64::from(TOKEN_BURST) + 1.0,
                "{} tokens in {} s",
                tokens,
                secs
            );
        }
    }
    Ok(())
}

#[test]
fn the_gates_properties_hold_in_redis_across_replicas() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let redis = rt.block_on(Redis::start());
    let fleet = rt.block_on(replicas(&redis, 3));
    let mut runner = TestRunner::new(Config::with_cases(48));

    // The rate limits hold over every window, whichever replicas the requests go through.
    runner
        .run(&steps(), |steps| {
            let tenant = fresh_tenant();
            let mut now_us = T0;
            let mut events: Vec<(u64, u32, i64)> = Vec::new();
            for s in &steps {
                now_us += s.advance_ms * 1000;
                let c = &fleet[s.replica];
                if let Ok(r) = rt.block_on(c.reserve_at(&tenant, limited(), s.tokens, now_us)) {
                    prop_assert_eq!(r.scope, Scope::Cluster);
                    let used = s.tokens * s.used_per_mille / 1000;
                    rt.block_on(r.ticket.unwrap().settle_at(Some(Some(used)), now_us));
                    events.push((now_us, 1, i64::from(s.tokens)));
                    events.push((now_us, 0, -i64::from(s.tokens - used)));
                }
            }
            within_rates(&events)
        })
        .unwrap();

    // Reconciliation refunds exactly the unused tokens: after settling, exactly burst - used tokens can be
    // reserved at that instant (through another replica), and not one more.
    runner
        .run(&(1u32..=TOKEN_BURST, 0u32..=1000), |(reserve, per_mille)| {
            let tenant = fresh_tenant();
            let limits = TenantLimits {
                requests: None,
                ..limited()
            };
            let r = rt
                .block_on(fleet[0].reserve_at(&tenant, limits.clone(), reserve, T0))
                .expect("a fresh tenant is admitted");
            let used = reserve * per_mille / 1000;
            rt.block_on(r.ticket.unwrap().settle_at(Some(Some(used)), T0));
            let left = TOKEN_BURST - used;
            if left > 0 {
                let r = rt.block_on(fleet[1].reserve_at(&tenant, limits.clone(), left, T0));
                prop_assert!(r.is_ok(), "reserved {}, used {}: {} should remain", reserve, used, left);
                // Keep it charged: a dropped ticket would refund it.
                std::mem::forget(r.ok().and_then(|r| r.ticket));
            }
            let refusal = rt
                .block_on(fleet[2].reserve_at(&tenant, limits, 1, T0))
                .err()
                .expect("nothing remains");
            prop_assert_eq!(refusal.reason, Reason::TenantTokens);
            prop_assert!(refusal.retry_after.is_some());
            Ok(())
        })
        .unwrap();
    drop(fleet);
    rt.block_on(redis.kill());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_cap_is_the_fleets_and_a_dead_replicas_slots_come_back() {
    let redis = Redis::start().await;
    let mut fleet = replicas(&redis, 2).await;
    let limits = TenantLimits {
        max_in_flight: Some(2),
        ..TenantLimits::default()
    };
    let a1 = fleet[0]
        .reserve_at("capped", limits.clone(), 10, 0)
        .await
        .expect("first");
    let a2 = fleet[0]
        .reserve_at("capped", limits.clone(), 10, 0)
        .await
        .expect("second");
    let refused = fleet[1]
        .reserve_at("capped", limits.clone(), 10, 0)
        .await
        .err()
        .expect("a third in flight is refused");
    assert_eq!(refused.reason, Reason::TenantConcurrency);
    assert!(refused.message.contains("across the fleet"), "{}", refused.message);
    // One ends on replica 0: replica 1 may start one (the settlement is sent from a task; poll).
    drop(a1);
    let b1 = until_admitted(&fleet[1], "capped", &limits).await;
    // Replica 0 dies holding a2: its ticket never settles and its heartbeat stops. When its lease ends,
    // its slot comes back.
    std::mem::forget(a2);
    fleet.remove(0).freeze();
    let b2 = until_admitted(&fleet[0], "capped", &limits).await;

    // Redis restarts empty while the survivor holds 2: its next heartbeat restates them, and a newcomer is
    // refused again.
    let port = redis.kill().await;
    let redis = Redis::on(port).await;
    let newcomer = Cluster::start(config(&redis), Admission::new(AdmissionLimits::default()))
        .await
        .unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let refused = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            tick.tick().await;
            match newcomer.reserve_at("capped", limits.clone(), 10, 0).await {
                Err(r) => return r,
                // Admitted before the survivor restated its holdings: give it back and look again.
                Ok(r) => drop(r),
            }
        }
    })
    .await
    .expect("the restated holdings fill the cap");
    assert_eq!(refused.reason, Reason::TenantConcurrency);
    drop((b1, b2));
    redis.kill().await;
}

/// Reserves for `tenant` until admitted, polling every 20 ms (bounded).
async fn until_admitted(c: &Arc<Cluster>, tenant: &str, limits: &TenantLimits) -> Reservation {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            tick.tick().await;
            if let Ok(r) = c.reserve_at(tenant, limits.clone(), 10, 0).await {
                return r;
            }
        }
    })
    .await
    .expect("admitted in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_a_replica_decides_locally_at_its_share() {
    // A port nobody listens on: the replica starts degraded, at its fallback share.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut limits = AdmissionLimits::default();
    limits.tenants.insert("a".into(), limited());
    let admission = Admission::new(limits);
    let config = ClusterConfig {
        fallback_replicas: 3,
        ..ClusterConfig::new(format!("redis://127.0.0.1:{port}"))
    };
    let c = Cluster::start(config, Arc::clone(&admission)).await.unwrap();
    let state = c.state();
    assert_eq!(state.mode, Mode::Degraded);
    assert!(state.last_error.is_some(), "{state:?}");
    assert_eq!(admission.share(), 3);
    let r = c.reserve("a", 10).await.expect("decided locally");
    assert_eq!(r.scope, Scope::Local, "the gate checks the replica's share");
    // The gate's buckets hold 1/3 of the limit: a burst of 3 requests becomes 1.
    let view = admission.tenant_view("a").unwrap();
    assert!((view.remaining_requests.unwrap() - 1.0).abs() < 1e-6, "{view:?}");
}

#[tokio::test]
async fn a_bad_url_or_lease_is_refused_with_the_key_to_fix() {
    let admission = Admission::new(AdmissionLimits::default());
    let e = Cluster::start(ClusterConfig::new("http://x"), Arc::clone(&admission))
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("cluster.redis_url"), "{e}");
    let config = ClusterConfig {
        heartbeat: Duration::from_secs(1),
        lease: Duration::from_secs(2),
        ..ClusterConfig::new("redis://127.0.0.1:1")
    };
    let e = Cluster::start(config, admission).await.err().unwrap();
    assert!(e.to_string().contains("cluster.lease_ms"), "{e}");
}
