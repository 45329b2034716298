//! Generation defaults in the config: `[model]`'s and each `[[model.versions]]`'s system prompt, sampling
//! and stop strings, checked by the same rules as a client's request (errors name the config key).

use ferroserve_core::GenerationDefaults;
use ferroserve_proto::v1 as pb;
use ferroserve_router::{Limits, RouterError, generation_defaults};
use serde::Deserialize;

use super::{ConfigError, err};

/// `sampling = { temperature = 0.7, top_p = 0.9 }`: how a version samples for requests that send no
/// sampling settings. Leaving it out means greedy.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingSection {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1] [default: 1].
    pub top_p: Option<f32>,
    /// 0 means no limit.
    pub top_k: u32,
    /// Above 1 discourages repeats [default: 1].
    pub repetition_penalty: Option<f32>,
}

impl SamplingSection {
    fn to_wire(self) -> pb::SamplingParams {
        pb::SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            ..Default::default()
        }
    }
}

/// The defaults of the version at `key` (`model` or `model.versions[N]`), checked.
pub(super) fn resolve(
    key: &str,
    system_prompt: &str,
    sampling: Option<SamplingSection>,
    stop: Vec<String>,
    limits: &Limits,
) -> Result<GenerationDefaults, ConfigError> {
    generation_defaults(system_prompt, sampling.map(SamplingSection::to_wire), stop, limits).map_err(|e| match e {
        RouterError::Invalid { field, message } => err(&format!("{key}.{field}"), message),
        other => err(key, other.to_string()),
    })
}
