//! What a backend streams back for one request: token chunks, then exactly one completion.

/// One item of a generation stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Newly generated tokens and the text they complete.
    Token(TokenChunk),
    /// The last event of every successful stream.
    Complete(Completion),
}

/// Tokens produced in one step, with the text that is now safe to show.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenChunk {
    /// Text released by these tokens. Empty while a partial UTF-8 character or a possible stop string is
    /// held back; the held text comes out with a later chunk.
    pub text: String,
    /// The sampled token ids.
    pub token_ids: Vec<u32>,
    /// Log-probability of each sampled token under the model's (unmodified) distribution.
    pub logprobs: Vec<f32>,
    /// Entropy, in nats, of the (unmodified) distribution each token was sampled from.
    pub entropies: Vec<f32>,
    /// One per token when the request asked for logprobs (`top_logprobs`); empty otherwise.
    pub details: Vec<TokenDetail>,
}

/// A generated token's text and the most likely tokens at its position.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenDetail {
    /// The token's bytes, decoded alone.
    pub piece: Vec<u8>,
    /// The most likely tokens, most likely first.
    pub top: Vec<Alternative>,
}

/// A token the model considered, with its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Alternative {
    /// The token id.
    pub token: u32,
    /// Its bytes, decoded alone.
    pub piece: Vec<u8>,
    /// `log softmax(logits)[token]` under the model's unmodified distribution.
    pub logprob: f32,
}

/// How and when a request ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Completion {
    /// Why generation stopped.
    pub finish: FinishReason,
    /// Token counts for billing and limits.
    pub usage: Usage,
    /// Where the time went.
    pub timings: Timings,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// A stop string appeared.
    Stop,
    /// The model's end-of-sequence (or end-of-turn) token.
    Eos,
    /// The content filter ended it.
    Filtered,
    /// The server ended it (shutdown, kill switch).
    Cancelled,
}

impl FinishReason {
    /// Lower-case name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Eos => "eos",
            FinishReason::Filtered => "filtered",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Tokens in the rendered prompt.
    pub prompt_tokens: u32,
    /// Tokens generated (stop-string tokens included, EOS excluded).
    pub completion_tokens: u32,
    /// Of the prompt tokens, those whose KV came from the prefix cache instead of being computed
    /// (OpenAI's `prompt_tokens_details.cached_tokens`).
    pub cached_tokens: u32,
}

/// Milliseconds from the request's arrival.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// Until the engine started on it.
    pub queue_ms: f64,
    /// Until the first token was sampled.
    pub time_to_first_token_ms: f64,
    /// Until it completed.
    pub total_ms: f64,
}
