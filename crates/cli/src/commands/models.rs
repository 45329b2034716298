//! `ferroserve models list|history|split|disable|enable|rollback|load|unload|rollout`: the operator's side of the traffic policy
//! between model versions, through the `Admin` service (admin credential required). Every change is
//! recorded with the operator's name (`--operator`, default `$USER`).

use anyhow::Context;
use clap::{Args, Subcommand};
use ferroserve_proto::v1 as pb;

use super::admin::{AdminConn, connect, operator_request as request, status_error};

/// `ferroserve models ...`.
#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Connection.
    #[command(flatten)]
    pub conn: AdminConn,
    /// The model [default: the server's default model].
    #[arg(long, global = true, default_value = "")]
    pub model: String,
    /// Who makes the change, for the history.
    #[arg(long, global = true, env = "USER", default_value = "admin")]
    pub operator: String,
    /// Why, for the history.
    #[arg(long, global = true, default_value = "")]
    pub reason: String,
    /// What to do.
    #[command(subcommand)]
    pub command: ModelsCommand,
}

/// The models subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Every version: state, traffic share, healthy workers, requests in flight, generation defaults.
    List,
    /// The split, the cohorts and the recent policy changes (who, when, what).
    History,
    /// Sets the weighted split, e.g. `split q4_1=95 q8_0=5 --cohort beta=q8_0`.
    Split(SplitArgs),
    /// Kill switch: new requests stop reaching this version at once (pins included).
    Disable {
        /// The version label.
        #[arg(value_name = "VERSION")]
        label: String,
        /// Also cancel its requests in flight (they end with UNAVAILABLE and the reason) instead of
        /// letting them finish.
        #[arg(long)]
        cancel_in_flight: bool,
    },
    /// Lets a disabled version take traffic again.
    Enable {
        /// The version label.
        #[arg(value_name = "VERSION")]
        label: String,
    },
    /// Restores the traffic policy as it was before the last change.
    Rollback,
    /// Loads a new version into the server (`serve`) from a GGUF path, in the background.
    Load(LoadArgs),
    /// Takes a version out of the pool; its requests in flight finish.
    Unload {
        /// The version label.
        #[arg(value_name = "VERSION")]
        label: String,
    },
    /// Starts an automatic canary analysis from a plan file (see configs/rollouts/canary.toml).
    Rollout(RolloutArgs),
    /// The rollout's status, step and decisions.
    RolloutStatus,
}

/// `ferroserve models load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The new version's label, e.g. `q8_0`.
    #[arg(value_name = "VERSION")]
    pub label: String,
    /// The GGUF file, on the server's machine.
    #[arg(long)]
    pub path: std::path::PathBuf,
    /// The version's system prompt [default: the server's].
    #[arg(long, default_value = "")]
    pub system_prompt: String,
    /// Its sampling for requests that send none; any flag sets the version's sampling, the others at their
    /// request defaults [default: the server's].
    #[command(flatten)]
    pub sampling: crate::config::SamplingSettings,
    /// A stop string added to every request's own; repeat for more [default: the server's].
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Require this `ferroserve model validate` report to have passed for the same file.
    #[arg(long)]
    pub validation_report: Option<std::path::PathBuf>,
}

/// `ferroserve models rollout`.
#[derive(Debug, Args)]
pub struct RolloutArgs {
    /// The plan: baseline, canary, steps and thresholds (TOML).
    #[arg(long)]
    pub plan: std::path::PathBuf,
    /// Overrides the plan's baseline version.
    #[arg(long)]
    pub baseline: Option<String>,
    /// Overrides the plan's canary version.
    #[arg(long)]
    pub canary: Option<String>,
}

/// A rollout plan file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    baseline: String,
    canary: String,
    steps: Vec<StepFile>,
    #[serde(default)]
    thresholds: ThresholdsFile,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    weight: u32,
    min_duration_secs: f64,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ThresholdsFile {
    min_requests: u32,
    max_error_rate_increase: f64,
    max_ttft_p95_ratio: f64,
    max_itl_p95_ratio: f64,
    max_block_rate_increase: f64,
    max_logprob_drop: f64,
    max_length_change: f64,
    max_entropy_increase: f64,
    window_secs: f64,
}

