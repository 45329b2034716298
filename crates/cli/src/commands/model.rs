//! `ferroserve model derive`: a second real model version, the default Q4_1 GGUF re-quantized to Q8_0 or
//! Q4_0 (Candle's quantizer), so that versions can differ in their weights and speed.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferroserve_model::derive::{Target, derive};
use ferroserve_model::fetch;

/// `ferroserve model ...`.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ModelCommand,
}

/// The model subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Writes a re-quantized GGUF (Q8_0 or Q4_0) from a Q4_1 one: a model version with other weights.
    Derive(DeriveArgs),
}

/// The formats `derive` writes.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// 8-bit: about 1.5x the size of the Q4_1 source, nearly its values.
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit without a minimum: smaller, coarser.
    #[value(name = "q4_0")]
    Q4_0,
}

/// `ferroserve model derive`.
#[derive(Debug, Args)]
pub struct DeriveArgs {
    /// The format to re-quantize to.
    #[arg(long, value_enum)]
    pub to: Format,
    /// The Q4_1 GGUF to start from [default: the default model, fetched if absent].
    #[arg(long)]
    pub source: Option<PathBuf>,
    /// Where to write [default: next to the source, e.g. SmolLM2-135M-Instruct.Q8_0.gguf].
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Cache directory for the fetched default model.
    #[arg(long, env = "FERROSERVE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// Runs a model subcommand.
pub fn run(args: ModelArgs) -> anyhow::Result<()> {
    match args.command {
        ModelCommand::Derive(a) => derive_command(a),
    }
}

fn derive_command(a: DeriveArgs) -> anyhow::Result<()> {
    let bars = crate::progress::Bars::default();
    let source = match a.source {
        Some(p) => p,
        None => fetch::ensure(
            &fetch::DEFAULT_MODEL,
            &a.cache_dir.unwrap_or_else(fetch::default_cache_dir),
            &bars,
        )
        .context("fetching the default model")?,
    };
    let (target, suffix) = match a.to {
        Format::Q8_0 => (Target::Q8_0, "Q8_0"),
        Format::Q4_0 => (Target::Q4_0, "Q4_0"),
    };
    let output = a.output.unwrap_or_else(|| {
        let stem = source.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
        let base = stem.strip_suffix(".Q4_1").unwrap_or(stem);
        source.with_file_name(format!("{base}.{suffix}.gguf"))
    });
    let d = derive(&source, &output, target, &bars)?;
    println!(
        "{}: {} tensors re-quantized to {suffix}, {} copied, {:.1} MB",
        d.path.display(),
        d.converted,
        d.copied,
        d.bytes as f64 / 1e6
    );
    Ok(())
}
