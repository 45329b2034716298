//! Client input to [`ValidRequest`]: every rule a request must meet before it costs any model work, each
//! failure naming the field and the limit. The shape limits are [`RequestLimits`], which workers check
//! again; the context length is checked against the served model before admission (inference.rs), and
//! exactly, once tokenized, by the engine.

use std::time::SystemTime;

use ferroserve_core::{
    ChatMessage, Constraint, GREEDY_BELOW_TEMPERATURE, GenerationDefaults, GrammarSyntax, Input, MAX_TOP_LOGPROBS,
    RequestLimits, Role, Sampling, ValidRequest, Violation, check_sampling, echo,
};
use ferroserve_proto::v1 as pb;

use crate::RouterError;

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
        match model.split_once('@') {
            _ if model.is_empty() => Ok(ModelSelector::Default),
            None => Ok(ModelSelector::Name(model.to_string())),
            Some((name, version)) if !name.is_empty() && !version.is_empty() && !version.contains('@') => {
                Ok(ModelSelector::Pinned {
                    name: name.to_string(),
                    version: version.to_string(),
                })
            }
            Some(_) => Err(invalid(
                "model",
                format!(
                    "`{}` is not a model name; use `name` or `name@version` (e.g. smollm2-135m-instruct@q4_1)",
                    echo(model)
                ),
            )),
        }
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> RouterError {
    RouterError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl From<Violation> for RouterError {
    fn from(v: Violation) -> RouterError {
        RouterError::Invalid {
            field: v.field,
            message: v.message,
        }
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
    /// The sticky-assignment key, checked.
    pub session: String,
}

/// Checks a client request and resolves its defaults. `request_id` is the id to use when the client sent
/// none. The cheap length checks come first, so that an oversized field costs nothing further.
pub(crate) fn validate(
    request: pb::GenerateRequest,
    request_id: impl FnOnce() -> String,
    limits: &RequestLimits,
) -> Result<Checked, RouterError> {
    RequestLimits::check_label("model", &request.model, limits.max_model_bytes, "max_model_bytes")?;
    RequestLimits::check_label(
        "session",
        &request.session,
        limits.max_session_bytes,
        "max_session_bytes",
    )?;
    let request_id = if request.request_id.is_empty() {
        request_id()
    } else {
        limits.check_request_id(&request.request_id)?;
        request.request_id
    };
    let model = ModelSelector::parse(&request.model)?;
    let input = input(request.prompt, request.messages, limits)?;
    if request.max_tokens == 0 {
        return Err(invalid("max_tokens", "must be at least 1 (got 0)"));
    }
    let sampling_given = request.sampling.is_some();
    let sampling = sampling(request.sampling.unwrap_or_default())?;
    limits.check_stop(&request.stop)?;
    if request.top_logprobs > MAX_TOP_LOGPROBS {
        return Err(invalid(
            "top_logprobs",
            format!("must be at most {MAX_TOP_LOGPROBS} (got {})", request.top_logprobs),
        ));
    }
    let constraint = request.constraint.map(constraint).transpose()?;
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
            continuation: Vec::new(),
            top_logprobs: request.logprobs.then_some(request.top_logprobs),
            constraint,
        },
        sampling_given,
        session: request.session,
    })
}

/// What validation makes of a client request, before any version or worker is involved: the model it
/// asks for and the request with the client's own settings. For tools and fuzzing; the service runs the
/// same function.
pub fn check_request(
    request: pb::GenerateRequest,
    limits: &RequestLimits,
) -> Result<(ModelSelector, ValidRequest), RouterError> {
    let checked = validate(request, || "req-check".to_string(), limits)?;
    Ok((checked.selector, checked.request))
}

