//! Model versions behind the real router (two mock workers, `mock@stable` and `mock@canary`, on
//! 127.0.0.1): weighted splits within statistical tolerance, sticky sessions, cohorts, the kill switch and
//! rollback, all changed through `Admin` while requests stream, with no request failing.

mod mock;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferroserve_admission::{AdmissionLimits, ServerLimits, TenantLimits};
use ferroserve_proto::v1 as pb;
use mock::*;
use tonic::transport::Channel;

type Admin = ferroserve_proto::v1::admin_client::AdminClient<Channel>;
type Client = ferroserve_proto::v1::inference_client::InferenceClient<Channel>;

/// No rate limits; room to queue every request the tests send.
fn limits() -> AdmissionLimits {
    AdmissionLimits {
        server: ServerLimits {
            shared: TenantLimits::default(),
            max_queued_requests: 256,
            max_queued_tokens: 1_000_000,
        },
        tenants: Default::default(),
    }
}

/// A version request naming the canary, other fields at their defaults.
fn canary_request() -> pb::VersionRequest {
    pb::VersionRequest {
        version: "canary".into(),
        ..Default::default()
    }
}

async fn harness() -> Harness {
    let h = Harness::start(Options {
        versions: vec!["stable".into(), "canary".into()],
        token_delay: Duration::from_millis(1),
        ..Options::new(limits())
    })
    .await;
    h.release.send(true).unwrap();
    h
}

fn operator<T>(message: T, who: &str) -> tonic::Request<T> {
    let mut r = admin_request(message, "admin");
    r.metadata_mut().insert("x-ferroserve-operator", who.parse().unwrap());
    r
}

async fn split(admin: &mut Admin, stable: u32, canary: u32) -> pb::TrafficState {
    let weights = HashMap::from([("stable".to_string(), stable), ("canary".to_string(), canary)]);
    admin
        .set_traffic(operator(
            pb::SetTrafficRequest {
                weights,
                reason: format!("{canary} % canary"),
                ..Default::default()
            },
            "ana",
        ))
        .await
        .unwrap()
        .into_inner()
}

