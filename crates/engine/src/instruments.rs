//! The engine's metric handles, registered once per engine with its model and version labels, so the hot
//! loop records without building label sets per token.

use ferroserve_core::{FinishReason, ModelInfo};
use ferroserve_telemetry::names;
use metrics::{Counter, Gauge, Histogram};

/// Handles for everything the engine records.
pub(crate) struct EngineMetrics {
    pub queue_duration: Histogram,
    pub prompt_tokens_total: Counter,
    pub generation_tokens_total: Counter,
    pub request_prompt_tokens: Histogram,
    pub request_generation_tokens: Histogram,
    pub running: Gauge,
    pub waiting: Gauge,
    pub batch_tokens: Histogram,
    pub kv_usage: Gauge,
    pub cancelled: Counter,
    pub token_logprob: Histogram,
    pub token_entropy: Histogram,
    pub drift_score: Gauge,
    /// The version label, for the per-reason finish counters.
    version: String,
    /// The model label.
    model: String,
}

impl EngineMetrics {
    pub fn new(info: &ModelInfo) -> EngineMetrics {
        let mv = [
            (names::LABEL_MODEL, info.name.clone()),
            (names::LABEL_VERSION, info.version.clone()),
        ];
        EngineMetrics {
            queue_duration: metrics::histogram!(names::QUEUE_DURATION_SECONDS, &mv),
            prompt_tokens_total: metrics::counter!(names::PROMPT_TOKENS_TOTAL, &mv),
            generation_tokens_total: metrics::counter!(names::GENERATION_TOKENS_TOTAL, &mv),
            request_prompt_tokens: metrics::histogram!(names::REQUEST_PROMPT_TOKENS, &mv),
            request_generation_tokens: metrics::histogram!(names::REQUEST_GENERATION_TOKENS, &mv),
            running: metrics::gauge!(names::RUNNING_REQUESTS, &mv),
            waiting: metrics::gauge!(names::WAITING_REQUESTS, &mv),
            batch_tokens: metrics::histogram!(names::BATCH_TOKENS, &mv),
            kv_usage: metrics::gauge!(names::KV_CACHE_USAGE_RATIO, &mv),
            cancelled: metrics::counter!(names::CANCELLED_REQUESTS_TOTAL, &mv),
            token_logprob: metrics::histogram!(names::TOKEN_LOGPROB, &mv),
            token_entropy: metrics::histogram!(names::TOKEN_ENTROPY, &mv),
            drift_score: metrics::gauge!(names::TOKEN_DRIFT_SCORE, &mv),
            version: info.version.clone(),
            model: info.name.clone(),
        }
    }

    /// Counts a finished generation under its reason.
    pub fn finished(&self, reason: FinishReason) {
        metrics::counter!(
            names::FINISH_REASON_TOTAL,
            names::LABEL_MODEL => self.model.clone(),
            names::LABEL_VERSION => self.version.clone(),
            names::LABEL_REASON => reason.as_str()
        )
        .increment(1);
    }
}
