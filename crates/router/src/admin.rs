//! `ferroserve.v1.Admin`: the operator's view. Later issues add model, filter and limit control here.

use std::pin::Pin;
use std::sync::Arc;

use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::admin_server::Admin;
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use ferroserve_admission::KeyStore;

use crate::inference::authorization;
use crate::pool::Pool;
use crate::{ModelSelector, RouterError};

/// The admin service.
pub(crate) struct AdminService {
    /// The workers to report on.
    pub pool: Arc<Pool>,
    /// Who may call it: only the admin credential.
    pub keys: Arc<KeyStore>,
}

impl AdminService {
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.keys
            .authorize_admin(authorization(request.metadata()))
            .map_err(|e| RouterError::from(e).into())
    }
}

fn report(pool: &Pool) -> pb::ListWorkersResponse {
    let default = pool.default_name();
    let workers = pool
        .workers()
        .into_iter()
        .map(|w| pb::WorkerInfo {
            address: w.location,
            in_flight: w.in_flight,
            healthy: w.healthy,
            models: vec![pb::ModelInfo {
                is_default: default.as_deref() == Some(w.model.name.as_str()),
                name: w.model.name,
                version: w.model.version,
                context_length: w.model.context_length,
            }],
        })
        .collect();
    pb::ListWorkersResponse { workers }
}

#[tonic::async_trait]
impl Admin for AdminService {
    type WatchWorkersStream = Pin<Box<dyn Stream<Item = Result<pb::ListWorkersResponse, Status>> + Send>>;

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(report(&self.pool)))
    }

    async fn snapshot_drift_baseline(
        &self,
        request: Request<pb::SnapshotDriftBaselineRequest>,
    ) -> Result<Response<pb::SnapshotDriftBaselineResponse>, Status> {
        self.authorize(&request)?;
        let selector = ModelSelector::parse(&request.into_inner().model)?;
        let backends = self.pool.matching(&selector)?;
        let mut reply = pb::SnapshotDriftBaselineResponse::default();
        for backend in backends {
            reply.tokens += backend.snapshot_drift_baseline().await.map_err(RouterError::from)?;
            reply.workers += 1;
        }
        tracing::info!(workers = reply.workers, tokens = reply.tokens, "drift baseline taken");
        Ok(Response::new(reply))
    }

    async fn watch_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<Self::WatchWorkersStream>, Status> {
        self.authorize(&request)?;
        let pool = Arc::clone(&self.pool);
        let changes = WatchStream::new(self.pool.watch_healthy());
        Ok(Response::new(changes.map(move |_| Ok(report(&pool))).boxed()))
    }
}
