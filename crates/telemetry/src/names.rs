//! The metric catalogue. Dashboards, alerts and external checks depend on these exact names: add, never
//! rename. Every histogram's buckets are here too, so the exporter and the docs agree.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

// --- Requests and latency (recorded by the router, per request) ---

/// Requests finished, by `status` (gRPC code name), `model` and `version`.
pub const REQUESTS_TOTAL: &str = "ferroserve_requests_total";
/// End-to-end request latency.
pub const REQUEST_DURATION_SECONDS: &str = "ferroserve_request_duration_seconds";
/// Time from arrival to the first generated token.
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "ferroserve_time_to_first_token_seconds";
/// Gap between consecutive streamed tokens (a chunk of k tokens counts as k gaps of gap/k).
pub const INTER_TOKEN_LATENCY_SECONDS: &str = "ferroserve_inter_token_latency_seconds";
/// Per request: (e2e - TTFT) / (output tokens - 1).
pub const TIME_PER_OUTPUT_TOKEN_SECONDS: &str = "ferroserve_time_per_output_token_seconds";
/// Time a request waited before the engine started on it (recorded by the engine).
pub const QUEUE_DURATION_SECONDS: &str = "ferroserve_queue_duration_seconds";

// --- Tokens (recorded by the engine) ---

/// Prompt tokens processed.
pub const PROMPT_TOKENS_TOTAL: &str = "ferroserve_prompt_tokens_total";
/// Tokens generated.
pub const GENERATION_TOKENS_TOTAL: &str = "ferroserve_generation_tokens_total";
/// Prompt length per request.
pub const REQUEST_PROMPT_TOKENS: &str = "ferroserve_request_prompt_tokens";
/// Output length per request; by version, it is one of the drift signals.
pub const REQUEST_GENERATION_TOKENS: &str = "ferroserve_request_generation_tokens";

// --- Engine ---

/// Requests the engine is generating for.
pub const RUNNING_REQUESTS: &str = "ferroserve_running_requests";
/// Requests queued for the engine.
pub const WAITING_REQUESTS: &str = "ferroserve_waiting_requests";
/// Tokens processed per engine step (prefill chunks and decode tokens together).
pub const BATCH_TOKENS: &str = "ferroserve_batch_tokens";
/// Fraction of the KV pool's blocks held by sequences, 0 to 1 (idle cached blocks count as free).
pub const KV_CACHE_USAGE_RATIO: &str = "ferroserve_kv_cache_usage_ratio";
/// KV blocks held by running sequences (a block is 16 positions of every layer; a block shared by
/// several sequences counts once).
pub const KV_CACHE_BLOCKS_USED: &str = "ferroserve_kv_cache_blocks_used";
/// KV blocks no sequence holds that keep a computed prefix for reuse (evicted first when blocks run out).
pub const KV_CACHE_BLOCKS_CACHED: &str = "ferroserve_kv_cache_blocks_cached";
/// Prompt tokens looked up in the prefix cache when a sequence is admitted (vLLM's
/// `prefix_cache_queries`).
pub const PREFIX_CACHE_QUERIES_TOTAL: &str = "ferroserve_prefix_cache_queries_total";
/// Of those, the tokens found cached, whose KV was not computed again (vLLM's `prefix_cache_hits`).
pub const PREFIX_CACHE_HITS_TOTAL: &str = "ferroserve_prefix_cache_hits_total";
/// Sequences preempted because the KV pool ran out of blocks; each is recomputed later (vLLM's
/// `num_preemptions`).
pub const PREEMPTIONS_TOTAL: &str = "ferroserve_num_preemptions_total";
/// Paged KV blocks the budget allows (`kv_budget_tokens` / 16).
pub const KV_CACHE_BLOCKS_CAPACITY: &str = "ferroserve_kv_cache_blocks_capacity";
/// Wall time of one engine step (one batched forward and its sampling), by `phase`: `prefill` (only
/// prompt chunks), `decode` (only generated tokens) or `mixed`.
pub const ENGINE_STEP_SECONDS: &str = "ferroserve_engine_step_seconds";
/// Engine-thread panics caught by the supervisor (each ended its requests with UNAVAILABLE and restarted
/// the loop, or, after repeated panics, stopped the engine).
pub const ENGINE_RESTARTS_TOTAL: &str = "ferroserve_engine_restarts_total";
/// Streams continued on another worker after theirs failed, by `outcome`: `resumed` (after tokens had been
/// sent), `redispatched` (before any), or `failed` (no worker could take it).
pub const MIGRATIONS_TOTAL: &str = "ferroserve_migrations_total";
/// Worker choices under prefix-aware routing, by `outcome`: `hit` (the worker that recently served the
/// longest prefix of the prompt), `miss` (no worker known to hold any of it; least loaded), `overloaded`
/// (the matching worker was too loaded; least loaded). The hit rate is hit over all.
pub const PREFIX_ROUTING_TOTAL: &str = "ferroserve_prefix_routing_total";
/// Client streams given up on because the client took nothing for the stall timeout.
pub const CLIENT_STALLS_TOTAL: &str = "ferroserve_client_stalls_total";
/// Generations stopped because the client left or its deadline passed.
pub const CANCELLED_REQUESTS_TOTAL: &str = "ferroserve_cancelled_requests_total";

