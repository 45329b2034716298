//! Filter configs: versioned TOML files in `configs/filters/`. A config is compiled and validated as a
//! whole before it is used, so a bad one is refused with a message naming the problem.

use std::path::{Path, PathBuf};

use ferroserve_model::embed::Budget;
use serde::{Deserialize, Serialize};

use crate::classifier::ClassifierFilter;
use crate::composite::CompositeFilter;
use crate::rules::RulesFilter;
use crate::semantic::{EmbedService, SemanticFilter, service};
use crate::verdict::Action;

/// A filter config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Filter name, e.g. `default`.
    pub name: String,
    /// Version label; `name@version` identifies the filter in metrics and verdicts.
    pub version: String,
    /// What this version changed, for operators.
    #[serde(default)]
    pub description: String,
    /// The rule filter.
    #[serde(default)]
    pub rules: RulesConfig,
    /// The semantic filter (sentence embeddings against exemplars), if any.
    pub semantic: Option<SemanticConfig>,
    /// The learned classifier (a trained head on sentence embeddings), if any.
    pub classifier: Option<ClassifierConfig>,
    /// The directory of the file this config came from: the classifier's weights are found from here.
    #[serde(skip)]
    pub dir: Option<PathBuf>,
}

/// `[classifier]`: written by `ferroserve filter train`, which also writes the weights it names.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    /// The head's weights (safetensors), relative to the config's directory.
    pub weights: PathBuf,
    /// The weights file's SHA-256: a config never runs with weights it was not trained with.
    pub sha256: String,
    /// The head's outputs in order: `allow` first, then the harm categories.
    pub classes: Vec<String>,
    /// The probability of harm (1 - P(allow)) at which a text is blocked, chosen on the validation split.
    pub threshold: f32,
    /// Hashed word n-gram features after the embedding (see `classifier::features`); 0 for none.
    #[serde(default)]
    pub ngram_buckets: usize,
    /// Hashed character n-gram features after the word n-grams; 0 (and absent) for none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub char_ngram_buckets: usize,
    /// Characters per window of a text longer than the encoder takes whole (100 to 1,000).
    #[serde(default = "window_chars")]
    pub window_chars: usize,
    /// Encoder layers an embedding takes (an early exit that cuts its cost in proportion); absent for all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_layers: Option<usize>,
    /// Tokens of a text (or window) the encoder reads at most, the head and the tail of a longer one
    /// (16 to 256; absent for 256). The n-grams still read every word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_tokens: Option<usize>,
    /// Softmax temperature fitted on the validation split (calibration).
    #[serde(default = "one")]
    pub temperature: f32,
    /// What a text gets when it cannot be embedded: `allow` (fail open; the rules still ran) or `block`.
    #[serde(default)]
    pub on_error: OnError,
    /// How the weights were made, so that `ferroserve filter train` can make them again.
    pub trained: Option<TrainedFrom>,
}

fn one() -> f32 {
    1.0
}

fn window_chars() -> usize {
    crate::classifier::MAX_WINDOW_CHARS
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl ClassifierConfig {
    /// The head's input layout after the embedding.
    pub fn layout(&self) -> crate::classifier::features::Layout {
        crate::classifier::features::Layout {
            word_buckets: self.ngram_buckets,
            char_buckets: self.char_ngram_buckets,
        }
    }

    /// How much of the encoder each text (or window) gets.
    pub fn budget(&self) -> Budget {
        Budget {
            layers: self.encoder_layers.unwrap_or(Budget::FULL.layers),
            tokens: self.encoder_tokens.unwrap_or(Budget::FULL.tokens),
        }
    }
}

/// The provenance of a classifier's weights.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainedFrom {
    /// The training and validation files, as given to `filter train`.
    pub data: Vec<String>,
    /// SHA-256 over the examples trained on, in order.
    pub data_sha256: String,
    /// The seed of the weights' initialization and of the dropout masks.
    pub seed: u64,
    /// The command that wrote these weights; run again, it writes the same ones on the same CPU.
    pub command: String,
}

fn default_threshold() -> f32 {
    0.6
}

/// `[semantic]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SemanticConfig {
    /// Cosine similarity at which a text joins a category, unless the category sets its own.
    #[serde(default = "default_threshold")]
    pub threshold: f32,
    /// How much closer to a category's exemplars than to the allowed look-alikes a text must be.
    #[serde(default)]
    pub margin: f32,
    /// Harmless look-alikes ("kill a zombie process"): texts closer to these are not flagged.
    #[serde(default)]
    pub allow: Vec<String>,
    /// The categories.
    #[serde(default)]
    pub categories: Vec<SemanticCategory>,
    /// What a text gets when it cannot be embedded (the embedding thread failed): `allow` (fail open; the
    /// rules still ran) or `block` (fail closed). Either way it is counted and shown by `ListFilters`.
    #[serde(default)]
    pub on_error: OnError,
}

