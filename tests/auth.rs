//! API keys on loopback: each credential gets the status it should, on both services.

mod support;

use ferroserve::config::{FileConfig, KeySection};
use ferroserve_admission::sha256_hex;
use ferroserve_proto::v1 as pb;
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
    file.server.http_listen = String::new();
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
    // The key is checked before the body is read: an oversized body from a stranger is refused as
    // unauthenticated, while the same body from a tenant meets the size limit.
    let huge = pb::GenerateRequest {
        prompt: "x".repeat(2 << 20),
        max_tokens: 1,
        ..Default::default()
    };
    let status = c.generate(with_key(huge.clone(), None)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = c.generate(with_key(huge, Some("test-key-alpha"))).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("max_request_bytes"), "{status:?}");
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

/// How the server under test is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// No keys, no admin credential, loopback only.
    Open,
    /// A tenant key and an admin credential.
    Keyed,
    /// No keys and no admin credential, configured to listen beyond loopback with
    /// `--allow-unauthenticated`. (The key store is built for 0.0.0.0; the test itself binds loopback.)
    Exposed,
}

/// What a call presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Credential {
    None,
    Wrong,
    Tenant,
    Admin,
}

impl Credential {
    const ALL: [Credential; 4] = [
        Credential::None,
        Credential::Wrong,
        Credential::Tenant,
        Credential::Admin,
    ];

    fn header(self) -> Option<&'static str> {
        match self {
            Credential::None => None,
            Credential::Wrong => Some("Bearer not-a-key"),
            Credential::Tenant => Some("Bearer matrix-tenant-key"),
            Credential::Admin => Some("Bearer matrix-admin-token"),
        }
    }
}

/// What each RPC answers an authorized caller that sends the empty (default) message. Every RPC of every
/// service in the descriptor sets must be here: a new RPC fails this test until its row is written.
fn authorized(path: &str) -> Code {
    use Code::*;
    match path {
        "/ferroserve.v1.Inference/Generate" | "/ferroserve.v1.Inference/GenerateStream" => InvalidArgument,
        "/ferroserve.v1.Inference/ListModels" => Ok,
        "/ferroserve.v1.Admin/ListWorkers"
        | "/ferroserve.v1.Admin/WatchWorkers"
        | "/ferroserve.v1.Admin/SnapshotDriftBaseline"
        | "/ferroserve.v1.Admin/GetLimits"
        | "/ferroserve.v1.Admin/SetLimits"
        | "/ferroserve.v1.Admin/ListFilters"
        | "/ferroserve.v1.Admin/EnableFilter"
        | "/ferroserve.v1.Admin/DisableFilter"
        | "/ferroserve.v1.Admin/SetShadowFilter"
        | "/ferroserve.v1.Admin/ReloadFilters"
        | "/ferroserve.v1.Admin/ListVersions"
        | "/ferroserve.v1.Admin/GetTraffic"
        // An empty split of the default model, and a rollback with no earlier policy, change nothing.
        | "/ferroserve.v1.Admin/SetTraffic"
        | "/ferroserve.v1.Admin/RollbackTraffic"
        | "/ferroserve.v1.Admin/GetRollout" => Ok,
        // No config file to re-read; no version named; no feedback kind.
        "/ferroserve.v1.Admin/ReloadConfig"
        | "/ferroserve.v1.Admin/DisableVersion"
        | "/ferroserve.v1.Admin/EnableVersion"
        | "/ferroserve.v1.Admin/StartRollout"
        | "/ferroserve.v1.Admin/LoadVersion"
        | "/ferroserve.v1.Admin/UnloadVersion"
        | "/ferroserve.v1.Admin/ReportFilterFeedback" => InvalidArgument,
        // No filter of the empty name.
        "/ferroserve.v1.Admin/SwapFilter" => NotFound,
        "/grpc.health.v1.Health/Check" | "/grpc.health.v1.Health/Watch" => Ok,
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        | "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" => Ok,
        "/ferroserve.worker.v1.Worker/Generate" => InvalidArgument,
        "/ferroserve.worker.v1.Worker/Describe"
        | "/ferroserve.worker.v1.Worker/WatchStats"
        | "/ferroserve.worker.v1.Worker/SnapshotDriftBaseline" => Ok,
        other => panic!("{other} has no row in the auth matrix; add what an authorized empty call answers"),
    }
}

/// The expected status of one cell: the RPC's authorized answer, unless the credential is refused.
fn expected(setup: Setup, service: &str, credential: Credential, path: &str) -> Code {
    use Credential::*;
    let ok = authorized(path);
    match service {
        // Probes and schema: open to every caller, always.
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => ok,
        "ferroserve.v1.Inference" => match (setup, credential) {
            (Setup::Keyed, None | Wrong) => Code::Unauthenticated,
            (Setup::Keyed, Admin) => Code::PermissionDenied,
            _ => ok,
        },
        "ferroserve.v1.Admin" => match (setup, credential) {
            (Setup::Open, _) | (Setup::Keyed, Admin) => ok,
            (Setup::Keyed, None | Wrong) => Code::Unauthenticated,
            (Setup::Keyed, Tenant) | (Setup::Exposed, _) => Code::PermissionDenied,
        },
        other => panic!("{other} is not a service of the public server; give the matrix its rules"),
    }
}