// --- Admission and filter ---

/// Requests refused by admission, by `tenant` and `reason` (`tenant_requests`, `tenant_tokens`,
/// `tenant_concurrency`, `server_requests`, `server_tokens`, `too_large`, `queue_full`, `deadline`,
/// `queue_deadline`).
pub const RATE_LIMITED_TOTAL: &str = "ferroserve_rate_limited_total";
/// Time the admission gate took to decide (admit, queue or reject).
pub const ADMISSION_DECISION_SECONDS: &str = "ferroserve_admission_decision_seconds";
/// Time an admitted request waited in the admission queue for a slot.
pub const ADMISSION_WAIT_SECONDS: &str = "ferroserve_admission_wait_seconds";
/// Requests running past admission, by `tenant`.
pub const ADMISSION_IN_FLIGHT: &str = "ferroserve_admission_in_flight";
/// Requests waiting in the admission queue.
pub const ADMISSION_QUEUE_REQUESTS: &str = "ferroserve_admission_queue_requests";
/// Tokens reserved by the requests in the admission queue.
pub const ADMISSION_QUEUE_TOKENS: &str = "ferroserve_admission_queue_tokens";
/// Requests a tenant could send now under its requests-per-second limit, by `tenant`.
pub const TENANT_REMAINING_REQUESTS: &str = "ferroserve_tenant_remaining_requests";
/// Tokens a tenant could reserve now under its tokens-per-minute limit, by `tenant`.
pub const TENANT_REMAINING_TOKENS: &str = "ferroserve_tenant_remaining_tokens";
/// Content-filter verdicts, by `filter`, `stage`, `category` and `action`: one per request and stage.
pub const FILTER_VERDICTS_TOTAL: &str = "ferroserve_filter_verdicts_total";
/// Time one filter check took, by `filter` and `stage`.
pub const FILTER_DURATION_SECONDS: &str = "ferroserve_filter_duration_seconds";
/// Shadow comparisons, by `active`, `shadow`, `stage` and `outcome` (`agree_block`, `agree_allow`,
/// `shadow_only_block`, `active_only_block`).
pub const FILTER_SHADOW_TOTAL: &str = "ferroserve_filter_shadow_total";
/// Texts the shadow filter skipped because its queue was full.
pub const FILTER_SHADOW_SKIPPED_TOTAL: &str = "ferroserve_filter_shadow_skipped_total";
/// Panics caught in the embedding thread (each failed its batch's texts, which got the filter's
/// `on_error`).
pub const EMBEDDING_PANICS_TOTAL: &str = "ferroserve_embedding_panics_total";
/// Filter checks that failed, by `stage` (`input`, `output`: a panic inside a filter, the text passed
/// unjudged; `semantic`: a text that could not be embedded) and `action` (what the text got).
pub const FILTER_FAILURES_TOTAL: &str = "ferroserve_filter_failures_total";
/// Reviewer feedback on past verdicts, by `filter` (name@version) and `kind` (`false_positive`,
/// `false_negative`).
pub const FILTER_FEEDBACK_TOTAL: &str = "ferroserve_filter_feedback_total";

