//! A request after validation: every field is within limits and every default is resolved.

use crate::Constraint;
use std::time::SystemTime;

/// A generation request that has passed validation. Only the router builds these from client input;
/// everything downstream may rely on the invariants documented per field.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    /// Non-empty id, either the client's or one the router made; echoed back and used in logs.
    pub request_id: String,
    /// What to feed the model: non-empty raw text or a non-empty conversation.
    pub input: Input,
    /// At least 1. The engine checks that prompt plus this fits the context.
    pub max_tokens: u32,
    /// Fully resolved sampling settings.
    pub sampling: Sampling,
    /// Non-empty stop strings; generation ends before the first occurrence of any.
    pub stop: Vec<String>,
    /// When the router accepted the request; queue time and TTFT count from here.
    pub arrived: SystemTime,
    /// Engine admission order: higher first; equal priorities are first come, first served.
    pub priority: i32,
    /// Tokens already generated (and streamed) for this request by a worker that failed: the engine
    /// continues after them, as if it had generated them itself, with the sampler advanced past them, so
    /// that a seeded stream goes on exactly. Empty for a new request. At most `max_tokens`.
    pub continuation: Vec<u32>,
    /// `Some(k)`: stream each generated token's text and bytes with its `k` most likely alternatives
    /// (at most [`crate::MAX_TOP_LOGPROBS`]); `None`: only the sampled tokens' logprobs, as always.
    pub top_logprobs: Option<u32>,
    /// What the output must match (a JSON schema, a regex, a grammar, a choice); `None`: free text.
    pub constraint: Option<Constraint>,
}

/// The two ways to give a model its input.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Raw text, tokenized as-is with no template.
    Prompt(String),
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// Who is speaking.
    pub role: Role,
    /// What they said.
    pub content: String,
}

/// The chat roles a template understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The human side.
    User,
    /// The model's earlier replies.
    Assistant,
}

impl Role {
    /// The role's name as chat templates spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    /// Parses a role name as a client sends it; `None` for anything unknown.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

/// Sampling settings with every default resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy; otherwise finite and positive.
    pub temperature: f32,
    /// In (0, 1]; 1 keeps the whole distribution.
    pub top_p: f32,
    /// 0 means no limit.
    pub top_k: u32,
    /// Seeds the per-request random generator, so the same seed gives the same text.
    pub seed: u64,
    /// 1 means none; values above 1 discourage repeating tokens already in the context.
    pub repetition_penalty: f32,
    /// Generate past the end-of-sequence token (benchmarks: every server produces `max_tokens`).
    pub ignore_eos: bool,
    /// In [-2, 2]; subtracted once from the logit of every token generated so far (OpenAI's).
    pub presence_penalty: f32,
    /// In [-2, 2]; subtracted from a generated token's logit once per time it was generated (OpenAI's).
    pub frequency_penalty: f32,
}

impl Sampling {
    /// Greedy decoding with no penalty.
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
        repetition_penalty: 1.0,
        ignore_eos: false,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
    };

    /// True when the next token is simply the most likely one.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// What a model version does with a request that leaves things to it: part of what a version is, beside
/// its weights and label. The engine applies the system prompt (it renders the chat template); the router
/// applies sampling and stop strings once it knows which version serves a request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerationDefaults {
    /// System message for conversations that bring none; `None` leaves it to the chat template.
    pub system_prompt: Option<String>,
    /// Sampling for requests that send none; `None` means greedy. Its seed is not used: each request
    /// draws its own (or brings one), so that requests differ.
    pub sampling: Option<Sampling>,
    /// Stop strings of this version, added to each request's own (end-of-turn markers that the tokenizer
    /// does not treat as end-of-sequence, for instance).
    pub stop: Vec<String>,
}

impl GenerationDefaults {
    /// `request` as this version runs it. `sampling_given` says whether the client sent sampling settings;
    /// when it did not, the version's sampling applies, with the request's seed and `ignore_eos`. The
    /// version's stop strings are added after the request's, without duplicates.
    pub fn apply(&self, request: &ValidRequest, sampling_given: bool) -> ValidRequest {
        let mut r = request.clone();
        if let (Some(s), false) = (self.sampling, sampling_given) {
            r.sampling = Sampling {
                seed: request.sampling.seed,
                ignore_eos: request.sampling.ignore_eos,
                ..s
            };
        }
        for s in &self.stop {
            if !r.stop.contains(s) {
                r.stop.push(s.clone());
            }
        }
        r
    }
}

impl ValidRequest {
    /// A greedy request for raw text; a convenience for tests and tools.
    pub fn greedy_prompt(request_id: &str, prompt: &str, max_tokens: u32) -> ValidRequest {
        ValidRequest {
            request_id: request_id.to_string(),
            input: Input::Prompt(prompt.to_string()),
            max_tokens,
            sampling: Sampling::GREEDY,
            stop: Vec::new(),
            arrived: SystemTime::now(),
            priority: 0,
            continuation: Vec::new(),
            top_logprobs: None,
            constraint: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_only_what_the_client_left_open() {
        let defaults = GenerationDefaults {
            system_prompt: None,
            sampling: Some(Sampling {
                temperature: 0.7,
                top_p: 0.9,
                seed: 99,
                ..Sampling::GREEDY
            }),
            stop: vec!["\n\nUser:".into(), "END".into()],
        };
        let mut r = ValidRequest::greedy_prompt("a", "hi", 4);
        r.sampling.seed = 5;
        r.stop = vec!["END".into()];
        let open = defaults.apply(&r, false);
        assert_eq!((open.sampling.temperature, open.sampling.top_p), (0.7, 0.9));
        assert_eq!(open.sampling.seed, 5, "the request's own seed, not the version's");
        assert_eq!(open.stop, ["END", "\n\nUser:"]);
        let given = defaults.apply(&r, true);
        assert_eq!(given.sampling, r.sampling, "the client's sampling wins");
        assert_eq!(given.stop, open.stop, "stop strings add up either way");
        assert_eq!(GenerationDefaults::default().apply(&r, false), r);
    }
}
