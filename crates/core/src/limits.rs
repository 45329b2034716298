//! Limits on a request's shape, and the one check of them that the router runs on client input and a
//! worker runs again on what reaches it over the network. Every refusal names the field and the limit.

use crate::{Input, Sampling, ValidRequest};

/// Temperatures below this are greedy: dividing logits by a smaller number overflows `f32`. vLLM uses the
/// same cut-off.
pub const GREEDY_BELOW_TEMPERATURE: f32 = 1e-5;
/// The largest temperature accepted; far above what any client sends (OpenAI's range ends at 2).
pub const MAX_TEMPERATURE: f32 = 100.0;
/// The most alternatives per token a request may ask for with its logprobs (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// The largest presence or frequency penalty, either way (OpenAI's range).
pub const MAX_OPENAI_PENALTY: f32 = 2.0;
/// The largest repetition penalty accepted.
pub const MAX_REPETITION_PENALTY: f32 = 100.0;
/// The longest part of a value echoed back in an error message, in characters.
const ECHO_CHARS: usize = 48;

/// Limits on request shape, from the `[router]` config section. Each is refused with INVALID_ARGUMENT
/// naming the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Largest encoded request message the transport decodes, in bytes; enforced before decoding.
    pub max_request_bytes: usize,
    /// Largest prompt, or all messages' contents together, in bytes.
    pub max_prompt_bytes: usize,
    /// Most chat messages in one request.
    pub max_messages: usize,
    /// Longest `model` field, in bytes.
    pub max_model_bytes: usize,
    /// Longest `session` field, in bytes.
    pub max_session_bytes: usize,
    /// Longest client-supplied request id, in bytes.
    pub max_request_id_bytes: usize,
    /// Most stop strings per request.
    pub max_stop_sequences: usize,
    /// Longest stop string, in bytes.
    pub max_stop_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_request_bytes: 1 << 20,
            max_prompt_bytes: 256 << 10,
            max_messages: 512,
            max_model_bytes: 128,
            max_session_bytes: 256,
            max_request_id_bytes: 128,
            max_stop_sequences: 16,
            max_stop_bytes: 256,
        }
    }
}

/// A request field that breaks a rule: what to change, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Violation {
    /// The field to fix, e.g. `messages[3].content` or `sampling.top_p`.
    pub field: String,
    /// What is wrong, with the limit that applies.
    pub message: String,
}

pub(crate) fn violation(field: impl Into<String>, message: impl Into<String>) -> Violation {
    Violation {
        field: field.into(),
        message: message.into(),
    }
}

/// `value` shortened for an error message: at most a few dozen characters, control characters escaped,
/// so that a client's input can neither flood a message nor forge a log line.
pub fn echo(value: &str) -> String {
    let mut out: String = value.chars().take(ECHO_CHARS).flat_map(char::escape_debug).collect();
    if value.chars().count() > ECHO_CHARS {
        out.push('…');
    }
    out
}

/// True for a character allowed in a request id: ASCII letters and digits and `- _ . : / + = @`.
fn id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.:/+=@".contains(c)
}

impl RequestLimits {
    /// Checks a byte length against a limit named `limit`.
    pub fn check_len(field: &str, len: usize, max: usize, limit: &str) -> Result<(), Violation> {
        if len > max {
            return Err(violation(
                field,
                format!("is {len} bytes; the limit {limit} is {max} bytes"),
            ));
        }
        Ok(())
    }

    /// A request id: non-empty, at most `max_request_id_bytes`, and only characters safe in logs and
    /// headers.
    pub fn check_request_id(&self, id: &str) -> Result<(), Violation> {
        Self::check_len(
            "request_id",
            id.len(),
            self.max_request_id_bytes,
            "max_request_id_bytes",
        )?;
        if let Some(c) = id.chars().find(|c| !id_char(*c)) {
            return Err(violation(
                "request_id",
                format!("contains {:?}; use only ASCII letters, digits and - _ . : / + = @", c),
            ));
        }
        if id.is_empty() {
            return Err(violation("request_id", "is empty"));
        }
        Ok(())
    }

    /// A free-text identifier (`model`, `session`): at most `max` bytes and no control characters.
    pub fn check_label(field: &str, value: &str, max: usize, limit: &str) -> Result<(), Violation> {
        Self::check_len(field, value.len(), max, limit)?;
        if value.chars().any(char::is_control) {
            return Err(violation(
                field,
                format!("`{}` contains a control character; remove it", echo(value)),
            ));
        }
        Ok(())
    }

    /// The input: a non-empty prompt, or 1 to `max_messages` messages, within `max_prompt_bytes` in all.
    pub fn check_input(&self, input: &Input) -> Result<(), Violation> {
        match input {
            Input::Prompt(text) => {
                if text.is_empty() {
                    return Err(violation("prompt", "the prompt is empty; send some text"));
                }
                Self::check_len("prompt", text.len(), self.max_prompt_bytes, "max_prompt_bytes")
            }
            Input::Chat(messages) => {
                if messages.is_empty() {
                    return Err(violation(
                        "messages",
                        "the conversation is empty; send at least one message",
                    ));
                }
                if messages.len() > self.max_messages {
                    return Err(violation(
                        "messages",
                        format!(
                            "{} messages given; the limit max_messages is {}",
                            messages.len(),
                            self.max_messages
                        ),
                    ));
                }
                let total: usize = messages.iter().map(|m| m.content.len()).sum();
                if total > self.max_prompt_bytes {
                    return Err(violation(
                        "messages",
                        format!(
                            "the messages' contents are {total} bytes together; the limit max_prompt_bytes is {} bytes",
                            self.max_prompt_bytes
                        ),
                    ));
                }
                Ok(())
            }
        }
    }

