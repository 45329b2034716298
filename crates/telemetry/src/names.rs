//! The metric catalogue. Dashboards and alerts depend on these exact names: add, never rename.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Requests finished, by gRPC status code name (`status`).
pub const REQUESTS_TOTAL: &str = "ferroserve_requests_total";
/// End-to-end request latency.
pub const REQUEST_DURATION_SECONDS: &str = "ferroserve_request_duration_seconds";
/// Time from arrival to the first generated token.
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "ferroserve_time_to_first_token_seconds";
/// Gap between consecutive streamed tokens.
pub const INTER_TOKEN_LATENCY_SECONDS: &str = "ferroserve_inter_token_latency_seconds";
/// Per request: (e2e - TTFT) / (output tokens - 1).
pub const TIME_PER_OUTPUT_TOKEN_SECONDS: &str = "ferroserve_time_per_output_token_seconds";
/// Time a request waited before the engine started on it.
pub const QUEUE_DURATION_SECONDS: &str = "ferroserve_queue_duration_seconds";
/// Prompt tokens processed.
pub const PROMPT_TOKENS_TOTAL: &str = "ferroserve_prompt_tokens_total";
/// Tokens generated.
pub const GENERATION_TOKENS_TOTAL: &str = "ferroserve_generation_tokens_total";
/// Requests the engine is generating for.
pub const RUNNING_REQUESTS: &str = "ferroserve_running_requests";
/// Requests queued for the engine.
pub const WAITING_REQUESTS: &str = "ferroserve_waiting_requests";
/// Generations stopped because the client left or its deadline passed.
pub const CANCELLED_REQUESTS_TOTAL: &str = "ferroserve_cancelled_requests_total";

/// Label: gRPC status code name, e.g. `ok`, `invalid_argument`.
pub const LABEL_STATUS: &str = "status";

/// Latency buckets in seconds, from 5 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Inter-token buckets in seconds, from 1 ms to 2 s.
pub const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0,
];

/// Registers help text and units for every metric. Call once after installing a recorder.
pub fn describe() {
    describe_counter!(REQUESTS_TOTAL, "Requests finished, by gRPC status.");
    describe_histogram!(REQUEST_DURATION_SECONDS, Unit::Seconds, "End-to-end request latency.");
    describe_histogram!(TIME_TO_FIRST_TOKEN_SECONDS, Unit::Seconds, "Time to first token.");
    describe_histogram!(
        INTER_TOKEN_LATENCY_SECONDS,
        Unit::Seconds,
        "Gap between streamed tokens."
    );
    describe_histogram!(
        TIME_PER_OUTPUT_TOKEN_SECONDS,
        Unit::Seconds,
        "Mean time per output token after the first."
    );
    describe_histogram!(QUEUE_DURATION_SECONDS, Unit::Seconds, "Time waiting for the engine.");
    describe_counter!(PROMPT_TOKENS_TOTAL, Unit::Count, "Prompt tokens processed.");
    describe_counter!(GENERATION_TOKENS_TOTAL, Unit::Count, "Tokens generated.");
    describe_gauge!(RUNNING_REQUESTS, Unit::Count, "Requests being generated.");
    describe_gauge!(WAITING_REQUESTS, Unit::Count, "Requests queued for the engine.");
    describe_counter!(
        CANCELLED_REQUESTS_TOTAL,
        Unit::Count,
        "Generations stopped because the client left."
    );
}
