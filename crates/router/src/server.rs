//! Assembling the router's servers: the gRPC server (Inference, Admin, health and reflection) and the
//! HTTP door (http/), both on one shared [`Pipeline`] and one graceful drain.
//!
//! The gRPC layers, outermost first, and why each sits where it does (http/mod.rs lists the HTTP door's):
//! - the accept loop (ferroserve-net): connection cap, TLS and the HTTP/2 preface under a handshake
//!   timeout, before a connection costs a task of the server's;
//! - HTTP/2 limits (streams per connection, resets, header size, keepalive, connection age);
//! - [`OversizeIsInvalid`]: a request over `max_request_bytes` is refused before it is read, as the
//!   client's mistake (INVALID_ARGUMENT), not tonic's OUT_OF_RANGE;
//! - the credential interceptors: a caller is authenticated from its headers before its body is decoded,
//!   so an unknown caller costs no decoding;
//! - the services.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ferroserve_core::RequestLimits;
use ferroserve_net::{
    ConnectionLimits, Drain, DrainPlan, H2_PREFACE_BYTES, HealthSwitch, Listen, OversizeIsInvalid, ServerTls, Serving,
};
use ferroserve_proto::v1::admin_server::AdminServer;
use ferroserve_proto::v1::inference_server::InferenceServer;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};

use crate::admin::AdminService;
use crate::catalog::Catalog;
use crate::control::SharedControl;
use crate::http::{HttpDoor, HttpLimits, serve_http};
use crate::inference::{InferenceService, authorization};
use crate::live::Live;
use crate::pipeline::{Pipeline, Protocol};
use crate::registry::{LoadSpec, VersionLoader};
use crate::traffic::{Policy, PolicyAction, Traffic};
use crate::versions::Versions;
use crate::{Pool, RouterError};
use ferroserve_filter::FilterHub;

/// How often the remaining-budget gauges are refreshed: buckets refill between requests.
const BUDGET_GAUGE_INTERVAL: Duration = Duration::from_secs(1);

/// Router settings from the `[router]`, `[server]` and `[connections]` config sections.
#[derive(Clone)]
pub struct RouterConfig {
    /// Request shape limits.
    pub limits: RequestLimits,
    /// After shutdown is signalled: the pre-stop delay, then how long in-flight streams may run.
    pub drain: DrainPlan,
    /// Where the traffic policy (kill switch, splits, history) is saved, so that it survives a restart.
    pub state_file: Option<std::path::PathBuf>,
    /// Connection and HTTP/2 limits of the public listener.
    pub connections: ConnectionLimits,
    /// TLS on the public listener, if configured (reloaded on SIGHUP by the binary).
    pub tls: Option<Arc<ServerTls>>,
    /// TLS on the HTTP listener (the same certificate, offering HTTP/1.1), if configured.
    pub http_tls: Option<Arc<ServerTls>>,
    /// How long a streaming client may take no message before it is given up on (its slot returns).
    pub client_stall: Duration,
    /// How long a worker may send no event before its request moves to another worker.
    pub worker_stall: Duration,
    /// The HTTP door's own limits (`n`, the default `max_tokens`).
    pub http: HttpLimits,
}

/// Authenticates an `Inference` call from its headers and hands the tenant to the handler.
fn inference_auth(pipeline: Arc<Pipeline>) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        let tenant = pipeline.authenticate(authorization(request.metadata()), Protocol::Grpc)?;
        request.extensions_mut().insert(tenant);
        Ok(request)
    }
}

/// Checks an `Admin` call's credential from its headers.
fn admin_auth(live: Arc<Live>) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        live.keys()
            .authorize_admin(authorization(request.metadata()))
            .map_err(|e| Status::from(RouterError::from(e)))?;
        Ok(request)
    }
}

/// What the router serves with.
pub struct RouterParts {
    /// The workers.
    pub pool: Arc<Pool>,
    /// Credentials and admission limits, changeable live.
    pub live: Arc<Live>,
    /// The content filter, swappable live.
    pub filters: Arc<FilterHub>,
    /// Limits and drain.
    pub config: RouterConfig,
    /// How to load a new version into this server (`serve`); `None` for a router of remote workers.
    pub loader: Option<Arc<dyn VersionLoader>>,
    /// Versions to load in the background once serving (with `loader`).
    pub preload: Vec<LoadSpec>,
    /// Traffic policies to start with, by model name (recorded in the history as changes by `config`).
    pub policies: Vec<(String, Policy)>,
    /// Where the OpenAI-compatible HTTP API listens; `None` disables it.
    pub http: Option<TcpListener>,
    /// The sentence encoder behind `/v1/embeddings`, if loaded.
    pub embeddings: Option<Arc<ferroserve_filter::semantic::EmbedService>>,
}

/// Refreshes the remaining-budget gauges (buckets refill between requests).
fn publish_budgets(live: &Live) -> tokio::task::JoinHandle<()> {
    let admission = Arc::clone(live.admission());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(BUDGET_GAUGE_INTERVAL);
        loop {
            tick.tick().await;
            admission.publish();
        }
    })
}

/// Health follows the pool: SERVING while at least one worker is healthy.
fn follow_pool(pool: &Pool, health: HealthSwitch) -> tokio::task::JoinHandle<()> {
    let mut healthy = pool.watch_healthy();
    tokio::spawn(async move {
        loop {
            health.set(if *healthy.borrow_and_update() > 0 {
                Serving::Serving
            } else {
                Serving::NotServing
            });
            if healthy.changed().await.is_err() {
                return;
            }
        }
    })
}

