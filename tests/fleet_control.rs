//! Control state shared by a fleet on 127.0.0.1 (a real `redis-server`, real workers serving versions a
//! and b, three `ferroserve router` processes): a split and a kill switch set on one replica hold on all
//! when the call returns and survive a router restart; filter and limit changes reach every replica; a
//! rollout's judge dies and another replica finishes the rollout.

mod support;

use std::time::{Duration, Instant};

use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::inference_client::InferenceClient;
use support::fleet::*;
use support::redis::Redis;
use support::*;
use tonic::Code;
use tonic::transport::Channel;

/// The versions a replica's traffic policy names: (weights, disabled versions).
async fn policy_of(fleet: &Fleet, i: usize) -> (Vec<(String, u32)>, Vec<String>) {
    let state = fleet
        .admin(i)
        .await
        .get_traffic(with_key(pb::GetTrafficRequest::default(), ADMIN))
        .await
        .expect("GetTraffic")
        .into_inner();
    let mut weights: Vec<_> = state.weights.into_iter().collect();
    weights.sort();
    let disabled = state
        .versions
        .into_iter()
        .filter(|v| v.disabled)
        .map(|v| v.version)
        .collect();
    (weights, disabled)
}

/// The version that served a request with `session` through `c`.
async fn served_by(c: &mut InferenceClient<Channel>, session: String) -> String {
    let mut request = chat("Hi", 1);
    request.session = session;
    let (_, done) = stream_all_as(c, request, ROOMY).await;
    // "name@version"
    done.model_version.rsplit('@').next().unwrap_or_default().to_string()
}

