//! Admission through the real router on 127.0.0.1, in front of a mock backend (no model), so that the test
//! decides when each generation may finish. Every refusal is checked for its status, its `retry-after-ms`
//! trailer, its `google.rpc.RetryInfo` detail and the limit it names.

mod mock;

use std::collections::BTreeMap;
use std::time::Duration;

use ferroserve_admission::{
    AdmissionLimits, KeyStore, Priority, ServerLimits, TenantLimits, parse_sha256, rate, sha256_hex,
};
use ferroserve_proto::v1 as pb;
use ferroserve_router::{LIMIT_METADATA, LiveSettings, RETRY_AFTER_MS};
use mock::*;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Checks a refusal's code, named limit and retry hint (in the trailer and as RetryInfo, in agreement).
fn assert_refused(status: &Status, code: Code, limit: &str, retry: bool) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(
        status.metadata().get(LIMIT_METADATA).and_then(|v| v.to_str().ok()),
        Some(limit),
        "{status:?}"
    );
    let trailer: Option<u64> = status
        .metadata()
        .get(RETRY_AFTER_MS)
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let info = status.get_details_retry_info().and_then(|r| r.retry_delay);
    assert_eq!(trailer.is_some(), retry, "{status:?}");
    assert_eq!(
        info.map(|d| d.as_millis() as u64),
        trailer,
        "RetryInfo agrees with the trailer"
    );
}

fn server_limits(slots: u32, queue: u32) -> ServerLimits {
    ServerLimits {
        shared: TenantLimits {
            max_in_flight: Some(slots),
            ..TenantLimits::default()
        },
        max_queued_requests: queue,
        max_queued_tokens: 100_000,
    }
}

