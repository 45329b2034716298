//! The HTTP door (OpenAI's API) through the real router on 127.0.0.1, in front of a mock backend (no
//! model): the same pipeline as gRPC, OpenAI's response and error shapes, rate-limit headers, `n`,
//! streaming, the content filter's finish reason, and a client that leaves mid-stream.

mod mock;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ferroserve_admission::{AdmissionLimits, ServerLimits, TenantLimits, rate};
use ferroserve_filter::{FilterConfig, FilterHub, Loaded};
use mock::http::{open_stream, post, send};
use mock::*;
use serde_json::{Value, json};

const ALPHA: Option<&str> = Some("key-alpha");

fn limits(max_in_flight: u32, queue: u32) -> AdmissionLimits {
    AdmissionLimits {
        server: ServerLimits {
            shared: TenantLimits {
                max_in_flight: Some(max_in_flight),
                ..TenantLimits::default()
            },
            max_queued_requests: queue,
            max_queued_tokens: 1_000_000,
        },
        tenants: BTreeMap::new(),
    }
}

async fn open_harness(o: Options) -> Harness {
    let h = Harness::start(o).await;
    let _ = h.release.send(true);
    h
}

fn chat_body(extra: Value) -> String {
    let mut body = json!({"model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body.to_string()
}

#[tokio::test]
async fn both_doors_give_the_same_text_and_usage() {
    let mut o = Options::new(limits(8, 8));
    o.script = Some(vec!["Hel".into(), "lo".into(), " there".into()]);
    let h = open_harness(o).await;
    let mut grpc = h.client().await;
    let g = grpc
        .generate(prompt_request("alpha", "", "hi", 3))
        .await
        .unwrap()
        .into_inner();
    let r = post(
        &h.http_url,
        "/v1/completions",
        ALPHA,
        &json!({"model": "mock", "prompt": "hi", "max_tokens": 3}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], g.text.as_str());
    let usage = g.usage.unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], usage.prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], usage.completion_tokens);
    assert_eq!(
        v["usage"]["total_tokens"],
        usage.prompt_tokens + usage.completion_tokens
    );
    assert_eq!(v["model"], g.model_version.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "EOS is OpenAI's stop");
    assert!(r.header("x-request-id").is_some_and(|id| id.starts_with("req-")));
    // The same request as a conversation, on the chat endpoint.
    let r = post(&h.http_url, "/v1/chat/completions", ALPHA, &chat_body(json!({}))).await;
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello there");
    h.stop().await;
}

#[tokio::test]
async fn streams_end_with_done_and_n_copies_share_one_usage() {
    let mut o = Options::new(limits(8, 8));
    o.script = Some(vec!["a".into(), "b".into()]);
    let h = open_harness(o).await;
    let body = chat_body(json!({"stream": true, "n": 2, "stream_options": {"include_usage": true}, "seed": 7}));
    let r = post(&h.http_url, "/v1/chat/completions", ALPHA, &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream"))
    );
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let mut text = [String::new(), String::new()];
    let mut finished = [None, None];
    for c in &chunks[..chunks.len() - 1] {
        assert_eq!(c["object"], "chat.completion.chunk");
        let choice = &c["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        if let Some(t) = choice["delta"]["content"].as_str() {
            text[i].push_str(t);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finished[i] = Some(f.to_string());
        }
    }
    assert_eq!(text, ["ab", "ab"]);
    assert_eq!(finished, [Some("stop".to_string()), Some("stop".to_string())]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 4, "both copies' tokens");
    assert_eq!(usage["usage"]["prompt_tokens"], MOCK_PROMPT_TOKENS, "the prompt once");
    // Two copies ran, copy i seeded with seed + i.
    let seeds: Vec<u64> = h.received.lock().unwrap().iter().map(|r| r.sampling.seed).collect();
    assert_eq!(seeds, [7, 8]);
    h.stop().await;
}

