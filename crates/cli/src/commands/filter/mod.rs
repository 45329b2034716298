//! `ferroserve filter eval`: a filter config's mistakes on labeled prompts. `ferroserve filter list|swap|
//! enable|disable|shadow|reload|feedback`: the operator's side of live filter changes, through the `Admin`
//! service (admin credential required).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferroserve_filter::FilterConfig;
use ferroserve_filter::eval::evaluate;
use ferroserve_model::embed::Backend;
use ferroserve_proto::v1 as pb;

use super::admin::{AdminConn, connect, operator_request, status_error};

mod feedback;
mod train;

/// `ferroserve filter ...`.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: FilterCommand,
    /// Who makes a live change: recorded with each swap, shadow, enable, disable and feedback in the
    /// server's feedback store (sent as `x-ferroserve-operator`).
    #[arg(long, global = true, env = "FERROSERVE_OPERATOR", default_value = "admin")]
    pub operator: String,
}

/// The filter subcommands.
#[derive(Debug, Subcommand)]
pub enum FilterCommand {
    /// Precision, recall, FPR and FNR per category and overall, the confusion matrix and latency.
    Eval(EvalArgs),
    /// A running server's loaded filter configs, the enforcing one, on/off, and the shadow's agreement.
    List(AdminConn),
    /// Makes a loaded config (`name` or `name@version`) enforce; requests in flight keep theirs.
    Swap(NamedArgs),
    /// Switches filtering on.
    Enable(AdminConn),
    /// Switches filtering off: requests pass unjudged until enabled again.
    Disable(AdminConn),
    /// Runs a loaded config in shadow beside the active one (no name: stop the shadow).
    Shadow(ShadowArgs),
    /// Re-reads the filter directory now; invalid files are refused by name.
    Reload(AdminConn),
    /// Marks a recent request's verdict as a false positive or a false negative.
    Feedback(FeedbackArgs),
    /// Trains a new versioned filter (the classifier's head) from labelled data and a feedback store.
    Train(train::TrainArgs),
    /// Attacks a filter with mutated harmful prompts; the attack success rate, and what got through.
    Redteam(feedback::RedTeamArgs),
    /// Lists, labels and exports the feedback store.
    Review(feedback::ReviewArgs),
    /// The gate: refuses a candidate whose catch rate drops, FPR rises or latency regresses.
    Validate(feedback::ValidateArgs),
}

/// A command that names a loaded filter config.
#[derive(Debug, Args)]
pub struct NamedArgs {
    /// Connection.
    #[command(flatten)]
    pub conn: AdminConn,
    /// The config's name, or `name@version`.
    pub name: String,
}

/// `ferroserve filter shadow`.
#[derive(Debug, Args)]
pub struct ShadowArgs {
    /// Connection.
    #[command(flatten)]
    pub conn: AdminConn,
    /// The config to run in shadow; leave out to stop the shadow.
    pub name: Option<String>,
}

/// `ferroserve filter feedback`.
#[derive(Debug, Args)]
pub struct FeedbackArgs {
    /// Connection.
    #[command(flatten)]
    pub conn: AdminConn,
    /// The request id, as the client sent it or the server assigned it.
    pub request_id: String,
    /// What the reviewer found.
    #[arg(long, value_enum)]
    pub kind: Feedback,
}

/// A reviewer's finding.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Feedback {
    /// Blocked or flagged, but harmless.
    FalsePositive,
    /// Allowed, but harmful.
    FalseNegative,
}

/// `ferroserve filter eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The filter config to judge.
    #[arg(long, default_value = "configs/filters/default.toml")]
    pub config: PathBuf,
    /// Labeled prompts, one JSON object per line: {"text", "label": "block"|"allow", "category"}.
    #[arg(long)]
    pub data: PathBuf,
    /// Print a JSON object (its `overall` holds precision, recall, fpr and fnr) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Times each prompt is judged, for steadier latency figures.
    #[arg(long, default_value_t = 20)]
    pub repeats: usize,
    /// Embed with Candle's f32 BERT (the reference) instead of the int8 encoder the server runs.
    #[arg(long)]
    pub reference_embedder: bool,
    /// Judge one part of the config alone.
    #[arg(long, value_enum)]
    pub only: Option<Part>,
}

/// A part of a filter config.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Part {
    /// The `[rules]` section.
    Rules,
    /// The `[semantic]` section.
    Semantic,
    /// The `[classifier]` section.
    Classifier,
}

/// Runs a filter subcommand.
pub async fn run(args: FilterArgs) -> anyhow::Result<()> {
    let (conn, call) = match args.command {
        FilterCommand::Eval(a) => return eval(a),
        FilterCommand::Train(a) => return train::run(a),
        FilterCommand::Redteam(a) => return feedback::redteam(a),
        FilterCommand::Review(a) => return feedback::review(a),
        FilterCommand::Validate(a) => return feedback::validate(a),
        FilterCommand::List(conn) => (conn, Call::List),
        FilterCommand::Swap(a) => (a.conn, Call::Swap(a.name)),
        FilterCommand::Enable(conn) => (conn, Call::Enable),
        FilterCommand::Disable(conn) => (conn, Call::Disable),
        FilterCommand::Shadow(a) => (a.conn, Call::Shadow(a.name.unwrap_or_default())),
        FilterCommand::Reload(conn) => (conn, Call::Reload),
        FilterCommand::Feedback(a) => (a.conn, Call::Feedback(a.request_id, a.kind)),
    };
    admin(&conn, call, &args.operator).await
}

