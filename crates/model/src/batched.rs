//! A llama-architecture forward over a flattened batch: tokens from many sequences, each at its own
//! position, in one step. This is what continuous batching runs on.
//!
//! - The matmuls (attention projections, MLP, output) run once over every token of the step.
//! - RoPE uses each token's own position.
//! - Attention runs per sequence, over that sequence's own KV cache, with a causal mask inside a chunk
//!   of several tokens (prefill).
//! - Logits are computed only for each sequence's last token.
//!
//! Each sequence's KV cache ([`SeqCache`]) is written in place, so the hot path has no `Tensor::cat`:
//! - on the CPU it is paged, in f16 blocks of its engine's pool ([`crate::pool`]) taken as the sequence
//!   grows and shared between sequences with a common prefix, and attention runs in plain Rust over the
//!   whole step ([`crate::kv`]);
//! - on other devices it is preallocated at its capacity as Candle tensors, and attention uses Candle's
//!   kernels, one sequence at a time.
//!
//! Weights are the GGUF's quantized tensors: Q4_1, Q4_0 and Q8_0 on the CPU through our kernels
//! (`ferroserve-kernels`), anything else through Candle's `QMatMul`. The logits match Candle's reference `quantized_llama` run one sequence at a time;
//! tests check it.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Tensor};
use candle_transformers::quantized_nn::RmsNorm;
use std::sync::Arc;

use ferroserve_kernels::{PanelMatrix, Q40Matrix, Q41Matrix, Q80Matrix};

use crate::ModelError;
use crate::gguf::GgufFile;
use crate::kv::{self, AttendJob, BLOCK_TOKENS, KvLayout};
use crate::pool::{Blocks, blocks_for};
pub use crate::seq_cache::SeqCache;
use crate::seq_cache::Store;

/// Positions precomputed for RoPE; a sequence longer than this is refused.
pub(crate) const MAX_POSITIONS: usize = 8192;

/// A weight matrix applied to every token of a step.
enum Linear {
    /// Q4_1 on the CPU: our kernel (`ferroserve-kernels`), since Candle has no SIMD path for Q4_1 and its
    /// cost would grow with every row of a batch.
    Q41(Q41Matrix),
    /// Q4_0 on the CPU: the same kernel body as Q4_1.
    Q40(Q40Matrix),
    /// Q8_0 on the CPU (SmolLM2's embedding and output): our kernel, which reads the matrix once per
    /// four rows where Candle reads it once per row. Shared with the embedding lookup when tied.
    Q80(Arc<Q80Matrix>),
    /// Any other format or device: Candle's quantized matmul.
    Candle(QMatMul),
}

impl Linear {
    fn new(q: QTensor, device: &Device) -> candle_core::Result<Linear> {
        if device.is_cpu() {
            let (rows, cols) = q.shape().dims2()?;
            let ours = match q.dtype() {
                GgmlDType::Q4_1 => Some(Q41Matrix::from_gguf_bytes(rows, cols, &q.data()?).map(Linear::Q41)),
                GgmlDType::Q4_0 => Some(Q40Matrix::from_gguf_bytes(rows, cols, &q.data()?).map(Linear::Q40)),
                GgmlDType::Q8_0 => {
                    Some(Q80Matrix::from_gguf_bytes(rows, cols, &q.data()?).map(|w| Linear::Q80(Arc::new(w))))
                }
                _ => None,
            };
            if let Some(linear) = ours {
                return linear.map_err(candle_core::Error::msg);
            }
        }
        Ok(Linear::Candle(QMatMul::from_qtensor(q)?))
    }

