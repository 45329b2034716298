//! OpenAI's request bodies, read into the pipeline's `GenerateRequest` and the few things only the HTTP
//! door handles (`n`, `stream`, `logprobs`). Fields are read one by one from the JSON object, so that a
//! known field with the wrong type or value is refused naming that parameter, and unknown fields are
//! ignored, as OpenAI's server does. Range checks that the gRPC door shares (temperature, top_p, the
//! prompt's size, stop strings) are left to the pipeline's validation; its field names become OpenAI's
//! parameter names in [`param_for`].

use ferroserve_core::MAX_TOP_LOGPROBS;
use ferroserve_proto::v1 as pb;
use serde_json::{Map, Value};

use crate::HttpError;

/// Which endpoint a body was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `POST /v1/chat/completions`: `messages`, rendered with the chat template.
    Chat,
    /// `POST /v1/completions`: a raw `prompt`.
    Completions,
}

/// What the HTTP door adds to the pipeline's request shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// The largest `n`.
    pub max_n: u32,
    /// `max_tokens` for a request that sends none (OpenAI's own default is "up to the context").
    pub default_max_tokens: u32,
}

/// A parsed completion request.
#[derive(Debug, Clone)]
pub(crate) struct Parsed {
    /// The request for the pipeline (one copy; `n` copies run).
    pub body: pb::GenerateRequest,
    /// How many completions to generate for the prompt.
    pub n: u32,
    /// Server-sent events rather than one JSON body.
    pub stream: bool,
    /// A last chunk with the usage (`stream_options.include_usage`).
    pub include_usage: bool,
    /// `Some(k)`: return each token's logprob, with its `k` most likely alternatives.
    pub logprobs: Option<u32>,
}

pub(crate) type Object = Map<String, Value>;

pub(super) fn wrong(param: &str, expected: &str, got: &Value) -> HttpError {
    let kind = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    HttpError::invalid(param, format!("must be {expected}, got {kind}"))
}

/// A field, treating `null` as absent, as OpenAI's server does.
pub(super) fn field<'a>(o: &'a Object, name: &str) -> Option<&'a Value> {
    o.get(name).filter(|v| !v.is_null())
}

fn string(o: &Object, name: &str) -> Result<Option<String>, HttpError> {
    match field(o, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(wrong(name, "a string", v)),
    }
}

fn boolean(o: &Object, name: &str) -> Result<Option<bool>, HttpError> {
    match field(o, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(wrong(name, "true or false", v)),
    }
}

fn number(o: &Object, name: &str) -> Result<Option<f32>, HttpError> {
    match field(o, name) {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64().map(|x| x as f32)),
        Some(v) => Err(wrong(name, "a number", v)),
    }
}

fn integer(o: &Object, name: &str) -> Result<Option<i64>, HttpError> {
    match field(o, name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) => Ok(Some(i)),
            None => Err(HttpError::invalid(name, format!("must be an integer, got {n}"))),
        },
        Some(v) => Err(wrong(name, "an integer", v)),
    }
}

/// An integer in `lo..=hi`.
fn bounded(o: &Object, name: &str, lo: i64, hi: i64) -> Result<Option<u32>, HttpError> {
    match integer(o, name)? {
        None => Ok(None),
        Some(i) if (lo..=hi).contains(&i) => Ok(Some(i as u32)),
        Some(i) => Err(HttpError::invalid(
            name,
            format!("must be between {lo} and {hi}, got {i}"),
        )),
    }
}

/// A request body as a JSON object: what every endpoint reads first.
pub(crate) fn object(bytes: &[u8]) -> Result<Object, HttpError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        HttpError::invalid(
            "body",
            format!("is not valid JSON ({e}); send a JSON object with Content-Type: application/json"),
        )
    })?;
    match value {
        Value::Object(o) => Ok(o),
        other => Err(wrong("body", "a JSON object", &other)),
    }
}

/// Parses a completion request body.
pub(crate) fn parse(bytes: &[u8], endpoint: Endpoint, limits: &HttpLimits) -> Result<Parsed, HttpError> {
    parse_object(&object(bytes)?, endpoint, limits)
}

