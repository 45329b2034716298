//! `ferroserve.v1.Admin`: the operator's view and controls: workers, drift baselines, admission limits and
//! config reloads. Every call needs the admin credential, checked by the interceptor in server.rs before
//! the request body is decoded.

use std::pin::Pin;
use std::sync::Arc;

use ferroserve_core::VersionId;
use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::admin_server::Admin;
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use ferroserve_admission::{LimitsPatch, LimitsView};
use ferroserve_filter::store::Step;
use ferroserve_filter::{Feedback, FilterHub};

use crate::catalog::Catalog;
use crate::control::SharedControl;
use crate::live::Live;
use crate::pool::Pool;
use crate::versions::{self, Versions};
use crate::{ModelSelector, RouterError};

/// The admin service.
pub(crate) struct AdminService {
    /// The workers to report on.
    pub pool: Arc<Pool>,
    /// Credentials (only the admin one opens this service) and the limits it changes.
    pub live: Arc<Live>,
    /// The content filter it controls.
    pub filters: Arc<FilterHub>,
    /// Filter selection and limit changes, shared with the fleet.
    pub control: Arc<SharedControl>,
    /// The versions, their traffic, rollouts, outcomes and in-flight cancel handles.
    pub catalog: Arc<Catalog>,
    /// The Admin calls on versions and traffic, over the catalog.
    pub versions: Versions,
    /// The server's shutdown: watch streams end as soon as it drains.
    pub drain: ferroserve_net::DrainWatch,
}