#[tokio::test]
async fn errors_are_openai_json_with_the_right_status_and_param() {
    let mut o = Options::new(limits(8, 8));
    o.limits.tenants.insert(
        "gamma".into(),
        TenantLimits {
            requests: Some(rate(1.0, Duration::from_secs(3600), Some(1), "requests").unwrap()),
            ..TenantLimits::default()
        },
    );
    let h = open_harness(o).await;
    let url = &h.http_url;
    let check = |r: &mock::http::Reply, status: u16, kind: &str| {
        assert_eq!(r.status, status, "{}", r.body);
        let e = &r.json()["error"];
        assert_eq!(e["type"], kind, "{}", r.body);
        assert!(!e["message"].as_str().unwrap().is_empty());
        e.clone()
    };
    let r = post(url, "/v1/chat/completions", None, &chat_body(json!({}))).await;
    check(&r, 401, "authentication_error");
    let r = post(url, "/v1/chat/completions", Some("wrong"), &chat_body(json!({}))).await;
    check(&r, 401, "authentication_error");
    let r = post(url, "/v1/chat/completions", Some("admin"), &chat_body(json!({}))).await;
    check(&r, 403, "permission_error");
    let r = post(url, "/v1/chat/completions", ALPHA, &chat_body(json!({"model": "nope"}))).await;
    assert_eq!(check(&r, 404, "not_found_error")["param"], "model");
    let r = post(
        url,
        "/v1/chat/completions",
        ALPHA,
        &chat_body(json!({"temperature": -1})),
    )
    .await;
    let e = check(&r, 400, "invalid_request_error");
    assert_eq!(
        e["param"], "temperature",
        "the pipeline's sampling.temperature, named as OpenAI names it"
    );
    let r = post(url, "/v1/chat/completions", ALPHA, &chat_body(json!({"top_p": "x"}))).await;
    assert_eq!(check(&r, 400, "invalid_request_error")["param"], "top_p");
    let r = post(url, "/v1/chat/completions", ALPHA, "{").await;
    assert_eq!(check(&r, 400, "invalid_request_error")["param"], "body");
    let r = post(url, "/v1/unknown", ALPHA, "{}").await;
    check(&r, 404, "not_found_error");
    let r = send(url, "GET", "/v1/chat/completions", ALPHA, "").await;
    assert_eq!(r.status, 405);
    let r = mock::http::claim(url, "/v1/completions", ALPHA, 64 << 20).await;
    assert_eq!(
        r.status, 413,
        "a body over max_request_bytes is refused before it is read"
    );
    // gamma may send one request an hour: the second is a 429 with when to retry and its budgets.
    let gamma = Some("key-gamma");
    let r = post(url, "/v1/chat/completions", gamma, &chat_body(json!({}))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("1"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    let r = post(url, "/v1/chat/completions", gamma, &chat_body(json!({}))).await;
    let e = check(&r, 429, "rate_limit_error");
    assert_eq!(e["code"], "rate_limit_exceeded");
    let retry: u64 = r.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!((3000..=3600).contains(&retry), "about an hour: {retry}");
    assert!(r.header("x-ratelimit-reset-requests").is_some_and(|v| v.ends_with('s')));
    h.stop().await;
}

#[tokio::test]
async fn a_full_server_answers_503_with_retry_after() {
    // One request at a time and no queue; the mock holds the first until released.
    let h = Harness::start(Options::new(limits(1, 0))).await;
    let url = h.http_url.clone();
    let first = tokio::spawn(async move { post(&url, "/v1/chat/completions", ALPHA, &chat_body(json!({}))).await });
    tokio::time::timeout(WAIT, async {
        while h.received.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the first request reached the worker");
    let r = post(&h.http_url, "/v1/chat/completions", ALPHA, &chat_body(json!({}))).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "queue_full", "{}", r.body);
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    let _ = h.release.send(true);
    assert_eq!(first.await.unwrap().status, 200);
    h.stop().await;
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_cancels_the_generation() {
    let mut o = Options::new(limits(8, 8));
    o.script = Some((0..500).map(|i| format!(" t{i}")).collect());
    o.token_delay = Duration::from_millis(5);
    let h = open_harness(o).await;
    let body = json!({"model": "mock", "prompt": "hi", "max_tokens": 500, "stream": true}).to_string();
    let reader = open_stream(&h.http_url, "/v1/completions", ALPHA, &body).await;
    drop(reader);
    let mut cancelled = h.cancelled.clone();
    tokio::time::timeout(WAIT, cancelled.wait_for(|n| *n >= 1))
        .await
        .expect("the worker's generation was cancelled")
        .unwrap();
    assert!(h.sent.load(std::sync::atomic::Ordering::Relaxed) < 500);
    h.stop().await;
}

#[tokio::test]
async fn a_filtered_prompt_finishes_with_content_filter() {
    let text = "name = \"f\"\nversion = \"1\"\n[rules]\n[[rules.categories]]\nname = \"weapons\"\naction = \"block\"\n\
                patterns = ['\\bpipe bomb\\b']\n";
    let config = FilterConfig::parse(text, "test").unwrap();
    let hub = FilterHub::empty(None, 100);
    hub.insert(Loaded {
        id: config.id(),
        name: "f".into(),
        description: String::new(),
        path: None,
        filter: Arc::new(config.compile().unwrap()),
    });
    hub.swap("f").unwrap();
    let mut o = Options::new(limits(8, 8));
    o.filters = hub;
    let h = open_harness(o).await;
    let body = json!({"model": "mock", "messages": [{"role": "user", "content": "how to build a pipe bomb"}]});
    let r = post(&h.http_url, "/v1/chat/completions", ALPHA, &body.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(v["choices"][0]["message"]["content"], "");
    assert!(h.received.lock().unwrap().is_empty(), "no model work");
    let r = post(
        &h.http_url,
        "/v1/moderations",
        ALPHA,
        &json!({"input": ["a pipe bomb", "a cake"]}).to_string(),
    )
    .await;
    let v = r.json();
    assert_eq!(v["model"], "f@1");
    assert_eq!(v["results"][0]["flagged"], true);
    assert_eq!(v["results"][0]["categories"]["weapons"], true);
    assert_eq!(v["results"][1]["flagged"], false);
    h.stop().await;
}

#[tokio::test]
async fn models_list_names_and_versions() {
    let h = open_harness(Options::new(limits(8, 8))).await;
    let r = send(&h.http_url, "GET", "/v1/models", ALPHA, "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ids: Vec<String> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["mock", "mock@v1"]);
    let r = post(&h.http_url, "/v1/embeddings", ALPHA, &json!({"input": "x"}).to_string()).await;
    assert_eq!(r.status, 404, "no encoder loaded: {}", r.body);
    h.stop().await;
}

#[tokio::test]
async fn more_copies_than_slots_run_as_slots_free() {
    // Two slots and a queue: four copies of one request. The copies that run are relayed at once, so they
    // finish and free their slots for the queued ones (parked copies would hold the slots forever).
    let mut o = Options::new(limits(2, 8));
    o.script = Some(vec!["a".into(), "b".into()]);
    let h = open_harness(o).await;
    let body = json!({"model": "mock", "prompt": "hi", "max_tokens": 2, "n": 4}).to_string();
    let r = post(&h.http_url, "/v1/completions", ALPHA, &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let texts: Vec<&str> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["ab"; 4]);
    h.stop().await;
}

#[tokio::test]
async fn requests_that_can_never_be_admitted_are_400_not_429() {
    let mut o = Options::new(limits(8, 8));
    o.limits.tenants.insert(
        "gamma".into(),
        TenantLimits {
            max_in_flight: Some(2),
            tokens: Some(rate(100.0, Duration::from_secs(60), Some(100), "tokens").unwrap()),
            ..TenantLimits::default()
        },
    );
    let h = open_harness(o).await;
    let gamma = Some("key-gamma");
    let r = post(&h.http_url, "/v1/chat/completions", gamma, &chat_body(json!({"n": 3}))).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["param"], "n");
    // 1000 tokens reserved from a bucket that holds 100: never admissible.
    let r = post(
        &h.http_url,
        "/v1/chat/completions",
        gamma,
        &chat_body(json!({"max_tokens": 1000})),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "too_large");
    assert!(r.header("retry-after").is_none());
    h.stop().await;
}

#[tokio::test]
async fn the_traffic_policy_applies_to_http_with_the_cohort_header_and_user() {
    let mut o = Options::new(limits(8, 8));
    o.versions = vec!["stable".into(), "canary".into()];
    let h = open_harness(o).await;
    let mut admin = h.admin().await;
    admin
        .set_traffic(admin_request(
            ferroserve_proto::v1::SetTrafficRequest {
                model: "mock".into(),
                weights: std::collections::HashMap::from([("stable".to_string(), 100)]),
                cohorts: std::collections::HashMap::from([("beta".to_string(), "canary".to_string())]),
                reason: "cohort test".into(),
            },
            "admin",
        ))
        .await
        .unwrap();
    let served = |cohort: Option<&'static str>| {
        let url = h.http_url.clone();
        async move {
            let headers: Vec<(&str, &str)> = cohort.map(|c| ("x-ferroserve-cohort", c)).into_iter().collect();
            let r = mock::http::send_with(
                &url,
                "POST",
                "/v1/chat/completions",
                ALPHA,
                &headers,
                &chat_body(json!({"user": "u1"})),
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()["model"].as_str().unwrap().to_string()
        }
    };
    assert_eq!(served(Some("beta")).await, "mock@canary");
    assert_eq!(served(None).await, "mock@stable");
    let r = post(
        &h.http_url,
        "/v1/chat/completions",
        ALPHA,
        &chat_body(json!({"model": "mock@canary"})),
    )
    .await;
    assert_eq!(r.json()["model"], "mock@canary", "a pin reaches its version");
    h.stop().await;
}

#[tokio::test]
async fn a_drain_lets_an_open_stream_finish_and_then_refuses_connections() {
    let mut o = Options::new(limits(8, 8));
    o.script = Some((0..40).map(|i| format!(" t{i}")).collect());
    o.token_delay = Duration::from_millis(10);
    let h = open_harness(o).await;
    let url = h.http_url.clone();
    let body = json!({"model": "mock", "prompt": "hi", "max_tokens": 40, "stream": true}).to_string();
    let mut reader = open_stream(&url, "/v1/completions", ALPHA, &body).await;
    // The server is told to stop while the stream is open; the stream still ends with [DONE].
    let stopping = tokio::spawn(h.stop());
    let mut rest = String::new();
    tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_to_string(&mut reader, &mut rest))
        .await
        .expect("the stream ended in time")
        .unwrap();
    assert!(rest.contains("data: [DONE]"), "{rest}");
    assert!(rest.contains("\"finish_reason\":\"stop\""), "{rest}");
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
    let addr = url.trim_start_matches("http://");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed after the drain"
    );
}
