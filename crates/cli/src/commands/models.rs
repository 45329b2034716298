//! `ferroserve models list|split|disable|enable|rollback`: the operator's side of the traffic policy
//! between model versions, through the `Admin` service (admin credential required). Every change is
//! recorded with the operator's name (`--operator`, default `$USER`).

use anyhow::Context;
use clap::{Args, Subcommand};
use ferroserve_proto::v1 as pb;

use super::admin::{AdminConn, connect, status_error, with_token};

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
    /// Versions served, their traffic share, workers and state, and the recent policy changes.
    List,
    /// Sets the weighted split, e.g. `split q4_1=95 q8_0=5 --cohort beta=q8_0`.
    Split(SplitArgs),
    /// Kill switch: new requests stop reaching this version at once (pins included).
    Disable {
        /// The version label.
        #[arg(value_name = "VERSION")]
        label: String,
    },
    /// Lets a disabled version take traffic again.
    Enable {
        /// The version label.
        #[arg(value_name = "VERSION")]
        label: String,
    },
    /// Restores the traffic policy as it was before the last change.
    Rollback,
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

/// An admin call carrying the credential and the operator's name.
fn request<T>(conn: &AdminConn, operator: &str, message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut r = with_token(message, &conn.admin_token)?;
    r.metadata_mut().insert(
        "x-ferroserve-operator",
        operator.parse().context("--operator must be printable ASCII")?,
    );
    Ok(r)
}

/// Runs a models subcommand.
pub async fn run(a: ModelsArgs) -> anyhow::Result<()> {
    let mut client = connect(&a.conn).await?;
    let (model, reason) = (a.model.clone(), a.reason.clone());
    let version_request = |version: String| pb::VersionRequest {
        model: model.clone(),
        version,
        reason: reason.clone(),
    };
    let state = match a.command {
        ModelsCommand::List => {
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
        ModelsCommand::Disable { label } => {
            client
                .disable_version(request(&a.conn, &a.operator, version_request(label))?)
                .await
        }
        ModelsCommand::Enable { label } => {
            client
                .enable_version(request(&a.conn, &a.operator, version_request(label))?)
                .await
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

fn print_state(s: &pb::TrafficState) {
    println!("{}", s.model);
    println!("  {:<16} {:>7} {:>9} {:>8}", "version", "share", "state", "workers");
    for v in &s.versions {
        println!(
            "  {:<16} {:>6.1}% {:>9} {:>4}/{:<3}",
            v.version,
            v.share * 100.0,
            if v.disabled { "disabled" } else { "enabled" },
            v.healthy_workers,
            v.workers
        );
    }
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
