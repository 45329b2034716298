//! The red-team feedback loop's commands: `filter redteam` (attack a filter, store what got through),
//! `filter review` (list, label and export the store) and `filter validate` (the gate a candidate passes
//! before it runs in shadow: no category's catch rate drops, the false-positive rate stays within its bound
//! and latency does not regress).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ferroserve_filter::eval::{Report as EvalReport, evaluate};
use ferroserve_filter::redteam::{attacks, run as attack};
use ferroserve_filter::store::{Entry, Label, Source, Step, Store, now};
use ferroserve_filter::{Filter, FilterConfig, Verdict};

use super::train::read_files;

/// `ferroserve filter redteam`.
#[derive(Debug, Args)]
pub struct RedTeamArgs {
    /// The filter config to attack.
    #[arg(long, default_value = "configs/filters/default.toml")]
    pub config: PathBuf,
    /// Labelled prompts whose harmful ones are mutated; repeat for several files.
    #[arg(long = "seeds", required = true)]
    pub seeds: Vec<PathBuf>,
    /// Harmful seeds per category.
    #[arg(long, default_value_t = 20)]
    pub per_category: usize,
    /// Seeds the choice of prompts and the mutations.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The feedback store that receives the attacks that got through (labelled harmful, with their text:
    /// they are our own synthetic prompts, not users').
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `ferroserve filter review`.
#[derive(Debug, Args)]
pub struct ReviewArgs {
    /// The feedback store.
    #[arg(long)]
    pub store: PathBuf,
    /// Label a finding: `ID=allow` or `ID=block:<category>`; repeat for several.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// The reviewer, recorded with each label.
    #[arg(long, default_value = "reviewer")]
    pub by: String,
    /// Write the labelled findings that kept their text as training JSONL here.
    #[arg(long)]
    pub export: Option<PathBuf>,
}

/// `ferroserve filter validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The candidate config.
    #[arg(long)]
    pub candidate: PathBuf,
    /// The filter it would replace.
    #[arg(long, default_value = "configs/filters/default.toml")]
    pub baseline: PathBuf,
    /// The frozen test splits (repeat for several; judged as one set).
    #[arg(
        long,
        default_values = ["configs/filters/data/test.jsonl", "configs/filters/data/test2.jsonl"]
    )]
    pub data: Vec<PathBuf>,
    /// The highest false-positive rate the candidate may have.
    #[arg(long, default_value_t = 0.05)]
    pub max_fpr: f64,
    /// How much slower (p99) than the baseline the candidate may be, as a factor.
    #[arg(long, default_value_t = 1.25)]
    pub latency_slack: f64,
    /// A feedback store where the gate's decision is recorded.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Who runs the gate, for the record.
    #[arg(long, default_value = "operator")]
    pub by: String,
}

fn compile(path: &std::path::Path) -> anyhow::Result<ferroserve_filter::CompositeFilter> {
    let config = FilterConfig::load(path)?;
    if config.needs_embeddings() {
        super::embeddings(ferroserve_model::embed::Backend::Int8)?;
    }
    config
        .compile()
        .with_context(|| format!("{} does not compile", path.display()))
}