/// Reads a completion request from its JSON object.
pub(crate) fn parse_object(o: &Object, endpoint: Endpoint, limits: &HttpLimits) -> Result<Parsed, HttpError> {
    unsupported(o)?;
    let mut body = pb::GenerateRequest {
        model: string(o, "model")?.unwrap_or_default(),
        session: string(o, "user")?.unwrap_or_default(),
        stop: stop(o)?,
        sampling: sampling(o)?,
        priority: match integer(o, "priority")? {
            None => 0,
            Some(p) => i32::try_from(p).map_err(|_| HttpError::invalid("priority", "is out of range"))?,
        },
        constraint: super::format::constraint(o)?,
        ..Default::default()
    };
    match endpoint {
        Endpoint::Chat => body.messages = messages(o)?,
        Endpoint::Completions => body.prompt = prompt(o)?,
    }
    let max_tokens = match (
        bounded(o, "max_completion_tokens", 1, i64::from(u32::MAX))?,
        bounded(o, "max_tokens", 1, i64::from(u32::MAX))?,
    ) {
        (Some(m), _) | (None, Some(m)) => m,
        (None, None) => limits.default_max_tokens,
    };
    body.max_tokens = max_tokens;
    let n = bounded(o, "n", 1, i64::from(limits.max_n))?.unwrap_or(1);
    let stream = boolean(o, "stream")?.unwrap_or(false);
    let include_usage = match field(o, "stream_options") {
        None => false,
        Some(Value::Object(so)) => boolean(so, "include_usage")
            .map_err(|_| HttpError::invalid("stream_options.include_usage", "must be true or false"))?
            .unwrap_or(false),
        Some(v) => return Err(wrong("stream_options", "an object", v)),
    };
    Ok(Parsed {
        body,
        n,
        stream,
        include_usage,
        logprobs: logprobs(o, endpoint)?,
    })
}

/// Fields OpenAI defines that change the output in ways this server does not implement: refused rather
/// than silently ignored, since ignoring them would return something the client did not ask for.
fn unsupported(o: &Object) -> Result<(), HttpError> {
    if bounded(o, "best_of", 1, 1).is_err() {
        return Err(HttpError::invalid(
            "best_of",
            "is not supported; use `n` for several completions",
        ));
    }
    if boolean(o, "echo")? == Some(true) {
        return Err(HttpError::invalid("echo", "is not supported; leave it false"));
    }
    if string(o, "suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(HttpError::invalid("suffix", "is not supported"));
    }
    if field(o, "logit_bias").is_some_and(|v| v.as_object().is_none_or(|m| !m.is_empty())) {
        return Err(HttpError::invalid("logit_bias", "is not supported; leave it out"));
    }
    if field(o, "tools").is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(HttpError::invalid(
            "tools",
            "tool calling is not supported; leave `tools` out",
        ));
    }
    Ok(())
}

/// `stop`: a string or a list of strings.
fn stop(o: &Object) -> Result<Vec<String>, HttpError> {
    match field(o, "stop") {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                v => Err(wrong(&format!("stop[{i}]"), "a string", v)),
            })
            .collect(),
        Some(v) => Err(wrong("stop", "a string or a list of strings", v)),
    }
}

/// Sampling settings, or `None` when the client sent none, so that the serving version's defaults apply
/// as they do on gRPC. When any is sent, the rest take OpenAI's defaults (temperature 1, top_p 1).
fn sampling(o: &Object) -> Result<Option<pb::SamplingParams>, HttpError> {
    let temperature = number(o, "temperature")?;
    let top_p = number(o, "top_p")?;
    // vLLM's top_k: -1 (or 0) means no limit.
    let top_k = match integer(o, "top_k")? {
        None => None,
        Some(k) if k <= 0 => Some(0),
        Some(k) => Some(u32::try_from(k).map_err(|_| HttpError::invalid("top_k", "is out of range"))?),
    };
    // OpenAI's seed is a signed 64-bit integer; its bits seed the sampler.
    let seed = match field(o, "seed") {
        None => None,
        Some(Value::Number(n)) => Some(
            n.as_i64()
                .map(|i| i as u64)
                .or_else(|| n.as_u64())
                .ok_or_else(|| HttpError::invalid("seed", format!("must be an integer, got {n}")))?,
        ),
        Some(v) => return Err(wrong("seed", "an integer", v)),
    };
    let repetition_penalty = number(o, "repetition_penalty")?;
    let ignore_eos = boolean(o, "ignore_eos")?;
    let presence_penalty = number(o, "presence_penalty")?;
    let frequency_penalty = number(o, "frequency_penalty")?;
    if temperature.is_none()
        && top_p.is_none()
        && top_k.is_none()
        && seed.is_none()
        && repetition_penalty.is_none()
        && ignore_eos.is_none()
        && presence_penalty.is_none()
        && frequency_penalty.is_none()
    {
        return Ok(None);
    }
    Ok(Some(pb::SamplingParams {
        temperature: temperature.unwrap_or(1.0),
        top_p,
        top_k: top_k.unwrap_or(0),
        seed,
        repetition_penalty,
        ignore_eos: ignore_eos.unwrap_or(false),
        presence_penalty,
        frequency_penalty,
    }))
}