/// One Admin filter RPC.
enum Call {
    List,
    Swap(String),
    Enable,
    Disable,
    Shadow(String),
    Reload,
    Feedback(String, Feedback),
}

async fn admin(conn: &AdminConn, call: Call, operator: &str) -> anyhow::Result<()> {
    let mut client = connect(conn).await?;
    let state = match call {
        Call::List => {
            client
                .list_filters(operator_request(conn, operator, pb::ListFiltersRequest {})?)
                .await
        }
        Call::Swap(name) => {
            client
                .swap_filter(operator_request(conn, operator, pb::SwapFilterRequest { name })?)
                .await
        }
        Call::Enable => {
            client
                .enable_filter(operator_request(conn, operator, pb::EnableFilterRequest {})?)
                .await
        }
        Call::Disable => {
            client
                .disable_filter(operator_request(conn, operator, pb::DisableFilterRequest {})?)
                .await
        }
        Call::Shadow(name) => {
            client
                .set_shadow_filter(operator_request(conn, operator, pb::SetShadowFilterRequest { name })?)
                .await
        }
        Call::Reload => {
            let r = client
                .reload_filters(operator_request(conn, operator, pb::ReloadFiltersRequest {})?)
                .await
                .map_err(status_error)?
                .into_inner();
            for refused in &r.refused {
                println!("refused: {refused}");
            }
            Ok(tonic::Response::new(r.filters.unwrap_or_default()))
        }
        Call::Feedback(request_id, kind) => {
            let kind = match kind {
                Feedback::FalsePositive => pb::FeedbackKind::FalsePositive,
                Feedback::FalseNegative => pb::FeedbackKind::FalseNegative,
            };
            let r = client
                .report_filter_feedback(operator_request(
                    conn,
                    operator,
                    pb::ReportFilterFeedbackRequest {
                        request_id,
                        kind: kind as i32,
                    },
                )?)
                .await
                .map_err(status_error)?
                .into_inner();
            let v = r.verdict.unwrap_or_default();
            println!(
                "counted against {} (verdict: {} stage, category {:?})",
                r.filter, v.stage, v.category
            );
            return Ok(());
        }
    };
    print_state(&state.map_err(status_error)?.into_inner());
    Ok(())
}

fn print_state(s: &pb::ListFiltersResponse) {
    let or_none = |v: &str| {
        if v.is_empty() {
            "(none)".to_string()
        } else {
            v.to_string()
        }
    };
    println!(
        "active {}  filtering {}  shadow {}",
        or_none(&s.active),
        if s.enabled { "on" } else { "off" },
        or_none(&s.shadow)
    );
    if let Some(a) = s.shadow_agreement.filter(|_| !s.shadow.is_empty()) {
        println!(
            "shadow agreement: both block {}, both allow {}, only shadow blocks {}, only active blocks {}",
            a.agree_block, a.agree_allow, a.shadow_only_block, a.active_only_block
        );
    }
    for f in &s.loaded {
        println!("  {:<24} {}  ({})", f.id, f.description, f.path);
        if !f.on_failure.is_empty() {
            // Texts its semantic part could not embed, and what they got (fail open or closed).
            println!(
                "  {:<24} embedding failures {} (on_error {})",
                "", f.failures, f.on_failure
            );
        }
    }
}

/// Loads the embedding model (fetched into the cache on first use) for the filter commands that judge or
/// train offline.
fn embeddings(backend: Backend) -> anyhow::Result<()> {
    super::install_embeddings(
        &ferroserve_model::fetch::default_cache_dir(),
        &crate::progress::Bars::default(),
        backend,
    )
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let mut config = FilterConfig::load(&a.config)?;
    let has = |present: bool, section: &str| {
        if present {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "{} has no {section} section to judge alone",
                a.config.display()
            ))
        }
    };
    match a.only {
        Some(Part::Rules) => (config.semantic, config.classifier) = (None, None),
        Some(Part::Semantic) => {
            has(config.semantic.is_some(), "[semantic]")?;
            (config.rules.categories, config.classifier) = (Vec::new(), None);
        }
        Some(Part::Classifier) => {
            has(config.classifier.is_some(), "[classifier]")?;
            (config.rules.categories, config.semantic) = (Vec::new(), None);
        }
        None => {}
    }
    if config.needs_embeddings() {
        embeddings(if a.reference_embedder {
            Backend::Candle
        } else {
            Backend::Int8
        })?;
    }
    let filter = config
        .compile()
        .with_context(|| format!("{} does not compile", a.config.display()))?;
    let examples = train::read_files(std::slice::from_ref(&a.data))?;
    let report = evaluate(&filter, &examples, a.repeats);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
