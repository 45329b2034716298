//! What the engine's real-model tests share: the default GGUF's spec, and its weights read once per test
//! binary.

use std::sync::{Arc, OnceLock};

use ferroserve_core::GenerationDefaults;
use ferroserve_model::batched::BatchedLlama;
use ferroserve_model::device::DeviceSpec;
use ferroserve_model::fetch::{self, DEFAULT_MODEL, Quiet};
use ferroserve_model::{LoadedModel, ModelSpec};

pub fn spec() -> ModelSpec {
    let path = fetch::ensure(&DEFAULT_MODEL, &fetch::default_cache_dir(), &Quiet).expect("default model");
    ModelSpec {
        name: "smollm2".into(),
        version: "test".into(),
        path,
        device: DeviceSpec::Cpu,
        defaults: GenerationDefaults::default(),
    }
}

/// The weights, read once for every engine of a test binary.
pub fn weights() -> Arc<BatchedLlama> {
    static W: OnceLock<Arc<BatchedLlama>> = OnceLock::new();
    W.get_or_init(|| LoadedModel::load(&spec()).expect("model loads").model)
        .clone()
}