/// `messages`: roles and text contents (a string, or a list of text parts).
fn messages(o: &Object) -> Result<Vec<pb::ChatMessage>, HttpError> {
    let list = match field(o, "messages") {
        None => return Err(HttpError::invalid("messages", "is required: a list of {role, content}")),
        Some(Value::Array(list)) => list,
        Some(v) => return Err(wrong("messages", "a list of {role, content}", v)),
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let Value::Object(m) = m else {
                return Err(wrong(&format!("messages[{i}]"), "an object with role and content", m));
            };
            let role = match string(m, "role")
                .map_err(|_| HttpError::invalid(format!("messages[{i}].role"), "must be a string"))?
            {
                // OpenAI's newer name for the system role.
                Some(r) if r == "developer" => "system".to_string(),
                Some(r) => r,
                None => return Err(HttpError::invalid(format!("messages[{i}].role"), "is required")),
            };
            Ok(pb::ChatMessage {
                role,
                content: content(m.get("content"), i)?,
            })
        })
        .collect()
}

fn content(value: Option<&Value>, i: usize) -> Result<String, HttpError> {
    let param = format!("messages[{i}].content");
    match value {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    (kind, _) => {
                        return Err(HttpError::invalid(
                            format!("{param}[{j}]"),
                            format!(
                                "only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported, got type {}",
                                kind.unwrap_or("(none)")
                            ),
                        ));
                    }
                }
            }
            Ok(text)
        }
        Some(v) => Err(wrong(&param, "a string or a list of text parts", v)),
    }
}

/// `prompt`: a string, or a list holding one string.
fn prompt(o: &Object) -> Result<String, HttpError> {
    match field(o, "prompt") {
        None => Err(HttpError::invalid("prompt", "is required")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => Ok(s.clone()),
            _ => Err(HttpError::invalid(
                "prompt",
                "only one text prompt per request is supported (not a batch, not token ids); send one request per prompt",
            )),
        },
        Some(v) => Err(wrong("prompt", "a string", v)),
    }
}

/// Chat: `logprobs: true` with `top_logprobs` alternatives; completions: `logprobs: k`.
fn logprobs(o: &Object, endpoint: Endpoint) -> Result<Option<u32>, HttpError> {
    match endpoint {
        Endpoint::Chat => {
            let top = bounded(o, "top_logprobs", 0, i64::from(MAX_TOP_LOGPROBS))?;
            match (boolean(o, "logprobs")?.unwrap_or(false), top) {
                (true, top) => Ok(Some(top.unwrap_or(0))),
                (false, Some(t)) if t > 0 => Err(HttpError::invalid("top_logprobs", "needs `logprobs: true`")),
                (false, _) => Ok(None),
            }
        }
        Endpoint::Completions => bounded(o, "logprobs", 0, 5),
    }
}

