//! Assembling the router's gRPC server: Inference, Admin, health and reflection, with graceful drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ferroserve_proto::v1::admin_server::AdminServer;
use ferroserve_proto::v1::inference_server::InferenceServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::admin::AdminService;
use crate::inference::InferenceService;
use crate::live::Live;
use crate::observe::Observations;
use crate::registry::{LoadSpec, Registry, VersionLoader};
use crate::traffic::{InFlight, Policy, Traffic};
use crate::versions::Versions;
use crate::{Limits, Pool};
use ferroserve_filter::FilterHub;

/// How often the remaining-budget gauges are refreshed: buckets refill between requests.
const BUDGET_GAUGE_INTERVAL: Duration = Duration::from_secs(1);

/// Router settings from the `[router]` and `[server]` config sections.
#[derive(Debug, Clone, Copy)]
pub struct RouterConfig {
    /// Request shape limits.
    pub limits: Limits,
    /// After shutdown is signalled, how long in-flight streams may run before the server stops anyway.
    pub drain_timeout: Duration,
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
}

/// Serves the public API on `listener` until `shutdown` completes, then stops accepting new requests and
/// lets in-flight ones finish for at most `drain_timeout`. Health reports SERVING while at least one
/// worker is healthy.
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
    } = parts;
    let budgets = tokio::spawn({
        let admission = Arc::clone(live.admission());
        async move {
            let mut tick = tokio::time::interval(BUDGET_GAUGE_INTERVAL);
            loop {
                tick.tick().await;
                admission.publish();
            }
        }
    });
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("", ServingStatus::NotServing).await;
    reporter.set_not_serving::<InferenceServer<InferenceService>>().await;
    let mut healthy = pool.watch_healthy();
    let health_task = tokio::spawn({
        let reporter = reporter.clone();
        async move {
            loop {
                let status = if *healthy.borrow_and_update() > 0 {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                reporter.set_service_status("", status).await;
                reporter
                    .set_service_status(
                        <InferenceServer<InferenceService> as tonic::server::NamedService>::NAME,
                        status,
                    )
                    .await;
                if healthy.changed().await.is_err() {
                    return;
                }
            }
        }
    });
    let reflection = ferroserve_worker::reflection_service();
    let traffic = Arc::new(Traffic::default());
    for (model, policy) in policies {
        traffic.change(&model, "config", "set", "from the config at startup", |p| *p = policy);
    }
    let observations = Arc::new(Observations::default());
    let in_flight = Arc::new(InFlight::default());
    let inference = InferenceServer::new(InferenceService {
        pool: Arc::clone(&pool),
        live: Arc::clone(&live),
        limits: config.limits,
        filters: Arc::clone(&filters),
        traffic: Arc::clone(&traffic),
        observations: Arc::clone(&observations),
        in_flight: Arc::clone(&in_flight),
    });
    let versions = Versions {
        traffic,
        pool: Arc::clone(&pool),
        registry: Arc::new(Registry::default()),
        loader,
        limits: config.limits,
    };
    if let Some(loader) = &versions.loader {
        for spec in preload {
            versions.start_load(loader, spec);
        }
    } else if !preload.is_empty() {
        tracing::warn!("this router has no in-process workers; the configured extra versions are not loaded");
    }
    let admin = AdminServer::new(AdminService {
        pool,
        live,
        filters,
        observations,
        rollouts: Arc::default(),
        versions,
        in_flight,
    });
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(inference)
        .add_service(admin)
        // TCP_NODELAY: a token is a small write; without it, Nagle holds the next one until the client's
        // delayed ACK (up to 40 ms on Linux), which shows up in TTFT and inter-token latency.
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async move {
            shutdown.await;
            tracing::info!(drain_timeout = ?config.drain_timeout, "shutting down: no new connections, draining streams");
            health_task.abort();
            budgets.abort();
            reporter.set_service_status("", ServingStatus::NotServing).await;
            let _ = drain_tx.send(());
        });
    ferroserve_worker::drain_bounded(server, drain_rx, config.drain_timeout).await
}