    /// Stop strings: at most `max_stop_sequences`, each 1 to `max_stop_bytes` bytes.
    pub fn check_stop(&self, stop: &[String]) -> Result<(), Violation> {
        if stop.len() > self.max_stop_sequences {
            return Err(violation(
                "stop",
                format!(
                    "{} stop strings given; the limit max_stop_sequences is {}",
                    stop.len(),
                    self.max_stop_sequences
                ),
            ));
        }
        for (i, s) in stop.iter().enumerate() {
            if s.is_empty() || s.len() > self.max_stop_bytes {
                return Err(violation(
                    format!("stop[{i}]"),
                    format!(
                        "must be 1 to {} bytes long (max_stop_bytes; got {})",
                        self.max_stop_bytes,
                        s.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Everything a validated request must meet, checked again where it arrives from the network.
    pub fn check(&self, r: &ValidRequest) -> Result<(), Violation> {
        self.check_request_id(&r.request_id)?;
        self.check_input(&r.input)?;
        if r.max_tokens == 0 {
            return Err(violation("max_tokens", "must be at least 1 (got 0)"));
        }
        if r.continuation.len() > r.max_tokens as usize {
            return Err(violation(
                "continuation",
                format!(
                    "{} tokens already generated, more than max_tokens ({})",
                    r.continuation.len(),
                    r.max_tokens
                ),
            ));
        }
        check_sampling(&r.sampling)?;
        if let Some(c) = &r.constraint {
            c.check("constraint")?;
        }
        self.check_stop(&r.stop)
    }
}

/// Resolved sampling settings within the ranges the sampler handles: temperature 0 or in
/// [`GREEDY_BELOW_TEMPERATURE`, `MAX_TEMPERATURE`], `top_p` in (0, 1], a finite repetition penalty in
/// (0, [`MAX_REPETITION_PENALTY`]], presence and frequency penalties in [-2, 2].
pub fn check_sampling(s: &Sampling) -> Result<(), Violation> {
    let t = s.temperature;
    if !(t == 0.0 || (GREEDY_BELOW_TEMPERATURE..=MAX_TEMPERATURE).contains(&t)) {
        return Err(violation(
            "sampling.temperature",
            format!("must be a finite number >= 0 and at most {MAX_TEMPERATURE}, 0 meaning greedy (got {t})"),
        ));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(violation(
            "sampling.top_p",
            format!("must be in (0, 1], or unset for 1.0 (got {})", s.top_p),
        ));
    }
    let p = s.repetition_penalty;
    if !(p > 0.0 && p <= MAX_REPETITION_PENALTY) {
        return Err(violation(
            "sampling.repetition_penalty",
            format!("must be a finite number > 0 and at most {MAX_REPETITION_PENALTY}, 1 meaning none (got {p})"),
        ));
    }
    for (field, v) in [
        ("sampling.presence_penalty", s.presence_penalty),
        ("sampling.frequency_penalty", s.frequency_penalty),
    ] {
        if !(-MAX_OPENAI_PENALTY..=MAX_OPENAI_PENALTY).contains(&v) {
            return Err(violation(
                field,
                format!("must be a number in [-{MAX_OPENAI_PENALTY}, {MAX_OPENAI_PENALTY}], 0 meaning none (got {v})"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChatMessage, Role};

    #[test]
    fn ids_with_unsafe_characters_are_refused() {
        let l = RequestLimits::default();
        assert!(l.check_request_id("req-0123:abc/def+x=y@z").is_ok());
        for bad in ["a\nb", "a b", "ä", "", &"x".repeat(129)] {
            assert!(l.check_request_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn echo_is_short_and_escapes_control_characters() {
        assert_eq!(echo("a\nb"), "a\\nb");
        let long = echo(&"x".repeat(1000));
        assert!(long.chars().count() <= ECHO_CHARS + 1 && long.ends_with('…'));
    }

    #[test]
    fn inputs_are_bounded_in_count_and_bytes() {
        let l = RequestLimits {
            max_prompt_bytes: 10,
            max_messages: 2,
            ..RequestLimits::default()
        };
        let m = |c: &str| ChatMessage {
            role: Role::User,
            content: c.into(),
        };
        assert!(l.check_input(&Input::Prompt("0123456789".into())).is_ok());
        let e = l.check_input(&Input::Prompt("01234567890".into())).unwrap_err();
        assert!(e.message.contains("max_prompt_bytes"), "{e}");
        assert!(l.check_input(&Input::Chat(vec![m(""), m(""), m("")])).is_err());
        let e = l.check_input(&Input::Chat(vec![m("012345"), m("012345")])).unwrap_err();
        assert_eq!(e.field, "messages");
        assert!(l.check_input(&Input::Chat(vec![])).is_err());
    }

    #[test]
    fn sampling_out_of_range_is_refused() {
        let ok = Sampling::GREEDY;
        assert!(check_sampling(&ok).is_ok());
        for t in [-1.0, f32::NAN, f32::INFINITY, 1e-30, 101.0] {
            let s = Sampling { temperature: t, ..ok };
            assert_eq!(check_sampling(&s).unwrap_err().field, "sampling.temperature", "{t}");
        }
        for p in [0.0, f32::INFINITY, f32::NAN, 1e9] {
            let s = Sampling {
                repetition_penalty: p,
                ..ok
            };
            assert!(check_sampling(&s).is_err(), "{p}");
        }
    }
}
