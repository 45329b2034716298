#![no_main]

#[path = "../bodies/stop_matcher.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
