//! A [`Backend`] that is a worker process across the network.

use std::time::Duration;

use ferroserve_core::{Backend, BackendError, EventStream, ModelInfo, StatsStream, ValidRequest};
use ferroserve_net::ClientTlsFiles;
use ferroserve_proto::worker as pb;
use ferroserve_proto::worker::worker_client::WorkerClient;
use futures::StreamExt;
use futures::future::BoxFuture;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::convert::{describe_from_wire, event_from_wire, request_to_wire, stats_from_wire, status_to_error};

/// How a router reaches its workers: TLS for `https://` addresses, and the shared secret.
#[derive(Clone)]
pub struct WorkerClientConfig {
    /// CA and client certificate (mTLS) for `https://` workers.
    pub tls: ClientTlsFiles,
    /// The internal-plane token, sent as a bearer token on every call.
    pub token: Option<String>,
    /// HTTP/2 keepalive pings on the worker connection: their interval, and how long one may go unanswered
    /// before the connection (and every stream on it) is closed.
    pub keepalive: (Duration, Duration),
    /// A worker whose stats stream (heartbeat every second) is silent this long is marked unhealthy.
    pub heartbeat_timeout: Duration,
}

impl Default for WorkerClientConfig {
    fn default() -> Self {
        WorkerClientConfig {
            tls: ClientTlsFiles::default(),
            token: None,
            keepalive: (Duration::from_secs(10), Duration::from_secs(5)),
            heartbeat_timeout: Duration::from_secs(5),
        }
    }
}

impl std::fmt::Debug for WorkerClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerClientConfig")
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .finish()
    }
}

/// Adds the internal-plane token to every call.
#[derive(Clone)]
pub struct AddToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for AddToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A connected worker. The channel reconnects by itself if the worker restarts.
pub struct RemoteWorker {
    /// `http://host:port`, for logs and the admin API.
    address: String,
    /// The model it reported when we connected.
    info: ModelInfo,
    /// Cheap to clone; one HTTP/2 connection multiplexes every request.
    client: WorkerClient<InterceptedService<Channel, AddToken>>,
    /// Silence on the stats stream for this long ends it.
    heartbeat_timeout: Duration,
}

impl RemoteWorker {
    /// Connects to `address` and asks which model it serves. Fails if the worker is unreachable or still
    /// loading; callers retry.
    pub async fn connect(address: &str, config: &WorkerClientConfig) -> Result<RemoteWorker, BackendError> {
        let unavailable = |e: &dyn std::fmt::Display| BackendError::Unavailable(format!("worker {address}: {e}"));
        let (every, answer_within) = config.keepalive;
        let endpoint = ferroserve_net::endpoint(address, &config.tls)
            .map_err(|e| unavailable(&e))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(every)
            .keep_alive_timeout(answer_within)
            .keep_alive_while_idle(true)
            .tcp_keepalive(Some(Duration::from_secs(30)));
        let channel = endpoint.connect().await.map_err(|e| unavailable(&e))?;
        let token = config
            .token
            .as_ref()
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .map_err(|_| unavailable(&"the worker token is not valid header text"))?;
        let mut client = WorkerClient::with_interceptor(channel, AddToken(token));
        let described = client
            .describe(pb::DescribeRequest {})
            .await
            .map_err(|s| status_to_error(s, address))?
            .into_inner();
        Ok(RemoteWorker {
            address: address.to_string(),
            info: describe_from_wire(described),
            client,
            heartbeat_timeout: config.heartbeat_timeout,
        })
    }
}

impl Backend for RemoteWorker {
    fn model(&self) -> &ModelInfo {
        &self.info
    }

    fn location(&self) -> &str {
        &self.address
    }

    fn generate(&self, request: ValidRequest) -> BoxFuture<'_, Result<EventStream, BackendError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let stream = client
                .generate(request_to_wire(&request))
                .await
                .map_err(|s| status_to_error(s, &self.address))?
                .into_inner();
            let address = self.address.clone();
            Ok(stream
                .map(move |item| match item {
                    Ok(event) => event_from_wire(event),
                    Err(status) => Err(status_to_error(status, &address)),
                })
                .boxed())
        })
    }

    fn snapshot_drift_baseline(&self) -> BoxFuture<'_, Result<u64, BackendError>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            Ok(client
                .snapshot_drift_baseline(pb::SnapshotDriftBaselineRequest {})
                .await
                .map_err(|s| status_to_error(s, &self.address))?
                .into_inner()
                .tokens)
        })
    }

    fn reidentify(&self) -> BoxFuture<'_, Option<std::sync::Arc<dyn Backend>>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            // A hung worker must not hang the pool's follower: it asks again on its next round.
            let described = tokio::time::timeout(Duration::from_secs(5), client.describe(pb::DescribeRequest {}))
                .await
                .ok()?
                .ok()?
                .into_inner();
            let info = describe_from_wire(described);
            (info != self.info).then(|| {
                tracing::info!(worker = %self.address, was = %self.info.qualified(), now = %info.qualified(), "the worker came back serving something else");
                std::sync::Arc::new(RemoteWorker {
                    address: self.address.clone(),
                    info,
                    client: self.client.clone(),
                    heartbeat_timeout: self.heartbeat_timeout,
                }) as std::sync::Arc<dyn Backend>
            })
        })
    }

    fn watch_stats(&self) -> StatsStream {
        let mut client = self.client.clone();
        let heartbeat = self.heartbeat_timeout;
        let stats = futures::stream::once(async move { client.watch_stats(pb::WatchStatsRequest {}).await })
            .filter_map(|r| async move { r.ok().map(|resp| resp.into_inner()) })
            .flatten()
            .take_while(|r| futures::future::ready(r.is_ok()))
            .filter_map(|r| async move { r.ok().map(stats_from_wire) })
            .boxed();
        // The worker sends at least one message a second; silence for `heartbeat` means it stopped
        // answering (a hung process, a partition without a reset), and the stream ends.
        futures::stream::unfold(stats, move |mut stats| async move {
            match tokio::time::timeout(heartbeat, stats.next()).await {
                Ok(Some(s)) => Some((s, stats)),
                Ok(None) | Err(_) => None,
            }
        })
        .boxed()
    }
}
