//! A mock engine, for measuring everything but the model: `ferroserve worker --mock` serves it. It
//! generates no text worth reading: each request streams `max_tokens` tokens (one per chunk, `" tok"`
//! each) after an optional delay per token, and completes with `Length`. Named as a mock everywhere it
//! shows: its version is `mock`, and it says so in its log at startup.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferroserve_core::{
    Backend, BackendError, Completion, Event, EventStream, FinishReason, GenerationDefaults, Input, ModelInfo,
    StatsStream, Timings, TokenChunk, Usage, ValidRequest, WorkerStats,
};
use futures::future::BoxFuture;
use futures::{StreamExt, stream};

/// How often the mock reports its counters (the router counts a silent worker unhealthy).
const STATS_EVERY: Duration = Duration::from_millis(500);

/// A backend that streams placeholder tokens without a model.
pub struct MockBackend {
    model: ModelInfo,
    location: String,
    /// Time per generated token; zero streams them as fast as the transport takes them.
    per_token: Duration,
    accepted: Arc<AtomicU64>,
    completed: Arc<AtomicU64>,
    generated: Arc<AtomicU64>,
}

impl MockBackend {
    /// A mock serving model `name` (version `mock`), taking `per_token` per token.
    pub fn new(name: &str, per_token: Duration) -> MockBackend {
        MockBackend {
            model: ModelInfo {
                name: name.to_string(),
                version: "mock".into(),
                context_length: 1 << 20,
                defaults: GenerationDefaults::default(),
            },
            location: "in-process mock".into(),
            per_token,
            accepted: Arc::default(),
            completed: Arc::default(),
            generated: Arc::default(),
        }
    }
}

/// A rough prompt length: one token per four bytes.
fn prompt_tokens(input: &Input) -> u32 {
    let bytes = match input {
        Input::Prompt(p) => p.len(),
        Input::Chat(messages) => messages.iter().map(|m| m.content.len()).sum(),
    };
    u32::try_from(bytes.div_ceil(4)).unwrap_or(u32::MAX)
}

impl Backend for MockBackend {
    fn model(&self) -> &ModelInfo {
        &self.model
    }

    fn location(&self) -> &str {
        &self.location
    }

    fn generate(&self, request: ValidRequest) -> BoxFuture<'_, Result<EventStream, BackendError>> {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let n = request.max_tokens;
        let prompt = prompt_tokens(&request.input);
        let per_token = self.per_token;
        let (completed, generated) = (Arc::clone(&self.completed), Arc::clone(&self.generated));
        let tokens = stream::iter(0..n).then(move |i| async move {
            if !per_token.is_zero() {
                tokio::time::sleep(per_token).await;
            }
            Ok(Event::Token(TokenChunk {
                text: " tok".into(),
                token_ids: vec![i],
                logprobs: vec![0.0],
                entropies: vec![0.0],
                details: Vec::new(),
            }))
        });
        let done = stream::once(async move {
            completed.fetch_add(1, Ordering::Relaxed);
            generated.fetch_add(u64::from(n), Ordering::Relaxed);
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            Ok(Event::Complete(Completion {
                finish: FinishReason::Length,
                usage: Usage {
                    prompt_tokens: prompt,
                    completion_tokens: n,
                    cached_tokens: 0,
                },
                timings: Timings {
                    queue_ms: 0.0,
                    time_to_first_token_ms: ms,
                    total_ms: ms,
                },
            }))
        });
        Box::pin(async move { Ok(tokens.chain(done).boxed()) })
    }

    fn watch_stats(&self) -> StatsStream {
        let (accepted, completed, generated) = (
            Arc::clone(&self.accepted),
            Arc::clone(&self.completed),
            Arc::clone(&self.generated),
        );
        let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(STATS_EVERY));
        ticks
            .map(move |_| {
                let (a, c) = (accepted.load(Ordering::Relaxed), completed.load(Ordering::Relaxed));
                WorkerStats {
                    accepted: a,
                    completed: c,
                    running: u32::try_from(a.saturating_sub(c)).unwrap_or(u32::MAX),
                    generated_tokens: generated.load(Ordering::Relaxed),
                    ..WorkerStats::default()
                }
            })
            .boxed()
    }

    fn snapshot_drift_baseline(&self) -> BoxFuture<'_, Result<u64, BackendError>> {
        Box::pin(async { Ok(0) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_mock_streams_max_tokens_then_completes_and_counts_them() {
        let mock = MockBackend::new("m", Duration::ZERO);
        assert_eq!(mock.model().qualified(), "m@mock");
        let request = ValidRequest {
            request_id: "r".into(),
            input: Input::Prompt("twelve bytes".into()),
            max_tokens: 5,
            sampling: ferroserve_core::Sampling::GREEDY,
            stop: Vec::new(),
            arrived: std::time::SystemTime::now(),
            priority: 0,
            continuation: Vec::new(),
            top_logprobs: None,
            constraint: None,
        };
        let events: Vec<_> = mock.generate(request).await.unwrap().collect().await;
        assert_eq!(events.len(), 6);
        let Ok(Event::Complete(done)) = events.last().unwrap() else {
            panic!("{events:?}")
        };
        assert_eq!(
            (done.finish, done.usage.completion_tokens, done.usage.prompt_tokens),
            (FinishReason::Length, 5, 3)
        );
        let stats = mock.watch_stats().next().await.unwrap();
        assert_eq!((stats.accepted, stats.completed, stats.generated_tokens), (1, 1, 5));
    }
}
