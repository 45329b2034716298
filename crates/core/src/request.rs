//! A request after validation: every field is within limits and every default is resolved.

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
    };

    /// True when the next token is simply the most likely one.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
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
        }
    }
}