/// What the semantic filter decides when it cannot embed a text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Fail open: the text passes (the rules still judged it).
    #[default]
    Allow,
    /// Fail closed: the text is blocked.
    Block,
}

impl OnError {
    /// The config's spelling.
    pub fn label(self) -> &'static str {
        match self {
            OnError::Allow => "allow",
            OnError::Block => "block",
        }
    }
}

/// `[[semantic.categories]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SemanticCategory {
    /// Category name; the same names as the rules' categories combine in metrics.
    pub name: String,
    /// `block` or `flag`.
    pub action: Action,
    /// This category's threshold.
    pub threshold: Option<f32>,
    /// Prompts that belong in the category.
    pub exemplars: Vec<String>,
}

/// `[rules]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// Regexes for a request for instructions or content; a category's terms count only with one.
    #[serde(default)]
    pub intents: Vec<String>,
    /// The categories.
    #[serde(default)]
    pub categories: Vec<CategoryConfig>,
}

/// `[[rules.categories]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryConfig {
    /// Category name, e.g. `weapons`; a metric label.
    pub name: String,
    /// `block` or `flag`.
    pub action: Action,
    /// Words and phrases that name the harm, matched as whole words after normalization.
    #[serde(default)]
    pub terms: Vec<String>,
    /// Regexes over the normalized text that are enough on their own.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Regexes that veto this category (defensive, educational or fictional framing).
    #[serde(default)]
    pub except: Vec<String>,
}

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {message}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        message: String,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What the parser said.
        message: String,
    },
    /// A value is not valid.
    #[error("{0}")]
    Invalid(String),
    /// A rule does not compile.
    #[error(transparent)]
    Compile(#[from] crate::rules::CompileError),
}

impl FilterConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<FilterConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let mut config = Self::parse(&text, &path.display().to_string())?;
        config.dir = path.parent().map(Path::to_path_buf);
        Ok(config)
    }

    /// Parses config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<FilterConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim().to_string(),
        })
    }

    /// Whether compiling needs the embedding model (a `[semantic]` or a `[classifier]` section).
    pub fn needs_embeddings(&self) -> bool {
        self.semantic.is_some() || self.classifier.is_some()
    }

    /// `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// Validates and compiles the config into a filter: its rules and, with a `[semantic]` section, its
    /// semantic filter (which needs the embedding service installed, see [`crate::semantic::install`]).
    pub fn compile(&self) -> Result<CompositeFilter, ConfigError> {
        if self.name.is_empty() || self.name.contains('@') || self.version.is_empty() {
            return Err(ConfigError::Invalid(
                "name and version must be non-empty, and the name must not contain `@`".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in &self.rules.categories {
            if !seen.insert(c.name.as_str()) {
                return Err(ConfigError::Invalid(format!("category `{}` appears twice", c.name)));
            }
            if c.action == Action::Allow {
                return Err(ConfigError::Invalid(format!(
                    "category `{}`: action must be `block` or `flag`",
                    c.name
                )));
            }
            if c.terms.is_empty() && c.patterns.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "category `{}` has no terms and no patterns, so it can never match",
                    c.name
                )));
            }
        }
        let rules = RulesFilter::compile(&self.id(), &self.rules)?;
        let semantic = match &self.semantic {
            None => None,
            Some(s) => {
                for c in &s.categories {
                    if c.action == Action::Allow {
                        return Err(ConfigError::Invalid(format!(
                            "semantic category `{}`: action must be `block` or `flag`",
                            c.name
                        )));
                    }
                }
                Some(SemanticFilter::compile(s, embeddings("[semantic]")?).map_err(ConfigError::Invalid)?)
            }
        };
        let classifier = match &self.classifier {
            None => None,
            Some(c) => Some(
                ClassifierFilter::load(c, self.dir.as_deref(), embeddings("[classifier]")?)
                    .map_err(ConfigError::Invalid)?,
            ),
        };
        if self.rules.categories.is_empty() && semantic.is_none() && classifier.is_none() {
            return Err(ConfigError::Invalid(
                "the config has no rules, no [semantic] and no [classifier] section".into(),
            ));
        }
        Ok(CompositeFilter::new(self.id(), rules, semantic, classifier))
    }
}

/// The process's embedding service, which `section` needs.
fn embeddings(section: &str) -> Result<std::sync::Arc<EmbedService>, ConfigError> {
    service().ok_or_else(|| {
        ConfigError::Invalid(format!(
            "{section} needs the embedding model, which this process has not loaded; \
             fetch it with `ferroserve fetch-model` or remove the {section} section"
        ))
    })
}