// --- Workers ---

/// 1 while the router can reach a worker, else 0, by `worker`.
pub const WORKER_HEALTHY: &str = "ferroserve_worker_healthy";

// --- Token drift, by `version` ---

/// Log-probability of each sampled token under the model's distribution.
pub const TOKEN_LOGPROB: &str = "ferroserve_token_logprob";
/// Entropy (nats) of each next-token distribution.
pub const TOKEN_ENTROPY: &str = "ferroserve_token_entropy";
/// Finished generations by `version` and `reason`.
pub const FINISH_REASON_TOTAL: &str = "ferroserve_finish_reason_total";
/// Population stability index between the live window and the baseline snapshot, by `version`.
pub const TOKEN_DRIFT_SCORE: &str = "ferroserve_token_drift_score";

// --- Structured output ---

/// Requests with a constraint on their output, by `model`, `version` and `kind` (`json_schema`,
/// `json_object`, `regex`, `grammar`, `choice`).
pub const CONSTRAINED_REQUESTS_TOTAL: &str = "ferroserve_constrained_requests_total";
/// Time to compile (or fetch from the cache) one request's constraint, by `cache` (`hit`, `miss`).
pub const CONSTRAINT_COMPILE_SECONDS: &str = "ferroserve_constraint_compile_seconds";
/// Time to compute one step's constraint masks, all constrained sequences together (on its own thread,
/// overlapping the forward pass).
pub const CONSTRAINT_MASK_SECONDS: &str = "ferroserve_constraint_mask_seconds";

// --- Cost ---

/// Accelerator (or CPU) cost accrued while busy, in US dollars, by `worker_kind`.
pub const COST_USD_TOTAL: &str = "ferroserve_cost_usd_total";
/// Cost of a million generated tokens at the current rate, by `worker_kind`.
pub const COST_PER_MILLION_TOKENS: &str = "ferroserve_cost_per_million_tokens";

// --- Model versions ---

/// The canary's share of unpinned traffic in a running rollout, in percent, by `model`.
pub const ROLLOUT_CANARY_WEIGHT: &str = "ferroserve_rollout_canary_weight";
/// Decisions of the automatic canary analysis, by `model` and `decision` (`promote`, `rollback`).
pub const ROLLOUT_DECISIONS_TOTAL: &str = "ferroserve_rollout_decisions_total";
/// A version's share of unpinned traffic under the model's split (0 to 1; 0 when disabled or left out),
/// by `model` and `version`.
pub const VERSION_TRAFFIC_SHARE_RATIO: &str = "ferroserve_version_traffic_share_ratio";
/// 1 while an operator or the canary analysis has a version disabled (kill switch), else 0.
pub const VERSION_DISABLED: &str = "ferroserve_version_disabled";
/// Traffic policy changes, by `model` and `action` (`set`, `disable`, `enable`, `rollback`, `unload`).
pub const TRAFFIC_POLICY_CHANGES_TOTAL: &str = "ferroserve_traffic_policy_changes_total";

// --- Fleet (router replicas sharing Redis) ---

/// 1 while this replica decides tenant limits in the shared store (Redis), 0 while it falls back to its
/// local share because Redis is unreachable. Absent without `cluster.redis_url`.
pub const CLUSTER_REDIS_UP: &str = "ferroserve_cluster_redis_up";
/// Live router replicas in the fleet, as this replica last counted them (leases in Redis).
pub const CLUSTER_REPLICAS: &str = "ferroserve_cluster_replicas";
/// Tenant-limit decisions, by `outcome` (`shared_admitted`, `shared_refused`, `local`: decided on the
/// replica's share because Redis was unreachable).
pub const CLUSTER_DECISIONS_TOTAL: &str = "ferroserve_cluster_decisions_total";
/// Time one shared decision took: the round trip to Redis and its script.
pub const CLUSTER_DECISION_SECONDS: &str = "ferroserve_cluster_decision_seconds";
/// Calls to Redis that failed or timed out, by `kind` (`reserve`, `settle`, `heartbeat`).
pub const CLUSTER_REDIS_ERRORS_TOTAL: &str = "ferroserve_cluster_redis_errors_total";

