//! TLS on every listener, on 127.0.0.1: the public port with a certificate reloaded on SIGHUP, and the
//! internal plane with mTLS and the shared token. Certificates come from a throwaway CA made per test.

mod support;

use std::path::Path;

use ferroserve_net::ClientTlsFiles;
use ferroserve_proto::worker::DescribeRequest;
use ferroserve_proto::worker::worker_client::WorkerClient;
use support::certs::{Pki, https_get};
use support::procs::{run_to_end, spawn, wait_log, wait_workers_healthy};
use support::*;
use tonic::transport::Channel;

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ferroserve-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A TLS channel to `url` trusting `ca`, optionally presenting a client certificate.
async fn tls_channel(url: &str, ca: &Path, client: Option<&Pki>) -> Result<Channel, String> {
    let files = ClientTlsFiles {
        ca: Some(ca.to_path_buf()),
        cert: client.map(|p| p.client_cert.clone()),
        key: client.map(|p| p.client_key.clone()),
    };
    ferroserve_net::endpoint(url, &files)?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// A plaintext HTTP/1.1 GET of /metrics: the first line of the answer, if any came.
async fn plain_http_answers(addr: std::net::SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    text.starts_with("HTTP/")
        .then(|| text.lines().next().unwrap_or_default().to_string())
}

/// One health check over a fresh TLS connection trusting `ca`: SERVING, or why not.
async fn healthy_over(url: &str, ca: &Path) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let mut health = HealthClient::new(tls_channel(url, ca, None).await?);
    let answer = health
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map_err(|s| format!("{s:?}"))?;
    (answer.into_inner().status == 1)
        .then_some(())
        .ok_or_else(|| "not SERVING".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_speaks_tls_and_a_sighup_swaps_the_certificate_without_a_restart() {
    let dir = scratch("serve");
    let (first, second) = (
        Pki::issue(&dir.join("a"), "first"),
        Pki::issue(&dir.join("b"), "second"),
    );
    let (cert, key) = (dir.join("live.pem"), dir.join("live.key"));
    std::fs::copy(&first.server_cert, &cert).unwrap();
    std::fs::copy(&first.server_key, &key).unwrap();
    let model = model_path();
    let serve = spawn(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--model-path",
        model.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ])
    .await;
    let https = format!("https://{}", serve.addr);
    tokio::time::timeout(WAIT, async {
        while healthy_over(&https, &first.ca).await.is_err() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("SERVING over TLS in time");

    // The CLI speaks TLS, trusting the CA it is given.
    let (status, stdout, stderr) = run_to_end(&[
        "generate",
        "--addr",
        &https,
        "--tls-ca",
        first.ca.to_str().unwrap(),
        "--max-tokens",
        "3",
        "Hi",
    ])
    .await;
    assert!(status.success(), "{stderr}");
    assert!(
        !stdout.is_empty() && stderr.contains("3 completion tokens"),
        "{stdout} {stderr}"
    );
    // The load tester speaks TLS too.
    let grpcs = format!("grpcs://{}", serve.addr);
    let (status, _, stderr) = run_to_end(&[
        "bench",
        "--target",
        &grpcs,
        "--tls-ca",
        first.ca.to_str().unwrap(),
        "--concurrency",
        "1",
        "--requests",
        "2",
        "--warmup",
        "1",
        "--max-tokens",
        "2",
        "--quiet",
    ])
    .await;
    assert!(status.success(), "bench over grpcs://: {stderr}");
    // /metrics is served over TLS with the same certificate; plaintext gets no answer there either.
    let metrics: std::net::SocketAddr = serve.metrics_addr().await.parse().unwrap();
    let (code, body) = https_get(metrics, &first.ca, "/metrics")
        .await
        .expect("metrics over TLS");
    assert!(code == 200 && body.contains("ferroserve_"), "{code} {body}");
    assert!(
        plain_http_answers(metrics).await.is_none(),
        "plaintext /metrics on a TLS listener"
    );
    // Plaintext gets no service, and a client trusting another CA is refused.
    let mut plain = InferenceClient::new(Channel::from_shared(serve.url.clone()).unwrap().connect_lazy());
    assert!(plain.generate(chat("Hi", 2)).await.is_err());
    assert!(healthy_over(&https, &second.ca).await.is_err());

    // New certificate files, then SIGHUP: new connections get the new certificate, with no restart.
    std::fs::copy(&second.server_cert, &cert).unwrap();
    std::fs::copy(&second.server_key, &key).unwrap();
    serve.signal("HUP");
    tokio::time::timeout(WAIT, async {
        while healthy_over(&https, &second.ca).await.is_err() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the reloaded certificate is served in time");
    assert!(
        healthy_over(&https, &first.ca).await.is_err(),
        "the old certificate is gone"
    );
    // A broken file is refused; the running certificate stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    let mut logs = serve.logs();
    serve.signal("HUP");
    let line = wait_log(&mut logs, "certificate not reloaded").await;
    assert!(line.contains("live.pem"), "the log names the file: {line}");
    assert!(healthy_over(&https, &second.ca).await.is_ok());
    serve.stop().await;
}

use ferroserve_proto::v1::inference_client::InferenceClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_reaches_its_worker_over_mtls_with_the_internal_token() {
    let dir = scratch("mtls");
    let pki = Pki::issue(&dir, "internal");
    let stranger = Pki::issue(&dir.join("stranger"), "stranger");
    let token = dir.join("worker.token");
    std::fs::write(&token, "internal-plane-token\n").unwrap();
    let worker_cfg = dir.join("worker.toml");
    std::fs::write(
        &worker_cfg,
        format!(
            "[worker]\ntls_cert = {:?}\ntls_key = {:?}\ntls_client_ca = {:?}\ntoken_sha256 = \"{}\"\n",
            pki.server_cert,
            pki.server_key,
            pki.ca,
            ferroserve_admission::sha256_hex("internal-plane-token")
        ),
    )
    .unwrap();
    let router_cfg = dir.join("router.toml");
    std::fs::write(
        &router_cfg,
        format!(
            "[router]\nworker_tls_ca = {:?}\nworker_tls_cert = {:?}\nworker_tls_key = {:?}\nworker_token_file = {:?}\n",
            pki.ca, pki.client_cert, pki.client_key, token
        ),
    )
    .unwrap();
    let model = model_path();
    let loopback = ["--listen", "127.0.0.1:0", "--metrics-listen", ""];
    let worker = spawn(&[
        "worker",
        "--config",
        worker_cfg.to_str().unwrap(),
        "--model-path",
        model.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .await;
    let worker_url = format!("https://{}", worker.addr);
    let router = spawn(
        &[
            &[
                "router",
                "--config",
                router_cfg.to_str().unwrap(),
                "--worker",
                &worker_url,
            ][..],
            &loopback,
        ]
        .concat(),
    )
    .await;
    wait_serving(&router.url).await;
    wait_workers_healthy(&router.url, 1).await;
    let mut c = client(&router.url).await;
    let (_, done) = stream_all(&mut c, chat("Say hi.", 4)).await;
    assert_eq!(done.usage.unwrap().completion_tokens, 4);
    // The worker's /metrics speaks TLS with its certificate (no client certificate asked of scrapers).
    let metrics: std::net::SocketAddr = worker.metrics_addr().await.parse().unwrap();
    let (code, body) = https_get(metrics, &pki.ca, "/metrics")
        .await
        .expect("worker metrics over TLS");
    assert!(code == 200 && body.contains("ferroserve_"), "{code} {body}");
    assert!(plain_http_answers(metrics).await.is_none(), "plaintext worker /metrics");

    // Callers other than the router: no client certificate, or one from another CA, get no connection;
    // the right certificate without the token is unauthenticated.
    let describe = |channel: Channel| async move {
        WorkerClient::new(channel)
            .describe(DescribeRequest {})
            .await
            .map(|_| ())
    };
    if let Ok(ch) = tls_channel(&worker_url, &pki.ca, None).await {
        assert!(
            describe(ch).await.is_err(),
            "a worker call without a client certificate"
        );
    }
    if let Ok(ch) = tls_channel(&worker_url, &pki.ca, Some(&stranger)).await {
        assert!(describe(ch).await.is_err(), "a client certificate from another CA");
    }
    let ch = tls_channel(&worker_url, &pki.ca, Some(&pki))
        .await
        .expect("mTLS connects");
    let status = describe(ch).await.expect_err("no token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    router.stop().await;
    worker.stop().await;
}