/// The version that served one unary request.
async fn served(c: &mut Client, id: &str, session: &str, cohort: Option<&str>) -> String {
    let mut r = request("alpha", id, 2);
    r.get_mut().session = session.into();
    if let Some(cohort) = cohort {
        r.metadata_mut().insert("x-ferroserve-cohort", cohort.parse().unwrap());
    }
    let done = c.generate(r).await.expect("no request fails").into_inner();
    done.model_version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splits_follow_the_weights_and_sessions_stick() {
    let h = harness().await;
    let (mut c, mut admin) = (h.client().await, h.admin().await);
    let state = split(&mut admin, 80, 20).await;
    let shares: HashMap<String, f64> = state.versions.iter().map(|v| (v.version.clone(), v.share)).collect();
    assert_eq!((shares["stable"], shares["canary"]), (0.8, 0.2));
    assert!(state.versions.iter().all(|v| v.healthy_workers == 1));

    let n = 400;
    let mut canary = 0;
    for i in 0..n {
        if served(&mut c, &format!("split-{i}"), "", None).await == "mock@canary" {
            canary += 1;
        }
    }
    // Binomial(400, 0.2): mean 80, sd 8; 5 sd either side.
    assert!((40..=120).contains(&canary), "canary served {canary} of {n}");

    for user in 0..20 {
        let session = format!("user-{user}");
        let first = served(&mut c, &format!("{session}-0"), &session, None).await;
        for i in 1..10 {
            assert_eq!(served(&mut c, &format!("{session}-{i}"), &session, None).await, first);
        }
    }

    // A cohort header overrides the draw; a pin reaches its version.
    admin
        .set_traffic(operator(
            pb::SetTrafficRequest {
                weights: HashMap::from([("stable".to_string(), 100)]),
                cohorts: HashMap::from([("beta".to_string(), "canary".to_string())]),
                ..Default::default()
            },
            "ana",
        ))
        .await
        .unwrap();
    assert_eq!(served(&mut c, "c1", "", Some("beta")).await, "mock@canary");
    assert_eq!(served(&mut c, "c2", "", None).await, "mock@stable");
    let mut pinned = request("alpha", "p1", 2);
    pinned.get_mut().model = "mock@canary".into();
    assert_eq!(
        c.generate(pinned).await.unwrap().into_inner().model_version,
        "mock@canary"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_and_rollback_under_streaming_load_fail_no_request() {
    let h = harness().await;
    let (c, mut admin) = (h.client().await, h.admin().await);
    split(&mut admin, 50, 50).await;

    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 25;
    let load: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let mut failed = 0;
                for j in 0..PER_CLIENT {
                    let mut r = request("alpha", &format!("load-{i}-{j}"), 8);
                    // Half the clients pin the canary: disabling it must move them, not fail them.
                    if i % 2 == 0 {
                        r.get_mut().model = "mock@canary".into();
                    }
                    let mut stream = match c.generate_stream(r).await {
                        Ok(s) => s.into_inner(),
                        Err(_) => {
                            failed += 1;
                            continue;
                        }
                    };
                    loop {
                        match stream.message().await {
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(_) => {
                                failed += 1;
                                break;
                            }
                        }
                    }
                }
                failed
            })
        })
        .collect();

    // Repeatedly: disable the canary and check that the very next requests avoid it, then roll back.
    let mut c2 = c.clone();
    let mut rounds = 0;
    let mut slowest = Duration::ZERO;
    while !load.iter().all(|t| t.is_finished()) && rounds < 1000 {
        let state = admin
            .disable_version(operator(
                pb::VersionRequest {
                    reason: "error rate".into(),
                    ..canary_request()
                },
                "bob",
            ))
            .await
            .unwrap()
            .into_inner();
        let took_effect = Instant::now();
        assert!(
            state
                .versions
                .iter()
                .any(|v| v.version == "canary" && v.disabled && v.share == 0.0)
        );
        for k in 0..4 {
            let v = served(&mut c2, &format!("after-disable-{rounds}-{k}"), "", None).await;
            assert_eq!(
                v, "mock@stable",
                "round {rounds}: a new request reached the disabled version"
            );
        }
        slowest = slowest.max(took_effect.elapsed());
        admin
            .rollback_traffic(operator(pb::RollbackTrafficRequest::default(), "bob"))
            .await
            .unwrap();
        rounds += 1;
    }
    let mut failed = 0;
    for task in load {
        failed += task.await.unwrap();
    }
    assert_eq!(failed, 0, "no request failed across {rounds} disable/rollback rounds");
    assert!(rounds >= 1);
    println!(
        "{rounds} disable/rollback rounds under load, 0 failed; 4 requests right after each disable, all on stable (slowest round trip {slowest:?})"
    );

    let state = admin
        .get_traffic(admin_request(pb::GetTrafficRequest::default(), "admin"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        state.versions.iter().all(|v| !v.disabled),
        "the last rollback re-enabled the canary"
    );
    let last = state.history.last().unwrap();
    assert_eq!((last.who.as_str(), last.action.as_str()), ("bob", "rollback"));
    assert!(
        state
            .history
            .iter()
            .any(|c| c.action == "disable" && c.summary.contains("error rate"))
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_traffic_changes_are_refused_with_what_to_fix() {
    let h = harness().await;
    let mut admin = h.admin().await;
    let unknown = admin
        .set_traffic(admin_request(
            pb::SetTrafficRequest {
                weights: HashMap::from([("nightly".to_string(), 10)]),
                ..Default::default()
            },
            "admin",
        ))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument);
    assert!(
        unknown.message().contains("mock@nightly") && unknown.message().contains("stable"),
        "{}",
        unknown.message()
    );
    let zero = admin
        .set_traffic(admin_request(
            pb::SetTrafficRequest {
                weights: HashMap::from([("stable".to_string(), 0)]),
                ..Default::default()
            },
            "admin",
        ))
        .await
        .unwrap_err();
    assert!(zero.message().contains("above 0"), "{}", zero.message());
    let nothing = admin
        .rollback_traffic(admin_request(pb::RollbackTrafficRequest::default(), "admin"))
        .await
        .unwrap_err();
    assert!(
        nothing.message().contains("no earlier traffic policy"),
        "{}",
        nothing.message()
    );
    let model = admin
        .disable_version(admin_request(
            pb::VersionRequest {
                model: "llama".into(),
                version: "v1".into(),
                ..Default::default()
            },
            "admin",
        ))
        .await
        .unwrap_err();
    assert_eq!(model.code(), tonic::Code::NotFound);
    let unauthorized = admin.get_traffic(pb::GetTrafficRequest::default()).await.unwrap_err();
    assert_eq!(unauthorized.code(), tonic::Code::Unauthenticated);
    h.stop().await;
}

async fn rollout_harness(drifting: &[&str], failing: &[&str]) -> Harness {
    rollout_harness_with(Options {
        drifting: drifting.iter().map(|v| v.to_string()).collect(),
        failing: failing.iter().map(|v| v.to_string()).collect(),
        ..Options::new(limits())
    })
    .await
}

async fn rollout_harness_with(o: Options) -> Harness {
    let h = Harness::start(Options {
        versions: vec!["stable".into(), "canary".into()],
        ..o
    })
    .await;
    h.release.send(true).unwrap();
    h
}

async fn start_rollout(admin: &mut Admin) -> pb::RolloutState {
    let step = |weight, ms| pb::RolloutStep {
        weight,
        min_duration_ms: ms,
    };
    admin
        .start_rollout(admin_request(
            pb::StartRolloutRequest {
                baseline: "stable".into(),
                canary: "canary".into(),
                steps: vec![step(5, 30), step(25, 30), step(100, 0)],
                thresholds: Some(pb::RolloutThresholds {
                    min_requests: 5,
                    max_error_rate_increase: 0.05,
                    max_logprob_drop: 1.0,
                    max_entropy_increase: 1.0,
                    max_length_change: 0.5,
                    ..Default::default()
                }),
                ..Default::default()
            },
            "admin",
        ))
        .await
        .unwrap()
        .into_inner()
}

/// Sends unpinned requests, four at a time, until the rollout stops running (bounded); returns its state
/// and how many requests failed.
async fn drive(h: &Harness, admin: &mut Admin) -> (pb::RolloutState, usize) {
    drive_with(h, admin, |_, _| async {}).await
}

/// [`drive`], running `also(round, client)` beside each round's four requests.
async fn drive_with<F: std::future::Future<Output = ()> + Send + 'static>(
    h: &Harness,
    admin: &mut Admin,
    also: impl Fn(usize, Client) -> F,
) -> (pb::RolloutState, usize) {
    let c = h.client().await;
    let mut failed = 0;
    for round in 0..2000 {
        let extra = tokio::spawn(also(round, c.clone()));
        let batch: Vec<_> = (0..4)
            .map(|k| {
                let mut c = c.clone();
                tokio::spawn(async move {
                    c.generate(request("alpha", &format!("r-{round}-{k}"), 2))
                        .await
                        .is_err()
                })
            })
            .collect();
        for t in batch {
            failed += usize::from(t.await.unwrap());
        }
        extra.await.unwrap();
        let state = admin
            .get_rollout(admin_request(pb::GetRolloutRequest::default(), "admin"))
            .await
            .unwrap()
            .into_inner();
        if state.status != "running" {
            return (state, failed);
        }
    }
    panic!("the rollout did not finish within 8000 requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_is_promoted_step_by_step() {
    let h = rollout_harness(&[], &[]).await;
    let mut admin = h.admin().await;
    let started = start_rollout(&mut admin).await;
    assert_eq!((started.status.as_str(), started.step), ("running", 0));
    let (state, failed) = drive(&h, &mut admin).await;
    assert_eq!(state.status, "promoted", "{:?}", state.decisions);
    assert_eq!(failed, 0);
    assert_eq!(state.decisions.len(), 4, "{:?}", state.decisions);
    assert!(state.decisions[2].contains("100 %"));
    assert!(
        state.decisions[3].contains(&format!(
            "drift baseline taken on 1 worker(s) ({MOCK_BASELINE_TOKENS} tokens)"
        )),
        "{:?}",
        state.decisions
    );
    assert_eq!(
        *h.baselines.lock().unwrap(),
        ["mock@canary"],
        "the promoted version's baseline"
    );
    let traffic = admin
        .get_traffic(admin_request(pb::GetTrafficRequest::default(), "admin"))
        .await
        .unwrap()
        .into_inner();
    let canary = traffic.versions.iter().find(|v| v.version == "canary").unwrap();
    assert_eq!(canary.share, 1.0);
    assert!(traffic.history.iter().all(|c| c.who == "canary-analysis"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drifting_canary_is_rolled_back_automatically_without_failing_requests() {
    let h = rollout_harness(&["canary"], &[]).await;
    let mut admin = h.admin().await;
    start_rollout(&mut admin).await;
    let (state, failed) = drive(&h, &mut admin).await;
    assert_eq!(state.status, "rolled_back", "{:?}", state.decisions);
    let reason = state.decisions.last().unwrap();
    assert!(
        reason.contains("token drift") && reason.contains("mean logprob"),
        "{reason}"
    );
    assert_eq!(failed, 0, "drift slows nothing down and fails nothing");
    let traffic = admin
        .get_traffic(admin_request(pb::GetTrafficRequest::default(), "admin"))
        .await
        .unwrap()
        .into_inner();
    assert!(traffic.versions.iter().any(|v| v.version == "canary" && v.disabled));
    assert!(traffic.history.last().unwrap().summary.contains("token drift"));
    let mut c = h.client().await;
    for i in 0..20 {
        assert_eq!(served(&mut c, &format!("after-{i}"), "", None).await, "mock@stable");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsure_canary_is_rolled_back_on_entropy_although_its_logprobs_look_normal() {
    let h = rollout_harness_with(Options {
        uncertain: vec!["canary".into()],
        ..Options::new(limits())
    })
    .await;
    let mut admin = h.admin().await;
    start_rollout(&mut admin).await;
    let (state, failed) = drive(&h, &mut admin).await;
    assert_eq!(state.status, "rolled_back", "{:?}", state.decisions);
    let reason = state.decisions.last().unwrap();
    assert!(reason.contains("mean entropy 3.000"), "{reason}");
    assert_eq!(failed, 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_rolled_back_on_its_error_rate() {
    let h = rollout_harness(&[], &["canary"]).await;
    let mut admin = h.admin().await;
    start_rollout(&mut admin).await;
    let (state, failed) = drive(&h, &mut admin).await;
    assert_eq!(state.status, "rolled_back", "{:?}", state.decisions);
    assert!(
        state.decisions.last().unwrap().contains("error rate"),
        "{:?}",
        state.decisions
    );
    assert!(failed >= 5, "the canary's induced failures were seen: {failed}");
    println!(
        "failing canary: rolled back after {failed} failed requests: {}",
        state.decisions.last().unwrap()
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_drains_requests_in_flight_or_cancels_them_with_a_reason() {
    let h = Harness::start(Options {
        versions: vec!["stable".into(), "canary".into()],
        token_delay: Duration::from_millis(2),
        script: Some(vec!["x".to_string(); 400]),
        ..Options::new(limits())
    })
    .await;
    h.release.send(true).unwrap();
    let (c, mut admin) = (h.client().await, h.admin().await);
    for cancel in [false, true] {
        let mut r = request("alpha", &format!("long-{cancel}"), 400);
        r.get_mut().model = "mock@canary".into();
        let mut stream = c.clone().generate_stream(r).await.unwrap().into_inner();
        assert!(stream.message().await.unwrap().is_some(), "a first token");
        let disabled = admin
            .disable_version(admin_request(
                pb::VersionRequest {
                    cancel_in_flight: cancel,
                    ..canary_request()
                },
                "admin",
            ))
            .await
            .unwrap()
            .into_inner();
        let canary = disabled.versions.iter().find(|v| v.version == "canary").unwrap();
        if !cancel {
            assert_eq!((canary.state.as_str(), canary.in_flight), ("draining", 1));
        }
        let mut tokens = 1;
        let end = loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    if let Some(pb::generate_stream_response::Event::Complete(done)) = m.event {
                        break Ok(done);
                    }
                    tokens += 1;
                }
                Ok(None) => panic!("stream ended without a completion"),
                Err(status) => break Err(status),
            }
        };
        if cancel {
            let status = end.expect_err("cancelled");
            assert_eq!(status.code(), tonic::Code::Unavailable);
            assert!(
                status.message().contains("mock@canary was disabled"),
                "{}",
                status.message()
            );
            assert!(tokens < 400, "cancelled before the end: {tokens} tokens");
        } else {
            let done = end.expect("drained to the end");
            assert_eq!(done.model_version, "mock@canary");
            assert_eq!(done.usage.unwrap().completion_tokens, 400);
            // Drained: the state turns to `disabled` once the request lets go of its worker.
            let mut state = String::new();
            for _ in 0..10_000 {
                let list = admin
                    .list_versions(admin_request(pb::ListVersionsRequest::default(), "admin"))
                    .await
                    .unwrap()
                    .into_inner();
                state = list
                    .versions
                    .iter()
                    .find(|v| v.version == "canary")
                    .unwrap()
                    .state
                    .clone();
                if state != "draining" {
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert_eq!(state, "disabled");
        }
        admin
            .enable_version(admin_request(canary_request(), "admin"))
            .await
            .unwrap();
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_kill_switch_stops_a_rollout_instead_of_being_overridden() {
    let h = rollout_harness(&[], &[]).await;
    let mut admin = h.admin().await;
    start_rollout(&mut admin).await;
    admin
        .disable_version(admin_request(canary_request(), "admin"))
        .await
        .unwrap();
    let (state, failed) = drive(&h, &mut admin).await;
    assert_eq!(state.status, "stopped", "{:?}", state.decisions);
    assert!(
        state
            .decisions
            .last()
            .unwrap()
            .contains("an operator disabled the canary")
    );
    assert_eq!(failed, 0);
    let traffic = admin
        .get_traffic(admin_request(pb::GetTrafficRequest::default(), "admin"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        traffic.versions.iter().any(|v| v.version == "canary" && v.disabled),
        "still disabled"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_version_fills_in_its_own_sampling_and_stop_strings() {
    let tuned = ferroserve_core::GenerationDefaults {
        system_prompt: Some("Be brief.".into()),
        sampling: Some(ferroserve_core::Sampling {
            temperature: 0.7,
            top_p: 0.9,
            ..ferroserve_core::Sampling::GREEDY
        }),
        stop: vec!["###".into()],
    };
    let h = Harness::start(Options {
        versions: vec!["plain".into(), "tuned".into()],
        defaults: vec![("tuned".into(), tuned)],
        ..Options::new(limits())
    })
    .await;
    h.release.send(true).unwrap();
    let (mut c, mut admin) = (h.client().await, h.admin().await);
    let send = |version: &str, sampling: Option<pb::SamplingParams>, stop: &[&str]| {
        let mut r = request("alpha", &format!("{version}-{}", sampling.is_some()), 2);
        r.get_mut().model = format!("mock@{version}");
        r.get_mut().sampling = sampling;
        r.get_mut().stop = stop.iter().map(|s| s.to_string()).collect();
        r
    };
    let own = pb::SamplingParams {
        temperature: 0.2,
        seed: Some(7),
        ..Default::default()
    };
    c.generate(send("tuned", None, &["END"])).await.unwrap();
    c.generate(send("tuned", Some(own), &[])).await.unwrap();
    c.generate(send("plain", None, &["END"])).await.unwrap();
    let received = h.received.lock().unwrap().clone();
    let [open, given, plain] = &received[..] else {
        panic!("three requests, got {received:?}")
    };
    assert_eq!((open.sampling.temperature, open.sampling.top_p), (0.7, 0.9));
    assert_eq!(
        open.stop,
        ["END", "###"],
        "the version's stop strings join the client's"
    );
    assert_eq!(
        (given.sampling.temperature, given.sampling.seed),
        (0.2, 7),
        "a client's own sampling wins"
    );
    assert_eq!(given.stop, ["###"]);
    assert!(plain.sampling.is_greedy() && plain.stop == ["END"], "{plain:?}");

    let list = admin
        .list_versions(admin_request(pb::ListVersionsRequest::default(), "admin"))
        .await
        .unwrap()
        .into_inner();
    let tuned = list.versions.iter().find(|v| v.version == "tuned").unwrap();
    assert_eq!(tuned.state, "ready");
    assert_eq!(tuned.system_prompt, "Be brief.");
    assert_eq!(tuned.sampling.as_ref().map(|s| s.temperature), Some(0.7));
    assert_eq!(tuned.stop, ["###"]);
    let plain = list.versions.iter().find(|v| v.version == "plain").unwrap();
    assert_eq!((plain.sampling.as_ref(), plain.stop.len()), (None, 0));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_own_deadlines_do_not_roll_a_canary_back() {
    let h = rollout_harness_with(Options {
        token_delay: Duration::from_millis(10),
        ..Options::new(limits())
    })
    .await;
    let mut admin = h.admin().await;
    start_rollout(&mut admin).await;
    let cut_short = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&cut_short);
    let (state, failed) = drive_with(&h, &mut admin, move |round, mut c| {
        // Each round, a client pinned to the canary sets a deadline its (slow) stream overruns: it ends
        // with DEADLINE_EXCEEDED, which must not count against the canary.
        let mut short = prompt_request("alpha", &format!("short-{round}"), "slow", 2);
        short.get_mut().model = "mock@canary".into();
        short.set_timeout(Duration::from_millis(120));
        let counted = Arc::clone(&counted);
        async move {
            let run = async {
                let mut stream = c.generate_stream(short).await?.into_inner();
                while stream.message().await?.is_some() {}
                Ok::<(), tonic::Status>(())
            };
            let status = run.await.expect_err("the deadline passes mid-stream");
            assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
            counted.fetch_add(1, Ordering::Relaxed);
        }
    })
    .await;
    assert_eq!(failed, 0, "unpinned requests succeed");
    assert_eq!(state.status, "promoted", "{:?}", state.decisions);
    let cut_short = cut_short.load(Ordering::Relaxed);
    assert!(cut_short >= 3, "the canary saw deadline failures: {cut_short}");
    h.stop().await;
}
