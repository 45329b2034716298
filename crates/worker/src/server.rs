//! The worker's gRPC server: the internal contract around one backend, plus health and reflection.

use std::future::Future;
use std::time::Duration;

use ferroserve_proto::worker as pb;
use ferroserve_proto::worker::worker_server::{Worker, WorkerServer};
use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::BackendSlot;
use crate::convert::{describe_to_wire, error_to_status, event_to_wire, request_from_wire, stats_to_wire};

/// How the worker server behaves.
#[derive(Debug, Clone, Copy)]
pub struct WorkerServerConfig {
    /// After shutdown is signalled, how long in-flight streams may run before the server stops anyway.
    pub drain_timeout: Duration,
}

/// Gives the router what the backend produces, nothing more: the router already validated and filtered.
struct WorkerService {
    /// The engine, once loaded.
    backend: BackendSlot,
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
        let request = request_from_wire(request.into_inner())?;
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
    let reflection = reflection_service();
    let health_task = tokio::spawn({
        let reporter = reporter.clone();
        async move {
            ready.await;
            mark_serving(&reporter).await;
            reporter.set_service_status("", ServingStatus::Serving).await;
        }
    });
    let service = WorkerServer::new(WorkerService { backend });
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(service)
        // TCP_NODELAY: a token is a small write; without it, Nagle holds the next one until the client's
        // delayed ACK (up to 40 ms on Linux), which shows up in TTFT and inter-token latency.
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async move {
            shutdown.await;
            reporter.set_service_status("", ServingStatus::NotServing).await;
            let _ = drain_tx.send(());
        });
    let result = drain_bounded(server, drain_rx, config.drain_timeout).await;
    health_task.abort();
    result
}

/// gRPC server reflection over Ferroserve's and the health service's descriptors, for every server.
pub fn reflection_service()
-> tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ferroserve_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the compiled-in descriptor sets are valid")
}

/// Runs a server future; once shutdown starts, gives it at most `timeout` to finish draining.
pub async fn drain_bounded<E>(
    server: impl Future<Output = Result<(), E>>,
    started: tokio::sync::oneshot::Receiver<()>,
    timeout: Duration,
) -> Result<(), E> {
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r,
        _ = async { if started.await.is_err() { std::future::pending::<()>().await } } => {
            match tokio::time::timeout(timeout, &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(?timeout, "drain timeout passed; stopping with streams still open");
                    Ok(())
                }
            }
        }
    }
}
