//! One request's timings, built chunk by chunk as the stream arrives.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How a failed request failed. Rate-limited requests are counted apart from failures: they are the
/// server's admission control working, not the server breaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// gRPC RESOURCE_EXHAUSTED, HTTP 429.
    RateLimited,
    /// gRPC UNAVAILABLE, HTTP 503, or a refused connection.
    Unavailable,
    /// gRPC INVALID_ARGUMENT / FAILED_PRECONDITION / OUT_OF_RANGE / NOT_FOUND, HTTP 400, 404, 422.
    Invalid,
    /// The per-request timeout (or gRPC DEADLINE_EXCEEDED).
    Timeout,
    /// Anything else: a broken stream, a 500, an unparsable chunk.
    Other,
}

impl ErrorKind {
    /// Every kind, in report order.
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::RateLimited,
        ErrorKind::Unavailable,
        ErrorKind::Invalid,
        ErrorKind::Timeout,
        ErrorKind::Other,
    ];

    /// The label used in tables and JSON.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Other => "other",
        }
    }

    /// The kind for a gRPC status code.
    pub fn from_grpc(code: tonic::Code) -> Self {
        use tonic::Code;
        match code {
            Code::ResourceExhausted => ErrorKind::RateLimited,
            Code::Unavailable => ErrorKind::Unavailable,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange | Code::NotFound => ErrorKind::Invalid,
            Code::DeadlineExceeded => ErrorKind::Timeout,
            _ => ErrorKind::Other,
        }
    }

    /// The kind for an HTTP status.
    pub fn from_http(status: u16) -> Self {
        match status {
            429 => ErrorKind::RateLimited,
            503 => ErrorKind::Unavailable,
            400 | 404 | 413 | 422 => ErrorKind::Invalid,
            408 | 504 => ErrorKind::Timeout,
            _ => ErrorKind::Other,
        }
    }
}

/// How the output tokens of a request were counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenCount {
    /// The server reported them: Ferroserve's `usage`, or OpenAI `usage` (`stream_options.include_usage`).
    Usage,
    /// Counted from the stream: one token per content chunk (what a server without usage allows).
    Chunks,
}

/// A failed request.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The class it is counted under.
    pub kind: ErrorKind,
    /// The server's message, for the first few failures printed at the end.
    pub message: String,
}

/// The timings of one request, relative to when it was sent.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was sent, from the start of the measured phase.
    pub sent_at: Duration,
    /// Send to last byte (or to the failure).
    pub e2e: Duration,
    /// Send to the first chunk that carried output; `None` if none did.
    pub ttft: Option<Duration>,
    /// Inter-token latencies: each gap between content chunks, split evenly over the tokens the later
    /// chunk carries (a chunk of k tokens counts as k gaps of gap/k).
    pub itl: Vec<Duration>,
    /// Output tokens.
    pub output_tokens: u32,
    /// Prompt tokens: the server's count where it reports one, else the prompt's own count.
    pub input_tokens: u32,
    /// How `output_tokens` was counted.
    pub counted_by: TokenCount,
    /// `None` when the request succeeded.
    pub failure: Option<Failure>,
}

impl Sample {
    /// TPOT = (e2e − TTFT) / (output tokens − 1), vLLM's definition; `None` below two tokens.
    pub fn tpot(&self) -> Option<Duration> {
        let ttft = self.ttft?;
        (self.output_tokens > 1).then(|| (self.e2e.saturating_sub(ttft)) / (self.output_tokens - 1))
    }

    /// Whether the request succeeded.
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }
}

/// Builds a [`Sample`] as the stream arrives: call [`Recorder::chunk`] per content chunk, then
/// [`Recorder::finish`] or [`Recorder::fail`].
#[derive(Debug)]
pub struct Recorder {
    /// When the request was sent.
    start: Instant,
    /// `start` relative to the measured phase.
    sent_at: Duration,
    /// Arrival of the previous content chunk.
    last: Option<Instant>,
    /// Filled in as chunks arrive.
    sample: Sample,
}

impl Recorder {
    /// Starts timing now. `prompt_tokens` is the prompt's own count, used unless the server reports one.
    pub fn start(sent_at: Duration, prompt_tokens: u32) -> Self {
        Recorder {
            start: Instant::now(),
            sent_at,
            last: None,
            sample: Sample {
                sent_at,
                e2e: Duration::ZERO,
                ttft: None,
                itl: Vec::new(),
                output_tokens: 0,
                input_tokens: prompt_tokens,
                counted_by: TokenCount::Chunks,
                failure: None,
            },
        }
    }

