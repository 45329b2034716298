//! The engine's metric handles, registered once per engine with its model and version labels, so the hot
//! loop records without building label sets per token.

use std::time::Duration;

use ferroserve_core::{ConstraintKind, FinishReason, ModelInfo};
use ferroserve_telemetry::names;
use metrics::{Counter, Gauge, Histogram};

use crate::constrain::Compiled;

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
    pub kv_blocks_used: Gauge,
    pub kv_blocks_capacity: Gauge,
    pub kv_blocks_cached: Gauge,
    /// Prompt tokens looked up in the prefix cache at admission, and those found (vLLM's names).
    pub prefix_cache_queries: Counter,
    pub prefix_cache_hits: Counter,
    pub preemptions: Counter,
    /// Step time, by phase: prefill, decode, mixed.
    pub step_seconds: [Histogram; 3],
    pub cancelled: Counter,
    pub token_logprob: Histogram,
    pub token_entropy: Histogram,
    pub drift_score: Gauge,
    /// Time to compute the constraint masks of one step (on the mask thread, during the forward pass).
    pub constraint_mask_seconds: Histogram,
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
            kv_blocks_used: metrics::gauge!(names::KV_CACHE_BLOCKS_USED, &mv),
            kv_blocks_capacity: metrics::gauge!(names::KV_CACHE_BLOCKS_CAPACITY, &mv),
            kv_blocks_cached: metrics::gauge!(names::KV_CACHE_BLOCKS_CACHED, &mv),
            prefix_cache_queries: metrics::counter!(names::PREFIX_CACHE_QUERIES_TOTAL, &mv),
            prefix_cache_hits: metrics::counter!(names::PREFIX_CACHE_HITS_TOTAL, &mv),
            preemptions: metrics::counter!(names::PREEMPTIONS_TOTAL, &mv),
            step_seconds: ["prefill", "decode", "mixed"].map(|phase| {
                let labels = [mv[0].clone(), mv[1].clone(), (names::LABEL_PHASE, phase.to_string())];
                metrics::histogram!(names::ENGINE_STEP_SECONDS, &labels)
            }),
            cancelled: metrics::counter!(names::CANCELLED_REQUESTS_TOTAL, &mv),
            token_logprob: metrics::histogram!(names::TOKEN_LOGPROB, &mv),
            token_entropy: metrics::histogram!(names::TOKEN_ENTROPY, &mv),
            drift_score: metrics::gauge!(names::TOKEN_DRIFT_SCORE, &mv),
            constraint_mask_seconds: metrics::histogram!(names::CONSTRAINT_MASK_SECONDS, &mv),
            version: info.version.clone(),
            model: info.name.clone(),
        }
    }

    /// Counts a constrained request by kind, and its compile time by whether the cache held it.
    pub fn constrained(&self, kind: ConstraintKind, how: Compiled, took: Duration) {
        metrics::counter!(
            names::CONSTRAINED_REQUESTS_TOTAL,
            names::LABEL_MODEL => self.model.clone(),
            names::LABEL_VERSION => self.version.clone(),
            names::LABEL_KIND => kind.as_str()
        )
        .increment(1);
        metrics::histogram!(
            names::CONSTRAINT_COMPILE_SECONDS,
            names::LABEL_MODEL => self.model.clone(),
            names::LABEL_VERSION => self.version.clone(),
            names::LABEL_CACHE => how.as_str()
        )
        .record(took.as_secs_f64());
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

#[cfg(test)]
mod tests {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;

    #[test]
    fn engine_series_carry_model_and_version_and_finishes_count_by_reason() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let m = EngineMetrics::new(&ModelInfo {
                name: "m".into(),
                version: "v2".into(),
                context_length: 8,
                defaults: Default::default(),
            });
            m.token_logprob.record(-0.5);
            m.finished(FinishReason::Eos);
            m.finished(FinishReason::Eos);
            m.finished(FinishReason::Length);
        });
        let snapshot = snapshotter.snapshot().into_vec();
        let find = |name: &str, reason: Option<&str>| {
            snapshot.iter().find(|(k, _, _, _)| {
                let key = k.key();
                key.name() == name
                    && key
                        .labels()
                        .any(|l| l.key() == names::LABEL_VERSION && l.value() == "v2")
                    && reason.is_none_or(|r| key.labels().any(|l| l.key() == names::LABEL_REASON && l.value() == r))
            })
        };
        assert!(matches!(
            find(names::FINISH_REASON_TOTAL, Some("eos")),
            Some((_, _, _, DebugValue::Counter(2)))
        ));
        assert!(matches!(
            find(names::FINISH_REASON_TOTAL, Some("length")),
            Some((_, _, _, DebugValue::Counter(1)))
        ));
        match find(names::TOKEN_LOGPROB, None) {
            Some((_, _, _, DebugValue::Histogram(values))) => assert_eq!(values.len(), 1),
            other => panic!("logprob histogram missing: {other:?}"),
        }
    }
}
