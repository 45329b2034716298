//! `ferroserve filter train`: a new versioned filter from labelled data. It embeds the training and
//! validation examples (plus the labelled findings of a feedback store), trains the classifier's head with a
//! seed, calibrates it on validation, and writes the weights and a config: the base config's rules with a
//! new `[classifier]` section. The same data and seed give the same weights on the same CPU.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use ferroserve_filter::FilterConfig;
use ferroserve_filter::classifier::features::Layout;
use ferroserve_filter::classifier::sha256_hex;
use ferroserve_filter::classifier::train::{TrainOptions, classes_of, data_sha256, embed_examples, fit};
use ferroserve_filter::config::{ClassifierConfig, TrainedFrom};
use ferroserve_filter::eval::{Example, read_examples};
use ferroserve_filter::store::Store;

/// `ferroserve filter train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training examples (JSONL: text, label, category); repeat for several files.
    #[arg(long = "data", required = true)]
    pub data: Vec<PathBuf>,
    /// Validation examples, for calibration and the threshold; repeat for several files.
    #[arg(long = "val", required = true)]
    pub val: Vec<PathBuf>,
    /// A feedback store whose labelled findings (with text) join the training data.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// The config whose rules the new filter keeps (its own `[classifier]` section is replaced).
    #[arg(long, default_value = "configs/filters/default.toml")]
    pub base: PathBuf,
    /// Where to write the new config; the weights go next to it as `<stem>.classifier.safetensors`.
    #[arg(long)]
    pub out: PathBuf,
    /// The new filter's name (a candidate needs its own to run in shadow beside the active one).
    #[arg(long)]
    pub name: String,
    /// The new filter's version (`--version` is the program's own).
    #[arg(long = "filter-version")]
    pub filter_version: String,
    /// Seeds the initial weights.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Hidden units of the head.
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    /// Full passes over the training data.
    #[arg(long, default_value_t = 600)]
    pub epochs: usize,
    /// AdamW's learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub learning_rate: f64,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// Hashed word n-gram features after the embedding; 0 for the embedding alone.
    #[arg(long, default_value_t = 4096)]
    pub ngram_buckets: usize,
    /// Hashed character n-gram features (3 to 5 characters of each word) after the word n-grams; 0 for
    /// none.
    #[arg(long, default_value_t = 4096)]
    pub char_ngram_buckets: usize,
    /// Characters per window of a long text, when the filter runs (100 to 1,000).
    #[arg(long, default_value_t = 300)]
    pub window_chars: usize,
    /// Encoder layers an embedding takes (an early exit; all-MiniLM-L6-v2 has 6).
    #[arg(long, default_value_t = 3)]
    pub encoder_layers: usize,
    /// Tokens of a text the encoder reads at most, head and tail (16 to 256).
    #[arg(long, default_value_t = 32)]
    pub encoder_tokens: usize,
    /// Share of hidden units dropped in each training pass.
    #[arg(long, default_value_t = 0.6)]
    pub dropout: f32,
    /// Probability mass spread from the true class over all classes.
    #[arg(long, default_value_t = 0.1)]
    pub label_smoothing: f32,
    /// The validation false-positive rate the block threshold must stay within.
    #[arg(long, default_value_t = 0.04)]
    pub target_fpr: f64,
}

/// Reads JSONL example files, in order.
pub fn read_files(paths: &[PathBuf]) -> anyhow::Result<Vec<Example>> {
    let mut all = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        all.extend(read_examples(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?);
    }
    Ok(all)
}

