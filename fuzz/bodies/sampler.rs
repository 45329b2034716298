//! Fuzz body: the sampler on arbitrary logits (NaN, ±inf, subnormals) and arbitrary settings. Shared by the
//! cargo-fuzz target and its proptest mirror (crates/engine/tests/fuzz_mirror.rs).
//!
//! Properties: the token is in the vocabulary, its logprob is finite and at most 0, the entropy is finite
//! and at least 0, and the same seed gives the same token.

use ferroserve_core::Sampling;
use ferroserve_engine::sampler::Sampler;

/// Samples two steps of `logits` with `params` (the second under the presence and frequency penalties of
/// the first), twice with the same seed.
pub fn check(params: Sampling, logits: &[f32], context: &[u32]) {
    if logits.is_empty() {
        return;
    }
    let (mut a, mut b) = (Sampler::new(params, context), Sampler::new(params, context));
    for _ in 0..2 {
        let x = a.sample(&mut logits.to_vec());
        let y = b.sample(&mut logits.to_vec());
        assert!(
            (x.token as usize) < logits.len(),
            "token {} of {}",
            x.token,
            logits.len()
        );
        assert!(x.logprob.is_finite() && x.logprob <= 0.0, "logprob {}", x.logprob);
        assert!(x.entropy.is_finite() && x.entropy >= 0.0, "entropy {}", x.entropy);
        assert_eq!(x.token, y.token, "the same seed chose differently");
    }
}

/// Reads settings from the first 20 bytes, then logits as raw f32 bits.
pub fn run(data: &[u8]) {
    if data.len() < 20 {
        return;
    }
    let f = |i: usize| f32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
    let params = Sampling {
        temperature: f(0),
        top_p: f(4),
        top_k: u32::from(data[8]),
        seed: u64::from_le_bytes(data[9..17].try_into().expect("8 bytes")),
        repetition_penalty: f(16),
        ignore_eos: false,
        // From bytes the other settings read too: the header stays 20 bytes, so the corpus keeps its layout.
        presence_penalty: f32::from(data[8] as i8) / 32.0,
        frequency_penalty: f32::from(data[9] as i8) / 32.0,
    };
    let logits: Vec<f32> = data[20..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .take(4096)
        .collect();
    let context: Vec<u32> = logits.iter().take(8).map(|l| l.to_bits() % 64).collect();
    check(params, &logits, &context);
}
