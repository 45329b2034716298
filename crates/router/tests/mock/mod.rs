//! Shared by the router's tests: a mock backend (no model) whose generations wait until the test releases
//! them, and a harness that serves the real router in front of it on 127.0.0.1.
#![allow(dead_code)]

pub mod http;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferroserve_admission::{
    Admission, AdmissionLimits, KeyStore, Priority, Tenant, TenantKey, parse_sha256, sha256_hex,
};
use ferroserve_core::{
    Backend, BackendError, Completion, Event, EventStream, FinishReason, GenerationDefaults, ModelInfo, StatsStream,
    TokenChunk, Usage, ValidRequest, WorkerStats,
};
use ferroserve_filter::FilterHub;
use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::admin_client::AdminClient;
use ferroserve_proto::v1::inference_client::InferenceClient;
use ferroserve_router::{HttpLimits, Live, Pool, Reloader, RouterConfig, RouterParts};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Bound on every wait.
pub const WAIT: Duration = Duration::from_secs(30);
/// Tokens the mock reports for any prompt.
pub const MOCK_PROMPT_TOKENS: u32 = 3;
/// Tokens a mock worker's drift baseline holds.
pub const MOCK_BASELINE_TOKENS: u64 = 64;
/// Without a script, the mock stops after this many tokens, as a model stops at EOS.
pub const MOCK_MAX_OUTPUT: u32 = 4;

/// A mock backend: no model. Each generation waits until the test opens `release`, records its request id,
/// then streams its script (or up to [`MOCK_MAX_OUTPUT`] "x" tokens), `token_delay` apart (ten times
/// that for the prompt "slow").
pub struct MockBackend {
    info: ModelInfo,
    location: String,
    release: watch::Receiver<bool>,
    started: Arc<Mutex<Vec<String>>>,
    /// Every request as the router handed it over, defaults applied.
    received: Arc<Mutex<Vec<ValidRequest>>>,
    /// `name@version` of each drift baseline taken.
    baselines: Arc<Mutex<Vec<String>>>,
    token_delay: Duration,
    script: Option<Vec<String>>,
    /// Tokens sent to routers, over all generations: shows when a generation was cancelled.
    sent: Arc<AtomicU32>,
    /// The logprob each token reports (-0.5 normally; lower for a drifting version).
    logprob: f32,
    /// The entropy each token's distribution reports.
    entropy: f32,
    /// Every generation ends in a worker error (a broken version).
    failing: bool,
    /// Generations whose router side went away before the end (the router cancelled them).
    cancelled: watch::Sender<u32>,
}

impl Backend for MockBackend {
    fn model(&self) -> &ModelInfo {
        &self.info
    }

    fn location(&self) -> &str {
        &self.location
    }

