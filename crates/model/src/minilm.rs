//! The sentence encoder (BERT, as in all-MiniLM-L6-v2) on our int8 kernels: the content filter's fast path.
//!
//! Candle's f32 BERT spends about 19 ms on a 20-token prompt on the 2-core development machine; the
//! filter's budget is 10 ms at p99. This forward pass keeps the same arithmetic but runs every dense layer
//! through [`ChannelQ8Matrix`] (weights quantized once at load to int8 with a scale per output row,
//! activations to 7 bits per block of 32), and the element-wise work (bias, GELU) inside the matmul's
//! parallel tiles.
//!
//! - **No padding.** The texts of a batch are laid end to end, one row per token, so a short text costs
//!   only its own tokens; attention runs per text and per head over that text's tokens alone.
//! - **Post-LayerNorm BERT**: embeddings (word + position + token type 0), LayerNorm; then per layer
//!   fused Q/K/V, softmax attention, output projection, residual and LayerNorm, a GELU (erf) feed-forward
//!   layer, residual and LayerNorm.
//! - Candle still reads the safetensors file; [`crate::embed`] keeps Candle's BERT as the reference, and
//!   a test holds the two to the same embeddings (cosine above 0.99).

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use candle_transformers::models::bert::{Config, HiddenAct};
use ferroserve_kernels::ChannelQ8Matrix;
use rayon::prelude::*;

use crate::kv::dot;

/// Why the encoder could not be built from a weights file.
pub type LoadError = String;

/// A dense layer: int8 weights (`out x in`, a scale per output row) and an f32 bias.
struct Dense {
    w: ChannelQ8Matrix,
    b: Vec<f32>,
}

impl Dense {
    /// `x` is `m x in`; returns `m x out`.
    fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.w.matmul_map(x, m, |c, row| {
            row.iter_mut().zip(&self.b[c]).for_each(|(v, b)| *v += b);
        })
    }

    /// `gelu(x Wᵀ + b)`, the activation applied inside the matmul's parallel tiles.
    fn forward_gelu(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.w.matmul_map(x, m, |c, row| {
            row.iter_mut().zip(&self.b[c]).for_each(|(v, b)| *v = gelu(*v + b));
        })
    }
}

/// LayerNorm's scale and shift.
struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

impl Norm {
    /// Normalizes each row of `x` in place.
    fn apply(&self, x: &mut [f32], eps: f32) {
        let n = self.gamma.len() as f32;
        for row in x.chunks_exact_mut(self.gamma.len()) {
            let mean = row.iter().sum::<f32>() / n;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, g), b) in row.iter_mut().zip(&self.gamma).zip(&self.beta) {
                *v = (*v - mean) * inv * g + b;
            }
        }
    }
}

struct Layer {
    /// Query, key and value stacked: `3 hidden x hidden`.
    qkv: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    up: Dense,
    down: Dense,
    out_norm: Norm,
}

/// A BERT encoder with int8 dense layers.
pub struct Int8Bert {
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    max_positions: usize,
    eps: f32,
}

/// The tensors of a safetensors file, found with or without a `bert.` prefix.
struct Weights {
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        let t = self
            .tensors
            .get(name)
            .or_else(|| self.tensors.get(&format!("bert.{name}")))
            .ok_or_else(|| format!("the weights have no tensor `{name}`"))?;
        if t.dims() != shape {
            return Err(format!("tensor `{name}` has shape {:?}, expected {shape:?}", t.dims()));
        }
        t.to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| format!("tensor `{name}`: {e}"))
    }

    fn dense(&self, prefix: &str, out: usize, input: usize) -> Result<Dense, LoadError> {
        Ok(Dense {
            w: ChannelQ8Matrix::quantize(out, input, &self.get(&format!("{prefix}.weight"), &[out, input])?)?,
            b: self.get(&format!("{prefix}.bias"), &[out])?,
        })
    }

    fn norm(&self, prefix: &str, n: usize) -> Result<Norm, LoadError> {
        Ok(Norm {
            gamma: self.get(&format!("{prefix}.weight"), &[n])?,
            beta: self.get(&format!("{prefix}.bias"), &[n])?,
        })
    }

    fn layer(&self, i: usize, hidden: usize, inter: usize) -> Result<Layer, LoadError> {
        let p = format!("encoder.layer.{i}");
        let mut qkv_w = Vec::with_capacity(3 * hidden * hidden);
        let mut qkv_b = Vec::with_capacity(3 * hidden);
        for part in ["query", "key", "value"] {
            qkv_w.extend(self.get(&format!("{p}.attention.self.{part}.weight"), &[hidden, hidden])?);
            qkv_b.extend(self.get(&format!("{p}.attention.self.{part}.bias"), &[hidden])?);
        }
        Ok(Layer {
            qkv: Dense {
                w: ChannelQ8Matrix::quantize(3 * hidden, hidden, &qkv_w)?,
                b: qkv_b,
            },
            attn_out: self.dense(&format!("{p}.attention.output.dense"), hidden, hidden)?,
            attn_norm: self.norm(&format!("{p}.attention.output.LayerNorm"), hidden)?,
            up: self.dense(&format!("{p}.intermediate.dense"), inter, hidden)?,
            down: self.dense(&format!("{p}.output.dense"), hidden, inter)?,
            out_norm: self.norm(&format!("{p}.output.LayerNorm"), hidden)?,
        })
    }
}