/// OpenAI's parameter for one of the pipeline's field names (`sampling.top_p` is `top_p`, `session` is
/// `user`); `None` where the name is the same.
pub(crate) fn param_for(field: &str) -> Option<String> {
    if let Some(rest) = field.strip_prefix("sampling.") {
        return Some(rest.to_string());
    }
    if ["json_schema", "json_object", "regex", "grammar", "choice", "constraint"]
        .iter()
        .any(|c| field == *c || field.starts_with(&format!("{c}.")))
    {
        // The HTTP door checked the constraint's shape under the parameter the client sent; what the
        // worker refuses (it does not compile) is reported against response_format.
        return Some("response_format".into());
    }
    match field {
        "session" => Some("user".into()),
        "request_id" => Some("x-request-id".into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HttpLimits = HttpLimits {
        max_n: 4,
        default_max_tokens: 16,
    };

    fn chat(json: &str) -> Result<Parsed, HttpError> {
        parse(json.as_bytes(), Endpoint::Chat, &LIMITS)
    }

    fn param_of(json: &str) -> String {
        let e = chat(json).expect_err("refused");
        assert_eq!(e.status, 400, "{e:?}");
        e.param.expect("names the parameter")
    }

    #[test]
    fn a_full_chat_request_reads_every_field() {
        let p = chat(
            r#"{"model": "m@v", "messages": [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
                "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0.5, "top_p": 0.9, "seed": -1,
                "stop": "END", "n": 3, "logprobs": true, "top_logprobs": 2, "stream": true,
                "stream_options": {"include_usage": true}, "user": "u1", "top_k": -1,
                "repetition_penalty": 1.1, "ignore_eos": true, "priority": 5, "unknown": {"x": 1},
                "presence_penalty": 0.5, "frequency_penalty": -1}"#,
        )
        .expect("valid");
        let b = &p.body;
        assert_eq!(b.model, "m@v");
        assert_eq!(b.messages[0].role, "system");
        assert_eq!(b.messages[1].content, "hi there");
        assert_eq!(b.max_tokens, 7, "max_completion_tokens wins");
        let s = b.sampling.expect("sampling sent");
        assert_eq!(
            (s.temperature, s.top_p, s.top_k, s.seed),
            (0.5, Some(0.9), 0, Some(u64::MAX))
        );
        assert_eq!((s.repetition_penalty, s.ignore_eos), (Some(1.1), true));
        assert_eq!((s.presence_penalty, s.frequency_penalty), (Some(0.5), Some(-1.0)));
        assert_eq!(b.stop, ["END"]);
        assert_eq!((b.session.as_str(), b.priority), ("u1", 5));
        assert_eq!((p.n, p.stream, p.include_usage, p.logprobs), (3, true, true, Some(2)));
    }

    #[test]
    fn defaults_leave_sampling_to_the_version() {
        let p = chat(r#"{"model": "", "messages": [{"role": "user", "content": "hi"}]}"#).expect("valid");
        assert!(p.body.sampling.is_none());
        assert_eq!((p.body.max_tokens, p.n, p.stream, p.logprobs), (16, 1, false, None));
        let only_seed = chat(r#"{"messages": [{"role": "user", "content": "hi"}], "seed": 3}"#).expect("valid");
        assert_eq!(
            only_seed.body.sampling.expect("sent").temperature,
            1.0,
            "OpenAI's default temperature"
        );
    }

    #[test]
    fn completions_take_a_prompt_and_integer_logprobs() {
        let p = parse(
            br#"{"prompt": ["once"], "logprobs": 3, "stop": ["a", "b"]}"#,
            Endpoint::Completions,
            &LIMITS,
        )
        .expect("valid");
        assert_eq!((p.body.prompt.as_str(), p.logprobs), ("once", Some(3)));
        assert_eq!(p.body.stop, ["a", "b"]);
        let e = parse(br#"{"prompt": ["a", "b"]}"#, Endpoint::Completions, &LIMITS).expect_err("a batch");
        assert_eq!(e.param.as_deref(), Some("prompt"));
    }

    #[test]
    fn wrong_types_and_values_name_the_parameter() {
        let msgs = r#""messages": [{"role": "user", "content": "hi"}]"#;
        assert_eq!(param_of("[1]"), "body");
        assert_eq!(param_of("{not json"), "body");
        assert_eq!(param_of(&format!(r#"{{{msgs}, "temperature": "hot"}}"#)), "temperature");
        assert_eq!(param_of(&format!(r#"{{{msgs}, "max_tokens": 0}}"#)), "max_tokens");
        assert_eq!(param_of(&format!(r#"{{{msgs}, "max_tokens": 1.5}}"#)), "max_tokens");
        assert_eq!(param_of(&format!(r#"{{{msgs}, "n": 5}}"#)), "n");
        assert_eq!(param_of(&format!(r#"{{{msgs}, "stop": [1]}}"#)), "stop[0]");
        assert_eq!(param_of(&format!(r#"{{{msgs}, "seed": "x"}}"#)), "seed");
        assert_eq!(
            param_of(&format!(r#"{{{msgs}, "stream_options": 1}}"#)),
            "stream_options"
        );
        assert_eq!(
            param_of(&format!(r#"{{{msgs}, "top_logprobs": 21, "logprobs": true}}"#)),
            "top_logprobs"
        );
        assert_eq!(param_of(&format!(r#"{{{msgs}, "top_logprobs": 2}}"#)), "top_logprobs");
        assert_eq!(
            param_of(&format!(r#"{{{msgs}, "presence_penalty": "x"}}"#)),
            "presence_penalty"
        );
        assert_eq!(param_of(&format!(r#"{{{msgs}, "tools": [{{}}]}}"#)), "tools");
        assert_eq!(
            param_of(&format!(r#"{{{msgs}, "response_format": {{"type": "xml"}}}}"#)),
            "response_format.type"
        );
        assert_eq!(param_of(r#"{"messages": "hi"}"#), "messages");
        assert_eq!(param_of(r#"{"messages": [{"content": "hi"}]}"#), "messages[0].role");
        assert_eq!(
            param_of(r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#),
            "messages[0].content[0]"
        );
        assert_eq!(param_of("{}"), "messages");
    }

    #[test]
    fn pipeline_fields_become_openai_parameters() {
        assert_eq!(param_for("sampling.top_p").as_deref(), Some("top_p"));
        assert_eq!(param_for("session").as_deref(), Some("user"));
        assert_eq!(param_for("messages[1].role"), None);
    }
}