    /// `x` is `[tokens, in]`; returns `[tokens, out]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Candle(q) => q.forward(x),
            Linear::Q41(w) => {
                let (m, _) = x.dims2()?;
                Tensor::from_vec(w.matmul(&rows_of(x)?, m), (m, w.rows()), x.device())
            }
            Linear::Q40(w) => {
                let (m, _) = x.dims2()?;
                Tensor::from_vec(w.matmul(&rows_of(x)?, m), (m, w.rows()), x.device())
            }
            Linear::Q80(w) => {
                let (m, _) = x.dims2()?;
                Tensor::from_vec(w.matmul(&rows_of(x)?, m), (m, w.rows()), x.device())
            }
        }
    }

    /// Weights (rows x cols) and the bytes a pass over them reads, for our formats.
    fn footprint(&self) -> Option<(usize, usize)> {
        match self {
            Linear::Q41(w) => Some((w.rows() * w.cols(), w.bytes())),
            Linear::Q40(w) => Some((w.rows() * w.cols(), w.bytes())),
            Linear::Q80(w) => Some((w.rows() * w.cols(), w.bytes())),
            Linear::Candle(_) => None,
        }
    }

    /// As [`Linear::forward`], but the result as a row-major vector (for the CPU attention).
    fn forward_rows(&self, x: &Tensor) -> candle_core::Result<Vec<f32>> {
        match self {
            Linear::Candle(q) => rows_of(&q.forward(x)?),
            Linear::Q41(w) => Ok(w.matmul(&rows_of(x)?, x.dims2()?.0)),
            Linear::Q40(w) => Ok(w.matmul(&rows_of(x)?, x.dims2()?.0)),
            Linear::Q80(w) => Ok(w.matmul(&rows_of(x)?, x.dims2()?.0)),
        }
    }
}

/// `x` through several matrices of the same input width, as row-major vectors: when all are Q4 matrices of
/// one format, `x` is quantized once and their tiles share one parallel region; otherwise one at a time.
fn forward_rows_group(linears: &[&Linear], x: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    /// All of `linears` as panel matrices of one format, when `pick` finds each.
    fn all<'a, P>(
        linears: &[&'a Linear],
        pick: fn(&'a Linear) -> Option<&'a PanelMatrix<P>>,
    ) -> Option<Vec<&'a PanelMatrix<P>>> {
        linears.iter().map(|l| pick(l)).collect()
    }
    let m = x.dims2()?.0;
    let q41 = all(linears, |l| match l {
        Linear::Q41(w) => Some(w),
        _ => None,
    });
    if let Some(ws) = q41 {
        return Ok(PanelMatrix::matmul_group(&ws, &rows_of(x)?, m));
    }
    let q40 = all(linears, |l| match l {
        Linear::Q40(w) => Some(w),
        _ => None,
    });
    if let Some(ws) = q40 {
        return Ok(PanelMatrix::matmul_group(&ws, &rows_of(x)?, m));
    }
    linears.iter().map(|l| l.forward_rows(x)).collect()
}

/// SwiGLU's `silu(gate) * up`, element by element, with Candle's formula for silu.
fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter().zip(up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect()
}

/// A tensor's values as a row-major f32 vector.
fn rows_of(x: &Tensor) -> candle_core::Result<Vec<f32>> {
    x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// One transformer block.
struct Block {
    /// Query, key, value and output projections.
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    /// SwiGLU MLP: down(silu(gate(x)) * up(x)).
    gate: Linear,
    down: Linear,
    up: Linear,
    /// Norms before attention and before the MLP.
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
}

/// The model's shape, read from the GGUF metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Vocabulary size (logits per token).
    pub vocab: usize,
}

/// Quantized llama weights, shared by every sequence; the KV caches live in [`SeqCache`]s.
pub struct BatchedLlama {
    /// Token embeddings (a lookup, not a matmul).
    embed: Embedding,
    /// The blocks.
    blocks: Vec<Block>,
    /// Final norm.
    norm: RmsNorm,
    /// Output projection (the embedding matrix when the GGUF ties them).
    output: Linear,
    /// RoPE tables, `[MAX_POSITIONS, rope_dim / 2]`, as tensors and (for the CPU path) as vectors.
    cos: Tensor,
    sin: Tensor,
    cos_rows: Vec<f32>,
    sin_rows: Vec<f32>,
    /// Heads and sizes.
    pub(crate) shape: Shape,
    /// Where tensors live.
    pub(crate) device: Device,
    /// Paged f16 caches and the plain-Rust attention (the CPU default), or Candle slot caches.
    pub(crate) paged: bool,
}