/// Every metric name above, for checks that dashboards and alerts use only real names.
pub const ALL: &[&str] = &[
    REQUESTS_TOTAL,
    REQUEST_DURATION_SECONDS,
    TIME_TO_FIRST_TOKEN_SECONDS,
    INTER_TOKEN_LATENCY_SECONDS,
    TIME_PER_OUTPUT_TOKEN_SECONDS,
    QUEUE_DURATION_SECONDS,
    PROMPT_TOKENS_TOTAL,
    GENERATION_TOKENS_TOTAL,
    REQUEST_PROMPT_TOKENS,
    REQUEST_GENERATION_TOKENS,
    RUNNING_REQUESTS,
    WAITING_REQUESTS,
    BATCH_TOKENS,
    KV_CACHE_USAGE_RATIO,
    KV_CACHE_BLOCKS_USED,
    KV_CACHE_BLOCKS_CAPACITY,
    KV_CACHE_BLOCKS_CACHED,
    PREFIX_CACHE_QUERIES_TOTAL,
    PREFIX_CACHE_HITS_TOTAL,
    PREEMPTIONS_TOTAL,
    ENGINE_STEP_SECONDS,
    CANCELLED_REQUESTS_TOTAL,
    RATE_LIMITED_TOTAL,
    ADMISSION_DECISION_SECONDS,
    ADMISSION_WAIT_SECONDS,
    ADMISSION_IN_FLIGHT,
    ADMISSION_QUEUE_REQUESTS,
    ADMISSION_QUEUE_TOKENS,
    TENANT_REMAINING_REQUESTS,
    TENANT_REMAINING_TOKENS,
    FILTER_VERDICTS_TOTAL,
    FILTER_DURATION_SECONDS,
    FILTER_SHADOW_TOTAL,
    FILTER_SHADOW_SKIPPED_TOTAL,
    FILTER_FAILURES_TOTAL,
    EMBEDDING_PANICS_TOTAL,
    FILTER_FEEDBACK_TOTAL,
    WORKER_HEALTHY,
    TOKEN_LOGPROB,
    TOKEN_ENTROPY,
    FINISH_REASON_TOTAL,
    TOKEN_DRIFT_SCORE,
    CONSTRAINED_REQUESTS_TOTAL,
    CONSTRAINT_COMPILE_SECONDS,
    CONSTRAINT_MASK_SECONDS,
    COST_USD_TOTAL,
    COST_PER_MILLION_TOKENS,
    ROLLOUT_CANARY_WEIGHT,
    ROLLOUT_DECISIONS_TOTAL,
    VERSION_TRAFFIC_SHARE_RATIO,
    VERSION_DISABLED,
    CLUSTER_REDIS_UP,
    CLUSTER_REPLICAS,
    CLUSTER_DECISIONS_TOTAL,
    CLUSTER_DECISION_SECONDS,
    CLUSTER_REDIS_ERRORS_TOTAL,
    TRAFFIC_POLICY_CHANGES_TOTAL,
    CONNECTIONS_OPEN,
    ENGINE_RESTARTS_TOTAL,
    MIGRATIONS_TOTAL,
    PREFIX_ROUTING_TOTAL,
    CLIENT_STALLS_TOTAL,
    CONNECTIONS_REFUSED_TOTAL,
    TLS_RELOADS_TOTAL,
];

// --- Connections (every listener) ---

/// Connections open now, by `listener` (`grpc`, `worker`, `metrics`).
pub const CONNECTIONS_OPEN: &str = "ferroserve_connections_open";
/// Connections closed before serving, by `listener` and `reason`: `limit` (the connection cap),
/// `handshake_timeout` (no TLS handshake or HTTP/2 preface in time) or `tls` (a failed handshake).
pub const CONNECTIONS_REFUSED_TOTAL: &str = "ferroserve_connections_refused_total";
/// Certificate reloads (SIGHUP), by `listener` and `outcome` (`ok` or `error`; on an error the running
/// certificate stays).
pub const TLS_RELOADS_TOTAL: &str = "ferroserve_tls_reloads_total";

