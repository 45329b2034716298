//! `ferroserve filter eval`: a filter config's mistakes on labeled prompts.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferroserve_filter::FilterConfig;
use ferroserve_filter::eval::{evaluate, read_examples};
use ferroserve_model::embed::Backend;

/// `ferroserve filter ...`.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: FilterCommand,
}

/// The filter subcommands.
#[derive(Debug, Subcommand)]
pub enum FilterCommand {
    /// Precision, recall, FPR and FNR per category and overall, the confusion matrix and latency.
    Eval(EvalArgs),
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
}

/// Runs a filter subcommand.
pub fn run(args: FilterArgs) -> anyhow::Result<()> {
    match args.command {
        FilterCommand::Eval(a) => eval(a),
    }
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let mut config = FilterConfig::load(&a.config)?;
    match a.only {
        Some(Part::Rules) => config.semantic = None,
        Some(Part::Semantic) if config.semantic.is_none() => {
            anyhow::bail!("{} has no [semantic] section to judge alone", a.config.display())
        }
        Some(Part::Semantic) => config.rules.categories.clear(),
        None => {}
    }
    if config.semantic.is_some() {
        let backend = if a.reference_embedder {
            Backend::Candle
        } else {
            Backend::Int8
        };
        super::install_embeddings(
            &ferroserve_model::fetch::default_cache_dir(),
            &crate::progress::Bars::default(),
            backend,
        )?;
    }
    let filter = config
        .compile()
        .with_context(|| format!("{} does not compile", a.config.display()))?;
    let text = std::fs::read_to_string(&a.data).with_context(|| format!("cannot read {}", a.data.display()))?;
    let examples = read_examples(&text).map_err(|e| anyhow::anyhow!("{}: {e}", a.data.display()))?;
    let report = evaluate(&filter, &examples, a.repeats);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