/// The token embedding table.
enum Embedding {
    /// Q8_0 on the CPU: rows dequantized as they are looked up (30 MB for SmolLM2 instead of 113 MB).
    Q80(Arc<Q80Matrix>),
    /// Dequantized to f32 on the device.
    Dense(Tensor),
}

impl Embedding {
    fn dense(q: &QTensor, device: &Device) -> Result<Embedding, ModelError> {
        Ok(Embedding::Dense(q.dequantize(device)?))
    }

    /// `[ids.len(), dim]`.
    fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor, ModelError> {
        Ok(match self {
            Embedding::Q80(w) => {
                let rows: Vec<f32> = ids.iter().flat_map(|&id| w.dequantize_row(id as usize)).collect();
                Tensor::from_vec(rows, (ids.len(), w.cols()), device)?
            }
            Embedding::Dense(t) => t.index_select(&Tensor::new(ids, device)?, 0)?,
        })
    }
}

/// One sequence's part of a step: its cache, and the tokens to run at positions `cache.len()..`.
pub struct Chunk<'a> {
    /// The sequence's cache; `len` advances by `tokens.len()`.
    pub cache: &'a mut SeqCache,
    /// Prompt tokens (prefill, possibly a slice of the prompt) or the one sampled token (decode).
    pub tokens: &'a [u32],
}

fn format_err(path: &std::path::Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Format {
        path: path.to_path_buf(),
        message: format!("cannot load llama weights: {e}"),
    }
}

/// The llama hyperparameters read from a file's metadata, before anything is sized by them.
struct Hyper {
    heads: usize,
    kv_heads: usize,
    layers: usize,
    dim: usize,
    rope_dim: usize,
    eps: f64,
    base: f32,
}

/// Bounds no model this engine runs exceeds; a file claiming more is corrupt or hostile, and must not make
/// the loader allocate for it.
const MAX_LAYERS: usize = 1024;
const MAX_DIM: usize = 1 << 16;

impl Hyper {
    /// The same values when they describe a model the forward can run: heads dividing the width, key/value
    /// heads dividing the heads, RoPE over the whole head, and a layer count the file's tensors can hold.
    fn checked(self, tensors: usize) -> Result<Hyper, String> {
        let Hyper {
            heads,
            kv_heads,
            layers,
            dim,
            rope_dim,
            ..
        } = self;
        if !(1..=MAX_DIM).contains(&dim) || heads == 0 || dim % heads != 0 {
            return Err(format!(
                "embedding width {dim} with {heads} heads: need 1..={MAX_DIM}, a multiple of heads"
            ));
        }
        if kv_heads == 0 || kv_heads > heads || heads % kv_heads != 0 {
            return Err(format!(
                "{kv_heads} key/value heads for {heads} heads: need a divisor of heads"
            ));
        }
        if rope_dim != dim / heads || rope_dim % 2 != 0 {
            return Err(format!(
                "RoPE over {rope_dim} dimensions of {}-wide heads: need the whole (even) head",
                dim / heads
            ));
        }
        // Nine tensors a block, plus the embedding and the final norm.
        if layers == 0 || layers > MAX_LAYERS || layers.saturating_mul(9).saturating_add(2) > tensors {
            return Err(format!("{layers} blocks, with {tensors} tensors in the file"));
        }
        if !(self.eps.is_finite() && self.eps > 0.0 && self.base.is_finite() && self.base > 0.0) {
            return Err(format!(
                "norm epsilon {} and RoPE base {}: need finite values above 0",
                self.eps, self.base
            ));
        }
        Ok(self)
    }
}

