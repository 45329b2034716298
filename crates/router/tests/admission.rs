//! Admission through the real router on 127.0.0.1, in front of a mock backend (no model), so that the test
//! decides when each generation may finish. Every refusal is checked for its status, its `retry-after-ms`
//! trailer, its `google.rpc.RetryInfo` detail and the limit it names.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferroserve_admission::{
    Admission, AdmissionLimits, KeyStore, Priority, ServerLimits, Tenant, TenantKey, TenantLimits, parse_sha256, rate,
    sha256_hex,
};
use ferroserve_core::{
    Backend, BackendError, Completion, Event, EventStream, FinishReason, ModelInfo, StatsStream, TokenChunk, Usage,
    ValidRequest, WorkerStats,
};
use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::admin_client::AdminClient;
use ferroserve_proto::v1::inference_client::InferenceClient;
use ferroserve_router::{LIMIT_METADATA, Live, LiveSettings, Pool, RETRY_AFTER_MS, RouterConfig, RouterParts};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(30);
/// Tokens the mock reports for any prompt.
const MOCK_PROMPT_TOKENS: u32 = 3;
/// The mock stops after this many tokens, as a model stops at EOS.
const MOCK_MAX_OUTPUT: u32 = 4;

/// A mock backend: no model. Each generation waits until the test opens `release`, records its request id,
/// then streams up to [`MOCK_MAX_OUTPUT`] tokens, `token_delay` apart.
struct MockBackend {
    info: ModelInfo,
    release: watch::Receiver<bool>,
    started: Arc<Mutex<Vec<String>>>,
    token_delay: Duration,
}

impl Backend for MockBackend {
    fn model(&self) -> &ModelInfo {
        &self.info
    }

    fn location(&self) -> &str {
        "mock"
    }

    fn generate(&self, request: ValidRequest) -> BoxFuture<'_, Result<EventStream, BackendError>> {
        let (tx, rx) = mpsc::channel(8);
        let mut release = self.release.clone();
        let started = Arc::clone(&self.started);
        let delay = self.token_delay;
        tokio::spawn(async move {
            if release.wait_for(|open| *open).await.is_err() {
                return;
            }
            started.lock().unwrap().push(request.request_id.clone());
            let n = request.max_tokens.min(MOCK_MAX_OUTPUT);
            for i in 0..n {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let chunk = TokenChunk {
                    text: "x".into(),
                    token_ids: vec![i],
                    logprobs: vec![-0.5],
                };
                if tx.send(Ok(Event::Token(chunk))).await.is_err() {
                    return;
                }
            }
            let complete = Completion {
                finish: FinishReason::Eos,
                usage: Usage {
                    prompt_tokens: MOCK_PROMPT_TOKENS,
                    completion_tokens: n,
                },
                timings: Default::default(),
            };
            let _ = tx.send(Ok(Event::Complete(complete))).await;
        });
        async move { Ok(ReceiverStream::new(rx).boxed()) }.boxed()
    }

    fn watch_stats(&self) -> StatsStream {
        futures::stream::once(async { WorkerStats::default() })
            .chain(futures::stream::pending())
            .boxed()
    }

    fn snapshot_drift_baseline(&self) -> BoxFuture<'_, Result<u64, BackendError>> {
        async { Ok(0) }.boxed()
    }
}

fn key(tenant: &str, priority: Priority) -> TenantKey {
    TenantKey {
        tenant: Tenant {
            name: tenant.into(),
            priority,
        },
        key_sha256: parse_sha256(&sha256_hex(&format!("key-{tenant}"))).unwrap(),
    }
}

struct Harness {
    url: String,
    release: watch::Sender<bool>,
    started: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start(
        limits: AdmissionLimits,
        token_delay: Duration,
        reload: Option<ferroserve_router::Reloader>,
    ) -> Self {
        let keys = KeyStore::new(
            vec![
                key("alpha", Priority::Interactive),
                key("beta", Priority::Interactive),
                key("gamma", Priority::Interactive),
                key("batch", Priority::Batch),
            ],
            Some(parse_sha256(&sha256_hex("admin")).unwrap()),
        );
        let (release, release_rx) = watch::channel(false);
        let started = Arc::new(Mutex::new(Vec::new()));
        let pool = Pool::new(Some("mock".into()));
        pool.add(Arc::new(MockBackend {
            info: ModelInfo {
                name: "mock".into(),
                version: "v1".into(),
                context_length: 4096,
            },
            release: release_rx,
            started: Arc::clone(&started),
            token_delay,
        }));
        let mut healthy = pool.watch_healthy();
        tokio::time::timeout(WAIT, healthy.wait_for(|n| *n > 0))
            .await
            .unwrap()
            .unwrap();
        let parts = RouterParts {
            pool,
            live: Live::new(keys, Admission::new(limits), reload),
            config: RouterConfig {
                limits: Default::default(),
                drain_timeout: Duration::from_secs(5),
            },
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            ferroserve_router::serve(listener, parts, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Harness {
            url,
            release,
            started,
            stop: Some(stop),
            server,
        }
    }

    async fn client(&self) -> InferenceClient<Channel> {
        InferenceClient::connect(self.url.clone()).await.unwrap()
    }

    async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::connect(self.url.clone()).await.unwrap()
    }

    async fn stop(mut self) {
        let _ = self.release.send(true);
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, self.server).await.unwrap().unwrap();
    }
}

