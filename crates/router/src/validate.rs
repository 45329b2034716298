//! Client input to [`ValidRequest`]: every rule a request must meet before it costs any model work, each
//! failure naming the field and the limit. Context-length checks need the tokenizer and happen in the
//! engine, which answers with the same INVALID_ARGUMENT.

use std::time::SystemTime;

use ferroserve_core::{ChatMessage, GenerationDefaults, Input, Role, Sampling, ValidRequest};
use ferroserve_proto::v1 as pb;

use crate::RouterError;

/// Limits on request shape, from the `[router]` config section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most stop strings per request.
    pub max_stop_sequences: usize,
    /// Longest stop string, in bytes.
    pub max_stop_bytes: usize,
    /// Longest client-supplied request id, in bytes.
    pub max_request_id_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stop_sequences: 16,
            max_stop_bytes: 256,
            max_request_id_bytes: 128,
        }
    }
}

/// Which model a request wants, parsed from its `model` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSelector {
    /// Empty: the server's default.
    Default,
    /// A name, any version of it.
    Name(String),
    /// `name@version`: exactly that version.
    Pinned {
        /// Model name.
        name: String,
        /// Version label.
        version: String,
    },
}

impl ModelSelector {
    /// Parses the `model` field.
    pub fn parse(model: &str) -> Result<ModelSelector, RouterError> {
        let invalid = |message: &str| RouterError::Invalid {
            field: "model".into(),
            message: message.to_string(),
        };
        match model.split_once('@') {
            _ if model.is_empty() => Ok(ModelSelector::Default),
            None => Ok(ModelSelector::Name(model.to_string())),
            Some((name, version)) if !name.is_empty() && !version.is_empty() && !version.contains('@') => {
                Ok(ModelSelector::Pinned {
                    name: name.to_string(),
                    version: version.to_string(),
                })
            }
            Some(_) => Err(invalid(&format!(
                "`{model}` is not a model name; use `name` or `name@version` (e.g. smollm2-135m-instruct@q4_1)"
            ))),
        }
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> RouterError {
    RouterError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// A request that passed validation, before a version is chosen.
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    /// The model it asks for.
    pub selector: ModelSelector,
    /// The request with the client's own settings (greedy where it sent no sampling); the serving
    /// version's [`GenerationDefaults`] complete it.
    pub request: ValidRequest,
    /// The client sent sampling settings, so the version's default sampling does not apply.
    pub sampling_given: bool,
}

/// Checks a client request and resolves its defaults. `request_id` is the id to use (the client's, checked
/// here, or one the caller made).
pub(crate) fn validate(
    request: pb::GenerateRequest,
    request_id: String,
    limits: &Limits,
) -> Result<Checked, RouterError> {
    let model = ModelSelector::parse(&request.model)?;
    if request_id.len() > limits.max_request_id_bytes {
        return Err(invalid(
            "request_id",
            format!(
                "is {} bytes; the limit is {}",
                request_id.len(),
                limits.max_request_id_bytes
            ),
        ));
    }
    let input = match (request.prompt.is_empty(), request.messages.is_empty()) {
        (false, false) => {
            return Err(invalid(
                "prompt",
                "set exactly one of `prompt` and `messages`, not both",
            ));
        }
        (true, true) => {
            return Err(invalid(
                "prompt",
                "the prompt is empty; set `prompt` to some text, or `messages` to a conversation",
            ));
        }
        (false, true) => Input::Prompt(request.prompt),
        (true, false) => Input::Chat(
            request
                .messages
                .into_iter()
                .enumerate()
                .map(|(i, m)| {
                    let role = Role::parse(&m.role).ok_or_else(|| {
                        invalid(
                            format!("messages[{i}].role"),
                            format!("unknown role `{}`; use one of system, user, assistant", m.role),
                        )
                    })?;
                    Ok(ChatMessage {
                        role,
                        content: m.content,
                    })
                })
                .collect::<Result<_, RouterError>>()?,
        ),
    };
    if request.max_tokens == 0 {
        return Err(invalid("max_tokens", "must be at least 1 (got 0)"));
    }
    let sampling_given = request.sampling.is_some();
    let sampling = sampling(request.sampling.unwrap_or_default())?;
    check_stop(&request.stop, limits)?;
    Ok(Checked {
        selector: model,
        request: ValidRequest {
            request_id,
            input,
            max_tokens: request.max_tokens,
            sampling,
            stop: request.stop,
            arrived: SystemTime::now(),
            priority: request.priority,
        },
        sampling_given,
    })
}

fn check_stop(stop: &[String], limits: &Limits) -> Result<(), RouterError> {
    if stop.len() > limits.max_stop_sequences {
        return Err(invalid(
            "stop",
            format!(
                "{} stop strings given; the limit is {}",
                stop.len(),
                limits.max_stop_sequences
            ),
        ));
    }
    for (i, s) in stop.iter().enumerate() {
        if s.is_empty() || s.len() > limits.max_stop_bytes {
            return Err(invalid(
                format!("stop[{i}]"),
                format!("must be 1 to {} bytes long (got {})", limits.max_stop_bytes, s.len()),
            ));
        }
    }
    Ok(())
}

/// A version's generation defaults from an operator (the config or `LoadVersion`), checked by the rules a
/// client's request meets; errors name the field as a request would (`sampling.top_p`, `stop[1]`). An empty
/// system prompt leaves it to the chat template; no sampling means greedy.
pub fn generation_defaults(
    system_prompt: &str,
    sampling_params: Option<pb::SamplingParams>,
    stop: Vec<String>,
    limits: &Limits,
) -> Result<GenerationDefaults, RouterError> {
    check_stop(&stop, limits)?;
    Ok(GenerationDefaults {
        system_prompt: Some(system_prompt.to_string()).filter(|s| !s.is_empty()),
        sampling: sampling_params
            .map(|s| sampling(pb::SamplingParams { seed: Some(0), ..s }))
            .transpose()?,
        stop,
    })
}

fn sampling(s: pb::SamplingParams) -> Result<Sampling, RouterError> {
    if !s.temperature.is_finite() || s.temperature < 0.0 {
        return Err(invalid(
            "sampling.temperature",
            format!("must be a finite number >= 0, 0 meaning greedy (got {})", s.temperature),
        ));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid(
            "sampling.top_p",
            format!("must be in (0, 1], or unset for 1.0 (got {top_p})"),
        ));
    }
    let repetition_penalty = s.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
        return Err(invalid(
            "sampling.repetition_penalty",
            format!("must be a finite number > 0, 1 meaning none (got {repetition_penalty})"),
        ));
    }
    Ok(Sampling {
        temperature: s.temperature,
        top_p,
        top_k: s.top_k,
        seed: s.seed.unwrap_or_else(rand::random),
        repetition_penalty,
        ignore_eos: s.ignore_eos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> pb::GenerateRequest {
        pb::GenerateRequest {
            prompt: "hi".into(),
            max_tokens: 4,
            ..Default::default()
        }
    }

    fn field_of(r: pb::GenerateRequest) -> String {
        match validate(r, "id".into(), &Limits::default()) {
            Err(RouterError::Invalid { field, .. }) => field,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_plain_prompt_passes_with_defaults_resolved() {
        let c = validate(base(), "id".into(), &Limits::default()).unwrap();
        let (model, v) = (c.selector, c.request);
        assert!(!c.sampling_given, "the version's default sampling may apply");
        assert_eq!(model, ModelSelector::Default);
        assert_eq!(v.input, Input::Prompt("hi".into()));
        assert!(v.sampling.is_greedy());
        assert_eq!(v.sampling.top_p, 1.0);
        assert_eq!(v.sampling.repetition_penalty, 1.0);
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut r = base();
        r.prompt.clear();
        assert_eq!(field_of(r), "prompt");
        let mut r = base();
        r.messages.push(pb::ChatMessage {
            role: "user".into(),
            content: "x".into(),
        });
        assert_eq!(field_of(r), "prompt");
        let mut r = base();
        r.max_tokens = 0;
        assert_eq!(field_of(r), "max_tokens");
        for t in [-0.5, f32::NAN, f32::INFINITY] {
            let mut r = base();
            r.sampling = Some(pb::SamplingParams {
                temperature: t,
                ..Default::default()
            });
            assert_eq!(field_of(r), "sampling.temperature");
        }
        for p in [0.0, -0.1, 1.5, f32::NAN] {
            let mut r = base();
            r.sampling = Some(pb::SamplingParams {
                top_p: Some(p),
                ..Default::default()
            });
            assert_eq!(field_of(r), "sampling.top_p");
        }
        let mut r = base();
        r.prompt.clear();
        r.messages = vec![
            pb::ChatMessage {
                role: "user".into(),
                content: "x".into(),
            },
            pb::ChatMessage {
                role: "bot".into(),
                content: "y".into(),
            },
        ];
        assert_eq!(field_of(r), "messages[1].role");
        let mut r = base();
        r.stop = vec![String::new()];
        assert_eq!(field_of(r), "stop[0]");
        let mut r = base();
        r.model = "a@b@c".into();
        assert_eq!(field_of(r), "model");
    }

    #[test]
    fn model_selector_forms() {
        assert_eq!(ModelSelector::parse("").unwrap(), ModelSelector::Default);
        assert_eq!(ModelSelector::parse("m").unwrap(), ModelSelector::Name("m".into()));
        assert_eq!(
            ModelSelector::parse("m@v1").unwrap(),
            ModelSelector::Pinned {
                name: "m".into(),
                version: "v1".into()
            }
        );
        assert!(ModelSelector::parse("m@").is_err());
        assert!(ModelSelector::parse("@v").is_err());
    }

    #[test]
    fn explicit_seed_is_kept() {
        let mut r = base();
        r.sampling = Some(pb::SamplingParams {
            temperature: 0.8,
            seed: Some(99),
            ..Default::default()
        });
        let c = validate(r, "id".into(), &Limits::default()).unwrap();
        assert_eq!(c.request.sampling.seed, 99);
        assert!(c.sampling_given);
    }

    #[test]
    fn operator_defaults_meet_the_request_rules() {
        let l = Limits::default();
        let d = generation_defaults(
            "",
            Some(pb::SamplingParams {
                temperature: 0.7,
                top_p: Some(0.9),
                ..Default::default()
            }),
            vec!["###".into()],
            &l,
        )
        .unwrap();
        assert_eq!(d.system_prompt, None);
        assert_eq!(d.sampling.map(|s| (s.temperature, s.top_p)), Some((0.7, 0.9)));
        let bad = |sampling, stop| match generation_defaults("x", sampling, stop, &l) {
            Err(RouterError::Invalid { field, .. }) => field,
            other => panic!("expected invalid, got {other:?}"),
        };
        let top_p = pb::SamplingParams {
            top_p: Some(2.0),
            ..Default::default()
        };
        assert_eq!(bad(Some(top_p), vec![]), "sampling.top_p");
        assert_eq!(bad(None, vec!["a".into(), String::new()]), "stop[1]");
    }
}
