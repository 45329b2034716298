//! Fuzz body: `WorkRequest` decoding plus the worker's own checks. Shared by the cargo-fuzz target and its
//! proptest mirror (crates/worker/tests/fuzz_mirror.rs).
//!
//! Properties: nothing panics; an accepted request meets the field limits.

use ferroserve_core::RequestLimits;
use ferroserve_proto::worker as pb;
use prost::Message;

/// Checks a decoded work request.
pub fn check(request: pb::WorkRequest) {
    let limits = RequestLimits {
        max_prompt_bytes: 4096,
        max_messages: 16,
        ..RequestLimits::default()
    };
    if let Ok(valid) = ferroserve_worker::check_work_request(request, &limits) {
        assert!(limits.check(&valid).is_ok());
        assert!(valid.max_tokens >= 1);
    }
}

/// Decodes `data` as a work request and checks it.
pub fn run(data: &[u8]) {
    if let Ok(request) = pb::WorkRequest::decode(data) {
        check(request);
    }
}
