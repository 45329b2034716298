//! The worker's gRPC server: the internal contract around one backend, plus health and reflection.
//!
//! The internal plane is authenticated: with a shared secret (`worker.token_sha256`) every Worker call
//! must carry it as a bearer token, checked before the body is decoded; with `worker.tls_client_ca`
//! the router must present a certificate that CA signed (mTLS). The worker trusts nothing else it is
//! sent either: every request meets the router's field limits again here.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ferroserve_core::RequestLimits;
use ferroserve_net::{ConnectionLimits, H2_PREFACE_BYTES, Listen, OversizeIsInvalid, ServerTls, TokenHash};
use ferroserve_proto::worker as pb;
use ferroserve_proto::worker::worker_server::{Worker, WorkerServer};
use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::BackendSlot;
use crate::convert::{describe_to_wire, error_to_status, event_to_wire, request_from_wire, stats_to_wire};

/// How the worker server behaves.
#[derive(Clone)]
pub struct WorkerServerConfig {
    /// After shutdown is signalled, how long in-flight streams may run before the server stops anyway.
    pub drain_timeout: Duration,
    /// Connection and HTTP/2 limits of the worker listener.
    pub connections: ConnectionLimits,
    /// TLS on the worker listener; with a client CA, routers must present a certificate (mTLS).
    pub tls: Option<Arc<ServerTls>>,
    /// The shared secret's hash every Worker call must present; `None` accepts any caller (loopback, or
    /// mTLS).
    pub token: Option<TokenHash>,
    /// The field limits every request must meet, as at the router.
    pub limits: RequestLimits,
}

/// A work request decoded from the wire and checked against the field limits the router applies: the
/// worker re-checks what it is sent rather than trust whoever reached its port.
pub fn check_work_request(
    request: pb::WorkRequest,
    limits: &RequestLimits,
) -> Result<ferroserve_core::ValidRequest, Status> {
    let request = request_from_wire(request)?;
    limits
        .check(&request)
        .map_err(|v| Status::invalid_argument(v.to_string()))?;
    Ok(request)
}

/// Gives the router what the backend produces, nothing more: the router already validated and filtered.
struct WorkerService {
    /// The engine, once loaded.
    backend: BackendSlot,
    /// The field limits, checked again here.
    limits: RequestLimits,
}

type BoxStream<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl WorkerService {
    fn backend(&self) -> Result<&std::sync::Arc<dyn ferroserve_core::Backend>, Status> {
        self.backend
            .get()
            .ok_or_else(|| Status::unavailable("the worker is still loading its model; retry shortly"))
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    type GenerateStream = BoxStream<pb::WorkEvent>;
    type WatchStatsStream = BoxStream<pb::WorkerStats>;

    async fn generate(&self, request: Request<pb::WorkRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let request = check_work_request(request.into_inner(), &self.limits)?;
        let id = request.request_id.clone();
        let mut events = self.backend()?.generate(request).await.map_err(error_to_status)?;
        // Forward through a bounded channel; when the router goes away the send fails or `closed()` fires,
        // this task ends and drops `events`, which cancels the generation in the engine.
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => break,
                    next = events.next() => match next {
                        Some(item) => {
                            if tx.send(item.map(event_to_wire).map_err(error_to_status)).await.is_err() {
                                break;
                            }
                        }
                        None => return,
                    },
                }
            }
            tracing::debug!(request_id = %id, "router left; dropping the generation");
        });
        Ok(Response::new(ReceiverStream::new(rx).boxed()))
    }

    async fn describe(&self, _: Request<pb::DescribeRequest>) -> Result<Response<pb::DescribeResponse>, Status> {
        Ok(Response::new(describe_to_wire(self.backend()?.model())))
    }

    async fn snapshot_drift_baseline(
        &self,
        _: Request<pb::SnapshotDriftBaselineRequest>,
    ) -> Result<Response<pb::SnapshotDriftBaselineResponse>, Status> {
        let tokens = self
            .backend()?
            .snapshot_drift_baseline()
            .await
            .map_err(error_to_status)?;
        Ok(Response::new(pb::SnapshotDriftBaselineResponse { tokens }))
    }

    async fn watch_stats(&self, _: Request<pb::WatchStatsRequest>) -> Result<Response<Self::WatchStatsStream>, Status> {
        let stats = self.backend()?.watch_stats();
        Ok(Response::new(stats.map(|s| Ok(stats_to_wire(s))).boxed()))
    }
}

/// Marks the worker service SERVING once its backend is in the slot.
async fn mark_serving(reporter: &HealthReporter) {
    reporter.set_serving::<WorkerServer<WorkerService>>().await;
}

/// Serves the worker contract on `listener` until `shutdown` completes, then drains for at most
/// `drain_timeout`. Health is NOT_SERVING until `backend` is filled and `ready` resolves.
pub async fn serve(
    listener: TcpListener,
    backend: BackendSlot,
    ready: impl Future<Output = ()> + Send + 'static,
    config: WorkerServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("", ServingStatus::NotServing).await;
    reporter.set_not_serving::<WorkerServer<WorkerService>>().await;
    let (reflection_v1, reflection_v1alpha) = ferroserve_net::reflection_services();
    let health_task = tokio::spawn({
        let reporter = reporter.clone();
        async move {
            ready.await;
            mark_serving(&reporter).await;
            reporter.set_service_status("", ServingStatus::Serving).await;
        }
    });
    let service = WorkerServer::new(WorkerService {
        backend,
        limits: config.limits,
    })
    .max_decoding_message_size(config.limits.max_request_bytes);
    let service = InterceptedService::new(service, token_check(config.token));
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let listen = Listen {
        name: "worker",
        limits: config.connections,
        tls: config.tls.clone(),
        first_bytes: H2_PREFACE_BYTES,
    };
    let server = config
        .connections
        .grpc_server()
        .layer(OversizeIsInvalid)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(ferroserve_net::incoming(listener, listen), async move {
            shutdown.await;
            reporter.set_service_status("", ServingStatus::NotServing).await;
            let _ = drain_tx.send(());
        });
    let result = ferroserve_net::drain_bounded(server, drain_rx, config.drain_timeout).await;
    health_task.abort();
    result
}

/// Refuses a Worker call without the shared secret, before its body is decoded.
fn token_check(token: Option<TokenHash>) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let Some(token) = &token else {
            return Ok(request);
        };
        let presented = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        if token.admits(presented) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "this worker needs the internal-plane token: send `authorization: Bearer <token>` \
                 (the router's router.worker_token_file or FERROSERVE_WORKER_TOKEN)",
            ))
        }
    }
}