/// RoPE tables for positions `0..MAX_POSITIONS`.
fn rope_tables(dim: usize, base: f32, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
        .collect();
    let inv = Tensor::new(inv.as_slice(), device)?.reshape((1, dim / 2))?;
    let pos = Tensor::arange(0, MAX_POSITIONS as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((MAX_POSITIONS, 1))?;
    let angles = pos.matmul(&inv)?;
    Ok((angles.cos()?, angles.sin()?))
}

impl BatchedLlama {
    /// Reads the weights of a llama-architecture GGUF onto `device`.
    pub fn load(gguf: &mut GgufFile, device: &Device) -> Result<BatchedLlama, ModelError> {
        BatchedLlama::load_reporting(gguf, device, &|_| {})
    }

    /// As [`BatchedLlama::load`], calling `progress` with the fraction of transformer blocks read so far.
    pub fn load_reporting(
        gguf: &mut GgufFile,
        device: &Device,
        progress: &dyn Fn(f32),
    ) -> Result<BatchedLlama, ModelError> {
        let path = gguf.path.clone();
        let err = |e: candle_core::Error| format_err(&path, e);
        let md = |key: &str| -> Result<&gguf_file::Value, ModelError> {
            gguf.content
                .metadata
                .get(key)
                .ok_or_else(|| format_err(&path, format!("missing metadata {key}")))
        };
        let num = |key: &str| -> Result<usize, ModelError> {
            md(key)?.to_u32().map(|v| v as usize).map_err(|e| format_err(&path, e))
        };
        let arch = md("general.architecture")?
            .to_string()
            .map_err(|e| format_err(&path, e))?;
        if arch != "llama" {
            return Err(format_err(&path, format!("architecture {arch:?}, not llama")));
        }
        let eps = md("llama.attention.layer_norm_rms_epsilon")?
            .to_f32()
            .map_err(|e| format_err(&path, e))? as f64;
        let base = md("llama.rope.freq_base").and_then(|v| v.to_f32().map_err(|e| format_err(&path, e)));
        let h = Hyper {
            heads: num("llama.attention.head_count")?,
            kv_heads: num("llama.attention.head_count_kv")?,
            layers: num("llama.block_count")?,
            dim: num("llama.embedding_length")?,
            rope_dim: num("llama.rope.dimension_count")?,
            eps,
            base: base.unwrap_or(10_000.0),
        }
        .checked(gguf.content.tensor_infos.len())
        .map_err(|m| format_err(&path, m))?;
        let (heads, kv_heads, layers, dim) = (h.heads, h.kv_heads, h.layers, h.dim);
        let (cos, sin) = rope_tables(h.rope_dim, h.base, device).map_err(err)?;

        let GgufFile { content, file, .. } = gguf;
        let mut tensor = |name: &str| content.tensor(file, name, device).map_err(err);
        let embed_q = tensor("token_embd.weight")?;
        let vocab = match embed_q.shape().dims() {
            [vocab, d] if *d == dim && *vocab > 0 => *vocab,
            other => {
                return Err(format_err(
                    &path,
                    format!("token_embd.weight is {other:?}, not [vocab, {dim}]"),
                ));
            }
        };
        let norm = RmsNorm::from_qtensor(tensor("output_norm.weight")?, eps).map_err(err)?;
        // Ask before reading: Candle's error for a missing tensor captures a backtrace, and symbolizing it
        // loads the binary's debug info, which then stays resident (127 MB) for the life of the process.
        let (embed, output) = match content.tensor_infos.contains_key("output.weight") {
            true => {
                let out = tensor("output.weight")?;
                (
                    Embedding::dense(&embed_q, device)?,
                    Linear::new(out, device).map_err(err)?,
                )
            }
            // Tied: one matrix serves both. Our Q8_0 matrix is kept once, quantized, for both.
            false => {
                let dense = match (device.is_cpu(), embed_q.dtype()) {
                    (true, GgmlDType::Q8_0) => None,
                    _ => Some(Embedding::dense(&embed_q, device)?),
                };
                let output = Linear::new(embed_q, device).map_err(err)?;
                match (dense, &output) {
                    (Some(embed), _) => (embed, output),
                    (None, Linear::Q80(w)) => (Embedding::Q80(w.clone()), output),
                    (None, _) => return Err(format_err(&path, "a Q8_0 embedding not read as Q8_0")),
                }
            }
        };
        let mut blocks = Vec::with_capacity(layers);
        for i in 0..layers {
            // Each matrix's [out, in] shape, checked before use: a forward over mismatched shapes would index
            // out of bounds.
            let head_dim = dim / heads;
            let mut q = |name: &str, out: usize, inp: usize| -> Result<Linear, ModelError> {
                let t = tensor(&format!("blk.{i}.{name}.weight"))?;
                match t.shape().dims() {
                    [o, n] if *o == out && *n == inp => Linear::new(t, device).map_err(err),
                    other => Err(format_err(
                        &path,
                        format!("blk.{i}.{name}.weight is {other:?}, not [{out}, {inp}]"),
                    )),
                }
            };
            let kv_dim = kv_heads * head_dim;
            let (wq, wk, wv) = (
                q("attn_q", dim, dim)?,
                q("attn_k", kv_dim, dim)?,
                q("attn_v", kv_dim, dim)?,
            );
            let wo = q("attn_output", dim, dim)?;
            let ff = content
                .tensor_infos
                .get(&format!("blk.{i}.ffn_gate.weight"))
                .map_or(0, |t| t.shape.dims().first().copied().unwrap_or(0));
            let (gate, down, up) = (q("ffn_gate", ff, dim)?, q("ffn_down", dim, ff)?, q("ffn_up", ff, dim)?);
            let attn_norm = RmsNorm::from_qtensor(tensor(&format!("blk.{i}.attn_norm.weight"))?, eps).map_err(err)?;
            let ffn_norm = RmsNorm::from_qtensor(tensor(&format!("blk.{i}.ffn_norm.weight"))?, eps).map_err(err)?;
            blocks.push(Block {
                wq,
                wk,
                wv,
                wo,
                gate,
                down,
                up,
                attn_norm,
                ffn_norm,
            });
            progress((i + 1) as f32 / layers as f32);
        }
        let (cos_rows, sin_rows) = (rows_of(&cos).map_err(err)?, rows_of(&sin).map_err(err)?);
        Ok(BatchedLlama {
            embed,
            blocks,
            norm,
            output,
            cos,
            sin,
            cos_rows,
            sin_rows,
            shape: Shape {
                layers,
                heads,
                kv_heads,
                head_dim: dim / heads,
                vocab,
            },
            device: device.clone(),
            paged: device.is_cpu(),
        })
    }

    /// Uses Candle's attention over preallocated slot caches even on the CPU: the path other devices
    /// take, so that tests on a machine without a GPU cover it.
    pub fn with_candle_attention(mut self) -> BatchedLlama {
        self.paged = false;
        self
    }

    /// The weights every decode step multiplies by (each block's projections and the output projection):
    /// their count and the bytes one pass reads. `None` when a matrix runs through Candle.
    pub fn matmul_footprint(&self) -> Option<(usize, usize)> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.wq, &b.wk, &b.wv, &b.wo, &b.gate, &b.up, &b.down])
            .chain([&self.output])
            .map(Linear::footprint)
            .try_fold((0, 0), |(p, b), f| f.map(|(fp, fb)| (p + fp, b + fb)))
    }

    /// The model's shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Where each value of a paged KV cache sits.
    pub fn kv_layout(&self) -> KvLayout {
        KvLayout {
            layers: self.shape.layers,
            kv_heads: self.shape.kv_heads,
            head_dim: self.shape.head_dim,
        }
    }

    /// Runs one step over every chunk and returns, per chunk, the logits that follow its last token.
    /// Each chunk's cache advances by its token count. A chunk that would overflow its cache, or an
    /// empty chunk, is refused before anything runs.
    pub fn forward(&self, chunks: &mut [Chunk<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        // Run the whole step on a pool thread: every parallel region inside then starts from the pool
        // (work-stealing) instead of injecting a job from outside and blocking until it is done.
        rayon::scope(|_| self.forward_in_pool(chunks))
    }

    fn forward_in_pool(&self, chunks: &mut [Chunk<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let Some(pool) = chunks.first().map(|c| c.cache.pool.clone()) else {
            return Ok(Vec::new());
        };
        for c in chunks.iter() {
            if !c.cache.pool.same(&pool) {
                return Err(ModelError::Cache(
                    "the chunks of one step come from different pools".into(),
                ));
            }
            if c.tokens.is_empty() || c.cache.len + c.tokens.len() > c.cache.capacity {
                return Err(ModelError::Cache(format!(
                    "a chunk of {} tokens at position {} does not fit a cache of {}",
                    c.tokens.len(),
                    c.cache.len,
                    c.cache.capacity
                )));
            }
        }
        let mut blocks = pool.lock();
        let total: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let mut ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut last = Vec::with_capacity(chunks.len());
        for c in chunks.iter() {
            ids.extend_from_slice(c.tokens);
            positions.extend((c.cache.len..c.cache.len + c.tokens.len()).map(|p| p as u32));
            last.push((ids.len() - 1) as u32);
        }
        let rope = if self.paged {
            for c in chunks.iter_mut() {
                let end = c.cache.len + c.tokens.len();
                if matches!(c.cache.store, Store::Slots { .. }) {
                    return Err(ModelError::Cache("a slot cache on the CPU path".into()));
                }
                if !c.cache.grow(&mut blocks, end) {
                    return Err(ModelError::Cache(format!(
                        "the KV pool has no free block for positions up to {end}"
                    )));
                }
            }
            None
        } else {
            let positions = Tensor::new(positions.as_slice(), &self.device)?;
            Some((
                self.cos.index_select(&positions, 0)?,
                self.sin.index_select(&positions, 0)?,
            ))
        };
        let positions: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
        let mut x = self.embed.lookup(&ids, &self.device)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            let h = block.attn_norm.forward(&x)?;
            let y = match &rope {
                None => self.attention_paged(layer, block, &h, chunks, &positions, &mut blocks)?,
                Some((cos, sin)) => self.attention_slots(layer, block, &h, chunks, cos, sin)?,
            };
            x = (x + block.wo.forward(&y)?)?;
            let h = block.ffn_norm.forward(&x)?;
            let act = if self.paged {
                let [gate, up] = <[Vec<f32>; 2]>::try_from(forward_rows_group(&[&block.gate, &block.up], &h)?)
                    .expect("two matrices, two results");
                Tensor::from_vec(
                    swiglu(&gate, &up),
                    (h.dims2()?.0, gate.len() / h.dims2()?.0),
                    &self.device,
                )?
            } else {
                (candle_nn::ops::silu(&block.gate.forward(&h)?)? * block.up.forward(&h)?)?
            };
            x = (x + block.down.forward(&act)?)?;
        }
        for c in chunks.iter_mut() {
            c.cache.record(&mut blocks, c.tokens);
        }
        drop(blocks);
        let x = x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
        let logits = self.output.forward(&self.norm.forward(&x)?)?;
        Ok(logits.to_dtype(DType::F32)?.to_vec2()?)
    }

    /// Attention on the CPU over paged caches: projections, RoPE by position, cache writes, then
    /// [`kv::attend`] over the whole step. Returns `[tokens, heads * head_dim]`.
    fn attention_paged(
        &self,
        layer: usize,
        block: &Block,
        h: &Tensor,
        chunks: &mut [Chunk<'_>],
        positions: &[usize],
        blocks: &mut Blocks,
    ) -> Result<Tensor, ModelError> {
        let s = self.shape;
        let (hd, kvw) = (s.head_dim, s.kv_heads * s.head_dim);
        let [mut q, mut k, v] = <[Vec<f32>; 3]>::try_from(forward_rows_group(&[&block.wq, &block.wk, &block.wv], h)?)
            .expect("three matrices, three results");
        kv::rope(&mut q, s.heads, hd, positions, &self.cos_rows, &self.sin_rows);
        kv::rope(&mut k, s.kv_heads, hd, positions, &self.cos_rows, &self.sin_rows);
        let layout = self.kv_layout();
        let mut offset = 0;
        let mut spans = Vec::with_capacity(chunks.len());
        for c in chunks.iter_mut() {
            let (past, n) = (c.cache.len, c.tokens.len());
            if let Store::Paged(ids) = &c.cache.store {
                for i in 0..n {
                    let row = (offset + i) * kvw..(offset + i + 1) * kvw;
                    let block = blocks.block_mut(ids[(past + i) / BLOCK_TOKENS]);
                    kv::write(layout, block, layer, past + i, &k[row.clone()], &v[row]);
                }
            }
            spans.push((past, n, offset));
            offset += n;
        }
        let blocks = &*blocks;
        let jobs: Vec<AttendJob<'_>> = chunks
            .iter()
            .zip(spans)
            .filter_map(|(c, (past, n, offset))| match &c.cache.store {
                Store::Paged(ids) => Some(AttendJob {
                    blocks: ids[..blocks_for(past + n)].iter().map(|&id| blocks.block(id)).collect(),
                    past,
                    n,
                    offset,
                }),
                Store::Slots { .. } => None,
            })
            .collect();
        let y = kv::attend(layout, s.heads, layer, &jobs, &q);
        Ok(Tensor::from_vec(y, (offset, s.heads * hd), &self.device)?)
    }

    /// Attention with Candle's kernels over preallocated slot caches, one sequence at a time.
    fn attention_slots(
        &self,
        layer: usize,
        block: &Block,
        h: &Tensor,
        chunks: &mut [Chunk<'_>],
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let s = self.shape;
        let total = h.dims2()?.0;
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((1, total, n, s.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = candle_nn::rotary_emb::rope_i(&heads(block.wq.forward(h)?, s.heads)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_i(&heads(block.wk.forward(h)?, s.kv_heads)?, cos, sin)?;
        let v = heads(block.wv.forward(h)?, s.kv_heads)?;
        let y = Tensor::zeros((1, s.heads, total, s.head_dim), DType::F32, &self.device)?;
        let mut offset = 0;
        for c in chunks.iter_mut() {
            let n = c.tokens.len();
            let past = c.cache.len;
            let Store::Slots { layers, .. } = &c.cache.store else {
                return Err(ModelError::Cache("a paged cache on the slot path".into()));
            };
            let (kc, vc) = &layers[layer];
            kc.slice_set(&k.narrow(2, offset, n)?.contiguous()?, 2, past)?;
            vc.slice_set(&v.narrow(2, offset, n)?.contiguous()?, 2, past)?;
            let out = self.attend(&q.narrow(2, offset, n)?, kc, vc, past, n)?;
            y.slice_set(&out, 2, offset)?;
            offset += n;
        }
        Ok(y.transpose(1, 2)?.reshape((total, s.heads * s.head_dim))?)
    }

    /// Attention of `n` new queries `[1, heads, n, head_dim]` at positions `past..past + n` over the first
    /// `past + n` cached keys and values, causal within the chunk.
    fn attend(&self, q: &Tensor, kc: &Tensor, vc: &Tensor, past: usize, n: usize) -> candle_core::Result<Tensor> {
        let s = self.shape;
        let seen = past + n;
        let group = s.heads / s.kv_heads;
        let k = candle_transformers::utils::repeat_kv(kc.narrow(2, 0, seen)?.contiguous()?, group)?;
        let v = candle_transformers::utils::repeat_kv(vc.narrow(2, 0, seen)?.contiguous()?, group)?;
        let scores = (q.contiguous()?.matmul(&k.t()?)? / (s.head_dim as f64).sqrt())?;
        let scores = if n > 1 {
            // Query i sits at position past + i and sees keys 0..=past + i.
            let mask: Vec<f32> = (0..n)
                .flat_map(|i| (0..seen).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            scores.broadcast_add(&Tensor::from_vec(mask, (n, seen), &self.device)?)?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs.matmul(&v)?.contiguous()
    }
}

/// Index of the largest value (greedy pick), for tests and checks.
pub fn argmax(logits: &[f32]) -> usize {
    logits
        .iter()
        .enumerate()
        .fold((0, f32::MIN), |best, (i, &v)| if v > best.1 { (i, v) } else { best })
        .0
}