/// The wire's constraint, its shape checked; the field named in errors is the oneof member the client set.
fn constraint(c: pb::generate_request::Constraint) -> Result<Constraint, RouterError> {
    use pb::generate_request::Constraint as C;
    let (field, c) = match c {
        C::JsonSchema(s) => (
            "json_schema.schema",
            Constraint::JsonSchema {
                schema: s.schema,
                strict: s.strict,
            },
        ),
        C::JsonObject(_) => ("json_object", Constraint::JsonObject),
        C::Regex(r) => ("regex", Constraint::Regex(r)),
        C::Grammar(g) => {
            let syntax = match pb::GrammarSyntax::try_from(g.syntax) {
                Ok(pb::GrammarSyntax::Lark) => GrammarSyntax::Lark,
                Ok(pb::GrammarSyntax::Gbnf) => GrammarSyntax::Gbnf,
                _ => {
                    return Err(invalid(
                        "grammar.syntax",
                        format!(
                            "unknown grammar syntax {}; use GRAMMAR_SYNTAX_LARK or GRAMMAR_SYNTAX_GBNF",
                            g.syntax
                        ),
                    ));
                }
            };
            ("grammar.text", Constraint::Grammar { syntax, text: g.text })
        }
        C::Choice(c) => ("choice.choices", Constraint::Choice(c.choices)),
    };
    c.check(field)?;
    Ok(c)
}

/// Exactly one of a prompt and a conversation, with known roles, within the input limits.
fn input(prompt: String, messages: Vec<pb::ChatMessage>, limits: &RequestLimits) -> Result<Input, RouterError> {
    let input = match (prompt.is_empty(), messages.is_empty()) {
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
        (false, true) => Input::Prompt(prompt),
        (true, false) => {
            // The count first: a huge list of empty messages is refused before it is walked.
            if messages.len() > limits.max_messages {
                return Err(invalid(
                    "messages",
                    format!(
                        "{} messages given; the limit max_messages is {}",
                        messages.len(),
                        limits.max_messages
                    ),
                ));
            }
            Input::Chat(
                messages
                    .into_iter()
                    .enumerate()
                    .map(|(i, m)| {
                        let role = Role::parse(&m.role).ok_or_else(|| {
                            invalid(
                                format!("messages[{i}].role"),
                                format!("unknown role `{}`; use one of system, user, assistant", echo(&m.role)),
                            )
                        })?;
                        Ok(ChatMessage {
                            role,
                            content: m.content,
                        })
                    })
                    .collect::<Result<_, RouterError>>()?,
            )
        }
    };
    limits.check_input(&input)?;
    Ok(input)
}

/// A version's generation defaults from an operator (the config or `LoadVersion`), checked by the rules a
/// client's request meets; errors name the field as a request would (`sampling.top_p`, `stop[1]`). An empty
/// system prompt leaves it to the chat template; no sampling means greedy.
pub fn generation_defaults(
    system_prompt: &str,
    sampling_params: Option<pb::SamplingParams>,
    stop: Vec<String>,
    limits: &RequestLimits,
) -> Result<GenerationDefaults, RouterError> {
    limits.check_stop(&stop)?;
    Ok(GenerationDefaults {
        system_prompt: Some(system_prompt.to_string()).filter(|s| !s.is_empty()),
        sampling: sampling_params
            .map(|s| sampling(pb::SamplingParams { seed: Some(0), ..s }))
            .transpose()?,
        stop,
    })
}

/// The wire's sampling settings resolved and range-checked. A temperature too small to divide by is
/// greedy, as vLLM treats it.
fn sampling(s: pb::SamplingParams) -> Result<Sampling, RouterError> {
    let temperature = if s.temperature >= 0.0 && s.temperature < GREEDY_BELOW_TEMPERATURE {
        0.0
    } else {
        s.temperature
    };
    let sampling = Sampling {
        temperature,
        top_p: s.top_p.unwrap_or(1.0),
        top_k: s.top_k,
        seed: s.seed.unwrap_or_else(rand::random),
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
        ignore_eos: s.ignore_eos,
        presence_penalty: s.presence_penalty.unwrap_or(0.0),
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
    };
    check_sampling(&sampling)?;
    Ok(sampling)
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
        match validate(r, || "id".into(), &RequestLimits::default()) {
            Err(RouterError::Invalid { field, .. }) => field,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_plain_prompt_passes_with_defaults_resolved() {
        let c = validate(base(), || "id".into(), &RequestLimits::default()).unwrap();
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
        let c = validate(r, || "id".into(), &RequestLimits::default()).unwrap();
        assert_eq!(c.request.sampling.seed, 99);
        assert!(c.sampling_given);
    }

    #[test]
    fn operator_defaults_meet_the_request_rules() {
        let l = RequestLimits::default();
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
