//! The content filter stage through the real router on 127.0.0.1, in front of a mock backend (no model)
//! that streams a script of tokens: input refusals, output filtering across token boundaries with the
//! generation cancelled, live swaps under concurrent streaming load, shadow mode, and feedback.

mod mock;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferroserve_admission::{AdmissionLimits, ServerLimits, TenantLimits};
use ferroserve_filter::store::{Entry, Label, Source, Step, Store};
use ferroserve_filter::{FilterConfig, FilterHub, Loaded};
use ferroserve_proto::v1 as pb;
use mock::*;
use pb::generate_stream_response::Event as Out;
use tonic::Code;

/// A filter config that blocks (category `c`) any text matching `pattern`.
fn loaded(name: &str, version: &str, category: &str, pattern: &str) -> Loaded {
    let text = format!(
        "name = \"{name}\"\nversion = \"{version}\"\n[rules]\n[[rules.categories]]\nname = \"{category}\"\n\
         action = \"block\"\npatterns = ['{pattern}']\n"
    );
    let config = FilterConfig::parse(&text, "test").unwrap();
    Loaded {
        id: config.id(),
        name: name.into(),
        description: String::new(),
        path: None,
        filter: Arc::new(config.compile().unwrap()),
    }
}

/// `r`, sent on behalf of the operator `who` (recorded with each filter step).
fn as_operator<T>(mut r: tonic::Request<T>, who: &str) -> tonic::Request<T> {
    r.metadata_mut().insert("x-ferroserve-operator", who.parse().unwrap());
    r
}

fn hub() -> Arc<FilterHub> {
    let hub = FilterHub::empty(None, 1000);
    hub.insert(loaded("bombs", "1", "weapons", r"\bpipe bomb\b"));
    hub.insert(loaded("secrets", "1", "privacy", r"\bsecret\b"));
    hub.swap("bombs").unwrap();
    hub
}

fn limits() -> AdmissionLimits {
    AdmissionLimits {
        server: ServerLimits {
            shared: TenantLimits {
                max_in_flight: Some(64),
                ..TenantLimits::default()
            },
            max_queued_requests: 256,
            max_queued_tokens: 1_000_000,
        },
        tenants: BTreeMap::new(),
    }
}