/// Runs `filter train`.
pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    let mut train = read_files(&a.data)?;
    if let Some(store) = &a.store {
        let found = Store::read(store)?.training_examples();
        println!("{} labelled findings from {}", found.len(), store.display());
        train.extend(found);
    }
    let val = read_files(&a.val)?;
    let base_text = std::fs::read_to_string(&a.base).with_context(|| format!("cannot read {}", a.base.display()))?;
    FilterConfig::parse(&base_text, &a.base.display().to_string())?;
    super::embeddings(ferroserve_model::embed::Backend::Int8)?;
    let service = ferroserve_filter::semantic::service().context("the embedding service")?;
    let classes = classes_of(&train);
    let started = std::time::Instant::now();
    let layout = Layout {
        word_buckets: a.ngram_buckets,
        char_buckets: a.char_ngram_buckets,
    };
    let budget = ferroserve_model::embed::Budget {
        layers: a.encoder_layers,
        tokens: a.encoder_tokens,
    };
    budget
        .check(service.depth())
        .map_err(|e| anyhow::anyhow!("{e} (--encoder-layers, --encoder-tokens)"))?;
    let train_set = embed_examples(&service, &train, &classes, layout, budget).map_err(anyhow::Error::msg)?;
    let val_set = embed_examples(&service, &val, &classes, layout, budget).map_err(anyhow::Error::msg)?;
    println!(
        "embedded {} training and {} validation examples in {:.1} s",
        train.len(),
        val.len(),
        started.elapsed().as_secs_f64()
    );
    let options = TrainOptions {
        seed: a.seed,
        hidden: a.hidden,
        epochs: a.epochs,
        target_fpr: a.target_fpr,
        learning_rate: a.learning_rate,
        weight_decay: a.weight_decay,
        dropout: a.dropout,
        label_smoothing: a.label_smoothing,
    };
    let trained = fit(classes.len(), &train_set, &val_set, &options)?;
    println!(
        "trained {} classes, final loss {:.4}; validation: temperature {:.2}, threshold {:.2}, recall {:.3}, FPR {:.3}",
        classes.len(),
        trained.final_loss,
        trained.temperature,
        trained.threshold,
        trained.val_recall,
        trained.val_fpr
    );
    let weights = trained.head.to_safetensors().map_err(anyhow::Error::msg)?;
    let weights_name = format!(
        "{}.classifier.safetensors",
        a.out
            .file_stem()
            .and_then(|s| s.to_str())
            .context("--out needs a file name")?
    );
    let dir = a.out.parent().unwrap_or(Path::new("."));
    std::fs::write(dir.join(&weights_name), &weights)?;
    let section = ClassifierConfig {
        weights: PathBuf::from(&weights_name),
        sha256: sha256_hex(&weights),
        classes,
        threshold: trained.threshold,
        ngram_buckets: a.ngram_buckets,
        char_ngram_buckets: a.char_ngram_buckets,
        window_chars: a.window_chars,
        encoder_layers: Some(a.encoder_layers),
        encoder_tokens: Some(a.encoder_tokens),
        temperature: trained.temperature,
        on_error: ferroserve_filter::config::OnError::Block,
        trained: Some(TrainedFrom {
            data: a
                .data
                .iter()
                .chain(&a.val)
                .chain(&a.store)
                .map(|p| p.display().to_string())
                .collect(),
            data_sha256: data_sha256(&train),
            seed: a.seed,
            command: std::env::args()
                .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
                .collect::<Vec<_>>()
                .join(" "),
        }),
    };
    let config = with_classifier(&base_text, &a.name, &a.filter_version, &section)?;
    std::fs::write(&a.out, &config)?;
    let check = FilterConfig::load(&a.out)?;
    check
        .compile()
        .with_context(|| format!("the written {} does not compile", a.out.display()))?;
    println!(
        "wrote {} ({}) and {}",
        a.out.display(),
        check.id(),
        dir.join(&weights_name).display()
    );
    Ok(())
}

/// The comment above the section `filter train` writes.
const WRITTEN_BY: &str = "# Written by `ferroserve filter train`; keep this section last.";

/// The base config's text with a new name and version, and `[classifier]` (always the last section of a
/// config `filter train` writes) replaced.
fn with_classifier(base: &str, name: &str, version: &str, section: &ClassifierConfig) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut top = true;
    for line in base.lines() {
        if line.starts_with("[classifier") {
            break;
        }
        if line == WRITTEN_BY {
            continue;
        }
        top &= !line.starts_with('[');
        let key = line.split('=').next().unwrap_or("").trim();
        match key {
            "name" if top => out.push_str(&format!("name = {}\n", toml_string(name))),
            "version" if top => out.push_str(&format!("version = {}\n", toml_string(version))),
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    #[derive(serde::Serialize)]
    struct Wrapper<'a> {
        classifier: &'a ClassifierConfig,
    }
    let rendered = toml::to_string(&Wrapper { classifier: section })?;
    out.push_str(WRITTEN_BY);
    out.push('\n');
    out.push_str(&rendered);
    Ok(out)
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trained_config_keeps_the_rules_and_replaces_name_version_and_classifier() {
        let base = "name = \"default\"\nversion = \"1\"\n[rules]\nintents = []\n[classifier]\nweights = \"old\"\n";
        let section = ClassifierConfig {
            weights: "next.classifier.safetensors".into(),
            sha256: "ab".into(),
            classes: vec!["allow".into(), "fraud".into()],
            threshold: 0.5,
            ngram_buckets: 0,
            char_ngram_buckets: 0,
            window_chars: 1000,
            encoder_layers: Some(3),
            encoder_tokens: None,
            temperature: 1.25,
            on_error: ferroserve_filter::config::OnError::Block,
            trained: None,
        };
        let out = with_classifier(base, "next", "2", &section).unwrap();
        let parsed = FilterConfig::parse(&out, "test").unwrap();
        assert_eq!(parsed.id(), "next@2");
        assert!(!out.contains("\"old\""), "{out}");
        let c = parsed.classifier.unwrap();
        assert_eq!((c.threshold, c.temperature, c.classes.len()), (0.5, 1.25, 2));
        assert_eq!((c.encoder_layers, c.encoder_tokens), (Some(3), None), "{out}");
    }
}
