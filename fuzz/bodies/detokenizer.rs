//! Fuzz body: the incremental detokenizer over arbitrary token ids of the real SmolLM2 tokenizer. Shared by
//! the cargo-fuzz target and its proptest mirror (crates/model/tests/fuzz_mirror.rs).
//!
//! Property: the streamed chunks are valid text whose concatenation is a prefix of decoding every id at
//! once, and once the ids end on a complete character, equal to it.

use std::sync::OnceLock;

use ferroserve_model::detok::IncrementalDecoder;
use ferroserve_model::fetch::{self, DEFAULT_MODEL, Quiet};
use ferroserve_model::gguf::GgufFile;
use ferroserve_model::tokenizer::TextTokenizer;

/// The real tokenizer, loaded once (the model is fetched into the cache as the tests do).
pub fn tokenizer() -> &'static TextTokenizer {
    static T: OnceLock<TextTokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = fetch::ensure(&DEFAULT_MODEL, &fetch::default_cache_dir(), &Quiet).expect("the default model");
        TextTokenizer::from_gguf(&GgufFile::open(&path).expect("gguf")).expect("tokenizer")
    })
}

/// Streams `ids` and compares with decoding them at once.
pub fn check(ids: &[u32]) {
    let t = tokenizer();
    let ids: Vec<u32> = ids.iter().map(|i| i % t.vocab_size() as u32).collect();
    let mut decoder = IncrementalDecoder::default();
    let mut streamed = String::new();
    for &id in &ids {
        streamed.push_str(&decoder.push(t, id).expect("decoding never fails on vocabulary ids"));
    }
    let whole = t.decode(&ids).expect("decode");
    assert!(
        whole.starts_with(&streamed),
        "streamed {streamed:?} is not a prefix of {whole:?} for {ids:?}"
    );
    if !whole.ends_with('\u{FFFD}') {
        assert_eq!(streamed, whole, "complete text was held back for {ids:?}");
    }
}

/// Reads `data` as little-endian u16 token ids.
pub fn run(data: &[u8]) {
    let ids: Vec<u32> = data
        .chunks_exact(2)
        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
        .take(256)
        .collect();
    check(&ids);
}
