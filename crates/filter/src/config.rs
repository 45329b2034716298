//! Filter configs: versioned TOML files in `configs/filters/`. A config is compiled and validated as a
//! whole before it is used, so a bad one is refused with a message naming the problem.

use std::path::Path;

use serde::Deserialize;

use crate::composite::CompositeFilter;
use crate::rules::RulesFilter;
use crate::semantic::{SemanticFilter, service};
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
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
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<FilterConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim().to_string(),
        })
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
                let service = service().ok_or_else(|| {
                    ConfigError::Invalid(
                        "[semantic] needs the embedding model, which this process has not loaded; \
                         fetch it with `ferroserve fetch-model` or remove the [semantic] section"
                            .into(),
                    )
                })?;
                Some(SemanticFilter::compile(s, service).map_err(ConfigError::Invalid)?)
            }
        };
        if self.rules.categories.is_empty() && semantic.is_none() {
            return Err(ConfigError::Invalid(
                "the config has neither rules nor a [semantic] section".into(),
            ));
        }
        Ok(CompositeFilter::new(self.id(), rules, semantic))
    }
}