    /// A chunk carrying `tokens` output tokens arrived now.
    pub fn chunk(&mut self, tokens: u32) {
        self.chunk_at(Instant::now(), tokens);
    }

    /// A chunk carrying `tokens` output tokens arrived at `now`.
    pub fn chunk_at(&mut self, now: Instant, tokens: u32) {
        if tokens == 0 {
            return;
        }
        match self.last {
            None => self.sample.ttft = Some(now - self.start),
            Some(prev) => {
                let gap = (now - prev) / tokens;
                self.sample.itl.extend(std::iter::repeat_n(gap, tokens as usize));
            }
        }
        self.last = Some(now);
        self.sample.output_tokens += tokens;
    }

    /// The server's own token counts, which replace the counts from the stream.
    pub fn usage(&mut self, prompt_tokens: Option<u32>, completion_tokens: u32) {
        if let Some(p) = prompt_tokens.filter(|&p| p > 0) {
            self.sample.input_tokens = p;
        }
        self.sample.output_tokens = completion_tokens;
        self.sample.counted_by = TokenCount::Usage;
    }

    /// The request completed.
    pub fn finish(mut self) -> Sample {
        self.sample.e2e = self.start.elapsed();
        self.sample
    }

    /// The request failed.
    pub fn fail(mut self, kind: ErrorKind, message: impl Into<String>) -> Sample {
        self.sample.e2e = self.start.elapsed();
        self.sample.failure = Some(Failure {
            kind,
            message: message.into(),
        });
        self.sample
    }

    /// When the request was sent, relative to the measured phase.
    pub fn sent_at(&self) -> Duration {
        self.sent_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_of_k_tokens_counts_k_even_gaps() {
        let mut r = Recorder::start(Duration::ZERO, 5);
        let t0 = r.start;
        r.chunk_at(t0 + Duration::from_millis(100), 1);
        r.chunk_at(t0 + Duration::from_millis(110), 1);
        r.chunk_at(t0 + Duration::from_millis(140), 3);
        r.chunk_at(t0 + Duration::from_millis(150), 0);
        let s = r.finish();
        assert_eq!(s.ttft, Some(Duration::from_millis(100)));
        assert_eq!(s.output_tokens, 5);
        assert_eq!(
            s.itl,
            vec![
                Duration::from_millis(10),
                Duration::from_millis(10),
                Duration::from_millis(10),
                Duration::from_millis(10)
            ]
        );
        assert_eq!(s.counted_by, TokenCount::Chunks);
        assert_eq!(s.input_tokens, 5);
    }

    #[test]
    fn tpot_follows_vllm() {
        let s = Sample {
            sent_at: Duration::ZERO,
            e2e: Duration::from_millis(1100),
            ttft: Some(Duration::from_millis(100)),
            itl: vec![],
            output_tokens: 11,
            input_tokens: 1,
            counted_by: TokenCount::Usage,
            failure: None,
        };
        assert_eq!(s.tpot(), Some(Duration::from_millis(100)));
        let one = Sample { output_tokens: 1, ..s };
        assert_eq!(one.tpot(), None);
    }

    #[test]
    fn usage_replaces_stream_counts() {
        let mut r = Recorder::start(Duration::ZERO, 7);
        r.chunk(1);
        r.usage(Some(9), 4);
        let s = r.finish();
        assert_eq!(
            (s.input_tokens, s.output_tokens, s.counted_by),
            (9, 4, TokenCount::Usage)
        );
        let mut r = Recorder::start(Duration::ZERO, 7);
        r.usage(Some(0), 4);
        assert_eq!(r.finish().input_tokens, 7, "a zero prompt count is no count");
    }

    #[test]
    fn status_classes() {
        assert_eq!(
            ErrorKind::from_grpc(tonic::Code::ResourceExhausted),
            ErrorKind::RateLimited
        );
        assert_eq!(ErrorKind::from_grpc(tonic::Code::Unavailable), ErrorKind::Unavailable);
        assert_eq!(ErrorKind::from_grpc(tonic::Code::InvalidArgument), ErrorKind::Invalid);
        assert_eq!(ErrorKind::from_grpc(tonic::Code::DeadlineExceeded), ErrorKind::Timeout);
        assert_eq!(ErrorKind::from_grpc(tonic::Code::Internal), ErrorKind::Other);
        assert_eq!(ErrorKind::from_http(429), ErrorKind::RateLimited);
        assert_eq!(ErrorKind::from_http(503), ErrorKind::Unavailable);
        assert_eq!(ErrorKind::from_http(400), ErrorKind::Invalid);
        assert_eq!(ErrorKind::from_http(500), ErrorKind::Other);
    }
}