/// `erf` to within 1.5e-7 (Abramowitz and Stegun 7.1.26): one `exp` instead of libm's series, which took
/// a tenth of the encoder's time.
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_7, -1.453_152_1, 1.061_405_4];
    let t = 1.0 / (1.0 + P * x.abs());
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let y = 1.0 - poly * exp(-x * x);
    y.copysign(x)
}

/// `e^x` to within (1 + |x|) · 1.5e-7 relative, as `2^n · 2^f` with a degree-6 polynomial for `2^f`: no branch and no
/// call, so the loops that use it (GELU, softmax) compile to vector code, where libm's `expf` is a call
/// per value.
#[inline]
fn exp(x: f32) -> f32 {
    let t = x.clamp(-87.0, 88.0) * std::f32::consts::LOG2_E;
    let n = t.round_ties_even();
    let f = t - n;
    // ln(2)^k / k!: the Taylor series of 2^f.
    const C: [f32; 6] = [
        std::f32::consts::LN_2,
        0.240_226_5,
        0.055_504_11,
        0.009_618_129,
        0.001_333_355_8,
        0.000_154_035_3,
    ];
    let p = 1.0 + f * (C[0] + f * (C[1] + f * (C[2] + f * (C[3] + f * (C[4] + f * C[5])))));
    f32::from_bits(((n as i32 + 127) as u32) << 23) * p
}

/// GELU, the exact (erf) form BERT was trained with.
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

