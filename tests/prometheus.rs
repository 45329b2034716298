//! A real Prometheus (Debian package `prometheus`) scrapes a running `ferroserve serve`, and PromQL over
//! the scraped series gives numbers. Needs `prometheus` and `promtool` on PATH, so it is ignored by the
//! plain test command; run it with `cargo test -p ferroserve --test prometheus -- --ignored`
//! (`.ci/run` installs the package and does).
//!
//! Prometheus scrapes on its own clock, so this test polls its HTTP API at a fixed interval, bounded in
//! count; there is no event to wait on instead.

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::*;
use tokio::process::Command;

/// Percent-encodes a PromQL query for a URL.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs an instant query and returns the first result's value, if there is one.
async fn query(prom: std::net::SocketAddr, q: &str) -> Option<f64> {
    let (status, body) = http_get(prom, &format!("/api/v1/query?query={}", encode(q))).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("prometheus JSON");
    let value = v["data"]["result"].as_array()?.first()?["value"][1]
        .as_str()?
        .to_string();
    value.parse().ok()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the Debian prometheus package; run with --ignored"]
async fn prometheus_scrapes_and_promql_answers() {
    let server = start_serve().await;
    let metrics = server.metrics_addr.expect("metrics enabled");
    let dir = std::env::temp_dir().join(format!("ferroserve-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: ferroserve\n    static_configs:\n      - targets: [\"{metrics}\"]\n"),
    )
    .unwrap();
    let prom_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={prom_addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start prometheus (apt-get install prometheus)");

    // Traffic in the background, bounded, until the queries below have what they need.
    let url = server.url();
    let traffic = tokio::spawn(async move {
        let mut c = client(&url).await;
        for i in 0..200 {
            stream_all(&mut c, chat(&format!("Say the number {i}."), 8)).await;
        }
    });

    let ttft_p99 = "histogram_quantile(0.99, rate(ferroserve_time_to_first_token_seconds_bucket[1m]))";
    let token_rate = "sum(rate(ferroserve_generation_tokens_total[1m]))";
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut answers = None;
    for _ in 0..240 {
        tick.tick().await;
        let ready =
            tokio::net::TcpStream::connect(prom_addr).await.is_ok() && http_get(prom_addr, "/-/ready").await.0 == 200;
        if !ready {
            continue;
        }
        if let (Some(p99), Some(rate)) = (query(prom_addr, ttft_p99).await, query(prom_addr, token_rate).await)
            && p99.is_finite()
            && rate > 0.0
        {
            answers = Some((p99, rate));
            break;
        }
    }
    traffic.abort();
    let (p99, rate) = answers.expect("Prometheus answered both queries within 120 s");
    println!("{ttft_p99} = {p99}\n{token_rate} = {rate}");
    assert!(p99 > 0.0 && rate > 0.0);

    // promtool agrees with our exposition and our alert rules.
    let (_, exposition) = http_get(metrics, "/metrics").await;
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = check.stdin.take().unwrap();
        stdin.write_all(exposition.as_bytes()).await.unwrap();
    }
    let out = check.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus/alerts.yml");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    prometheus.kill().await.unwrap();
    let _ = prometheus.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
    server.shutdown().await.unwrap();
}