fn request(tenant: &str, id: &str, max_tokens: u32) -> tonic::Request<pb::GenerateRequest> {
    let mut r = tonic::Request::new(pb::GenerateRequest {
        prompt: "hi".into(),
        max_tokens,
        request_id: id.into(),
        ..Default::default()
    });
    r.metadata_mut()
        .insert("authorization", format!("Bearer key-{tenant}").parse().unwrap());
    r
}

fn admin_request<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// Checks a refusal's code, named limit and retry hint (in the trailer and as RetryInfo, in agreement).
fn assert_refused(status: &Status, code: Code, limit: &str, retry: bool) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(
        status.metadata().get(LIMIT_METADATA).and_then(|v| v.to_str().ok()),
        Some(limit),
        "{status:?}"
    );
    let trailer: Option<u64> = status
        .metadata()
        .get(RETRY_AFTER_MS)
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let info = status.get_details_retry_info().and_then(|r| r.retry_delay);
    assert_eq!(trailer.is_some(), retry, "{status:?}");
    assert_eq!(
        info.map(|d| d.as_millis() as u64),
        trailer,
        "RetryInfo agrees with the trailer"
    );
}

fn server_limits(slots: u32, queue: u32) -> ServerLimits {
    ServerLimits {
        shared: TenantLimits {
            max_in_flight: Some(slots),
            ..TenantLimits::default()
        },
        max_queued_requests: queue,
        max_queued_tokens: 100_000,
    }
}