impl Int8Bert {
    /// Builds the encoder from a safetensors file's bytes and the model's config.
    pub fn load(bytes: &[u8], config: &Config) -> Result<Int8Bert, LoadError> {
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| e.to_string())?;
        let w = Weights { tensors };
        let (hidden, inter) = (config.hidden_size, config.intermediate_size);
        if !matches!(config.hidden_act, HiddenAct::Gelu) {
            return Err(format!(
                "hidden_act {:?} is not supported; this encoder runs `gelu`",
                config.hidden_act
            ));
        }
        if config.num_attention_heads == 0 || !hidden.is_multiple_of(config.num_attention_heads) {
            return Err(format!(
                "hidden size {hidden} does not split into {} heads",
                config.num_attention_heads
            ));
        }
        let layers = (0..config.num_hidden_layers)
            .map(|i| w.layer(i, hidden, inter))
            .collect::<Result<_, _>>()?;
        let mut token_type = w.get(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, hidden],
        )?;
        token_type.truncate(hidden);
        Ok(Int8Bert {
            word: w.get("embeddings.word_embeddings.weight", &[config.vocab_size, hidden])?,
            position: w.get(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, hidden],
            )?,
            token_type,
            embed_norm: w.norm("embeddings.LayerNorm", hidden)?,
            layers,
            hidden,
            heads: config.num_attention_heads,
            max_positions: config.max_position_embeddings,
            eps: config.layer_norm_eps as f32,
        })
    }

    /// Layers of the full encoder.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// Mean-pooled, unit-length embeddings of tokenized texts (each at most `max_positions` tokens),
    /// taken after the first `layers` layers (an early exit: the cost falls in proportion).
    ///
    /// The pass runs on a rayon worker, so its matmuls and attention split work by stealing rather than
    /// by waking the pool from outside for each of their thirty parallel loops.
    pub fn embed(&self, texts: &[&[u32]], layers: usize) -> Result<Vec<Vec<f32>>, String> {
        rayon::scope(|_| self.embed_in_pool(texts, layers))
    }

    fn embed_in_pool(&self, texts: &[&[u32]], layers: usize) -> Result<Vec<Vec<f32>>, String> {
        let h = self.hidden;
        let vocab = self.word.len() / h;
        let mut starts = Vec::with_capacity(texts.len() + 1);
        let mut x = Vec::new();
        starts.push(0);
        for ids in texts {
            if ids.len() > self.max_positions {
                return Err(format!(
                    "{} tokens, the encoder takes at most {}",
                    ids.len(),
                    self.max_positions
                ));
            }
            for (pos, &id) in ids.iter().enumerate() {
                let id = id as usize;
                if id >= vocab {
                    return Err(format!("token id {id} is outside the vocabulary of {vocab}"));
                }
                let word = &self.word[id * h..(id + 1) * h];
                let position = &self.position[pos * h..(pos + 1) * h];
                x.extend((0..h).map(|j| word[j] + position[j] + self.token_type[j]));
            }
            starts.push(x.len() / h);
        }
        let tokens = x.len() / h;
        self.embed_norm.apply(&mut x, self.eps);
        for layer in self.layers.iter().take(layers) {
            let qkv = layer.qkv.forward(&x, tokens);
            let ctx = self.attention(&qkv, &starts);
            let a = layer.attn_out.forward(&ctx, tokens);
            x.iter_mut().zip(&a).for_each(|(v, a)| *v += a);
            layer.attn_norm.apply(&mut x, self.eps);
            let up = layer.up.forward_gelu(&x, tokens);
            let down = layer.down.forward(&up, tokens);
            x.iter_mut().zip(&down).for_each(|(v, d)| *v += d);
            layer.out_norm.apply(&mut x, self.eps);
        }
        Ok(starts
            .windows(2)
            .map(|w| {
                let mut mean = vec![0.0f32; h];
                for row in x[w[0] * h..w[1] * h].chunks_exact(h) {
                    mean.iter_mut().zip(row).for_each(|(m, v)| *m += v);
                }
                let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt();
                if norm > 0.0 {
                    mean.iter_mut().for_each(|m| *m /= norm);
                }
                mean
            })
            .collect())
    }

    /// Softmax attention per text and head; `qkv` rows are `[q | k | v]`. Returns `tokens x hidden`.
    fn attention(&self, qkv: &[f32], starts: &[usize]) -> Vec<f32> {
        let h = self.hidden;
        let d = h / self.heads;
        let scale = 1.0 / (d as f32).sqrt();
        let jobs: Vec<(usize, usize)> = (0..starts.len() - 1)
            .flat_map(|s| (0..self.heads).map(move |head| (s, head)))
            .collect();
        // Each job returns its text's context for one head: `n x d`.
        let parts: Vec<Vec<f32>> = jobs
            .par_iter()
            .map(|&(s, head)| {
                let (a, b) = (starts[s], starts[s + 1]);
                let n = b - a;
                let q = |i: usize| &qkv[(a + i) * 3 * h + head * d..][..d];
                let k = |j: usize| &qkv[(a + j) * 3 * h + h + head * d..][..d];
                let v = |j: usize| &qkv[(a + j) * 3 * h + 2 * h + head * d..][..d];
                let mut out = vec![0.0f32; n * d];
                let mut p = vec![0.0f32; n];
                for i in 0..n {
                    let qi = q(i);
                    for (j, pj) in p.iter_mut().enumerate() {
                        *pj = dot(qi, k(j)) * scale;
                    }
                    let max = p.iter().fold(f32::MIN, |m, v| m.max(*v));
                    let mut sum = 0.0;
                    for pj in p.iter_mut() {
                        *pj = exp(*pj - max);
                        sum += *pj;
                    }
                    let o = &mut out[i * d..(i + 1) * d];
                    for (j, pj) in p.iter().enumerate() {
                        let w = pj / sum;
                        o.iter_mut().zip(v(j)).for_each(|(o, v)| *o += w * v);
                    }
                }
                out
            })
            .collect();
        let tokens = starts[starts.len() - 1];
        let mut ctx = vec![0.0f32; tokens * h];
        for (&(s, head), part) in jobs.iter().zip(&parts) {
            for (i, row) in part.chunks_exact(d).enumerate() {
                let t = starts[s] + i;
                ctx[t * h + head * d..t * h + (head + 1) * d].copy_from_slice(row);
            }
        }
        ctx
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_matches_std_closely() {
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let (ours, std) = (super::exp(x), x.exp());
            // The range reduction `x · log2 e` in f32 loses more as |x| grows.
            let tolerance = (1.0 + x.abs()) * 1.5e-7;
            assert!((ours - std).abs() <= tolerance * std, "exp({x}) = {ours}, std {std}");
        }
        assert_eq!(super::exp(-1000.0), super::exp(-87.0));
    }

    #[test]
    fn erf_matches_libm_closely() {
        for i in -4000..=4000 {
            let x = i as f32 / 1000.0;
            let (ours, libm) = (super::erf(x), candle_core::cpu::erf::erf_f32(x));
            assert!((ours - libm).abs() < 1e-6, "erf({x}) = {ours}, libm {libm}");
        }
        assert!(super::erf(0.0).abs() < 1e-6);
        assert_eq!(super::erf(20.0), 1.0);
        assert_eq!(super::erf(-20.0), -1.0);
        assert!(super::erf(-0.5) < 0.0 && super::erf(0.5) > 0.0);
    }
}
