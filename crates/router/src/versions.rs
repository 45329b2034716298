//! The `Admin` traffic RPCs: checking an operator's change against the versions the workers serve, applying
//! it to the [`Traffic`] policy, and reporting the state back.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferroserve_core::VersionId;
use ferroserve_proto::v1 as pb;

use crate::RouterError;
use crate::catalog::Catalog;
use crate::pool::Pool;
use crate::registry::{LoadSpec, Phase, Progress, VersionLoader};
use crate::rollout::Plan;
use crate::traffic::{Policy, PolicyAction};
use ferroserve_core::RequestLimits;

/// The admin call's header naming the operator, for the history.
pub(crate) const OPERATOR_HEADER: &str = "x-ferroserve-operator";

/// The operator named by an admin call, or `admin`.
pub(crate) fn operator(metadata: &tonic::metadata::MetadataMap) -> String {
    metadata
        .get(OPERATOR_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .unwrap_or("admin")
        .to_string()
}

/// The model a call names: its `model` field, or the default model.
pub(crate) fn model(pool: &Pool, requested: &str) -> Result<String, RouterError> {
    let name = if requested.is_empty() {
        pool.default_name().ok_or_else(|| RouterError::NoWorker {
            model: "the default model".into(),
            reason: "no worker has joined yet".into(),
        })?
    } else {
        requested.to_string()
    };
    if pool.models().iter().any(|m| m.name == name) {
        Ok(name)
    } else {
        Err(RouterError::ModelNotFound {
            requested: name,
            available: pool.models().iter().map(|m| m.name.clone()).collect(),
        })
    }
}

fn check_version(pool: &Pool, name: &str, version: &str, field: &str) -> Result<(), RouterError> {
    let served = pool.versions(name);
    if served.iter().any(|v| v == version) {
        return Ok(());
    }
    Err(RouterError::Invalid {
        field: field.into(),
        message: format!(
            "no worker serves {name}@{version}; versions served: {}",
            served.join(", ")
        ),
    })
}

/// The version controls behind the `Admin` RPCs: the traffic policy, the workers, and the loads.
pub(crate) struct Versions {
    /// The traffic policy and the load phases.
    pub catalog: Arc<Catalog>,
    /// The workers, of every version.
    pub pool: Arc<Pool>,
    /// How to load a version into this server, when it can.
    pub loader: Option<Arc<dyn VersionLoader>>,
    /// Request shape limits, which a loaded version's stop strings also meet.
    pub limits: RequestLimits,
}

impl Versions {
    /// The traffic state of `name`: its policy, each version's state, share and workers, and the history.
    fn state(&self, name: &str) -> pb::TrafficState {
        let policy = self.catalog.traffic.policy(name);
        let workers = self.pool.workers();
        let mut versions = self.pool.versions(name);
        for v in policy
            .weights
            .keys()
            .cloned()
            .chain(self.catalog.registry.versions(name))
        {
            if !versions.contains(&v) {
                versions.push(v);
            }
        }
        let enabled_weight = |v: &str| {
            if policy.disabled.contains(v) {
                0
            } else {
                u64::from(policy.weights.get(v).copied().unwrap_or(0))
            }
        };
        let total: u64 = versions.iter().map(|v| enabled_weight(v)).sum();
        let version_states = versions
            .iter()
            .map(|v| {
                let of_version = workers.iter().filter(|w| w.model.name == name && w.model.version == *v);
                let in_flight: u32 = of_version.clone().map(|w| w.in_flight).sum();
                let defaults = of_version
                    .clone()
                    .next()
                    .map(|w| w.model.defaults.clone())
                    .unwrap_or_default();
                let phase = if policy.disabled.contains(v) {
                    if in_flight > 0 {
                        Phase::Draining
                    } else {
                        Phase::Disabled
                    }
                } else if of_version.clone().next().is_some() {
                    Phase::Ready
                } else {
                    self.catalog
                        .registry
                        .get(&VersionId::new(name, v))
                        .unwrap_or(Phase::Unloaded)
                };
                let (wire_phase, load_percent, failure) = phase.to_wire();
                pb::VersionState {
                    version: v.clone(),
                    state: phase.to_string(),
                    phase: wire_phase as i32,
                    load_percent,
                    failure,
                    share: if total == 0 {
                        0.0
                    } else {
                        enabled_weight(v) as f64 / total as f64
                    },
                    disabled: policy.disabled.contains(v),
                    healthy_workers: of_version.clone().filter(|w| w.healthy).count() as u32,
                    workers: of_version.count() as u32,
                    in_flight,
                    system_prompt: defaults.system_prompt.unwrap_or_default(),
                    sampling: defaults.sampling.map(|s| pb::SamplingParams {
                        temperature: s.temperature,
                        top_p: Some(s.top_p),
                        top_k: s.top_k,
                        seed: None,
                        repetition_penalty: Some(s.repetition_penalty),
                        ignore_eos: false,
                        presence_penalty: Some(s.presence_penalty),
                        frequency_penalty: Some(s.frequency_penalty),
                    }),
                    stop: defaults.stop,
                }
            })
            .collect();
        pb::TrafficState {
            model: name.to_string(),
            weights: policy.weights.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            cohorts: policy.cohorts.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            versions: version_states,
            history: self
                .catalog
                .traffic
                .history()
                .into_iter()
                .map(|c| pb::PolicyChange {
                    at_unix_ms: c.at_unix_ms,
                    who: c.who,
                    action: c.action.label().into(),
                    kind: c.action.to_wire() as i32,
                    summary: c.summary,
                })
                .collect(),
        }
    }

    /// `ListVersions`: the versions part of the traffic state.
    pub(crate) fn list(&self, r: &pb::ListVersionsRequest) -> Result<pb::ListVersionsResponse, RouterError> {
        let name = model(&self.pool, &r.model)?;
        let s = self.state(&name);
        Ok(pb::ListVersionsResponse {
            model: s.model,
            versions: s.versions,
        })
    }

    /// `GetTraffic`.
    pub(crate) fn get(&self, r: &pb::GetTrafficRequest) -> Result<pb::TrafficState, RouterError> {
        let name = model(&self.pool, &r.model)?;
        Ok(self.state(&name))
    }

    /// `SetTraffic`: every version named must be served, and some weight must be above zero.
    pub(crate) async fn set(&self, who: &str, r: pb::SetTrafficRequest) -> Result<pb::TrafficState, RouterError> {
        let name = model(&self.pool, &r.model)?;
        for version in r.weights.keys() {
            check_version(&self.pool, &name, version, &format!("weights[{version}]"))?;
        }
        for (cohort, version) in &r.cohorts {
            check_version(&self.pool, &name, version, &format!("cohorts[{cohort}]"))?;
        }
        if !r.weights.is_empty() && r.weights.values().all(|w| *w == 0) {
            return Err(RouterError::Invalid {
                field: "weights".into(),
                message: "at least one version needs a weight above 0".into(),
            });
        }
        let weights: BTreeMap<String, u32> = r.weights.into_iter().collect();
        let cohorts: BTreeMap<String, String> = r.cohorts.into_iter().collect();
        self.catalog
            .traffic
            .commit(&name, who, PolicyAction::Set, &r.reason, |p: &mut Policy| {
                p.weights = weights.clone();
                p.cohorts = cohorts.clone();
            })
            .await?;
        Ok(self.state(&name))
    }

    /// `DisableVersion` and `EnableVersion`. A disable with `cancel_in_flight` also counts a cancellation,
    /// which every replica (this one included) carries out on its requests in flight on that version.
    pub(crate) async fn switch(
        &self,
        who: &str,
        r: pb::VersionRequest,
        disable: bool,
    ) -> Result<pb::TrafficState, RouterError> {
        let name = model(&self.pool, &r.model)?;
        check_version(&self.pool, &name, &r.version, "version")?;
        let action = if disable {
            PolicyAction::Disable
        } else {
            PolicyAction::Enable
        };
        let cancel = disable && r.cancel_in_flight;
        self.catalog
            .traffic
            .commit(&name, who, action, &r.reason, |p| {
                if disable {
                    p.disabled.insert(r.version.clone());
                } else {
                    p.disabled.remove(&r.version);
                }
                if cancel {
                    *p.cancels.entry(r.version.clone()).or_insert(0) += 1;
                }
            })
            .await?;
        Ok(self.state(&name))
    }

    /// `RollbackTraffic`.
    pub(crate) async fn rollback(
        &self,
        who: &str,
        r: pb::RollbackTrafficRequest,
    ) -> Result<pb::TrafficState, RouterError> {
        let name = model(&self.pool, &r.model)?;
        self.catalog
            .traffic
            .commit_rollback(&name, who, &r.reason)
            .await?
            .ok_or_else(|| RouterError::Invalid {
                field: "model".into(),
                message: format!("{name} has no earlier traffic policy to roll back to"),
            })?;
        Ok(self.state(&name))
    }

    /// `LoadVersion`: checks the request, then loads in the background; the state says `loading` at once.
    pub(crate) fn load(&self, r: pb::LoadVersionRequest) -> Result<pb::TrafficState, RouterError> {
        let invalid = |field: &str, message: String| RouterError::Invalid {
            field: field.into(),
            message,
        };
        let loader = self.loader.as_ref().ok_or_else(|| {
            invalid(
                "path",
                "this router has no in-process workers and cannot load a model; start `ferroserve worker \
             --model-path FILE --model-version V` and route to it"
                    .into(),
            )
        })?;
        let name = model(&self.pool, &r.model)?;
        if r.version.is_empty() || r.version.contains('@') {
            return Err(invalid("version", "give a label without `@`, e.g. q8_0".into()));
        }
        let qualified = VersionId::new(&name, &r.version);
        if self.pool.versions(&name).contains(&r.version)
            || matches!(self.catalog.registry.get(&qualified), Some(Phase::Loading { .. }))
        {
            return Err(invalid(
                "version",
                format!("{qualified} is already loaded or loading; unload it first"),
            ));
        }
        let path = std::path::PathBuf::from(&r.path);
        if !path.is_file() {
            return Err(invalid("path", format!("{} is not a file on the server", r.path)));
        }
        if !r.validation_report.is_empty() {
            check_validation(&r.validation_report, &path)?;
        }
        let defaults = crate::generation_defaults(&r.system_prompt, r.sampling, r.stop, &self.limits)?;
        let spec = LoadSpec {
            name: name.clone(),
            version: r.version,
            path,
            defaults,
        };
        self.start_load(loader, spec);
        Ok(self.state(&name))
    }

    /// Loads `spec` in the background: `loading`, then `ready` (it joins the pool) or `failed: why` (nothing
    /// else changes).
    pub(crate) fn start_load(&self, loader: &Arc<dyn VersionLoader>, spec: LoadSpec) {
        let qualified = VersionId::new(&spec.name, &spec.version);
        self.catalog.registry.set(&qualified, Phase::Loading { percent: 0 });
        let progress: Progress = {
            let (registry, qualified) = (Arc::clone(&self.catalog.registry), qualified.clone());
            Arc::new(move |done: f32| {
                let percent = (done.clamp(0.0, 1.0) * 100.0).round() as u8;
                registry.set(&qualified, Phase::Loading { percent });
            })
        };
        let (pool, registry, load) = (
            Arc::clone(&self.pool),
            Arc::clone(&self.catalog.registry),
            loader.load(spec, progress),
        );
        tokio::spawn(async move {
            match load.await {
                Ok(backend) => {
                    pool.add(backend);
                    registry.set(&qualified, Phase::Ready);
                }
                Err(e) => {
                    tracing::warn!(version = %qualified, error = %e, "loading a version failed; nothing changed");
                    registry.set(&qualified, Phase::Failed(e));
                }
            }
        });
    }

    /// `UnloadVersion`: refused for a model's last version, so that unloading never leaves it unserved.
    pub(crate) async fn unload(&self, who: &str, r: pb::VersionRequest) -> Result<pb::TrafficState, RouterError> {
        let name = model(&self.pool, &r.model)?;
        check_version(&self.pool, &name, &r.version, "version")?;
        if self.pool.versions(&name).len() < 2 {
            return Err(RouterError::Invalid {
                field: "version".into(),
                message: format!(
                    "{name}@{} is the last version serving {name}; load another first",
                    r.version
                ),
            });
        }
        let version = r.version.clone();
        self.catalog
            .traffic
            .commit(&name, who, PolicyAction::Unload, &r.reason, |p| {
                p.weights.remove(&version);
                p.cohorts.retain(|_, v| *v != version);
                p.disabled.remove(&version);
            })
            .await?;
        self.pool.remove_version(&name, &r.version);
        self.catalog
            .registry
            .set(&VersionId::new(&name, &r.version), Phase::Unloaded);
        Ok(self.state(&name))
    }
}

/// `StartRollout`: both versions served and different, at least one step, weights 1 to 100.
pub(crate) fn rollout_plan(pool: &Pool, r: pb::StartRolloutRequest) -> Result<Plan, RouterError> {
    let name = model(pool, &r.model)?;
    check_version(pool, &name, &r.baseline, "baseline")?;
    check_version(pool, &name, &r.canary, "canary")?;
    let invalid = |field: &str, message: String| RouterError::Invalid {
        field: field.into(),
        message,
    };
    if r.baseline == r.canary {
        return Err(invalid("canary", "the canary must differ from the baseline".into()));
    }
    if r.steps.is_empty() {
        return Err(invalid("steps", "give at least one step, e.g. 5 % for 60 s".into()));
    }
    for (i, s) in r.steps.iter().enumerate() {
        if !(1..=100).contains(&s.weight) {
            return Err(invalid(
                &format!("steps[{i}].weight"),
                format!("{} is not a percentage from 1 to 100", s.weight),
            ));
        }
    }
    Ok(Plan {
        model: name,
        baseline: r.baseline,
        canary: r.canary,
        steps: r
            .steps
            .iter()
            .map(|s| (s.weight, std::time::Duration::from_millis(s.min_duration_ms)))
            .collect(),
        thresholds: r.thresholds.unwrap_or_default(),
    })
}

/// The report must be a passed validation of this very file.
fn check_validation(report: &str, candidate: &std::path::Path) -> Result<(), RouterError> {
    let invalid = |message: String| RouterError::Invalid {
        field: "validation_report".into(),
        message,
    };
    let text = std::fs::read_to_string(report).map_err(|e| invalid(format!("cannot read {report}: {e}")))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(format!("{report} is not a validation report: {e}")))?;
    let same = |p: &str| {
        let a = std::path::Path::new(p).canonicalize().ok();
        a.is_some() && a == candidate.canonicalize().ok()
    };
    if !json["candidate"].as_str().is_some_and(same) {
        return Err(invalid(format!(
            "{report} validated {}, not {}",
            json["candidate"],
            candidate.display()
        )));
    }
    if json["passed"] != serde_json::Value::Bool(true) {
        return Err(invalid(format!(
            "{report} says the candidate failed validation; fix it or load without a report"
        )));
    }
    Ok(())
}
