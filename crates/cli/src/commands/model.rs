//! `ferroserve model derive`: a second real model version, the default Q4_1 GGUF re-quantized to Q8_0 or
//! Q4_0 (Candle's quantizer), so that versions can differ in their weights and speed.
//! `ferroserve model validate`: the gate a version passes before it takes traffic.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferroserve_model::derive::{Target, derive};
use ferroserve_model::fetch;
use ferroserve_model::validate::{Golden, Settings, Tolerances, validate};

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
    /// Checks a candidate against a baseline: golden prompts, perplexity, latency. Prints PASS or FAIL
    /// (and exits non-zero on FAIL) and writes the report as JSON.
    Validate(ValidateArgs),
}

/// `ferroserve model validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The candidate GGUF.
    #[arg(long)]
    pub candidate: PathBuf,
    /// The baseline GGUF [default: the default model, fetched if absent].
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Golden prompts, one JSON object per line: {"prompt": "...", "expect": ["...", ...]}.
    #[arg(long, default_value = "configs/validation/golden.jsonl")]
    pub golden: PathBuf,
    /// The text perplexity is measured on.
    #[arg(long, default_value = "configs/validation/reference.txt")]
    pub reference: PathBuf,
    /// Candidate perplexity may exceed the baseline's by this fraction.
    #[arg(long, default_value_t = 0.05)]
    pub perplexity_tolerance: f64,
    /// Candidate time per token may be this many times the baseline's.
    #[arg(long, default_value_t = 1.5)]
    pub latency_ratio: f64,
    /// The system prompt before each golden prompt (the served model's default).
    #[arg(long, default_value = "You are a helpful assistant.")]
    pub system: String,
    /// Where the JSON report goes [default: the candidate's path with `.validation.json`].
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Cache directory for the fetched default model.
    #[arg(long, env = "FERROSERVE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
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
        ModelCommand::Validate(a) => validate_command(a),
    }
}

fn default_model(cache_dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    fetch::ensure(
        &fetch::DEFAULT_MODEL,
        &cache_dir.unwrap_or_else(fetch::default_cache_dir),
        &crate::progress::Bars::default(),
    )
    .context("fetching the default model")
}

fn validate_command(a: ValidateArgs) -> anyhow::Result<()> {
    let baseline = match a.baseline {
        Some(p) => p,
        None => default_model(a.cache_dir)?,
    };
    let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()));
    let golden: Vec<Golden> = read(&a.golden)?
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{} line {}", a.golden.display(), i + 1)))
        .collect::<anyhow::Result<_>>()?;
    let reference = read(&a.reference)?;
    let settings = Settings {
        system_prompt: a.system.clone(),
        tolerances: Tolerances {
            perplexity: a.perplexity_tolerance,
            latency_ratio: a.latency_ratio,
        },
    };
    let report = validate(&a.candidate, &baseline, &golden, &reference, settings)?;
    let mark = |ok: bool| if ok { "ok  " } else { "FAIL" };
    println!(
        "candidate {}
baseline  {}",
        a.candidate.display(),
        baseline.display()
    );
    for g in &report.golden {
        let verdict = match (g.candidate_passed, g.baseline_passed) {
            (true, _) => "ok  ",
            (false, true) => "FAIL",
            (false, false) => "miss (baseline too)",
        };
        println!("  {verdict} {:?} -> {:?}", g.prompt, g.candidate_answer);
    }
    let (p, l) = (&report.perplexity, &report.ms_per_token);
    println!(
        "  {} perplexity {:.2} against baseline {:.2} (limit {:.2})",
        mark(p.passed),
        p.candidate,
        p.baseline,
        p.limit
    );
    println!(
        "  {} {:.1} ms per token against baseline {:.1} (limit {:.1})",
        mark(l.passed),
        l.candidate,
        l.baseline,
        l.limit
    );
    let output = a
        .output
        .unwrap_or_else(|| a.candidate.with_extension("validation.json"));
    std::fs::write(&output, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", output.display()))?;
    println!(
        "{} (report: {})",
        if report.passed { "PASS" } else { "FAIL" },
        output.display()
    );
    if !report.passed {
        anyhow::bail!(
            "validation failed: {} golden regressions, perplexity {}, latency {}",
            report.golden_regressions,
            if p.passed { "ok" } else { "over its limit" },
            if l.passed { "ok" } else { "over its limit" }
        );
    }
    Ok(())
}

fn derive_command(a: DeriveArgs) -> anyhow::Result<()> {
    let bars = crate::progress::Bars::default();
    let source = match a.source {
        Some(p) => p,
        None => default_model(a.cache_dir)?,
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
