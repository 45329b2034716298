//! Loading and unloading model versions in a running `ferroserve serve` (real model, 127.0.0.1): a version
//! declared in the config loads at startup, a derived Q8_0 file loads in the background while the Q4_1
//! version keeps serving, pinned requests reach it, a file
//! that is not a model fails its load and changes nothing, a failed validation report is refused, and an
//! unloaded version stops taking requests.

mod support;

use ferroserve::config::{FileConfig, TrafficSection, VersionSection};
use ferroserve_model::derive::{Target, derive};
use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::admin_client::AdminClient;
use support::*;
use tonic::transport::Channel;

/// Follows `GetTraffic` (bounded) until `version`'s state starts with `prefix`.
async fn until_state(admin: &mut AdminClient<Channel>, version: &str, prefix: &str) -> pb::TrafficState {
    tokio::time::timeout(WAIT, async {
        loop {
            let state = admin
                .get_traffic(pb::GetTrafficRequest::default())
                .await
                .unwrap()
                .into_inner();
            if state
                .versions
                .iter()
                .any(|v| v.version == version && v.state.starts_with(prefix))
            {
                return state;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{version} reached `{prefix}` in time"))
}

fn pinned(version: &str) -> pb::GenerateRequest {
    let mut r = chat("What is the capital of France?", 4);
    r.model = format!("smollm2-135m-instruct@{version}");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_load_and_unload_while_serving() {
    let dir = std::env::temp_dir().join(format!("ferroserve-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = model_path();
    let q8 = dir.join("q8_0.gguf");
    derive(&source, &q8, Target::Q8_0, &ferroserve_model::fetch::Quiet).unwrap();

    let mut file = FileConfig::default();
    file.server.listen = "127.0.0.1:0".into();
    file.server.metrics_listen = String::new();
    file.server.http_listen = String::new();
    // A version declared in the config loads in the background at startup.
    file.model.versions.push(VersionSection {
        version: "configured".into(),
        path: q8.clone(),
        system_prompt: None,
        sampling: None,
        // A version's own stop string: its answers end at the first space.
        stop: Some(vec![" ".into()]),
    });
    // The startup split: all unpinned traffic on q4_1, the `beta` cohort on the configured version.
    file.model.traffic = Some(TrafficSection {
        weights: [("q4_1".to_string(), 100)].into(),
        cohorts: [("beta".to_string(), "configured".to_string())].into(),
    });
    let server = ferroserve::commands::servers::start_serve(file.validate().unwrap(), source)
        .await
        .unwrap();
    wait_serving(&server.url()).await;
    let mut c = client(&server.url()).await;
    let mut admin = AdminClient::connect(server.url()).await.unwrap();
    let load = |version: &str, path: &std::path::Path, report: &str| pb::LoadVersionRequest {
        version: version.into(),
        path: path.display().to_string(),
        validation_report: report.into(),
        ..Default::default()
    };

    until_state(&mut admin, "configured", "ready").await;
    let mut long = pinned("configured");
    long.max_tokens = 16;
    let configured = c.generate(long).await.unwrap().into_inner();
    assert_eq!(configured.model_version, "smollm2-135m-instruct@configured");
    // Its defaults: the server's system prompt (inherited), greedy, and its own stop string, which ends
    // the answer the base version continues past.
    let listed = admin
        .list_versions(pb::ListVersionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let v = listed.versions.iter().find(|v| v.version == "configured").unwrap();
    assert_eq!(
        (v.system_prompt.as_str(), v.sampling.as_ref(), &v.stop[..]),
        ("You are a helpful assistant.", None, &[" ".to_string()][..])
    );
    assert_eq!(
        configured.finish_reason,
        pb::FinishReason::Stop as i32,
        "{configured:?}"
    );
    assert!(!configured.text.contains(' '));
    let base = c.generate(pinned("q4_1")).await.unwrap().into_inner();
    assert!(base.text.trim().contains(' '), "{base:?}");
    // The config's split applies from the start, recorded as a change by `config`.
    let mut beta = tonic::Request::new(chat("Hi", 2));
    beta.metadata_mut()
        .insert("x-ferroserve-cohort", "beta".parse().unwrap());
    let cohort = c.generate(beta).await.unwrap().into_inner();
    assert_eq!(cohort.model_version, "smollm2-135m-instruct@configured");
    let traffic = admin
        .get_traffic(pb::GetTrafficRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(traffic.history[0].who, "config");
    assert_eq!(traffic.weights["q4_1"], 100);

    // Defaults that a request could not carry are refused, naming the field.
    let bad_sampling = admin
        .load_version(pb::LoadVersionRequest {
            sampling: Some(pb::SamplingParams {
                top_p: Some(2.0),
                ..Default::default()
            }),
            ..load("bad", &q8, "")
        })
        .await
        .unwrap_err();
    assert_eq!(bad_sampling.code(), tonic::Code::InvalidArgument);
    assert!(
        bad_sampling.message().contains("sampling.top_p"),
        "{}",
        bad_sampling.message()
    );

    // A file that is not a model: the load fails in the background, says why, and nothing changes.
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"not a model").unwrap();
    admin.load_version(load("broken", &junk, "")).await.unwrap();
    let state = until_state(&mut admin, "broken", "failed").await;
    let broken = state.versions.iter().find(|v| v.version == "broken").unwrap();
    assert!(
        broken.state.contains("not a GGUF") && !broken.state.contains('\n'),
        "{}",
        broken.state
    );
    assert_eq!(
        c.generate(pinned("q4_1")).await.unwrap().into_inner().model_version,
        "smollm2-135m-instruct@q4_1"
    );

    // A validation report that failed is refused before anything loads.
    let report = dir.join("report.json");
    std::fs::write(
        &report,
        format!(r#"{{"candidate": "{}", "passed": false}}"#, q8.display()),
    )
    .unwrap();
    let refused = admin
        .load_version(load("q8_0", &q8, report.to_str().unwrap()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("failed validation"), "{}", refused.message());

    // The real thing: it loads while the first version serves, then pins reach it.
    std::fs::write(
        &report,
        format!(r#"{{"candidate": "{}", "passed": true}}"#, q8.display()),
    )
    .unwrap();
    let started = admin
        .load_version(load("q8_0", &q8, report.to_str().unwrap()))
        .await
        .unwrap()
        .into_inner();
    let loading = started.versions.iter().find(|v| v.version == "q8_0").unwrap();
    assert!(loading.state.starts_with("loading"), "{}", loading.state);
    let twice = admin.load_version(load("q8_0", &q8, "")).await.unwrap_err();
    assert!(
        twice.message().contains("already loaded or loading"),
        "{}",
        twice.message()
    );
    let during = c.generate(pinned("q4_1")).await.unwrap().into_inner();
    assert_eq!(during.model_version, "smollm2-135m-instruct@q4_1");
    let state = until_state(&mut admin, "q8_0", "ready").await;
    let q8_state = state.versions.iter().find(|v| v.version == "q8_0").unwrap();
    assert_eq!(
        (q8_state.workers, q8_state.share),
        (1, 0.0),
        "a new version gets no share until a split"
    );
    let served = c.generate(pinned("q8_0")).await.unwrap().into_inner();
    assert_eq!(served.model_version, "smollm2-135m-instruct@q8_0");
    assert!(!served.text.is_empty());

    // Unload: pins to it are refused by name, the other version serves, the last version stays.
    admin
        .unload_version(pb::VersionRequest {
            version: "q8_0".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let gone = c.generate(pinned("q8_0")).await.unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    assert_eq!(
        c.generate(chat("Hi", 2)).await.unwrap().into_inner().model_version,
        "smollm2-135m-instruct@q4_1"
    );
    let unload = |version: &str| pb::VersionRequest {
        version: version.into(),
        ..Default::default()
    };
    admin.unload_version(unload("configured")).await.unwrap();
    let last = admin.unload_version(unload("q4_1")).await.unwrap_err();
    assert!(last.message().contains("last version"), "{}", last.message());

    server.shutdown().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
