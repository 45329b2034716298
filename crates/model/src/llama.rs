//! The llama-architecture forward pass, for one sequence at a time.
//!
//! This wraps Candle's reference `quantized_llama`, whose KV cache holds a single sequence. The
//! continuous-batching engine replaces it with a forward over many sequences; this stays as the reference
//! that one is tested against.

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;

use crate::ModelError;
use crate::gguf::GgufFile;

/// Quantized llama weights plus the KV cache of the one sequence being generated.
pub struct Llama {
    /// Weights and per-layer KV cache.
    weights: ModelWeights,
    /// Where tensors live.
    device: Device,
}

impl Llama {
    /// Reads the weights from an opened GGUF onto `device`.
    pub fn load(gguf: GgufFile, device: &Device) -> Result<Llama, ModelError> {
        let GgufFile {
            path,
            content,
            mut file,
        } = gguf;
        let weights = ModelWeights::from_gguf(content, &mut file, device).map_err(|e| ModelError::Format {
            path,
            message: format!("cannot load llama weights: {e}"),
        })?;
        Ok(Llama {
            weights,
            device: device.clone(),
        })
    }

    /// Runs `tokens`, which sit at positions `start..start + tokens.len()` of the sequence, and returns the
    /// logits for the token after the last one. `start == 0` begins a new sequence and drops the old cache.
    pub fn forward(&mut self, tokens: &[u32], start: usize) -> Result<Vec<f32>, ModelError> {
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let logits = self.weights.forward(&input, start)?;
        Ok(logits.squeeze(0)?.to_dtype(candle_core::DType::F32)?.to_vec1()?)
    }

    /// Frees the KV cache of the finished sequence.
    pub fn clear(&mut self) {
        self.weights.clear_kv_cache();
    }
}
