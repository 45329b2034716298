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
use ferroserve_net::{
    ConnectionLimits, Drain, DrainPlan, DrainWatch, H2_PREFACE_BYTES, Listen, OversizeIsInvalid, Phase, ServerTls,
    Serving, TokenHash,
};
use ferroserve_proto::worker as pb;
use ferroserve_proto::worker::worker_server::{Worker, WorkerServer};
use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::BackendSlot;
use crate::convert::{describe_to_wire, error_to_status, event_to_wire, request_from_wire, stats_to_wire};

/// How often `WatchStats` repeats the latest counters when nothing changes.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// How the worker server behaves.
#[derive(Clone)]
pub struct WorkerServerConfig {
    /// After shutdown is signalled: the pre-stop delay, then how long in-flight streams may run.
    pub drain: DrainPlan,
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
    /// The server's shutdown: at its deadline, streams still open end with UNAVAILABLE.
    drain: DrainWatch,
    /// `Generate` response streams not yet finished: a draining worker ends its stats streams only once
    /// every completion is out, so that the router never takes the end for a failure of a finished request.
    open: Arc<watch::Sender<usize>>,
}

/// Counts one open `Generate` stream while it lives.
struct OpenStream(Arc<watch::Sender<usize>>);

impl OpenStream {
    fn new(open: &Arc<watch::Sender<usize>>) -> OpenStream {
        open.send_modify(|n| *n += 1);
        OpenStream(Arc::clone(open))
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
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
        let cut_off = self.drain.reached(Phase::CutOff);
        tokio::spawn(async move {
            tokio::pin!(cut_off);
            loop {
                tokio::select! {
                    _ = tx.closed() => break,
                    () = &mut cut_off => {
                        // The router continues it on another worker.
                        let _ = tx.try_send(Err(Status::unavailable("this worker's drain deadline passed")));
                        return;
                    }
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
        // Counted open until the response stream is dropped: after its last message, or when cancelled.
        let open = OpenStream::new(&self.open);
        let stream = ReceiverStream::new(rx).map(move |m| {
            let _counted = &open;
            m
        });
        Ok(Response::new(stream.boxed()))
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
        // Each change at once, and the latest again every HEARTBEAT when nothing changes: the router
        // takes silence as a hung worker. The stream ends when the backend's does (a dead engine).
        let beats = futures::stream::unfold((stats, None), |(mut stats, last)| async move {
            let next = match last {
                None => stats.next().await,
                Some(last) => match tokio::time::timeout(HEARTBEAT, stats.next()).await {
                    Ok(next) => next,
                    Err(_) => Some(last),
                },
            }?;
            Some((next, (stats, Some(next))))
        });
        // Once the worker drains and every Generate stream has sent its last message, the stream ends: the
        // router stops counting on the worker, and the drain need not wait for this stream.
        let (drain, mut open) = (self.drain.clone(), self.open.subscribe());
        let drained = async move {
            drain.reached(Phase::Draining).await;
            let _ = open.wait_for(|n| *n == 0).await;
        };
        let beats = beats.take_until(drained);
        Ok(Response::new(beats.map(|s| Ok(stats_to_wire(s))).boxed()))
    }
}

/// Serves the worker contract on `listener` until `shutdown` completes, then drains as
/// [`ferroserve_net::Drain`] describes; work that had not started goes back to the router, which sends
/// it to another worker. Health is NOT_SERVING until `backend` is filled and `ready` resolves, and again
/// if the engine dies.
pub async fn serve(
    listener: TcpListener,
    backend: BackendSlot,
    ready: impl Future<Output = ()> + Send + 'static,
    config: WorkerServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (switch, health) =
        ferroserve_net::health_service(&[<WorkerServer<WorkerService> as tonic::server::NamedService>::NAME]);
    let (reflection_v1, reflection_v1alpha) = ferroserve_net::reflection_services();
    let health_task = tokio::spawn({
        let (switch, backend) = (switch.clone(), backend.clone());
        async move {
            ready.await;
            let Some(backend) = backend.get() else { return };
            switch.set(Serving::Serving);
            // The backend's stats stream ends when its engine dies for good.
            let mut stats = backend.watch_stats();
            while stats.next().await.is_some() {}
            tracing::error!("the engine has stopped; the worker reports NOT_SERVING");
            switch.set(Serving::NotServing);
        }
    });
    let drain = Drain::new(config.drain, switch);
    let service = WorkerServer::new(WorkerService {
        backend: backend.clone(),
        limits: config.limits,
        drain: drain.watch(),
        open: Arc::new(watch::Sender::new(0)),
    })
    .max_decoding_message_size(config.limits.max_request_bytes);
    let service = InterceptedService::new(service, token_check(config.token));
    let listen = Listen {
        name: "worker",
        limits: config.connections,
        tls: config.tls.clone(),
        first_bytes: H2_PREFACE_BYTES,
    };
    let signal = drain.signal(async move {
        shutdown.await;
        // What has not started goes back to the router now, while the listener still accepts.
        if let Some(b) = backend.get() {
            b.drain();
        }
    });
    let server = config
        .connections
        .grpc_server()
        .layer(OversizeIsInvalid)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(ferroserve_net::incoming(listener, listen), signal);
    let result = drain.run(server).await;
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