// --- Labels ---

/// gRPC status code name, e.g. `ok`, `invalid_argument`.
pub const LABEL_STATUS: &str = "status";
/// The front door a request came through: `grpc` or `http` (the OpenAI-compatible API).
pub const LABEL_PROTOCOL: &str = "protocol";
/// Model name.
pub const LABEL_MODEL: &str = "model";
/// Model version label.
pub const LABEL_VERSION: &str = "version";
/// Worker location (address or `in-process`).
pub const LABEL_WORKER: &str = "worker";
/// Why a generation ended.
pub const LABEL_REASON: &str = "reason";
/// Tenant name (never a key).
pub const LABEL_TENANT: &str = "tenant";
/// Content filter id (`name@version`).
pub const LABEL_FILTER: &str = "filter";
/// Where a text was filtered: `input` or `output`.
pub const LABEL_STAGE: &str = "stage";
/// A filter category, e.g. `weapons`; empty when nothing matched.
pub const LABEL_CATEGORY: &str = "category";
/// What a filter decided: `allow`, `flag` or `block`.
pub const LABEL_ACTION: &str = "action";
/// The enforcing filter in a shadow comparison.
pub const LABEL_ACTIVE: &str = "active";
/// The shadow filter in a shadow comparison.
pub const LABEL_SHADOW: &str = "shadow";
/// How a shadow comparison came out.
pub const LABEL_OUTCOME: &str = "outcome";
/// Kind of feedback.
pub const LABEL_KIND: &str = "kind";
/// Which price applies (`cpu`, `h200`, ...).
pub const LABEL_WORKER_KIND: &str = "worker_kind";
/// What an engine step ran: `prefill`, `decode` or `mixed`.
pub const LABEL_PHASE: &str = "phase";
/// Whether a compiled constraint came from the cache (`hit`, `miss`).
pub const LABEL_CACHE: &str = "cache";
/// A rollout decision: `promote` or `rollback`.
pub const LABEL_DECISION: &str = "decision";
/// Which listener of the process: `grpc`, `worker` or `metrics`.
pub const LABEL_LISTENER: &str = "listener";

// --- Buckets ---

/// Request latency buckets in seconds, 5 ms to 120 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Inter-token buckets in seconds, 1 ms to 2 s.
pub const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0,
];
/// Token-count buckets, 1 to 8192.
pub const TOKEN_COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];
/// Admission decision buckets in seconds, 1 µs to 10 ms: a decision should take microseconds.
pub const DECISION_BUCKETS: &[f64] = &[
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.01,
];
/// Filter check buckets in seconds, 1 µs to 100 ms (rules take microseconds, embeddings milliseconds).
pub const FILTER_BUCKETS: &[f64] = &[
    0.000_001, 0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
];
/// Log-probability buckets (nats, negative), from very unlikely to certain.
pub const LOGPROB_BUCKETS: &[f64] = &[
    -20.0, -10.0, -7.0, -5.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, -0.25, -0.1, -0.01, 0.0,
];
/// Entropy buckets (nats), from a certain choice to a near-uniform one over a large vocabulary.
pub const ENTROPY_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 11.0,
];