async fn stream_all_as(
    c: &mut InferenceClient<Channel>,
    request: pb::GenerateRequest,
    key: &str,
) -> (u32, pb::GenerationComplete) {
    let mut stream = c
        .generate_stream(with_key(request, key))
        .await
        .expect("admitted")
        .into_inner();
    let mut tokens = 0;
    while let Some(m) = stream.message().await.expect("stream") {
        match m.event.expect("event") {
            pb::generate_stream_response::Event::Token(_) => tokens += 1,
            pb::generate_stream_response::Event::Complete(c) => return (tokens, c),
        }
    }
    panic!("no completion")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_and_a_kill_switch_set_on_one_replica_hold_on_all_and_survive_a_restart() {
    let redis = Redis::start().await;
    let mut fleet = Fleet::start_with(Some(&redis), 3, &[Some("a"), Some("b")]).await;
    let mut admin = fleet.admin(0).await;

    // A split set on replica 0 is every replica's policy when the call returns.
    let split = pb::SetTrafficRequest {
        weights: [("a".to_string(), 50), ("b".to_string(), 50)].into(),
        reason: "fleet test".into(),
        ..Default::default()
    };
    admin.set_traffic(with_key(split, ADMIN)).await.expect("SetTraffic");
    for i in 0..3 {
        let (weights, disabled) = policy_of(&fleet, i).await;
        assert_eq!(weights, vec![("a".into(), 50), ("b".into(), 50)], "replica {i}");
        assert!(disabled.is_empty(), "replica {i}");
    }

    // The kill switch on replica 0: once DisableVersion returns, replicas 1 and 2 start nothing on b.
    // Toggled ten times, each time checked with requests whose sessions would otherwise split.
    let mut clients = fleet.clients().await;
    let mut took = Vec::new();
    for round in 0..10 {
        let disable = pb::VersionRequest {
            version: "b".into(),
            reason: format!("round {round}"),
            ..Default::default()
        };
        let started = Instant::now();
        admin
            .disable_version(with_key(disable, ADMIN))
            .await
            .expect("DisableVersion");
        took.push(started.elapsed());
        for (i, c) in clients.iter_mut().enumerate().skip(1) {
            for s in 0..4 {
                let version = served_by(c, format!("session-{round}-{s}")).await;
                assert_eq!(version, "a", "replica {i} served a request on the disabled version b");
            }
        }
        let enable = pb::VersionRequest {
            version: "b".into(),
            reason: format!("round {round}"),
            ..Default::default()
        };
        admin
            .enable_version(with_key(enable, ADMIN))
            .await
            .expect("EnableVersion");
    }
    took.sort();
    eprintln!(
        "kill switch applied on all 3 replicas when DisableVersion returned: p50 {:.1} ms, max {:.1} ms over {} \
         calls",
        took[took.len() / 2].as_secs_f64() * 1000.0,
        took[took.len() - 1].as_secs_f64() * 1000.0,
        took.len()
    );
    // Both versions serve again once enabled: the sessions spread over a and b.
    let mut seen = std::collections::BTreeSet::new();
    for s in 0..16 {
        seen.insert(served_by(&mut clients[2], format!("after-{s}")).await);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // Disabled once more, then a router restarts (a new replica starts and one stops): it starts with the
    // fleet's policy, not the config's.
    let disable = pb::VersionRequest {
        version: "b".into(),
        reason: "before the restart".into(),
        ..Default::default()
    };
    admin
        .disable_version(with_key(disable, ADMIN))
        .await
        .expect("DisableVersion");
    let stopped = fleet.routers.remove(2);
    stopped.stop().await;
    let new = fleet.add_router().await;
    let (weights, disabled) = policy_of(&fleet, new).await;
    assert_eq!(weights, vec![("a".into(), 50), ("b".into(), 50)]);
    assert_eq!(disabled, vec!["b".to_string()]);
    let mut c = client(&fleet.routers[new].url).await;
    assert_eq!(served_by(&mut c, "new-router".into()).await, "a");
    drop(fleet);
    redis.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_and_limit_changes_on_one_replica_reach_every_replica() {
    let redis = Redis::start().await;
    let mut fleet = Fleet::start(Some(&redis), 3).await;
    let mut admin = fleet.admin(0).await;

    // The filter: swapped, shadowed and switched off on replica 0; every replica's selection follows
    // before each call returns.
    let swap = pb::SwapFilterRequest { name: "lenient".into() };
    admin.swap_filter(with_key(swap, ADMIN)).await.expect("SwapFilter");
    let shadow = pb::SetShadowFilterRequest { name: "strict".into() };
    admin
        .set_shadow_filter(with_key(shadow, ADMIN))
        .await
        .expect("SetShadowFilter");
    admin
        .disable_filter(with_key(pb::DisableFilterRequest {}, ADMIN))
        .await
        .expect("DisableFilter");
    for i in 0..3 {
        let f = fleet
            .admin(i)
            .await
            .list_filters(with_key(pb::ListFiltersRequest {}, ADMIN))
            .await
            .expect("ListFilters")
            .into_inner();
        assert_eq!(
            (f.active.as_str(), f.shadow.as_str(), f.enabled),
            ("lenient@1", "strict@1", false),
            "replica {i}"
        );
    }
    // An unknown filter is refused on the replica that got the call, and nothing changes anywhere.
    let unknown = pb::SwapFilterRequest { name: "nope".into() };
    let e = admin.swap_filter(with_key(unknown, ADMIN)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // A limit: changed on replica 1, in force on every replica when the call returns.
    let limits = pb::SetLimitsRequest {
        tenant: "capped".into(),
        limits: Some(pb::Limits {
            requests_per_second: Some(7.0),
            max_in_flight: Some(5),
            ..Default::default()
        }),
    };
    fleet
        .admin(1)
        .await
        .set_limits(with_key(limits, ADMIN))
        .await
        .expect("SetLimits");
    for i in 0..3 {
        let all = fleet
            .admin(i)
            .await
            .get_limits(with_key(pb::GetLimitsRequest {}, ADMIN))
            .await
            .expect("GetLimits")
            .into_inner();
        let capped = all.tenants.iter().find(|t| t.tenant == "capped").expect("capped");
        let l = capped.limits.unwrap();
        assert_eq!(
            (l.requests_per_second, l.max_in_flight, l.request_burst),
            (Some(7.0), Some(5), Some(BURST)),
            "replica {i}"
        );
    }
    // A replica that starts later applies the fleet's changes over its config.
    let new = fleet.add_router().await;
    let f = fleet
        .admin(new)
        .await
        .list_filters(with_key(pb::ListFiltersRequest {}, ADMIN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((f.active.as_str(), f.enabled), ("lenient@1", false));
    drop(fleet);
    redis.kill().await;
}

/// The rollout of the default model as replica `i` sees it.
async fn rollout_on(fleet: &Fleet, i: usize) -> pb::RolloutState {
    fleet
        .admin(i)
        .await
        .get_rollout(with_key(pb::GetRolloutRequest::default(), ADMIN))
        .await
        .expect("GetRollout")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollouts_judge_dies_and_another_replica_finishes_the_rollout() {
    let redis = Redis::start().await;
    let mut fleet = Fleet::start_with(Some(&redis), 3, &[Some("a"), Some("b")]).await;
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(fleet.fleet_state(i).await.replica);
        }
        ids
    };
    // Canary b in two steps of at least 300 ms each, judged on two requests a side; thresholds off.
    let start = pb::StartRolloutRequest {
        baseline: "a".into(),
        canary: "b".into(),
        steps: vec![
            pb::RolloutStep {
                weight: 50,
                min_duration_ms: 300,
            },
            pb::RolloutStep {
                weight: 100,
                min_duration_ms: 300,
            },
        ],
        thresholds: Some(pb::RolloutThresholds {
            min_requests: 2,
            ..Default::default()
        }),
        ..Default::default()
    };
    fleet
        .admin(0)
        .await
        .start_rollout(with_key(start, ADMIN))
        .await
        .expect("StartRollout");

    // Load through every replica until told to stop.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut load = Vec::new();
    for (i, mut c) in fleet.clients().await.into_iter().enumerate() {
        let stopped = stopped.clone();
        load.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !*stopped.borrow() {
                n += 1;
                let mut request = chat("Hi", 1);
                request.session = format!("judge-{i}-{n}");
                // A replica being killed fails its own requests; only the survivors' count.
                if let Ok(s) = c.generate_stream(with_key(request, ROOMY)).await {
                    let mut s = s.into_inner();
                    while let Ok(Some(_)) = s.message().await {}
                }
            }
        }));
    }

    // The judge makes its first promotion; then its replica dies.
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let first = tokio::time::timeout(WAIT, async {
        loop {
            tick.tick().await;
            let r = rollout_on(&fleet, 0).await;
            if r.step >= 1 && !r.judge.is_empty() {
                return r;
            }
        }
    })
    .await
    .expect("the judge promoted to step 2");
    let dead = ids
        .iter()
        .position(|id| *id == first.judge)
        .expect("the judge is one of the replicas");
    let mut judge = fleet.routers.remove(dead);
    judge.kill9().await;
    // Replica indexes shift after the removal; index 0 is a survivor either way.
    let survivor = 0;

    // Another replica takes the judging over once the lease ends, and finishes the rollout.
    let done = tokio::time::timeout(WAIT, async {
        loop {
            tick.tick().await;
            let r = rollout_on(&fleet, survivor).await;
            if r.status != "running" {
                return r;
            }
        }
    })
    .await
    .expect("the rollout ended in time");
    stop.send(true).unwrap();
    for l in load {
        let _ = l.await;
    }
    assert_eq!(done.status, "promoted", "{done:?}");
    assert_ne!(done.judge, first.judge, "a surviving replica finished it: {done:?}");
    assert!(ids.contains(&done.judge), "{done:?}");
    eprintln!(
        "judge {} died after step 1; {} finished: {:?}",
        first.judge, done.judge, done.decisions
    );
    drop(fleet);
    redis.kill().await;
}