fn read_plan(a: &RolloutArgs, model: &str) -> anyhow::Result<pb::StartRolloutRequest> {
    let text = std::fs::read_to_string(&a.plan).with_context(|| format!("cannot read {}", a.plan.display()))?;
    let p: PlanFile = toml::from_str(&text).with_context(|| format!("{}", a.plan.display()))?;
    let t = p.thresholds;
    Ok(pb::StartRolloutRequest {
        model: model.to_string(),
        baseline: a.baseline.clone().unwrap_or(p.baseline),
        canary: a.canary.clone().unwrap_or(p.canary),
        steps: p
            .steps
            .iter()
            .map(|s| pb::RolloutStep {
                weight: s.weight,
                min_duration_ms: (s.min_duration_secs.max(0.0) * 1000.0) as u64,
            })
            .collect(),
        thresholds: Some(pb::RolloutThresholds {
            min_requests: t.min_requests,
            max_error_rate_increase: t.max_error_rate_increase,
            max_ttft_p95_ratio: t.max_ttft_p95_ratio,
            max_itl_p95_ratio: t.max_itl_p95_ratio,
            max_block_rate_increase: t.max_block_rate_increase,
            max_logprob_drop: t.max_logprob_drop,
            max_length_change: t.max_length_change,
            max_entropy_increase: t.max_entropy_increase,
            window_ms: (t.window_secs.max(0.0) * 1000.0) as u64,
        }),
    })
}

fn print_rollout(r: &pb::RolloutState) {
    println!("{} rollout: {} ({} -> {})", r.model, r.status, r.baseline, r.canary);
    for (i, s) in r.steps.iter().enumerate() {
        let mark = if i as u32 == r.step { ">" } else { " " };
        println!(
            "  {mark} step {}: {:>3} % for at least {} ms",
            i + 1,
            s.weight,
            s.min_duration_ms
        );
    }
    for d in &r.decisions {
        println!("  {d}");
    }
}

/// `ferroserve models split`.
#[derive(Debug, Args)]
pub struct SplitArgs {
    /// `version=weight` pairs; weights are relative.
    #[arg(required = true)]
    pub weights: Vec<String>,
    /// `cohort=version`: requests with header `x-ferroserve-cohort: cohort` get that version.
    #[arg(long = "cohort")]
    pub cohorts: Vec<String>,
}

fn pairs(items: &[String], what: &str) -> anyhow::Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|item| {
            item.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("`{item}`: write {what}"))
        })
        .collect()
}

/// Runs a models subcommand.
pub async fn run(a: ModelsArgs) -> anyhow::Result<()> {
    let mut client = connect(&a.conn).await?;
    let (model, reason) = (a.model.clone(), a.reason.clone());
    let version_request = |version: String| pb::VersionRequest {
        model: model.clone(),
        version,
        reason: reason.clone(),
        cancel_in_flight: false,
    };
    let state = match a.command {
        ModelsCommand::List => {
            let message = pb::ListVersionsRequest { model: model.clone() };
            let list = client
                .list_versions(request(&a.conn, &a.operator, message)?)
                .await
                .map_err(status_error)?;
            let list = list.into_inner();
            print_versions(&list.model, &list.versions);
            return Ok(());
        }
        ModelsCommand::History => {
            client
                .get_traffic(request(
                    &a.conn,
                    &a.operator,
                    pb::GetTrafficRequest { model: model.clone() },
                )?)
                .await
        }
        ModelsCommand::Split(s) => {
            let weights = pairs(&s.weights, "version=weight")?
                .into_iter()
                .map(|(v, w)| {
                    Ok((
                        v,
                        w.parse::<u32>()
                            .with_context(|| format!("weight `{w}` is not a whole number"))?,
                    ))
                })
                .collect::<anyhow::Result<_>>()?;
            let cohorts = pairs(&s.cohorts, "cohort=version")?.into_iter().collect();
            let message = pb::SetTrafficRequest {
                model: model.clone(),
                weights,
                cohorts,
                reason: reason.clone(),
            };
            client.set_traffic(request(&a.conn, &a.operator, message)?).await
        }
        ModelsCommand::Disable {
            label,
            cancel_in_flight,
        } => {
            let message = pb::VersionRequest {
                cancel_in_flight,
                ..version_request(label)
            };
            client.disable_version(request(&a.conn, &a.operator, message)?).await
        }
        ModelsCommand::Enable { label } => {
            client
                .enable_version(request(&a.conn, &a.operator, version_request(label))?)
                .await
        }
        ModelsCommand::Load(l) => {
            let absolute = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            let message = pb::LoadVersionRequest {
                model: model.clone(),
                version: l.label,
                path: absolute(&l.path).display().to_string(),
                system_prompt: l.system_prompt,
                sampling: l.sampling.any().then(|| l.sampling.to_wire()),
                stop: l.stop,
                validation_report: l
                    .validation_report
                    .map(|r| absolute(&r).display().to_string())
                    .unwrap_or_default(),
            };
            client.load_version(request(&a.conn, &a.operator, message)?).await
        }
        ModelsCommand::Unload { label } => {
            client
                .unload_version(request(&a.conn, &a.operator, version_request(label))?)
                .await
        }
        ModelsCommand::Rollout(r) => {
            let message = read_plan(&r, &model)?;
            let state = client
                .start_rollout(request(&a.conn, &a.operator, message)?)
                .await
                .map_err(status_error)?;
            print_rollout(&state.into_inner());
            return Ok(());
        }
        ModelsCommand::RolloutStatus => {
            let message = pb::GetRolloutRequest { model: model.clone() };
            let state = client
                .get_rollout(request(&a.conn, &a.operator, message)?)
                .await
                .map_err(status_error)?;
            print_rollout(&state.into_inner());
            return Ok(());
        }
        ModelsCommand::Rollback => {
            let message = pb::RollbackTrafficRequest {
                model: model.clone(),
                reason: reason.clone(),
            };
            client.rollback_traffic(request(&a.conn, &a.operator, message)?).await
        }
    };
    print_state(&state.map_err(status_error)?.into_inner());
    Ok(())
}