/// Every histogram with its buckets, for the exporter.
pub const HISTOGRAM_BUCKETS: &[(&str, &[f64])] = &[
    (REQUEST_DURATION_SECONDS, LATENCY_BUCKETS),
    (TIME_TO_FIRST_TOKEN_SECONDS, LATENCY_BUCKETS),
    (QUEUE_DURATION_SECONDS, LATENCY_BUCKETS),
    (ADMISSION_WAIT_SECONDS, LATENCY_BUCKETS),
    (ADMISSION_DECISION_SECONDS, DECISION_BUCKETS),
    (CLUSTER_DECISION_SECONDS, DECISION_BUCKETS),
    (FILTER_DURATION_SECONDS, FILTER_BUCKETS),
    (INTER_TOKEN_LATENCY_SECONDS, INTER_TOKEN_BUCKETS),
    (TIME_PER_OUTPUT_TOKEN_SECONDS, INTER_TOKEN_BUCKETS),
    (REQUEST_PROMPT_TOKENS, TOKEN_COUNT_BUCKETS),
    (REQUEST_GENERATION_TOKENS, TOKEN_COUNT_BUCKETS),
    (BATCH_TOKENS, TOKEN_COUNT_BUCKETS),
    (ENGINE_STEP_SECONDS, INTER_TOKEN_BUCKETS),
    (TOKEN_LOGPROB, LOGPROB_BUCKETS),
    (TOKEN_ENTROPY, ENTROPY_BUCKETS),
    (CONSTRAINT_COMPILE_SECONDS, FILTER_BUCKETS),
    (CONSTRAINT_MASK_SECONDS, FILTER_BUCKETS),
];