fn matrix_settings(setup: Setup) -> ferroserve::config::Settings {
    let mut file = FileConfig::default();
    file.server.listen = "127.0.0.1:0".into();
    file.server.metrics_listen = String::new();
    file.server.http_listen = String::new();
    match setup {
        Setup::Open => {}
        Setup::Keyed => {
            file.auth.admin_token_sha256 = Some(sha256_hex("matrix-admin-token"));
            file.auth.keys = vec![KeySection {
                tenant: "matrix".into(),
                key_sha256: sha256_hex("matrix-tenant-key"),
                ..KeySection::default()
            }];
        }
        Setup::Exposed => {
            file.server.listen = "0.0.0.0:0".into();
            file.auth.allow_unauthenticated = true;
        }
    }
    let mut settings = file.validate().unwrap();
    settings.listen = "127.0.0.1:0".parse().unwrap();
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_of_every_service_answers_each_credential_as_the_matrix_says() {
    use support::raw::{call, methods};
    let all = methods(&[
        ferroserve_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ]);
    let public: Vec<_> = all
        .iter()
        .filter(|m| !m.service.starts_with("ferroserve.worker"))
        .collect();
    assert!(public.len() >= 30, "{} RPCs", public.len());
    let mut failures = Vec::new();
    let mut table = String::new();
    for setup in [Setup::Open, Setup::Keyed, Setup::Exposed] {
        let server = ferroserve::commands::servers::start_serve(matrix_settings(setup), model_path())
            .await
            .unwrap();
        wait_serving(&server.url()).await;
        let channel = tonic::transport::Channel::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        for m in &public {
            let mut row = format!("{setup:?}\t{}", m.path);
            for cred in Credential::ALL {
                let got = tokio::time::timeout(WAIT, call(channel.clone(), m, Vec::new(), cred.header()))
                    .await
                    .expect("call answered in time");
                let want = expected(setup, &m.service, cred, &m.path);
                row.push_str(&format!("\t{got:?}"));
                if got != want {
                    failures.push(format!("{setup:?} {} {cred:?}: got {got:?}, expected {want:?}", m.path));
                }
            }
            table.push_str(&row);
            table.push('\n');
        }
        server.shutdown().await.unwrap();
    }
    println!("setup\trpc\tnone\twrong\ttenant\tadmin\n{table}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_contract_needs_the_internal_token_on_every_rpc() {
    use support::raw::{call, methods};
    let mut file = FileConfig::default();
    file.worker.listen = "127.0.0.1:0".into();
    file.worker.metrics_listen = String::new();
    file.worker.token_sha256 = Some(sha256_hex("internal-token"));
    let worker = ferroserve::commands::servers::start_worker(
        file.validate().unwrap(),
        ferroserve::commands::servers::WorkerModel::File(model_path()),
    )
    .await
    .unwrap();
    wait_serving(&worker.url()).await;
    let channel = tonic::transport::Channel::from_shared(worker.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let all = methods(&[
        ferroserve_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ]);
    let mut checked = 0;
    for m in all
        .iter()
        .filter(|m| m.service == "ferroserve.worker.v1.Worker" || m.service.starts_with("grpc."))
    {
        for (header, refused) in [
            (None, true),
            (Some("Bearer wrong-token"), true),
            (Some("Bearer internal-token"), false),
        ] {
            let got = tokio::time::timeout(WAIT, call(channel.clone(), m, Vec::new(), header))
                .await
                .expect("call answered in time");
            let want = if refused && m.service.starts_with("ferroserve") {
                Code::Unauthenticated
            } else {
                authorized(&m.path)
            };
            assert_eq!(got, want, "{} with {header:?}", m.path);
            checked += 1;
        }
    }
    assert!(checked >= 18, "{checked} cells");

    // A caller with the token still meets the field limits: the worker checks them again itself.
    use ferroserve_proto::worker as wpb;
    let mut w = wpb::worker_client::WorkerClient::new(channel.clone());
    let with_token = |r: wpb::WorkRequest| {
        let mut r = tonic::Request::new(r);
        r.metadata_mut()
            .insert("authorization", "Bearer internal-token".parse().unwrap());
        r
    };
    let base = wpb::WorkRequest {
        request_id: "ok-1".into(),
        input: Some(wpb::work_request::Input::Prompt("Hi".into())),
        max_tokens: 2,
        sampling: Some(wpb::Sampling {
            top_p: 1.0,
            repetition_penalty: 1.0,
            ..Default::default()
        }),
        ..Default::default()
    };
    let cases = [
        (
            wpb::WorkRequest {
                request_id: "forged\nlog line".into(),
                ..base.clone()
            },
            "request_id",
        ),
        (
            wpb::WorkRequest {
                input: Some(wpb::work_request::Input::Prompt("x".repeat(300_000))),
                ..base.clone()
            },
            "prompt",
        ),
        (
            wpb::WorkRequest {
                stop: vec!["s".into(); 100],
                ..base.clone()
            },
            "stop",
        ),
        (
            wpb::WorkRequest {
                continuation: vec![1; 3],
                ..base.clone()
            },
            "continuation",
        ),
    ];
    for (request, field) in cases {
        let status = w.generate(with_token(request)).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "names {field}: {status:?}");
    }
    assert!(
        w.generate(with_token(base)).await.is_ok(),
        "a well-formed request is served"
    );
    worker.shutdown().await.unwrap();
}