fn print_versions(model: &str, versions: &[pb::VersionState]) {
    println!("{model}");
    println!(
        "  {:<16} {:<12} {:>7} {:>8} {:>9}  defaults",
        "version", "state", "share", "workers", "in flight"
    );
    for v in versions {
        println!(
            "  {:<16} {:<12} {:>6.1}% {:>4}/{:<3} {:>9}  {}",
            v.version,
            v.state,
            v.share * 100.0,
            v.healthy_workers,
            v.workers,
            v.in_flight,
            defaults_summary(v)
        );
    }
}

/// A version's generation defaults in one line: `sampling ...; stop [...]; system "..."`.
fn defaults_summary(v: &pb::VersionState) -> String {
    let sampling = match &v.sampling {
        None => "greedy".to_string(),
        Some(s) => format!(
            "temperature {} top_p {} top_k {} repetition_penalty {}",
            s.temperature,
            s.top_p.unwrap_or(1.0),
            s.top_k,
            s.repetition_penalty.unwrap_or(1.0)
        ),
    };
    let mut parts = vec![sampling];
    if !v.stop.is_empty() {
        parts.push(format!("stop {:?}", v.stop));
    }
    if !v.system_prompt.is_empty() {
        parts.push(format!("system {:?}", v.system_prompt));
    }
    parts.join("; ")
}

fn print_state(s: &pb::TrafficState) {
    print_versions(&s.model, &s.versions);
    if s.weights.is_empty() {
        println!("  no split: unpinned requests go to the least loaded worker of any version");
    }
    for (cohort, version) in &s.cohorts {
        println!("  cohort {cohort} -> {version}");
    }
    if !s.history.is_empty() {
        println!("recent changes:");
        for c in s.history.iter().rev().take(10).rev() {
            println!("  {} {:<6} {:<8} {}", c.at_unix_ms, c.who, c.action, c.summary);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_rollout_plan_reads_and_flags_override_it() {
        let plan = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/rollouts/canary.toml");
        let args = RolloutArgs {
            plan,
            baseline: None,
            canary: Some("q4_0".into()),
        };
        let r = read_plan(&args, "m").unwrap();
        assert_eq!((r.baseline.as_str(), r.canary.as_str()), ("q4_1", "q4_0"));
        let weights: Vec<u32> = r.steps.iter().map(|s| s.weight).collect();
        assert_eq!(weights, [5, 25, 100]);
        assert_eq!(r.steps[0].min_duration_ms, 60_000);
        let t = r.thresholds.unwrap();
        assert_eq!((t.min_requests, t.window_ms), (20, 60_000));
        assert!(t.max_logprob_drop > 0.0 && t.max_error_rate_increase > 0.0);
    }

    #[test]
    fn a_plan_with_an_unknown_key_is_refused_by_name() {
        let path = std::env::temp_dir().join(format!("ferroserve-plan-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "baseline = \"a\"\ncanary = \"b\"\nsteps = []\n[thresholds]\nmax_errors = 1\n",
        )
        .unwrap();
        let args = RolloutArgs {
            plan: path.clone(),
            baseline: None,
            canary: None,
        };
        let err = format!("{:#}", read_plan(&args, "m").unwrap_err());
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains("max_errors"), "{err}");
    }
}
