//! `ferroserve serve --config configs/multi-tenant.toml` with the real model on 127.0.0.1: the sample's
//! limits hold, and editing the file then reloading it changes keys and limits live, while a broken file
//! changes nothing.

mod support;

use clap::Parser;
use ferroserve::args::{Cli, Command, Role};
use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::admin_client::AdminClient;
use support::*;
use tonic::Code;

fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

/// The sample config with its listeners moved to ephemeral loopback ports, written to a temporary file.
fn sample_config(path: &std::path::Path, edit: impl Fn(String) -> String) {
    let sample = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/multi-tenant.toml"))
        .expect("the sample config");
    std::fs::write(path, edit(sample)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_multi_tenant_sample_limits_alpha_and_reloads_live() {
    let path = std::env::temp_dir().join(format!("ferroserve-admission-{}.toml", std::process::id()));
    sample_config(&path, |s| s);
    let model = model_path();
    let cli = Cli::parse_from([
        "ferroserve",
        "serve",
        "--config",
        path.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "",
        "--model-path",
        model.to_str().unwrap(),
    ]);
    let Command::Serve(args) = cli.command else {
        unreachable!()
    };
    let settings = args.reloadable_settings(Role::Router, &[]).unwrap();
    let server = ferroserve::commands::servers::start_serve(settings, model)
        .await
        .unwrap();
    wait_serving(&server.url()).await;
    let c = client(&server.url()).await;

    // alpha: 2 requests per second with a burst of 2 (and 2 in flight). Three at once: one is refused.
    let sends = (0..3).map(|_| {
        let mut c = c.clone();
        async move { c.generate_stream(with_key(chat("Hi", 1), "demo-key-alpha")).await }
    });
    let results = futures::future::join_all(sends).await;
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(!refused.is_empty(), "a third request within the burst is refused");
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.metadata().get("retry-after-ms").is_some(), "{status:?}");
        assert!(status.message().contains("tenant `alpha`"), "{}", status.message());
    }
    drop(results);
    // beta is not held back by alpha.
    let ok = c
        .clone()
        .generate(with_key(chat("Hi", 2), "demo-key-beta"))
        .await
        .unwrap();
    assert_eq!(ok.into_inner().usage.unwrap().completion_tokens, 2);

    // Edit the file: a new tenant, and a higher limit for alpha; reload through Admin.
    let gamma_hash = ferroserve_admission::sha256_hex("demo-key-gamma");
    sample_config(&path, |s| {
        format!(
            "{}\n[[auth.keys]]\ntenant = \"gamma\"\nkey_sha256 = \"{gamma_hash}\"\nmax_in_flight = 1\n",
            s.replace(
                "requests_per_second = 2.0\nrequest_burst = 2",
                "requests_per_second = 1000.0\nrequest_burst = 1000"
            )
        )
    });
    let mut admin = AdminClient::connect(server.url()).await.unwrap();
    let summary = admin
        .reload_config(with_key(pb::ReloadConfigRequest {}, "demo-admin-token"))
        .await
        .unwrap()
        .into_inner()
        .summary;
    assert!(summary.contains("3 API keys"), "{summary}");
    c.clone()
        .generate(with_key(chat("Hi", 1), "demo-key-gamma"))
        .await
        .expect("the new key works without a restart");
    let limits = admin
        .get_limits(with_key(pb::GetLimitsRequest {}, "demo-admin-token"))
        .await
        .unwrap()
        .into_inner();
    let alpha = limits.tenants.iter().find(|t| t.tenant == "alpha").unwrap();
    assert_eq!(alpha.limits.as_ref().unwrap().requests_per_second, Some(1000.0));

    // A broken file is refused by name, and the running settings stay.
    sample_config(&path, |s| {
        s.replace("requests_per_second = 2.0", "requests_per_second = -1.0")
    });
    let status = admin
        .reload_config(with_key(pb::ReloadConfigRequest {}, "demo-admin-token"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("auth.keys[0].requests_per_second"),
        "{}",
        status.message()
    );
    c.clone()
        .generate(with_key(chat("Hi", 1), "demo-key-gamma"))
        .await
        .expect("the previous settings are still in force");
    std::fs::remove_file(&path).unwrap();
    server.shutdown().await.unwrap();
}
