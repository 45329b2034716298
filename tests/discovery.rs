//! Worker discovery through DNS, on 127.0.0.1: a real `dnsmasq` answers a name from a hosts file the test
//! rewrites, two real workers listen on 127.0.0.2 and 127.0.0.3 at one port (as the pods of a Kubernetes
//! headless Service do), and a router follows `dns://name:port`. Under load, a worker added to the name
//! joins the pool, and a worker taken out of it leaves, with no request failing.

mod support;

use std::sync::Arc;

use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::admin_client::AdminClient;
use support::dnsmasq::Dnsmasq;
use support::procs::spawn;
use support::*;

const NAME: &str = "workers.fleet.test";
const ADMIN: &str = "discovery-admin";

fn with_admin<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    r
}

/// Follows the router's worker report (bounded) until its healthy workers are exactly `addresses`.
async fn until_pool(router: &str, addresses: &[String]) {
    let mut admin = AdminClient::connect(router.to_string()).await.unwrap();
    let mut reports = admin
        .watch_workers(with_admin(pb::ListWorkersRequest {}))
        .await
        .expect("WatchWorkers")
        .into_inner();
    let mut want: Vec<&String> = addresses.iter().collect();
    want.sort();
    let mut last = Vec::new();
    let reached = tokio::time::timeout(WAIT, async {
        while let Some(r) = reports.message().await.expect("worker report") {
            let mut have: Vec<String> = r
                .workers
                .iter()
                .filter(|w| w.healthy)
                .map(|w| w.address.clone())
                .collect();
            have.sort();
            if have.iter().collect::<Vec<_>>() == want {
                return;
            }
            last = have;
        }
    })
    .await;
    assert!(reached.is_ok(), "the pool never became {want:?}; last: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_join_and_leave_the_pool_as_dns_changes_with_no_failed_request() {
    let dir = std::env::temp_dir().join(format!("ferroserve-discovery-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut dns = Dnsmasq::start(&dir, NAME, &["127.0.0.2"]).await;
    let config = dir.join("router.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nadmin_token_sha256 = \"{}\"\n\n[router]\ndns_server = \"{}\"\n\
             dns_interval_ms = 100\n",
            ferroserve_admission::sha256_hex(ADMIN),
            dns.server()
        ),
    )
    .unwrap();

    // Two workers on one port, as two pods behind a headless Service.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let model = model_path();
    let worker = |ip: &str| format!("{ip}:{port}");
    let (a, b) = (worker("127.0.0.2"), worker("127.0.0.3"));
    let mut workers = Vec::new();
    for listen in [&a, &b] {
        let args = [
            "worker",
            "--model-path",
            model.to_str().unwrap(),
            "--listen",
            listen,
            "--metrics-listen",
            "",
        ];
        workers.push(spawn(&args).await);
    }
    let target = format!("dns://{NAME}:{port}");
    let router = spawn(&[
        "router",
        "--config",
        config.to_str().unwrap(),
        "--worker",
        &target,
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "",
    ])
    .await;
    wait_serving(&router.url).await;
    let (url_a, url_b) = (format!("http://{a}"), format!("http://{b}"));
    until_pool(&router.url, std::slice::from_ref(&url_a)).await;

    // Load: two clients send requests back to back until told to stop, counting what completes.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (done_tx, done) = tokio::sync::watch::channel(0u32);
    let done_tx = Arc::new(done_tx);
    let mut load = Vec::new();
    for i in 0..2 {
        let mut c = client(&router.url).await;
        let (stopped, done_tx) = (stopped.clone(), Arc::clone(&done_tx));
        load.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            let mut n = 0;
            while !*stopped.borrow() {
                n += 1;
                match c.generate_stream(chat(&format!("Count to {i}{n}."), 8)).await {
                    Ok(s) => {
                        let mut s = s.into_inner();
                        let mut complete = false;
                        loop {
                            match s.message().await {
                                Ok(Some(m)) => {
                                    complete |=
                                        matches!(m.event, Some(pb::generate_stream_response::Event::Complete(_)))
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    failed.push(format!("{:?}: {}", e.code(), e.message()));
                                    break;
                                }
                            }
                        }
                        if complete {
                            done_tx.send_modify(|d| *d += 1);
                        } else if failed.is_empty() {
                            failed.push("a stream ended without a completion".into());
                        }
                    }
                    Err(e) => failed.push(format!("{:?}: {}", e.code(), e.message())),
                }
            }
            failed
        }));
    }
    let more = |n: u32| {
        let mut done = done.clone();
        let from = *done.borrow();
        async move {
            let reached = tokio::time::timeout(WAIT, done.wait_for(|d| *d >= from + n)).await;
            assert!(reached.is_ok(), "the load stalled at {from} requests");
        }
    };
    more(3).await;

    // b appears in DNS: it joins the pool under load.
    dns.set(NAME, &["127.0.0.2", "127.0.0.3"]).await;
    until_pool(&router.url, &[url_a.clone(), url_b.clone()]).await;
    more(6).await;
    // a leaves DNS: it leaves the pool, its requests finishing, and b serves on.
    dns.set(NAME, &["127.0.0.3"]).await;
    until_pool(&router.url, std::slice::from_ref(&url_b)).await;
    more(6).await;

    stop.send(true).unwrap();
    let mut failures = Vec::new();
    for task in load {
        failures.extend(task.await.expect("load task"));
    }
    assert!(
        failures.is_empty(),
        "requests failed while the pool changed: {failures:?}"
    );
    eprintln!(
        "{} requests while the pool grew and shrank, none failed",
        *done.borrow()
    );
    drop(router);
    drop(workers);
    let _ = std::fs::remove_dir_all(&dir);
}
