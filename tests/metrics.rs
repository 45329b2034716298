//! The Prometheus exposition of `ferroserve serve`: the catalogue's series appear with the right labels,
//! move with traffic, and carry no request ids or prompt text.

mod support;

use ferroserve_proto::v1::SnapshotDriftBaselineRequest;
use ferroserve_proto::v1::admin_client::AdminClient;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_traffic_with_bounded_labels() {
    let server = start_serve().await;
    let metrics = server.metrics_addr.expect("metrics enabled");
    let (status, _) = http_get(metrics, "/nope").await;
    assert_eq!(status, 404);

    let mut c = client(&server.url()).await;
    let mut req = chat("Secret prompt text: name a planet.", 6);
    req.request_id = "req-should-not-be-a-label".into();
    stream_all(&mut c, req).await;
    let (status, text) = http_get(metrics, "/metrics").await;
    assert_eq!(status, 200);
    let mv = "model=\"smollm2-135m-instruct\",version=\"q4_1\"";
    for series in [
        format!("ferroserve_time_to_first_token_seconds_bucket{{{mv},le=\"0.005\"}}"),
        format!("ferroserve_inter_token_latency_seconds_count{{{mv}}}"),
        format!("ferroserve_request_duration_seconds_count{{{mv}}}"),
        format!("ferroserve_queue_duration_seconds_count{{{mv}}}"),
        format!("ferroserve_token_logprob_count{{{mv}}}"),
        format!("ferroserve_token_entropy_count{{{mv}}}"),
        format!("ferroserve_batch_tokens_count{{{mv}}}"),
        format!("ferroserve_engine_step_seconds_count{{{mv},phase=\"prefill\"}}"),
        format!("ferroserve_engine_step_seconds_count{{{mv},phase=\"decode\"}}"),
        format!("ferroserve_kv_cache_blocks_capacity{{{mv}}}"),
        format!("ferroserve_request_generation_tokens_sum{{{mv}}}"),
        "ferroserve_worker_healthy{worker=\"in-process\"}".to_string(),
    ] {
        assert!(sample(&text, &series).is_some(), "missing {series} in:\n{text}");
    }
    // The default 32768 budget tokens in blocks of 16; the finished request returned its blocks, and its
    // prompt's full blocks stay cached for reuse.
    assert_eq!(
        sample(&text, &format!("ferroserve_kv_cache_blocks_capacity{{{mv}}}")),
        Some(2048.0)
    );
    assert_eq!(
        sample(&text, &format!("ferroserve_kv_cache_blocks_used{{{mv}}}")),
        Some(0.0)
    );
    assert!(sample(&text, &format!("ferroserve_kv_cache_blocks_cached{{{mv}}}")).is_some_and(|n| n >= 1.0));
    assert!(sample(&text, &format!("ferroserve_prefix_cache_queries_total{{{mv}}}")).is_some_and(|n| n >= 1.0));
    let generated = |text: &str| sample(text, &format!("ferroserve_generation_tokens_total{{{mv}}}")).unwrap_or(0.0);
    assert!(generated(&text) >= 6.0);
    assert_eq!(
        sample(&text, "ferroserve_worker_healthy{worker=\"in-process\"}"),
        Some(1.0)
    );
    assert!(
        sample(&text, "ferroserve_requests_total{status=\"ok\"").is_some(),
        "{text}"
    );
    assert!(text.contains("# TYPE ferroserve_cost_usd_total counter"));
    assert!(!text.contains("req-should-not-be-a-label") && !text.contains("Secret prompt"));

    // Drift: a baseline taken now, then the same kind of traffic, scores as stable (well under 0.25).
    let mut admin = AdminClient::connect(server.url()).await.unwrap();
    let snap = admin
        .snapshot_drift_baseline(SnapshotDriftBaselineRequest { model: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snap.workers, 1);
    assert!(snap.tokens >= 6);
    stream_all(&mut c, chat("Secret prompt text: name a planet.", 6)).await;
    let (_, text) = http_get(metrics, "/metrics").await;
    let drift = sample(&text, &format!("ferroserve_token_drift_score{{{mv}}}")).expect("drift gauge");
    assert!((0.0..0.25).contains(&drift), "same traffic should not drift: {drift}");
    assert!(generated(&text) >= 12.0);
    let unknown = admin
        .snapshot_drift_baseline(SnapshotDriftBaselineRequest { model: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scraper_that_never_finishes_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut settings = settings();
    settings.connections.handshake_timeout = std::time::Duration::from_millis(500);
    let server = ferroserve::commands::servers::start_serve(settings, model_path())
        .await
        .unwrap();
    let metrics = server.metrics_addr.expect("metrics enabled");
    let mut slow = tokio::net::TcpStream::connect(metrics).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut rest = Vec::new();
    // The server closes the connection at the header-read timeout (with or without a 408 first).
    let read = tokio::time::timeout(WAIT, slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the half-sent request was cut off");
    let text = String::from_utf8_lossy(&rest);
    assert!(
        !text.contains("ferroserve_"),
        "no metrics for an unfinished request: {text}"
    );
    // A prompt scraper is still served.
    let (status, _) = http_get(metrics, "/metrics").await;
    assert_eq!(status, 200);
    server.shutdown().await.unwrap();
}