/// Registers help text and units for every metric. Call once after installing a recorder.
pub fn describe() {
    describe_counter!(
        REQUESTS_TOTAL,
        Unit::Count,
        "Requests finished, by status (named as gRPC codes on both front doors) and protocol."
    );
    describe_histogram!(REQUEST_DURATION_SECONDS, Unit::Seconds, "End-to-end request latency.");
    describe_histogram!(
        TIME_TO_FIRST_TOKEN_SECONDS,
        Unit::Seconds,
        "Time from arrival to the first token."
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY_SECONDS,
        Unit::Seconds,
        "Gap between streamed tokens."
    );
    describe_histogram!(
        TIME_PER_OUTPUT_TOKEN_SECONDS,
        Unit::Seconds,
        "Per request: (e2e - TTFT) / (output tokens - 1)."
    );
    describe_histogram!(QUEUE_DURATION_SECONDS, Unit::Seconds, "Time waiting for the engine.");
    describe_counter!(PROMPT_TOKENS_TOTAL, Unit::Count, "Prompt tokens processed.");
    describe_counter!(GENERATION_TOKENS_TOTAL, Unit::Count, "Tokens generated.");
    describe_histogram!(REQUEST_PROMPT_TOKENS, Unit::Count, "Prompt tokens per request.");
    describe_histogram!(REQUEST_GENERATION_TOKENS, Unit::Count, "Generated tokens per request.");
    describe_gauge!(RUNNING_REQUESTS, Unit::Count, "Requests being generated.");
    describe_gauge!(WAITING_REQUESTS, Unit::Count, "Requests queued for the engine.");
    describe_histogram!(BATCH_TOKENS, Unit::Count, "Tokens processed per engine step.");
    describe_gauge!(KV_CACHE_USAGE_RATIO, "Fraction of the KV-cache budget in use (0 to 1).");
    describe_gauge!(KV_CACHE_BLOCKS_USED, "Paged KV blocks held by running sequences.");
    describe_gauge!(KV_CACHE_BLOCKS_CAPACITY, "Paged KV blocks the budget allows.");
    describe_gauge!(
        KV_CACHE_BLOCKS_CACHED,
        "KV blocks no sequence holds, kept as a reusable prefix (evicted first)."
    );
    describe_counter!(
        PREFIX_CACHE_QUERIES_TOTAL,
        Unit::Count,
        "Prompt tokens looked up in the prefix cache at admission."
    );
    describe_counter!(
        PREFIX_CACHE_HITS_TOTAL,
        Unit::Count,
        "Prompt tokens found in the prefix cache at admission (not computed again)."
    );
    describe_counter!(
        PREFIX_ROUTING_TOTAL,
        Unit::Count,
        "Worker choices under prefix-aware routing, by outcome (hit, miss, overloaded)."
    );
    describe_counter!(
        PREEMPTIONS_TOTAL,
        Unit::Count,
        "Sequences preempted because the KV pool ran out of blocks (recomputed later)."
    );
    describe_gauge!(
        ROLLOUT_CANARY_WEIGHT,
        "Canary share of unpinned traffic in a running rollout, percent."
    );
    describe_counter!(
        ROLLOUT_DECISIONS_TOTAL,
        "Automatic canary analysis decisions, by decision."
    );
    describe_gauge!(
        VERSION_TRAFFIC_SHARE_RATIO,
        "A version's share of unpinned traffic under its model's split (0 to 1)."
    );
    describe_gauge!(VERSION_DISABLED, "1 while a version is disabled (kill switch).");
    describe_counter!(
        TRAFFIC_POLICY_CHANGES_TOTAL,
        Unit::Count,
        "Traffic policy changes, by action."
    );
    describe_gauge!(CONNECTIONS_OPEN, Unit::Count, "Connections open, by listener.");
    describe_counter!(
        ENGINE_RESTARTS_TOTAL,
        Unit::Count,
        "Engine-thread panics caught by the supervisor."
    );
    describe_counter!(
        MIGRATIONS_TOTAL,
        Unit::Count,
        "Streams continued on another worker, by outcome."
    );
    describe_counter!(
        CLIENT_STALLS_TOTAL,
        Unit::Count,
        "Client streams ended because the client stopped reading."
    );
    describe_counter!(
        CONNECTIONS_REFUSED_TOTAL,
        Unit::Count,
        "Connections closed before serving, by listener and reason."
    );
    describe_counter!(
        TLS_RELOADS_TOTAL,
        Unit::Count,
        "Certificate reloads, by listener and outcome."
    );
    describe_histogram!(
        ENGINE_STEP_SECONDS,
        Unit::Seconds,
        "Wall time of one engine step, by phase (prefill, decode, mixed)."
    );
    describe_counter!(
        CANCELLED_REQUESTS_TOTAL,
        Unit::Count,
        "Generations stopped because the client left."
    );
    describe_counter!(
        RATE_LIMITED_TOTAL,
        Unit::Count,
        "Requests refused by admission, by tenant and reason."
    );
    describe_histogram!(
        ADMISSION_DECISION_SECONDS,
        Unit::Seconds,
        "Time the admission gate took to admit, queue or reject."
    );
    describe_gauge!(
        CLUSTER_REDIS_UP,
        Unit::Count,
        "1 while tenant limits are decided in Redis, 0 while this replica falls back to its share."
    );
    describe_gauge!(CLUSTER_REPLICAS, Unit::Count, "Live router replicas in the fleet.");
    describe_counter!(
        CLUSTER_DECISIONS_TOTAL,
        Unit::Count,
        "Tenant-limit decisions, by outcome (shared_admitted, shared_refused, local)."
    );
    describe_histogram!(
        CLUSTER_DECISION_SECONDS,
        Unit::Seconds,
        "Round trip of one shared tenant-limit decision to Redis."
    );
    describe_counter!(
        CLUSTER_REDIS_ERRORS_TOTAL,
        Unit::Count,
        "Calls to Redis that failed or timed out, by kind."
    );
    describe_histogram!(
        ADMISSION_WAIT_SECONDS,
        Unit::Seconds,
        "Time admitted requests waited for a slot."
    );
    describe_gauge!(
        ADMISSION_IN_FLIGHT,
        Unit::Count,
        "Requests running past admission, by tenant."
    );
    describe_gauge!(
        ADMISSION_QUEUE_REQUESTS,
        Unit::Count,
        "Requests waiting in the admission queue."
    );
    describe_gauge!(
        ADMISSION_QUEUE_TOKENS,
        Unit::Count,
        "Tokens reserved by waiting requests."
    );
    describe_gauge!(
        TENANT_REMAINING_REQUESTS,
        Unit::Count,
        "Requests a tenant may send now under its rate limit."
    );
    describe_gauge!(
        TENANT_REMAINING_TOKENS,
        Unit::Count,
        "Tokens a tenant may reserve now under its token limit."
    );
    describe_counter!(
        FILTER_VERDICTS_TOTAL,
        Unit::Count,
        "Content-filter verdicts, one per request and stage."
    );
    describe_histogram!(FILTER_DURATION_SECONDS, Unit::Seconds, "Time one filter check took.");
    describe_counter!(
        FILTER_SHADOW_TOTAL,
        Unit::Count,
        "Shadow filter agreement with the active filter."
    );
    describe_counter!(
        FILTER_SHADOW_SKIPPED_TOTAL,
        Unit::Count,
        "Texts the shadow filter skipped (queue full)."
    );
    describe_counter!(
        EMBEDDING_PANICS_TOTAL,
        Unit::Count,
        "Panics caught in the embedding thread."
    );
    describe_counter!(
        FILTER_FAILURES_TOTAL,
        Unit::Count,
        "Filter checks that failed; the text passed unjudged."
    );
    describe_counter!(
        FILTER_FEEDBACK_TOTAL,
        Unit::Count,
        "Reviewer feedback on verdicts, by filter version."
    );
    describe_gauge!(WORKER_HEALTHY, "1 while the router can reach the worker, else 0.");
    describe_histogram!(TOKEN_LOGPROB, "Log-probability (nats) of each sampled token.");
    describe_histogram!(TOKEN_ENTROPY, "Entropy (nats) of each next-token distribution.");
    describe_counter!(
        FINISH_REASON_TOTAL,
        Unit::Count,
        "Finished generations by version and reason."
    );
    describe_gauge!(
        TOKEN_DRIFT_SCORE,
        "Population stability index of the token distribution against the baseline."
    );
    describe_counter!(
        CONSTRAINED_REQUESTS_TOTAL,
        Unit::Count,
        "Requests with a constraint on their output (structured output), by kind."
    );
    describe_histogram!(
        CONSTRAINT_COMPILE_SECONDS,
        Unit::Seconds,
        "Time to compile one request's constraint, or take it from the cache (cache=hit|miss)."
    );
    describe_histogram!(
        CONSTRAINT_MASK_SECONDS,
        Unit::Seconds,
        "Time to compute one step's constraint masks, overlapping the forward pass."
    );
    describe_counter!(COST_USD_TOTAL, "Busy-time cost in US dollars.");
    describe_gauge!(
        COST_PER_MILLION_TOKENS,
        "US dollars per million generated tokens at the current rate."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metric names referenced in a deploy file, with histogram suffixes removed.
    fn referenced(text: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("ferroserve_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.push(base.to_string());
            rest = &tail[end..];
        }
        names
    }

    fn deploy_file(path: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy")
            .join(path);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn names_are_unique_prefixed_and_histograms_have_buckets() {
        let mut seen = std::collections::HashSet::new();
        for n in ALL {
            assert!(n.starts_with("ferroserve_"), "{n}");
            assert!(seen.insert(n), "{n} listed twice");
        }
        for (name, buckets) in HISTOGRAM_BUCKETS {
            assert!(ALL.contains(name));
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{name} buckets must increase");
        }
    }

    #[test]
    fn dashboard_and_alerts_use_only_catalogue_names() {
        for file in ["grafana/ferroserve.json", "prometheus/alerts.yml"] {
            let used = referenced(&deploy_file(file));
            assert!(!used.is_empty(), "{file} references no metrics");
            for name in used {
                assert!(ALL.contains(&name.as_str()), "{file} uses unknown metric {name}");
            }
        }
    }

    #[test]
    fn the_dashboard_is_valid_json_with_a_query_in_every_panel() {
        let dash: serde_json::Value =
            serde_json::from_str(&deploy_file("grafana/ferroserve.json")).expect("valid JSON");
        assert_eq!(dash["uid"], "ferroserve");
        let panels = dash["panels"].as_array().expect("panels array");
        assert!(panels.len() >= 12, "{} panels", panels.len());
        for p in panels {
            assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()));
            assert!(p["gridPos"]["w"].as_u64().is_some_and(|w| w > 0 && w <= 24));
            let targets = p["targets"].as_array().expect("targets");
            assert!(!targets.is_empty());
            assert!(
                targets
                    .iter()
                    .all(|t| t["expr"].as_str().is_some_and(|e| e.contains("ferroserve_")))
            );
        }
        let all = serde_json::to_string(&dash).unwrap();
        for must in [
            "ferroserve_time_to_first_token_seconds",
            "ferroserve_token_drift_score",
            "ferroserve_cost_usd_total",
        ] {
            assert!(all.contains(must), "dashboard lacks {must}");
        }
    }
}
