//! The config of a model's versions: `[[model.versions]]`, each version's generation defaults (system
//! prompt, sampling, stop strings, inherited from `[model]`), and `[model.traffic]`, the split at startup.
//! Defaults are checked by the same rules as a client's request; every error names its config key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ferroserve_core::GenerationDefaults;
use ferroserve_core::RequestLimits;
use ferroserve_proto::v1 as pb;
use ferroserve_router::{LoadSpec, Policy, RouterError, generation_defaults};
use serde::Deserialize;

use super::{ConfigError, ModelSection, err};

/// `[[model.versions]]`: another version of the model, served beside the first; a split gives it traffic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionSection {
    /// Its label, e.g. `q8_0`.
    pub version: String,
    /// Its GGUF file.
    pub path: PathBuf,
    /// Its system prompt [default: `model.system_prompt`].
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Its sampling for requests that send none [default: `model.sampling`].
    #[serde(default)]
    pub sampling: Option<SamplingSettings>,
    /// Its stop strings [default: `model.stop`].
    #[serde(default)]
    pub stop: Option<Vec<String>>,
}

/// Sampling settings left open where not given, in the config (`sampling = { temperature = 0.7,
/// top_p = 0.9 }`, a version's default for requests that send none) and on the command line (`generate`'s
/// request sampling, `models load`'s version default). Giving none leaves sampling to the level above: the
/// version's default for a request, the server's for a version, greedy for the server.
#[derive(Debug, Clone, Copy, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingSettings {
    /// Sampling temperature; 0 is greedy. With no sampling flag at all, sampling is left to the serving
    /// version's default (`generate`) or the server's (`models load`).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens (0: no limit).
    #[arg(long)]
    pub top_k: Option<u32>,
    /// Penalty for tokens already in the context (1: none).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
}

impl SamplingSettings {
    /// Whether any setting was given.
    pub fn any(&self) -> bool {
        self.temperature.is_some() || self.top_p.is_some() || self.top_k.is_some() || self.repetition_penalty.is_some()
    }

    /// The settings on the wire, the ones not given at their request defaults.
    pub fn to_wire(&self) -> pb::SamplingParams {
        pb::SamplingParams {
            temperature: self.temperature.unwrap_or(0.0),
            top_p: self.top_p,
            top_k: self.top_k.unwrap_or(0),
            repetition_penalty: self.repetition_penalty,
            ..Default::default()
        }
    }
}

/// `[model.traffic]`: the split the server starts with (an operator changes it live with
/// `ferroserve models split`). A restart or a new router replica comes up with this policy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrafficSection {
    /// Version -> relative weight of unpinned traffic, e.g. `{ q4_1 = 95, q8_0 = 5 }`.
    pub weights: BTreeMap<String, u32>,
    /// Cohort (the `x-ferroserve-cohort` header) -> version.
    pub cohorts: BTreeMap<String, String>,
}

/// `model`'s versions checked: the served version's defaults, the extra versions to load, and the
/// startup traffic policy. `remote`: a router of remote workers, whose versions the config does not list.
pub(super) fn resolve(
    model: &ModelSection,
    limits: &RequestLimits,
    remote: bool,
) -> Result<(GenerationDefaults, Vec<LoadSpec>, Option<Policy>), ConfigError> {
    let m = model;
    let mut labels = vec![m.version.as_str()];
    for (i, v) in m.versions.iter().enumerate() {
        let key = format!("model.versions[{i}]");
        if v.version.is_empty() || v.version.contains('@') || labels.contains(&v.version.as_str()) {
            return Err(err(
                &format!("{key}.version"),
                "must be non-empty, contain no `@` and differ from the other versions",
            ));
        }
        labels.push(&v.version);
        if !v.path.is_file() {
            return Err(err(
                &format!("{key}.path"),
                format!("{} is not a file", v.path.display()),
            ));
        }
    }
    let served = defaults("model", &m.system_prompt, m.sampling, m.stop.clone(), limits)?;
    let versions = m
        .versions
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let defaults = defaults(
                &format!("model.versions[{i}]"),
                v.system_prompt.as_deref().unwrap_or(&m.system_prompt),
                v.sampling.or(m.sampling),
                v.stop.clone().unwrap_or_else(|| m.stop.clone()),
                limits,
            )?;
            Ok(LoadSpec {
                name: m.name.clone(),
                version: v.version.clone(),
                path: v.path.clone(),
                defaults,
            })
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;
    let traffic = m.traffic.as_ref().map(|t| traffic(t, &labels, remote)).transpose()?;
    Ok((served, versions, traffic))
}

fn traffic(t: &TrafficSection, labels: &[&str], remote: bool) -> Result<Policy, ConfigError> {
    let known = |key: String, v: &str| {
        if remote || labels.contains(&v) {
            Ok(())
        } else {
            Err(err(
                &key,
                format!(
                    "`{v}` is not a version of this model; declare it in [[model.versions]] (versions: {})",
                    labels.join(", ")
                ),
            ))
        }
    };
    for v in t.weights.keys() {
        known(format!("model.traffic.weights.{v}"), v)?;
    }
    for (cohort, v) in &t.cohorts {
        known(format!("model.traffic.cohorts.{cohort}"), v)?;
    }
    if !t.weights.is_empty() && t.weights.values().all(|w| *w == 0) {
        return Err(err(
            "model.traffic.weights",
            "give at least one version a weight above 0",
        ));
    }
    Ok(Policy {
        weights: t.weights.clone(),
        cohorts: t.cohorts.clone(),
        disabled: Default::default(),
        cancels: Default::default(),
    })
}

/// The defaults of the version at `key` (`model` or `model.versions[N]`), checked.
fn defaults(
    key: &str,
    system_prompt: &str,
    sampling: Option<SamplingSettings>,
    stop: Vec<String>,
    limits: &RequestLimits,
) -> Result<GenerationDefaults, ConfigError> {
    generation_defaults(
        system_prompt,
        sampling.as_ref().map(SamplingSettings::to_wire),
        stop,
        limits,
    )
    .map_err(|e| match e {
        RouterError::Invalid { field, message } => err(&format!("{key}.{field}"), message),
        other => err(key, other.to_string()),
    })
}
