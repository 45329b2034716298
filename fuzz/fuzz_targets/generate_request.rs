#![no_main]

#[path = "../bodies/generate_request.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