fn filters_to_wire(hub: &FilterHub) -> pb::ListFiltersResponse {
    let selection = hub.selection();
    pb::ListFiltersResponse {
        loaded: hub
            .library()
            .iter()
            .map(|l| {
                let (failures, on_failure) = l.filter.failures().unwrap_or((0, ""));
                pb::FilterInfo {
                    id: l.id.clone(),
                    description: l.description.clone(),
                    path: l.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                    failures,
                    on_failure: on_failure.to_string(),
                }
            })
            .collect(),
        active: selection.active.as_ref().map(|a| a.id.clone()).unwrap_or_default(),
        enabled: selection.enabled,
        shadow: selection.shadow.as_ref().map(|a| a.id.clone()).unwrap_or_default(),
        shadow_agreement: selection.shadow.as_ref().map(|_| {
            let [agree_block, agree_allow, shadow_only_block, active_only_block] = hub.shadow_stats().counts();
            pb::ShadowAgreement {
                agree_block,
                agree_allow,
                shadow_only_block,
                active_only_block,
            }
        }),
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

fn fleet_to_wire(s: ferroserve_cluster::ClusterState) -> pb::FleetState {
    let mode = match s.mode {
        ferroserve_cluster::Mode::Shared => pb::FleetMode::Shared,
        ferroserve_cluster::Mode::Degraded => pb::FleetMode::Degraded,
    };
    pb::FleetState {
        mode: mode as i32,
        replicas: s.replicas,
        replica: s.replica,
        seconds_in_mode: s.since.as_secs_f64(),
        last_error: s.last_error.unwrap_or_default(),
    }
}

fn limits_to_wire(v: LimitsView) -> pb::LimitsState {
    let l = &v.limits;
    pb::LimitsState {
        tenant: v.name,
        limits: Some(pb::Limits {
            requests_per_second: l.requests.map(|r| r.amount),
            request_burst: l.requests.map(|r| r.burst),
            tokens_per_minute: l.tokens.map(|r| r.amount),
            token_burst: l.tokens.map(|r| r.burst),
            max_in_flight: l.max_in_flight,
            max_queued_requests: None,
            max_queued_tokens: None,
        }),
        remaining_requests: v.remaining_requests,
        remaining_tokens: v.remaining_tokens,
        running: v.running,
        queued: v.queued,
    }
}

fn patch_from_wire(l: pb::Limits) -> LimitsPatch {
    LimitsPatch {
        requests_per_second: l.requests_per_second,
        request_burst: l.request_burst,
        tokens_per_minute: l.tokens_per_minute,
        token_burst: l.token_burst,
        max_in_flight: l.max_in_flight,
        max_queued_requests: l.max_queued_requests,
        max_queued_tokens: l.max_queued_tokens,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    type WatchWorkersStream = Pin<Box<dyn Stream<Item = Result<pb::ListWorkersResponse, Status>> + Send>>;

    async fn list_workers(
        &self,
        _: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        Ok(Response::new(report(&self.pool)))
    }

    async fn snapshot_drift_baseline(
        &self,
        request: Request<pb::SnapshotDriftBaselineRequest>,
    ) -> Result<Response<pb::SnapshotDriftBaselineResponse>, Status> {
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
        _: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<Self::WatchWorkersStream>, Status> {
        let pool = Arc::clone(&self.pool);
        let changes = WatchStream::new(self.pool.watch_healthy());
        // A watch must not hold a drain open: it ends as soon as the server drains.
        let draining = self.drain.reached(ferroserve_net::Phase::Draining);
        Ok(Response::new(
            changes.map(move |_| Ok(report(&pool))).take_until(draining).boxed(),
        ))
    }

    async fn get_limits(&self, _: Request<pb::GetLimitsRequest>) -> Result<Response<pb::GetLimitsResponse>, Status> {
        let snapshot = self.live.admission().snapshot();
        let mut server = limits_to_wire(snapshot.server);
        if let Some(l) = server.limits.as_mut() {
            let queue = self.live.admission().queue_limits();
            l.max_queued_requests = Some(queue.0);
            l.max_queued_tokens = Some(queue.1);
        }
        Ok(Response::new(pb::GetLimitsResponse {
            server: Some(server),
            tenants: snapshot.tenants.into_iter().map(limits_to_wire).collect(),
            fleet: self.live.cluster().map(|c| fleet_to_wire(c.state())),
        }))
    }

    async fn set_limits(
        &self,
        request: Request<pb::SetLimitsRequest>,
    ) -> Result<Response<pb::SetLimitsResponse>, Status> {
        let request = request.into_inner();
        let patch = patch_from_wire(request.limits.unwrap_or_default());
        let tenant = Some(request.tenant.as_str()).filter(|t| !t.is_empty());
        let applied = self.control.set_limits(tenant, &patch).await?;
        tracing::info!(tenant = tenant.unwrap_or("(server)"), ?patch, "limits changed");
        Ok(Response::new(pb::SetLimitsResponse {
            applied: Some(limits_to_wire(applied)),
        }))
    }

    async fn reload_config(
        &self,
        _: Request<pb::ReloadConfigRequest>,
    ) -> Result<Response<pb::ReloadConfigResponse>, Status> {
        let summary = self.live.reload().map_err(RouterError::Reload)?;
        Ok(Response::new(pb::ReloadConfigResponse { summary }))
    }

    async fn list_filters(
        &self,
        _: Request<pb::ListFiltersRequest>,
    ) -> Result<Response<pb::ListFiltersResponse>, Status> {
        Ok(Response::new(filters_to_wire(&self.filters)))
    }

    async fn swap_filter(
        &self,
        request: Request<pb::SwapFilterRequest>,
    ) -> Result<Response<pb::ListFiltersResponse>, Status> {
        let who = versions::operator(request.metadata());
        let name = request.into_inner().name;
        self.control
            .select_filter(|hub| {
                let promoted = hub.swap_checked(&name).map_err(RouterError::from)?;
                hub.record_step(Step::Promote, &promoted.id, &who);
                Ok(())
            })
            .await?;
        Ok(Response::new(filters_to_wire(&self.filters)))
    }

    async fn enable_filter(
        &self,
        request: Request<pb::EnableFilterRequest>,
    ) -> Result<Response<pb::ListFiltersResponse>, Status> {
        let who = versions::operator(request.metadata());
        self.control
            .select_filter(|hub| {
                hub.set_enabled(true);
                hub.record_step(Step::Enable, "", &who);
                Ok(())
            })
            .await?;
        Ok(Response::new(filters_to_wire(&self.filters)))
    }

    async fn disable_filter(
        &self,
        request: Request<pb::DisableFilterRequest>,
    ) -> Result<Response<pb::ListFiltersResponse>, Status> {
        let who = versions::operator(request.metadata());
        self.control
            .select_filter(|hub| {
                hub.set_enabled(false);
                hub.record_step(Step::Disable, "", &who);
                Ok(())
            })
            .await?;
        Ok(Response::new(filters_to_wire(&self.filters)))
    }

    async fn set_shadow_filter(
        &self,
        request: Request<pb::SetShadowFilterRequest>,
    ) -> Result<Response<pb::ListFiltersResponse>, Status> {
        let who = versions::operator(request.metadata());
        let name = request.into_inner().name;
        let shadow = Some(name.as_str()).filter(|n| !n.is_empty());
        self.control
            .select_filter(|hub| {
                let set = hub.set_shadow(shadow).map_err(RouterError::from)?;
                hub.record_step(Step::Shadow, set.as_ref().map_or("", |s| s.id.as_str()), &who);
                Ok(())
            })
            .await?;
        Ok(Response::new(filters_to_wire(&self.filters)))
    }

    async fn reload_filters(
        &self,
        _: Request<pb::ReloadFiltersRequest>,
    ) -> Result<Response<pb::ReloadFiltersResponse>, Status> {
        let refused = self.filters.reload();
        Ok(Response::new(pb::ReloadFiltersResponse {
            refused,
            filters: Some(filters_to_wire(&self.filters)),
        }))
    }

    async fn report_filter_feedback(
        &self,
        request: Request<pb::ReportFilterFeedbackRequest>,
    ) -> Result<Response<pb::ReportFilterFeedbackResponse>, Status> {
        let who = versions::operator(request.metadata());
        let request = request.into_inner();
        let kind = match pb::FeedbackKind::try_from(request.kind) {
            Ok(pb::FeedbackKind::FalsePositive) => Feedback::FalsePositive,
            Ok(pb::FeedbackKind::FalseNegative) => Feedback::FalseNegative,
            _ => {
                return Err(RouterError::Invalid {
                    field: "kind".into(),
                    message: "set FEEDBACK_KIND_FALSE_POSITIVE or FEEDBACK_KIND_FALSE_NEGATIVE".into(),
                }
                .into());
            }
        };
        let recorded = self
            .filters
            .feedback(&request.request_id, kind, &who)
            .map_err(RouterError::from)?;
        Ok(Response::new(pb::ReportFilterFeedbackResponse {
            verdict: Some(crate::relay::verdict_to_wire(
                &recorded.filter,
                recorded.stage.label(),
                &recorded.verdict,
            )),
            filter: recorded.filter,
        }))
    }

    async fn list_versions(
        &self,
        request: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        Ok(Response::new(self.versions.list(request.get_ref())?))
    }

    async fn get_traffic(&self, request: Request<pb::GetTrafficRequest>) -> Result<Response<pb::TrafficState>, Status> {
        Ok(Response::new(self.versions.get(request.get_ref())?))
    }

    async fn set_traffic(&self, request: Request<pb::SetTrafficRequest>) -> Result<Response<pb::TrafficState>, Status> {
        let who = versions::operator(request.metadata());
        Ok(Response::new(self.versions.set(&who, request.into_inner()).await?))
    }

    async fn disable_version(
        &self,
        request: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        let who = versions::operator(request.metadata());
        let r = request.into_inner();
        let (cancel, version) = (r.cancel_in_flight, r.version.clone());
        let state = self.versions.switch(&who, r, true).await?;
        if cancel {
            // After the switch: nothing new reaches the version, and what runs there now ends (in a fleet,
            // every replica cancels its own when it applies the change).
            self.catalog.in_flight.cancel(&VersionId::new(&state.model, version));
        }
        Ok(Response::new(state))
    }

    async fn enable_version(&self, request: Request<pb::VersionRequest>) -> Result<Response<pb::TrafficState>, Status> {
        let who = versions::operator(request.metadata());
        Ok(Response::new(
            self.versions.switch(&who, request.into_inner(), false).await?,
        ))
    }

    async fn rollback_traffic(
        &self,
        request: Request<pb::RollbackTrafficRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        let who = versions::operator(request.metadata());
        Ok(Response::new(self.versions.rollback(&who, request.into_inner()).await?))
    }

    async fn start_rollout(
        &self,
        request: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<pb::RolloutState>, Status> {
        let plan = versions::rollout_plan(&self.pool, request.into_inner())?;
        let (traffic, observations) = (
            Arc::clone(&self.catalog.traffic),
            Arc::clone(&self.catalog.observations),
        );
        let pool = Arc::clone(&self.pool);
        Ok(Response::new(
            self.catalog.rollouts.start(plan, traffic, observations, pool).await?,
        ))
    }

    async fn get_rollout(&self, request: Request<pb::GetRolloutRequest>) -> Result<Response<pb::RolloutState>, Status> {
        let model = versions::model(&self.pool, &request.get_ref().model)?;
        Ok(Response::new(self.catalog.rollouts.state(&model)))
    }

    async fn load_version(
        &self,
        request: Request<pb::LoadVersionRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        let state = self.versions.load(request.into_inner())?;
        Ok(Response::new(state))
    }

    async fn unload_version(&self, request: Request<pb::VersionRequest>) -> Result<Response<pb::TrafficState>, Status> {
        let who = versions::operator(request.metadata());
        let state = self.versions.unload(&who, request.into_inner()).await?;
        Ok(Response::new(state))
    }
}
