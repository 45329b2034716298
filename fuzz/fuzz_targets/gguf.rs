#![no_main]

#[path = "../bodies/gguf.rs"]
#[allow(dead_code)]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