    fn generate(&self, request: ValidRequest) -> BoxFuture<'_, Result<EventStream, BackendError>> {
        let (tx, rx) = mpsc::channel(1);
        let mut release = self.release.clone();
        let started = Arc::clone(&self.started);
        self.received.lock().unwrap().push(request.clone());
        let sent = Arc::clone(&self.sent);
        let cancelled = self.cancelled.clone();
        // A prompt of "slow" takes ten times as long per token (a stream that overruns a deadline the
        // router's estimate allowed).
        let slow = matches!(&request.input, ferroserve_core::Input::Prompt(p) if p == "slow");
        let delay = if slow { self.token_delay * 10 } else { self.token_delay };
        let (logprob, entropy, failing) = (self.logprob, self.entropy, self.failing);
        let texts: Vec<String> = match &self.script {
            Some(s) => s.iter().take(request.max_tokens as usize).cloned().collect(),
            None => vec!["x".to_string(); request.max_tokens.min(MOCK_MAX_OUTPUT) as usize],
        };
        tokio::spawn(async move {
            if release.wait_for(|open| *open).await.is_err() {
                return;
            }
            started.lock().unwrap().push(request.request_id.clone());
            let n = texts.len() as u32;
            for (i, text) in texts.into_iter().enumerate() {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let chunk = TokenChunk {
                    text,
                    token_ids: vec![i as u32],
                    logprobs: vec![logprob],
                    entropies: vec![entropy],
                    details: Vec::new(),
                };
                if tx.send(Ok(Event::Token(chunk))).await.is_err() {
                    cancelled.send_modify(|n| *n += 1);
                    return;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            if failing {
                let _ = tx
                    .send(Err(BackendError::Internal("mock version is broken".into())))
                    .await;
                return;
            }
            let complete = Completion {
                finish: FinishReason::Eos,
                usage: Usage {
                    prompt_tokens: MOCK_PROMPT_TOKENS,
                    completion_tokens: n,
                    cached_tokens: 0,
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
        self.baselines.lock().unwrap().push(self.info.qualified());
        async { Ok(MOCK_BASELINE_TOKENS) }.boxed()
    }
}

/// A tenant key whose plaintext is `key-<tenant>`.
pub fn key(tenant: &str, priority: Priority) -> TenantKey {
    TenantKey {
        tenant: Tenant::new(tenant, priority),
        key_sha256: parse_sha256(&sha256_hex(&format!("key-{tenant}"))).unwrap(),
    }
}

/// How to build a harness.
pub struct Options {
    /// Admission limits.
    pub limits: AdmissionLimits,
    /// Gap between mock tokens.
    pub token_delay: Duration,
    /// What `Admin.ReloadConfig` does.
    pub reload: Option<Reloader>,
    /// The content filter.
    pub filters: Arc<FilterHub>,
    /// The mock's token texts; `None` for "x" tokens.
    pub script: Option<Vec<String>>,
    /// Versions of the `mock` model, one mock worker each (located at `mock` alone, else `mock-<version>`).
    pub versions: Vec<String>,
    /// Versions whose tokens report a logprob of -6 instead of -0.5 (token drift).
    pub drifting: Vec<String>,
    /// Versions whose tokens come from distributions with an entropy of 3 nats instead of 0.8 (a model
    /// grown unsure of itself while its sampled tokens' logprobs look normal).
    pub uncertain: Vec<String>,
    /// Versions whose every generation ends in a worker error.
    pub failing: Vec<String>,
    /// Generation defaults by version (none for the others).
    pub defaults: Vec<(String, GenerationDefaults)>,
    /// How long a streaming client may read nothing before the router gives up on it.
    pub client_stall: Duration,
}

impl Options {
    /// No filter, no script, no delay.
    pub fn new(limits: AdmissionLimits) -> Options {
        Options {
            limits,
            token_delay: Duration::ZERO,
            reload: None,
            filters: FilterHub::empty(None, 100),
            script: None,
            versions: vec!["v1".into()],
            drifting: Vec::new(),
            uncertain: Vec::new(),
            failing: Vec::new(),
            defaults: Vec::new(),
            client_stall: Duration::from_secs(30),
        }
    }
}

/// The real router, serving on 127.0.0.1 in front of one [`MockBackend`].
pub struct Harness {
    pub url: String,
    pub release: watch::Sender<bool>,
    pub started: Arc<Mutex<Vec<String>>>,
    /// Every request the mock workers received, as the router completed it.
    pub received: Arc<Mutex<Vec<ValidRequest>>>,
    /// `name@version` of each drift baseline the mock workers took.
    pub baselines: Arc<Mutex<Vec<String>>>,
    pub sent: Arc<AtomicU32>,
    /// Generations the router cancelled (their event stream was dropped before the end).
    pub cancelled: watch::Receiver<u32>,
    /// `http://addr` of the OpenAI-compatible HTTP API.
    pub http_url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl Harness {
    pub async fn start(o: Options) -> Self {
        let keys = KeyStore::new(
            vec![
                key("alpha", Priority::Interactive),
                // beta may order its own requests within -5..=5; the others may only send 0.
                TenantKey {
                    tenant: Tenant {
                        request_priorities: -5..=5,
                        ..Tenant::new("beta", Priority::Interactive)
                    },
                    ..key("beta", Priority::Interactive)
                },
                key("gamma", Priority::Interactive),
                key("batch", Priority::Batch),
            ],
            Some(parse_sha256(&sha256_hex("admin")).unwrap()),
            true,
        );
        let (release, release_rx) = watch::channel(false);
        let started = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(Mutex::new(Vec::new()));
        let baselines = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(AtomicU32::new(0));
        let (cancelled_tx, cancelled) = watch::channel(0);
        let pool = Pool::new(Some("mock".into()));
        let single = o.versions.len() == 1;
        for version in &o.versions {
            pool.add(Arc::new(MockBackend {
                info: ModelInfo {
                    name: "mock".into(),
                    version: version.clone(),
                    context_length: 4096,
                    defaults: o
                        .defaults
                        .iter()
                        .find(|(v, _)| v == version)
                        .map(|(_, d)| d.clone())
                        .unwrap_or_default(),
                },
                location: if single {
                    "mock".into()
                } else {
                    format!("mock-{version}")
                },
                release: release_rx.clone(),
                started: Arc::clone(&started),
                received: Arc::clone(&received),
                baselines: Arc::clone(&baselines),
                token_delay: o.token_delay,
                script: o.script.clone(),
                sent: Arc::clone(&sent),
                logprob: if o.drifting.contains(version) { -6.0 } else { -0.5 },
                entropy: if o.uncertain.contains(version) { 3.0 } else { 0.8 },
                failing: o.failing.contains(version),
                cancelled: cancelled_tx.clone(),
            }));
        }
        let mut healthy = pool.watch_healthy();
        let workers = o.versions.len();
        tokio::time::timeout(WAIT, healthy.wait_for(|n| *n >= workers))
            .await
            .unwrap()
            .unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_url = format!("http://{}", http.local_addr().unwrap());
        let parts = RouterParts {
            pool,
            live: Live::new(keys, Admission::new(o.limits), o.reload),
            filters: o.filters,
            config: RouterConfig {
                limits: Default::default(),
                drain: ferroserve_net::DrainPlan {
                    prestop: Duration::ZERO,
                    timeout: Duration::from_secs(5),
                },
                state_file: None,
                connections: Default::default(),
                tls: None,
                client_stall: o.client_stall,
                worker_stall: Duration::from_secs(120),
                http: HttpLimits {
                    max_n: 4,
                    default_max_tokens: 16,
                },
                http_tls: None,
            },
            loader: None,
            preload: Vec::new(),
            policies: Vec::new(),
            http: Some(http),
            embeddings: None,
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
            received,
            baselines,
            sent,
            cancelled,
            http_url,
            stop: Some(stop),
            server,
        }
    }

    pub async fn client(&self) -> InferenceClient<Channel> {
        InferenceClient::connect(self.url.clone()).await.unwrap()
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::connect(self.url.clone()).await.unwrap()
    }

    pub async fn stop(mut self) {
        let _ = self.release.send(true);
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, self.server).await.unwrap().unwrap();
    }
}

/// A prompt request from `tenant` with its key.
pub fn request(tenant: &str, id: &str, max_tokens: u32) -> tonic::Request<pb::GenerateRequest> {
    prompt_request(tenant, id, "hi", max_tokens)
}

/// A request with this prompt from `tenant`.
pub fn prompt_request(tenant: &str, id: &str, prompt: &str, max_tokens: u32) -> tonic::Request<pb::GenerateRequest> {
    let mut r = tonic::Request::new(pb::GenerateRequest {
        prompt: prompt.into(),
        max_tokens,
        request_id: id.into(),
        ..Default::default()
    });
    r.metadata_mut()
        .insert("authorization", format!("Bearer key-{tenant}").parse().unwrap());
    r
}

/// An Admin request with this bearer token.
pub fn admin_request<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}
