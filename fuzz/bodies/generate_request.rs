//! Fuzz body: `GenerateRequest` decoding plus the router's validation. Shared by the cargo-fuzz target
//! and its proptest mirror (crates/router/tests/fuzz_mirror.rs), which include this file.
//!
//! Properties: nothing panics; what the router accepts also meets the field limits a worker re-checks.

use ferroserve_core::RequestLimits;
use ferroserve_proto::v1 as pb;
use prost::Message;

/// Small limits, so that the fuzzer reaches every one of them.
pub fn limits() -> RequestLimits {
    RequestLimits {
        max_request_bytes: 1 << 16,
        max_prompt_bytes: 4096,
        max_messages: 16,
        max_model_bytes: 32,
        max_session_bytes: 32,
        max_request_id_bytes: 32,
        max_stop_sequences: 4,
        max_stop_bytes: 16,
    }
}

/// Validates a decoded request.
pub fn check(request: pb::GenerateRequest) {
    let limits = limits();
    if let Ok((_, valid)) = ferroserve_router::check_request(request, &limits)
        && let Err(v) = limits.check(&valid)
    {
        panic!("the router accepted a request a worker would refuse: {v}");
    }
}

/// Decodes `data` as a request and validates it.
pub fn run(data: &[u8]) {
    if let Ok(request) = pb::GenerateRequest::decode(data) {
        check(request);
    }
}