/// Runs `filter redteam`.
pub fn redteam(a: RedTeamArgs) -> anyhow::Result<()> {
    let filter = compile(&a.config)?;
    let seeds = read_files(&a.seeds)?;
    let report = attack(&filter, attacks(&seeds, a.per_category, a.seed));
    if let Some(path) = &a.store {
        let store = Store::open(path, true)?;
        for s in &report.successes {
            let label = Label::Block {
                category: s.category.clone(),
            };
            let f = store.finding(
                Source::RedTeam,
                filter.id(),
                None,
                &store.keep(&std::sync::Arc::from(s.text.as_str())),
                &Verdict::allow(),
                Some(label),
                "redteam",
            );
            store.append(&Entry::Finding(f))?;
        }
        eprintln!(
            "{} successful attacks stored in {}",
            report.successes.len(),
            path.display()
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// Runs `filter review`.
pub fn review(a: ReviewArgs) -> anyhow::Result<()> {
    let store = Store::open(&a.store, true)?;
    let known = Store::read(&a.store)?.findings();
    for l in &a.labels {
        let (id, label) = l
            .split_once('=')
            .context("a label is ID=allow or ID=block:<category>")?;
        anyhow::ensure!(
            known.iter().any(|(f, _)| f.id == id),
            "no finding `{id}` in {}",
            a.store.display()
        );
        let label = Label::parse(label).map_err(anyhow::Error::msg)?;
        store.append(&Entry::Label {
            id: id.to_string(),
            label,
            by: a.by.clone(),
            at: now(),
        })?;
    }
    let entries = Store::read(&a.store)?;
    println!(
        "{:<12} {:<20} {:<16} {:<7} {:<18} text",
        "id", "source", "filter", "action", "label"
    );
    for (f, label) in entries.findings() {
        let label = match label {
            None => "(unlabelled)".to_string(),
            Some(Label::Allow) => "allow".to_string(),
            Some(Label::Block { category }) => format!("block:{category}"),
        };
        let text = f.text.as_deref().map_or_else(
            || format!("sha256 {}", &f.text_sha256[..16]),
            |t| t.chars().take(60).collect(),
        );
        println!(
            "{:<12} {:<20} {:<16} {:<7} {:<18} {}",
            f.id,
            format!("{:?}", f.source),
            f.filter,
            f.action.label(),
            label,
            text.replace('\n', " / ")
        );
    }
    for step in entries.steps() {
        if let Entry::Step {
            step,
            filter,
            by,
            at,
            detail,
        } = step
        {
            println!("step {at} {step:?} {filter} by {by}: {detail}");
        }
    }
    if let Some(out) = &a.export {
        let examples = entries.training_examples();
        let lines: Vec<String> = examples
            .iter()
            .map(|e| serde_json::json!({"text": e.text, "label": e.label, "category": e.category}).to_string())
            .collect();
        std::fs::write(out, lines.join("\n") + "\n")?;
        println!("exported {} labelled findings to {}", examples.len(), out.display());
    }
    Ok(())
}

/// Why the gate refuses a candidate, or nothing.
fn gate_problems(candidate: &EvalReport, baseline: &EvalReport, a: &ValidateArgs) -> Vec<String> {
    let mut problems = Vec::new();
    for (category, base) in &baseline.caught {
        let cand = candidate.caught.get(category).copied().unwrap_or(0.0);
        if cand < *base {
            problems.push(format!(
                "{category}: catches {cand:.3} of its harmful prompts, the baseline {base:.3}"
            ));
        }
    }
    if candidate.overall.fpr > a.max_fpr {
        problems.push(format!(
            "false-positive rate {:.3} is above {:.3}",
            candidate.overall.fpr, a.max_fpr
        ));
    }
    if candidate.latency_p99_us > baseline.latency_p99_us * a.latency_slack {
        problems.push(format!(
            "p99 latency {:.0} us is more than {:.2}x the baseline's {:.0} us",
            candidate.latency_p99_us, a.latency_slack, baseline.latency_p99_us
        ));
    }
    problems
}

/// Runs `filter validate`: exits with an error (status 1) when the gate refuses.
pub fn validate(a: ValidateArgs) -> anyhow::Result<()> {
    let (candidate, baseline) = (compile(&a.candidate)?, compile(&a.baseline)?);
    let examples = read_files(&a.data)?;
    let (c, b) = (evaluate(&candidate, &examples, 3), evaluate(&baseline, &examples, 3));
    println!("category          baseline  candidate   (share of harmful prompts blocked)");
    for (k, base) in &b.caught {
        println!("{k:<16} {base:>9.3} {:>10.3}", c.caught.get(k).copied().unwrap_or(0.0));
    }
    println!(
        "recall           {:>9.3} {:>10.3}\nFPR              {:>9.3} {:>10.3}\np99 latency us   {:>9.0} {:>10.0}",
        b.overall.recall, c.overall.recall, b.overall.fpr, c.overall.fpr, b.latency_p99_us, c.latency_p99_us
    );
    let problems = gate_problems(&c, &b, &a);
    let detail = format!(
        "on {}: recall {:.3} (baseline {:.3}), FPR {:.3}; {}",
        a.data
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" + "),
        c.overall.recall,
        b.overall.recall,
        c.overall.fpr,
        if problems.is_empty() {
            "passed".to_string()
        } else {
            problems.join("; ")
        }
    );
    if let Some(path) = &a.store {
        let step = if problems.is_empty() {
            Step::GatePassed
        } else {
            Step::GateRefused
        };
        Store::open(path, false)?.step(step, candidate.id(), &a.by, &detail);
    }
    if problems.is_empty() {
        println!("PASSED: {} may run in shadow", candidate.id());
        Ok(())
    } else {
        anyhow::bail!("the gate refuses {}:\n  {}", candidate.id(), problems.join("\n  "))
    }
}