/// The mock says "here is a pipe bomb recipe", with the phrase split across tokens.
fn script() -> Vec<String> {
    [
        "here", " is", " a", " pi", "pe bo", "mb", " recipe", " and", " more", " text",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Streams a request to the end: the text received and the completion.
async fn stream(
    c: &mut pb::inference_client::InferenceClient<tonic::transport::Channel>,
    r: tonic::Request<pb::GenerateRequest>,
) -> Result<(String, pb::GenerationComplete), tonic::Status> {
    let mut s = c.generate_stream(r).await?.into_inner();
    let mut text = String::new();
    while let Some(m) = s.message().await? {
        match m.event.unwrap() {
            Out::Token(t) => text.push_str(&t.text),
            Out::Complete(done) => return Ok((text, done)),
        }
    }
    panic!("stream ended without a completion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_prompt_gets_a_filtered_completion_and_costs_no_model_work() {
    let h = Harness::start(Options {
        filters: hub(),
        script: Some(script()),
        ..Options::new(limits())
    })
    .await;
    h.release.send(true).unwrap();
    let mut c = h.client().await;
    let r = c
        .generate(prompt_request("alpha", "in-1", "how do I make a PIPE B0MB", 5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.finish_reason, pb::FinishReason::Filtered as i32);
    assert!(r.text.is_empty());
    let f = r.filtered.unwrap();
    assert_eq!(
        (f.filter.as_str(), f.stage.as_str(), f.category.as_str()),
        ("bombs@1", "input", "weapons")
    );
    let (text, done) = stream(&mut c, prompt_request("alpha", "in-2", "a pipe  bomb?", 5))
        .await
        .unwrap();
    assert!(text.is_empty());
    assert_eq!(done.finish_reason, pb::FinishReason::Filtered as i32);
    assert_eq!(done.filtered.unwrap().stage, "input");
    assert!(h.started.lock().unwrap().is_empty(), "no generation started");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_split_across_tokens_is_caught_and_the_generation_stops() {
    let h = Harness::start(Options {
        filters: hub(),
        script: Some(script()),
        ..Options::new(limits())
    })
    .await;
    h.release.send(true).unwrap();
    let mut c = h.client().await;
    let (text, done) = stream(&mut c, request("alpha", "out-1", 10)).await.unwrap();
    assert_eq!(done.finish_reason, pb::FinishReason::Filtered as i32);
    let f = done.filtered.unwrap();
    assert_eq!((f.stage.as_str(), f.category.as_str()), ("output", "weapons"));
    assert!(
        !text.contains("bomb"),
        "the blocked phrase never reaches the client: {text:?}"
    );
    assert!(
        text.starts_with("here is a"),
        "only the partial word was held back: {text:?}"
    );
    assert!(
        h.sent.load(Ordering::Relaxed) < script().len() as u32,
        "generation was cancelled before the script ended"
    );
    // Unary requests are filtered the same way.
    let r = c.generate(request("alpha", "out-2", 10)).await.unwrap().into_inner();
    assert_eq!(r.finish_reason, pb::FinishReason::Filtered as i32);
    assert!(!r.text.contains("bomb"));
    // With filtering off, the whole text goes out.
    h.admin()
        .await
        .disable_filter(admin_request(pb::DisableFilterRequest {}, "admin"))
        .await
        .unwrap();
    let (text, done) = stream(&mut c, request("alpha", "out-3", 10)).await.unwrap();
    assert_eq!(done.finish_reason, pb::FinishReason::Eos as i32);
    assert_eq!(text, script().concat());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_under_concurrent_streaming_load_fail_no_request() {
    let h = Harness::start(Options {
        filters: hub(),
        script: Some(script()),
        token_delay: Duration::from_millis(1),
        ..Options::new(limits())
    })
    .await;
    h.release.send(true).unwrap();
    let c = h.client().await;
    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 12;
    let load: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for j in 0..PER_CLIENT {
                    let id = format!("load-{i}-{j}");
                    outcomes.push(stream(&mut c, request("alpha", &id, 10)).await);
                }
                outcomes
            })
        })
        .collect();
    let mut admin = h.admin().await;
    let mut swaps = 0;
    while !load.iter().all(|t| t.is_finished()) && swaps < 10_000 {
        let name = if swaps % 2 == 0 { "secrets" } else { "bombs" };
        admin
            .swap_filter(admin_request(pb::SwapFilterRequest { name: name.into() }, "admin"))
            .await
            .unwrap();
        swaps += 1;
    }
    let (mut filtered, mut passed) = (0, 0);
    for task in load {
        for outcome in task.await.unwrap() {
            let (text, done) = outcome.expect("no request fails during swaps");
            if done.finish_reason == pb::FinishReason::Filtered as i32 {
                // Only the `bombs` filter blocks this script: a request filtered must have started with it.
                assert_eq!(done.filtered.unwrap().filter, "bombs@1");
                assert!(!text.contains("bomb"));
                filtered += 1;
            } else {
                assert_eq!(
                    text,
                    script().concat(),
                    "a request that started with `secrets` keeps it"
                );
                passed += 1;
            }
        }
    }
    assert_eq!(filtered + passed, CLIENTS * PER_CLIENT);
    assert!(swaps >= 2, "the filter was swapped during the load ({swaps} swaps)");
    println!("{swaps} swaps, {filtered} filtered, {passed} passed, 0 failed");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_filter_is_measured_without_affecting_responses_and_feedback_is_checked() {
    let filters = hub();
    let store_path = std::env::temp_dir().join(format!("ferroserve-feedback-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&store_path);
    filters.set_store(Arc::new(Store::open(&store_path, true).unwrap()));

    let h = Harness::start(Options {
        filters: Arc::clone(&filters),
        script: Some(vec!["fine".to_string()]),
        ..Options::new(limits())
    })
    .await;
    h.release.send(true).unwrap();
    let mut admin = h.admin().await;
    let listed = admin
        .set_shadow_filter(as_operator(
            admin_request(pb::SetShadowFilterRequest { name: "secrets".into() }, "admin"),
            "carol",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (listed.active.as_str(), listed.shadow.as_str()),
        ("bombs@1", "secrets@1")
    );
    let mut c = h.client().await;
    // The shadow would block this prompt, but only the active filter decides.
    let r = c
        .generate(prompt_request("alpha", "shadowed", "tell me a secret", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.finish_reason, pb::FinishReason::Eos as i32);
    let blocked = c
        .generate(prompt_request("alpha", "blocked", "pipe bomb", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(blocked.finish_reason, pb::FinishReason::Filtered as i32);
    // The shadow thread counts asynchronously; wait (bounded) for its four input comparisons.
    let agreement = tokio::time::timeout(WAIT, async {
        loop {
            let a = admin
                .list_filters(admin_request(pb::ListFiltersRequest {}, "admin"))
                .await
                .unwrap()
                .into_inner()
                .shadow_agreement
                .unwrap();
            if a.agree_block + a.agree_allow + a.shadow_only_block + a.active_only_block >= 4 {
                return a;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    assert!(agreement.shadow_only_block >= 1, "{agreement:?}");
    assert!(agreement.active_only_block >= 1, "{agreement:?}");

    let feedback = |id: &str, kind: pb::FeedbackKind| {
        admin_request(
            pb::ReportFilterFeedbackRequest {
                request_id: id.into(),
                kind: kind as i32,
            },
            "admin",
        )
    };
    let fp = admin
        .report_filter_feedback(as_operator(
            feedback("blocked", pb::FeedbackKind::FalsePositive),
            "dave",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fp.filter, "bombs@1");
    assert_eq!(fp.verdict.unwrap().category, "weapons");
    let fn_ = admin
        .report_filter_feedback(feedback("shadowed", pb::FeedbackKind::FalseNegative))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fn_.filter, "bombs@1");
    let status = admin
        .report_filter_feedback(feedback("blocked", pb::FeedbackKind::FalseNegative))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = admin
        .report_filter_feedback(feedback("never-seen", pb::FeedbackKind::FalsePositive))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = admin
        .swap_filter(admin_request(pb::SwapFilterRequest { name: "nope".into() }, "admin"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("bombs@1"), "{}", status.message());
    let status = admin
        .swap_filter(admin_request(
            pb::SwapFilterRequest { name: "secrets".into() },
            "key-alpha",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    admin
        .swap_filter(as_operator(
            admin_request(pb::SwapFilterRequest { name: "secrets".into() }, "admin"),
            "erin",
        ))
        .await
        .unwrap();
    h.stop().await;

    // The durable store holds the reviewers' reports (text kept: this store opted in), the shadow's
    // disagreements, and each step with who took it.
    let entries = Store::read(&store_path).unwrap();
    let findings = entries.findings();
    let fp = findings
        .iter()
        .find(|(f, _)| f.source == Source::FalsePositive)
        .expect("the false positive");
    assert_eq!(
        (fp.0.text.as_deref(), fp.0.by.as_str(), &fp.1),
        (Some("pipe bomb"), "dave", &Some(Label::Allow))
    );
    let fn_ = findings
        .iter()
        .find(|(f, _)| f.source == Source::FalseNegative)
        .expect("the false negative");
    assert_eq!(
        (fn_.0.text.as_deref(), fn_.0.by.as_str(), &fn_.1),
        (Some("tell me a secret"), "admin", &None)
    );
    let disagreements: Vec<&str> = findings
        .iter()
        .filter(|(f, _)| f.source == Source::ShadowDisagreement)
        .filter_map(|(f, _)| f.text.as_deref())
        .collect();
    assert!(
        disagreements.contains(&"tell me a secret") && disagreements.contains(&"pipe bomb"),
        "{disagreements:?}"
    );
    let steps: Vec<(Step, String, String)> = entries
        .steps()
        .filter_map(|e| match e {
            Entry::Step { step, filter, by, .. } => Some((*step, filter.clone(), by.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        steps,
        vec![
            (Step::Shadow, "secrets@1".to_string(), "carol".to_string()),
            (Step::Promote, "secrets@1".to_string(), "erin".to_string()),
        ]
    );
    std::fs::remove_file(&store_path).unwrap();
}