async fn remaining_tokens(h: &Harness, tenant: &str) -> f64 {
    let limits = h
        .admin()
        .await
        .get_limits(admin_request(pb::GetLimitsRequest {}, "admin"))
        .await
        .unwrap()
        .into_inner();
    limits
        .tenants
        .iter()
        .find(|t| t.tenant == tenant)
        .unwrap()
        .remaining_tokens
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_refuse_with_resource_exhausted_and_when_to_retry() {
    let alpha = TenantLimits {
        // Two at once, then one per 100 s: the third request is refused whatever the machine's speed.
        requests: Some(rate(0.01, Duration::from_secs(1), Some(2), "r").unwrap()),
        ..TenantLimits::default()
    };
    let gamma = TenantLimits {
        tokens: Some(rate(0.6, Duration::from_secs(60), Some(100), "t").unwrap()),
        ..TenantLimits::default()
    };
    let limits = AdmissionLimits {
        server: server_limits(8, 8),
        tenants: BTreeMap::from([("alpha".to_string(), alpha), ("gamma".to_string(), gamma)]),
    };
    let h = Harness::start(limits, Duration::ZERO, None).await;
    h.release.send(true).unwrap();
    let mut c = h.client().await;
    c.generate(request("alpha", "a1", 2)).await.unwrap();
    c.generate(request("alpha", "a2", 2)).await.unwrap();
    let refused = c.generate(request("alpha", "a3", 2)).await.unwrap_err();
    assert_refused(&refused, Code::ResourceExhausted, "tenant_requests", true);
    assert!(
        refused.message().contains("tenant `alpha`") && refused.message().contains("requests per second"),
        "{}",
        refused.message()
    );
    // Streams are refused the same way, and another tenant is unaffected.
    let refused = c.generate_stream(request("alpha", "a4", 2)).await.unwrap_err();
    assert_refused(&refused, Code::ResourceExhausted, "tenant_requests", true);
    c.generate(request("beta", "b1", 2)).await.unwrap();

    // Tokens: "hi" reserves 1 (estimate) + 10; the mock uses 3 + 4, so 4 come back.
    let done = c.generate(request("gamma", "g1", 10)).await.unwrap().into_inner();
    let usage = done.usage.unwrap();
    let used = f64::from(usage.prompt_tokens + usage.completion_tokens);
    let left = remaining_tokens(&h, "gamma").await;
    assert!((left - (100.0 - used)).abs() < 0.5, "left {left}, used {used}");
    let refused = c.generate(request("gamma", "g2", 95)).await.unwrap_err();
    assert_refused(&refused, Code::ResourceExhausted, "tenant_tokens", true);
    assert!(refused.message().contains("tokens per minute"), "{}", refused.message());
    let refused = c.generate(request("gamma", "g3", 150)).await.unwrap_err();
    assert_refused(&refused, Code::ResourceExhausted, "too_large", false);
    assert!(refused.message().contains("lower max_tokens"), "{}", refused.message());
    h.stop().await;
}

/// Waits (bounded) until the server reports `running` requests running and `queued` waiting.
async fn until_state(h: &Harness, running: u32, queued: u32) {
    let mut admin = h.admin().await;
    tokio::time::timeout(WAIT, async {
        loop {
            let limits = admin
                .get_limits(admin_request(pb::GetLimitsRequest {}, "admin"))
                .await
                .unwrap()
                .into_inner();
            let server = limits.server.unwrap();
            if (server.running, server.queued) == (running, queued) {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("requests reached the queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_queues_by_priority_then_sheds_with_unavailable_and_loses_nothing() {
    let limits = AdmissionLimits {
        server: server_limits(1, 2),
        tenants: BTreeMap::new(),
    };
    let h = Harness::start(limits, Duration::ZERO, None).await;
    let c = h.client().await;
    let spawn = |tenant: &'static str, id: &'static str| {
        let mut c = c.clone();
        tokio::spawn(async move { c.generate(request(tenant, id, 2)).await })
    };
    let first = spawn("alpha", "running");
    until_state(&h, 1, 0).await;
    let batch = spawn("batch", "batch");
    until_state(&h, 1, 1).await;
    let interactive = spawn("beta", "interactive");
    until_state(&h, 1, 2).await;
    let refused = c.clone().generate(request("gamma", "shed", 2)).await.unwrap_err();
    assert_refused(&refused, Code::Unavailable, "queue_full", true);
    assert!(refused.message().contains("at capacity"), "{}", refused.message());

    h.release.send(true).unwrap();
    for task in [first, batch, interactive] {
        let reply = tokio::time::timeout(WAIT, task).await.unwrap().unwrap().unwrap();
        assert_eq!(reply.into_inner().usage.unwrap().completion_tokens, 2);
    }
    let order = h.started.lock().unwrap().clone();
    assert_eq!(
        order,
        ["running", "interactive", "batch"],
        "interactive goes ahead of batch"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_cannot_be_met_is_refused_at_once() {
    let limits = AdmissionLimits {
        server: server_limits(4, 4),
        tenants: BTreeMap::new(),
    };
    // 20 ms per token, so the gate learns a TPOT to estimate with.
    let h = Harness::start(limits, Duration::from_millis(20), None).await;
    h.release.send(true).unwrap();
    let mut c = h.client().await;
    for i in 0..3 {
        c.generate(request("alpha", &format!("warm{i}"), 4)).await.unwrap();
    }
    let mut hopeless = request("alpha", "hopeless", 1000);
    hopeless.set_timeout(Duration::from_millis(300));
    let refused = c.generate(hopeless).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(
        refused.metadata().get(LIMIT_METADATA).and_then(|v| v.to_str().ok()),
        Some("deadline")
    );
    assert!(refused.message().contains("deadline (300 ms)"), "{}", refused.message());
    assert!(
        !h.started.lock().unwrap().contains(&"hopeless".to_string()),
        "no model work was spent on it"
    );
    let mut feasible = request("alpha", "feasible", 4);
    feasible.set_timeout(Duration::from_secs(20));
    c.generate(feasible).await.unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_change_live_without_disturbing_requests_in_flight() {
    let alpha = TenantLimits {
        requests: Some(rate(0.01, Duration::from_secs(1), Some(1), "r").unwrap()),
        ..TenantLimits::default()
    };
    let limits = AdmissionLimits {
        server: server_limits(4, 4),
        tenants: BTreeMap::from([("alpha".to_string(), alpha.clone()), ("beta".to_string(), alpha)]),
    };
    let reload: ferroserve_router::Reloader = Box::new(|| Err("admission.max_in_flight: must be at least 1".into()));
    let h = Harness::start(limits, Duration::ZERO, Some(reload)).await;
    let c = h.client().await;
    let in_flight = {
        let mut c = c.clone();
        tokio::spawn(async move { c.generate(request("alpha", "held", 2)).await })
    };
    until_state(&h, 1, 0).await;
    let mut admin = h.admin().await;
    let before_beta = admin
        .get_limits(admin_request(pb::GetLimitsRequest {}, "admin"))
        .await
        .unwrap()
        .into_inner()
        .tenants
        .into_iter()
        .find(|t| t.tenant == "beta")
        .unwrap();
    let refused = c.clone().generate(request("alpha", "over", 2)).await.unwrap_err();
    assert_refused(&refused, Code::ResourceExhausted, "tenant_requests", true);

    let raise = pb::SetLimitsRequest {
        tenant: "alpha".into(),
        limits: Some(pb::Limits {
            requests_per_second: Some(1000.0),
            request_burst: Some(1000),
            ..Default::default()
        }),
    };
    let status = admin
        .set_limits(admin_request(raise.clone(), "key-alpha"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let applied = admin
        .set_limits(admin_request(raise, "admin"))
        .await
        .unwrap()
        .into_inner()
        .applied
        .unwrap();
    assert_eq!(applied.limits.unwrap().requests_per_second, Some(1000.0));
    assert_eq!(applied.running, 1, "the request in flight is still running");

    let bad = pb::SetLimitsRequest {
        tenant: "alpha".into(),
        limits: Some(pb::Limits {
            tokens_per_minute: Some(-5.0),
            ..Default::default()
        }),
    };
    let status = admin.set_limits(admin_request(bad, "admin")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("tokens_per_minute"), "{}", status.message());
    let unknown = pb::SetLimitsRequest {
        tenant: "nobody".into(),
        limits: Some(pb::Limits::default()),
    };
    let status = admin.set_limits(admin_request(unknown, "admin")).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("alpha"), "{}", status.message());
    let status = admin
        .reload_config(admin_request(pb::ReloadConfigRequest {}, "admin"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("running settings stay"),
        "{}",
        status.message()
    );

    let after = admin
        .get_limits(admin_request(pb::GetLimitsRequest {}, "admin"))
        .await
        .unwrap()
        .into_inner();
    let beta = after.tenants.iter().find(|t| t.tenant == "beta").unwrap();
    let alpha = after.tenants.iter().find(|t| t.tenant == "alpha").unwrap();
    assert_eq!(beta.limits, before_beta.limits, "beta's limits are untouched");
    assert!(
        (beta.remaining_requests.unwrap() - before_beta.remaining_requests.unwrap()).abs() < 0.01,
        "beta's bucket is not reset"
    );
    assert_eq!(alpha.limits.as_ref().unwrap().requests_per_second, Some(1000.0));

    h.release.send(true).unwrap();
    let held = tokio::time::timeout(WAIT, in_flight).await.unwrap().unwrap().unwrap();
    assert_eq!(held.into_inner().usage.unwrap().completion_tokens, 2);
    c.clone().generate(request("alpha", "now-allowed", 2)).await.unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_swaps_keys_and_limits_atomically() {
    let limits = AdmissionLimits {
        server: server_limits(4, 4),
        tenants: BTreeMap::new(),
    };
    let reload: ferroserve_router::Reloader = Box::new(|| {
        let mut tenants = BTreeMap::new();
        tenants.insert(
            "delta".to_string(),
            TenantLimits {
                max_in_flight: Some(1),
                ..TenantLimits::default()
            },
        );
        Ok(LiveSettings {
            keys: KeyStore::new(
                vec![key("delta", Priority::Batch)],
                Some(parse_sha256(&sha256_hex("admin")).unwrap()),
            ),
            limits: AdmissionLimits {
                server: server_limits(4, 4),
                tenants,
            },
        })
    });
    let h = Harness::start(limits, Duration::ZERO, Some(reload)).await;
    h.release.send(true).unwrap();
    let mut c = h.client().await;
    let status = c.generate(request("delta", "d0", 2)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let summary = h
        .admin()
        .await
        .reload_config(admin_request(pb::ReloadConfigRequest {}, "admin"))
        .await
        .unwrap()
        .into_inner()
        .summary;
    assert!(summary.contains("1 API keys"), "{summary}");
    c.generate(request("delta", "d1", 2)).await.unwrap();
    let status = c.generate(request("alpha", "a1", 2)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "alpha's key was removed");
    h.stop().await;
}