/// The traffic policies: those saved before a restart, else the config's.
fn traffic(state_file: Option<std::path::PathBuf>, policies: Vec<(String, Policy)>) -> Arc<Traffic> {
    let traffic = Arc::new(Traffic::persisted(state_file));
    for (model, policy) in policies {
        if traffic.has_policy(&model) {
            tracing::info!(%model, "keeping the traffic policy saved before the restart over the config's");
        } else {
            traffic.change(&model, "config", PolicyAction::Set, "from the config at startup", |p| {
                *p = policy
            });
        }
    }
    traffic
}

/// The version control wing, starting the configured extra versions' loads.
fn versions(
    catalog: Arc<Catalog>,
    pool: Arc<Pool>,
    loader: Option<Arc<dyn VersionLoader>>,
    preload: Vec<LoadSpec>,
    limits: RequestLimits,
) -> Versions {
    let versions = Versions {
        catalog,
        pool,
        loader,
        limits,
    };
    if let Some(loader) = &versions.loader {
        for spec in preload {
            versions.start_load(loader, spec);
        }
    } else if !preload.is_empty() {
        tracing::warn!("this router has no in-process workers; the configured extra versions are not loaded");
    }
    versions
}

/// The HTTP door on `listener`: the same pipeline, the same connection limits and drain as gRPC.
fn http_door(
    listener: TcpListener,
    pipeline: &Arc<Pipeline>,
    config: &RouterConfig,
    embeddings: Option<Arc<ferroserve_filter::semantic::EmbedService>>,
    drain: ferroserve_net::DrainWatch,
) -> impl Future<Output = ()> + Send + 'static {
    let door = Arc::new(HttpDoor::new(Arc::clone(pipeline), config.http, embeddings));
    let listen = Listen {
        name: "http",
        limits: config.connections,
        tls: config.http_tls.clone(),
        first_bytes: 0,
    };
    serve_http(
        listener,
        listen,
        door,
        config.limits.max_request_bytes,
        drain,
        config.drain.prestop,
    )
}

/// Serves the public API on `listener` until `shutdown` completes, then drains as [`Drain`] describes:
/// NOT_SERVING first, the pre-stop delay, GOAWAY, and at the deadline every stream still open ends with
/// UNAVAILABLE. Health reports SERVING while at least one worker is healthy.
pub async fn serve(
    listener: TcpListener,
    parts: RouterParts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let RouterParts {
        pool,
        live,
        filters,
        config,
        loader,
        preload,
        policies,
        http,
        embeddings,
    } = parts;
    let budgets = publish_budgets(&live);
    let (switch, health) = ferroserve_net::health_service(&[
        <InferenceServer<InferenceService> as tonic::server::NamedService>::NAME,
        <AdminServer<AdminService> as tonic::server::NamedService>::NAME,
    ]);
    let follower = follow_pool(&pool, switch.clone());
    let drain = Drain::new(config.drain, switch);
    let (reflection_v1, reflection_v1alpha) = ferroserve_net::reflection_services();
    let catalog = Catalog::new(traffic(config.state_file.clone(), policies));
    let control = SharedControl::new(Arc::clone(&live), Arc::clone(&filters));
    let mut syncing = Vec::new();
    if let Some(cluster) = live.cluster() {
        syncing = catalog.join(cluster, &pool).await;
        control.join(Arc::clone(cluster)).await;
        syncing.push(tokio::spawn(Arc::clone(cluster).follow_doc(Arc::clone(&control))));
    }
    let max_request_bytes = config.limits.max_request_bytes;
    let pipeline = Arc::new(Pipeline {
        pool: Arc::clone(&pool),
        live: Arc::clone(&live),
        limits: config.limits,
        filters: Arc::clone(&filters),
        catalog: Arc::clone(&catalog),
        client_stall: config.client_stall,
        worker_stall: config.worker_stall,
        drain: drain.watch(),
    });
    let http = http.map(|listener| http_door(listener, &pipeline, &config, embeddings, drain.watch()));
    let inference = InferenceServer::new(InferenceService {
        pipeline: Arc::clone(&pipeline),
    })
    .max_decoding_message_size(max_request_bytes);
    let inference = InterceptedService::new(inference, inference_auth(Arc::clone(&pipeline)));
    let versions = versions(Arc::clone(&catalog), Arc::clone(&pool), loader, preload, config.limits);
    let admin_auth = admin_auth(Arc::clone(&live));
    let admin = AdminServer::new(AdminService {
        pool,
        live,
        filters,
        control,
        catalog,
        versions,
        drain: drain.watch(),
    })
    .max_decoding_message_size(max_request_bytes);
    let admin = InterceptedService::new(admin, admin_auth);
    let listen = Listen {
        name: "grpc",
        limits: config.connections,
        tls: config.tls.clone(),
        first_bytes: H2_PREFACE_BYTES,
    };
    let signal = drain.signal(async move {
        shutdown.await;
        follower.abort();
        budgets.abort();
        for s in syncing {
            s.abort();
        }
    });
    let server = config
        .connections
        .grpc_server()
        .layer(OversizeIsInvalid)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(inference)
        .add_service(admin)
        .serve_with_incoming_shutdown(ferroserve_net::incoming(listener, listen), signal);
    // One drain for both doors: the deadline cuts off what is still open on either.
    drain
        .run(async move {
            let http = async move {
                if let Some(http) = http {
                    http.await;
                }
            };
            let (grpc, ()) = tokio::join!(server, http);
            grpc
        })
        .await
}
