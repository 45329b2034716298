//! API keys on loopback: each credential gets the status it should, on both services.

mod support;

use ferroserve::config::{FileConfig, KeySection};
use ferroserve_admission::sha256_hex;
use ferroserve_proto::v1::ListWorkersRequest;
use ferroserve_proto::v1::admin_client::AdminClient;
use support::*;
use tonic::Code;

fn with_key<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(k) = key {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_open_the_data_plane_and_only_the_admin_credential_opens_admin() {
    let mut file = FileConfig::default();
    file.server.listen = "127.0.0.1:0".into();
    file.server.metrics_listen = String::new();
    file.auth.admin_token_sha256 = Some(sha256_hex("test-admin"));
    file.auth.keys = vec![KeySection {
        tenant: "alpha".into(),
        key_sha256: sha256_hex("test-key-alpha"),
        ..KeySection::default()
    }];
    let settings = file.validate().unwrap();
    let server = ferroserve::commands::servers::start_serve(settings, model_path())
        .await
        .unwrap();
    wait_serving(&server.url()).await;
    let mut c = client(&server.url()).await;

    let status = c.generate(with_key(chat("Hi", 2), None)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("authorization: Bearer"),
        "{}",
        status.message()
    );
    let status = c.generate(with_key(chat("Hi", 2), Some("wrong"))).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = c
        .generate_stream(with_key(chat("Hi", 2), Some("test-admin")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let ok = c
        .generate(with_key(chat("Hi", 2), Some("test-key-alpha")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.usage.unwrap().completion_tokens, 2);

    let mut admin = AdminClient::connect(server.url()).await.unwrap();
    let status = admin
        .list_workers(with_key(ListWorkersRequest {}, Some("test-key-alpha")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("admin credential"));
    let status = admin
        .list_workers(with_key(ListWorkersRequest {}, None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let workers = admin
        .list_workers(with_key(ListWorkersRequest {}, Some("test-admin")))
        .await
        .unwrap();
    assert_eq!(workers.into_inner().workers.len(), 1);
    server.shutdown().await.unwrap();
}
