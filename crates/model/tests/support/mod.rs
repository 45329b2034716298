//! The real SmolLM2 GGUF, loaded once per test binary.
#![allow(dead_code)]

use std::sync::OnceLock;

use candle_core::Device;
use ferroserve_model::batched::BatchedLlama;
use ferroserve_model::fetch::{self, DEFAULT_MODEL, Quiet};
use ferroserve_model::gguf::GgufFile;
use ferroserve_model::tokenizer::TextTokenizer;

pub struct Fixture {
    pub path: std::path::PathBuf,
    pub model: BatchedLlama,
    pub tokenizer: TextTokenizer,
}

pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let path = fetch::ensure(&DEFAULT_MODEL, &fetch::default_cache_dir(), &Quiet).expect("default model");
        let mut gguf = GgufFile::open(&path).expect("gguf opens");
        let tokenizer = TextTokenizer::from_gguf(&gguf).expect("tokenizer");
        let model = BatchedLlama::load(&mut gguf, &Device::Cpu).expect("weights load");
        Fixture { path, model, tokenizer }
    })
}