async fn remaining_tokens(h: &Harness, tenant: &str) -> f64 {
    let limits = h
        .admin()
        .await
        .get_limits(admin_request(pb::GetLimitsRequest {}, "admin"))
        .await
        .unwrap()
        .into_inner();
    limits
        .tenants
        .iter()
        .find(|t| t.tenant == tenant)
        .unwrap()
        .remaining_tokens
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_refuse_with_resource_exhausted_and_when_to_retry() {
    let alpha = TenantLimits {
        // Two at once, then one per 100 s: the third request is refused whatever the machine's speed.
        requests: Some(rate(0.01, Duration::from_secs(1), Some(2), "r").unwrap()),
        ..TenantLimits::default()
    };
    let gamma = TenantLimits {
        tokens: Some(rate(0.6, Duration::from_secs(60), Some(100), "t").unwrap()),
        ..TenantLimits::default()
    };
    let limits = AdmissionLimits {
        server: server_limits(8, 8),
        tenants: BTreeMap::from([("alpha".to_string(), alpha), ("gamma".to_string(), gamma)]),
    };
    let h = Harness::start(Options::new(limits)).await;
    h.release.send(true).unwrap();
    let mut c = h.client().await;
    c.generate(request("alpha", "a1", 2)).await.unwrap();
    c.generate(request("alpha", "a2", 2)).await.unwrap();
    let refused = c.generate(request("alpha", "a3", 2)).await.unwrap_err();
    assert_refused(&refused, Code::ResourceExhausted, "tenant_requests", true);
    assert!(
        refused.message().contains("tenant `alpha`") && refused.message().contains("requests per second"),
        "{}",
        refused.message()
    );
    // Streams are refused the same way, and another tenant is unaffected.
    let refused = c.generate_stream(request("alpha", "a4", 2)).await.unwrap_err();
    assert_refused(&refused, Code::ResourceExhausted, "tenant_requests", true);
    c.generate(request("beta", "b1", 2)).await.unwrap();

    // Tokens: "hi" reserves 1 (estimate) + 10; the mock uses 3 + 4, so 4 come back.
    let done = c.generate(request("gamma", "g1", 10)).await.unwrap().into_inner();
    let usage = done.usage.unwrap();
    let used = f64::from(usage.prompt_tokens + usage.completion_tokens);
    let left = remaining_tokens(&h, "gamma").await;
    assert!((left - (100.0 - used)).abs() < 0.5, "left {left}, used {used}");
    let refused = c.generate(request("gamma", "g2", 95)).await.unwrap_err();
    assert_refused(&refused, Code::ResourceExhausted, "tenant_tokens", true);
    assert!(refused.message().contains("tokens per minute"), "{}", refused.message());
    let refused = c.generate(request("gamma", "g3", 150)).await.unwrap_err();
    assert_refused(&refused, Code::ResourceExhausted, "too_large", false);
    assert!(refused.message().contains("lower max_tokens"), "{}", refused.message());
    h.stop().await;
}

/// Waits (bounded) until the server reports `running` requests running and `queued` waiting.
async fn until_state(h: &Harness, running: u32, queued: u32) {
    let mut admin = h.admin().await;
    tokio::time::timeout(WAIT, async {
        loop {
            let limits = admin
                .get_limits(admin_request(pb::GetLimitsRequest {}, "admin"))
                .await
                .unwrap()
                .into_inner();
            let server = limits.server.unwrap();
            if (server.running, server.queued) == (running, queued) {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("requests reached the queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_queues_by_priority_then_sheds_with_unavailable_and_loses_nothing() {
    let limits = AdmissionLimits {
        server: server_limits(1, 2),
        tenants: BTreeMap::new(),
    };
    let h = Harness::start(Options::new(limits)).await;
    let c = h.client().await;
    let spawn = |tenant: &'static str, id: &'static str| {
        let mut c = c.clone();
        tokio::spawn(async move { c.generate(request(tenant, id, 2)).await })
    };
    let first = spawn("alpha", "running");
    until_state(&h, 1, 0).await;
    let batch = spawn("batch", "batch");
    until_state(&h, 1, 1).await;
    let interactive = spawn("beta", "interactive");
    until_state(&h, 1, 2).await;
    let refused = c.clone().generate(request("gamma", "shed", 2)).await.unwrap_err();
    assert_refused(&refused, Code::Unavailable, "queue_full", true);
    assert!(refused.message().contains("at capacity"), "{}", refused.message());

    h.release.send(true).unwrap();
    for task in [first, batch, interactive] {
        let reply = tokio::time::timeout(WAIT, task).await.unwrap().unwrap().unwrap();
        assert_eq!(reply.into_inner().usage.unwrap().completion_tokens, 2);
    }
    let order = h.started.lock().unwrap().clone();
    assert_eq!(
        order,
        ["running", "interactive", "batch"],
        "interactive goes ahead of batch"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_cannot_be_met_is_refused_at_once() {
    let limits = AdmissionLimits {
        server: server_limits(4, 4),
        tenants: BTreeMap::new(),
    };
    // 20 ms per token, so the gate learns a TPOT to estimate with.
    let h = Harness::start(Options {
        token_delay: Duration::from_millis(20),
        ..Options::new(limits)
    })
    .await;
    h.release.send(true).unwrap();
    let mut c = h.client().await;
    for i in 0..3 {
        c.generate(request("alpha", &format!("warm{i}"), 4)).await.unwrap();
    }
    let mut hopeless = request("alpha", "hopeless", 1000);
    hopeless.set_timeout(Duration::from_millis(300));
    let refused = c.generate(hopeless).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(
        refused.metadata().get(LIMIT_METADATA).and_then(|v| v.to_str().ok()),
        Some("deadline")
    );
    assert!(refused.message().contains("deadline (300 ms)"), "{}", refused.message());
    assert!(
        !h.started.lock().unwrap().contains(&"hopeless".to_string()),
        "no model work was spent on it"
    );
    let mut feasible = request("alpha", "feasible", 4);
    feasible.set_timeout(Duration::from_secs(20));
    c.generate(feasible).await.unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_change_live_without_disturbing_requests_in_flight() {
    let alpha = TenantLimits {
        requests: Some(rate(0.01, Duration::from_secs(1), Some(1), "r").unwrap()),
        ..TenantLimits::default()
    };
    let limits = AdmissionLimits {
        server: server_limits(4, 4),
        tenants: BTreeMap::from([("alpha".to_string(), alpha.clone()), ("beta".to_string(), alpha)]),
    };
    let reload: ferroserve_router::Reloader = Box::new(|| Err("admission.max_in_flight: must be at least 1".into()));
    let h = Harness::start(Options {
        reload: Some(reload),
        ..Options::new(limits)
    })
    .await;
    let c = h.client().await;
    let in_flight = {
        let mut c = c.clone();
        tokio::spawn(async move { c.generate(request("alpha", "held", 2)).await })
    };
    until_state(&h, 1, 0).await;
    let mut admin = h.admin().await;
    let before_beta = admin
        .get_limits(admin_request(pb::GetLimitsRequest {}, "admin"))
        .await
        .unwrap()
        .into_inner()
        .tenants
        .into_iter()
        .find(|t| t.tenant == "beta")
        .unwrap();
    let refused = c.clone().generate(request("alpha", "over", 2)).await.unwrap_err();
    assert_refused(&refused, Code::ResourceExhausted, "tenant_requests", true);

    let raise = pb::SetLimitsRequest {
        tenant: "alpha".into(),
        limits: Some(pb::Limits {
            requests_per_second: Some(1000.0),
            request_burst: Some(1000),
            ..Default::default()
        }),
    };
    let status = admin
        .set_limits(admin_request(raise.clone(), "key-alpha"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let applied = admin
        .set_limits(admin_request(raise, "admin"))
        .await
        .unwrap()
        .into_inner()
        .applied
        .unwrap();
    assert_eq!(applied.limits.unwrap().requests_per_second, Some(1000.0));
    assert_eq!(applied.running, 1, "the request in flight is still running");

    let bad = pb::SetLimitsRequest {
        tenant: "alpha".into(),
        limits: Some(pb::Limits {
            tokens_per_minute: Some(-5.0),
            ..Default::default()
        }),
    };
    let status = admin.set_limits(admin_request(bad, "admin")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("tokens_per_minute"), "{}", status.message());
    let unknown = pb::SetLimitsRequest {
        tenant: "nobody".into(),
        limits: Some(pb::Limits::default()),
    };
    let status = admin.set_limits(admin_request(unknown, "admin")).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("alpha"), "{}", status.message());
    let status = admin
        .reload_config(admin_request(pb::ReloadConfigRequest {}, "admin"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("running settings stay"),
        "{}",
        status.message()
    );

    let after = admin
        .get_limits(admin_request(pb::GetLimitsRequest {}, "admin"))
        .await
        .unwrap()
        .into_inner();
    let beta = after.tenants.iter().find(|t| t.tenant == "beta").unwrap();
    let alpha = after.tenants.iter().find(|t| t.tenant == "alpha").unwrap();
    assert_eq!(beta.limits, before_beta.limits, "beta's limits are untouched");
    assert!(
        (beta.remaining_requests.unwrap() - before_beta.remaining_requests.unwrap()).abs() < 0.01,
        "beta's bucket is not reset"
    );
    assert_eq!(alpha.limits.as_ref().unwrap().requests_per_second, Some(1000.0));

    h.release.send(true).unwrap();
    let held = tokio::time::timeout(WAIT, in_flight).await.unwrap().unwrap().unwrap();
    assert_eq!(held.into_inner().usage.unwrap().completion_tokens, 2);
    c.clone().generate(request("alpha", "now-allowed", 2)).await.unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_swaps_keys_and_limits_atomically() {
    let limits = AdmissionLimits {
        server: server_limits(4, 4),
        tenants: BTreeMap::new(),
    };
    let reload: ferroserve_router::Reloader = Box::new(|| {
        let mut tenants = BTreeMap::new();
        tenants.insert(
            "delta".to_string(),
            TenantLimits {
                max_in_flight: Some(1),
                ..TenantLimits::default()
            },
        );
        Ok(LiveSettings {
            keys: KeyStore::new(
                vec![key("delta", Priority::Batch)],
                Some(parse_sha256(&sha256_hex("admin")).unwrap()),
                true,
            ),
            limits: AdmissionLimits {
                server: server_limits(4, 4),
                tenants,
            },
        })
    });
    let h = Harness::start(Options {
        reload: Some(reload),
        ..Options::new(limits)
    })
    .await;
    h.release.send(true).unwrap();
    let mut c = h.client().await;
    let status = c.generate(request("delta", "d0", 2)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let summary = h
        .admin()
        .await
        .reload_config(admin_request(pb::ReloadConfigRequest {}, "admin"))
        .await
        .unwrap()
        .into_inner()
        .summary;
    assert!(summary.contains("1 API keys"), "{summary}");
    c.generate(request("delta", "d1", 2)).await.unwrap();
    let status = c.generate(request("alpha", "a1", 2)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "alpha's key was removed");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_jump_the_queue_beyond_its_priority_range() {
    let h = Harness::start(Options::new(AdmissionLimits {
        server: server_limits(8, 8),
        tenants: BTreeMap::new(),
    }))
    .await;
    h.release.send(true).unwrap();
    let mut c = h.client().await;
    for (tenant, id, asked) in [
        ("alpha", "p1", 100),
        ("beta", "p2", 100),
        ("beta", "p3", -100),
        ("beta", "p4", 3),
    ] {
        let mut r = request(tenant, id, 2);
        r.get_mut().priority = asked;
        c.generate(r).await.unwrap();
    }
    let got: Vec<(String, i32)> = h
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.request_id.clone(), r.priority))
        .collect();
    for (id, priority) in [("p1", 0), ("p2", 5), ("p3", -5), ("p4", 3)] {
        assert!(
            got.contains(&(id.to_string(), priority)),
            "{id} should run at {priority}: {got:?}"
        );
    }
    h.stop().await;
}
