//! The KV cache on the CPU, and the attention that reads it.
//!
//! - **Paged.** A sequence's keys and values live in fixed-size blocks of [`BLOCK_TOKENS`] positions,
//!   taken from its engine's pool ([`crate::pool`]) as the sequence grows and listed in its block table.
//!   Full blocks can be shared between sequences with the same prefix.
//! - **f16.** Values are stored in half precision: 23 KB per position for SmolLM2-135M instead of 46 KB.
//!   Attention reads them back as f32.
//! - **Layout.** A block holds every layer's keys and values, each `[kv_head][position][head_dim]`, so one
//!   head's keys for a block are contiguous.
//! - **Attention** runs in plain Rust over a whole step: one task per (sequence, KV head) on the rayon
//!   pool, each handling the query heads that share that KV head (grouped-query attention), with a causal
//!   mask inside a chunk of several tokens. The f16 cache is read in place by the kernels' f32 · f16
//!   operations ([`HalfOps`]); there is no per-sequence tensor op, copy of the cache or `Tensor::cat` on
//!   the hot path.

use ferroserve_kernels::HalfOps;
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Positions per KV block.
pub const BLOCK_TOKENS: usize = 16;

/// Sizes that fix where a value sits in a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Transformer blocks.
    pub layers: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
}

impl KvLayout {
    /// f16 values in one block: every layer's keys and values for [`BLOCK_TOKENS`] positions.
    pub(crate) fn block_len(&self) -> usize {
        self.layers * 2 * self.kv_heads * BLOCK_TOKENS * self.head_dim
    }

    /// Start of one `[BLOCK_TOKENS, head_dim]` panel: a layer's keys (or values) for one head.
    fn panel(&self, layer: usize, values: bool, head: usize) -> usize {
        ((layer * 2 + usize::from(values)) * self.kv_heads + head) * BLOCK_TOKENS * self.head_dim
    }

    /// Bytes one position takes in the cache.
    pub fn bytes_per_token(&self) -> usize {
        self.block_len() / BLOCK_TOKENS * std::mem::size_of::<f16>()
    }
}

/// Stores position `pos` of `layer` in `block` (the block holding it): `k` and `v` are
/// `[kv_heads * head_dim]`.
pub fn write(layout: KvLayout, block: &mut [f16], layer: usize, pos: usize, k: &[f32], v: &[f32]) {
    let hd = layout.head_dim;
    let row = (pos % BLOCK_TOKENS) * hd;
    for h in 0..layout.kv_heads {
        let at = layout.panel(layer, false, h) + row;
        block[at..at + hd].convert_from_f32_slice(&k[h * hd..(h + 1) * hd]);
        let at = layout.panel(layer, true, h) + row;
        block[at..at + hd].convert_from_f32_slice(&v[h * hd..(h + 1) * hd]);
    }
}

/// Keys (or values) of one head at the first `n` positions of `block`: `[n, head_dim]`, in place.
fn panel(layout: KvLayout, block: &[f16], layer: usize, values: bool, head: usize, n: usize) -> &[f16] {
    let start = layout.panel(layer, values, head);
    &block[start..start + n * layout.head_dim]
}

/// One sequence's part of a step: `n` new tokens at positions `past..past + n`, whose rows start at
/// `offset` in the step's flattened batch. Their keys and values are already in `kv`.
pub struct AttendJob<'a> {
    /// The sequence's blocks, in position order.
    pub blocks: Vec<&'a [f16]>,
    /// Positions cached before this step.
    pub past: usize,
    /// New tokens.
    pub n: usize,
    /// First row of the sequence in the step.
    pub offset: usize,
}

/// Attention for every token of a step. `q` is `[tokens, heads * head_dim]` with RoPE applied; the
/// result has the same shape. Query `i` of a job sees positions `..=past + i` of its own sequence.
pub fn attend(layout: KvLayout, heads: usize, layer: usize, jobs: &[AttendJob<'_>], q: &[f32]) -> Vec<f32> {
    let hd = layout.head_dim;
    let group = heads / layout.kv_heads;
    let width = heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let tasks: Vec<(usize, usize)> = (0..jobs.len())
        .flat_map(|j| (0..layout.kv_heads).map(move |h| (j, h)))
        .collect();
    let ops = HalfOps::active();
    let parts: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(j, kv_head)| {
            let job = &jobs[j];
            let seen = job.past + job.n;
            // The cache's blocks for this head, read in place: (keys, values) of up to BLOCK_TOKENS
            // positions each.
            let blocks: Vec<(&[f16], &[f16])> = (0..seen.div_ceil(BLOCK_TOKENS))
                .map(|b| {
                    let n = BLOCK_TOKENS.min(seen - b * BLOCK_TOKENS);
                    let block = job.blocks[b];
                    (
                        panel(layout, block, layer, false, kv_head, n),
                        panel(layout, block, layer, true, kv_head, n),
                    )
                })
                .collect();
            let mut out = vec![0.0f32; job.n * group * hd];
            // One row of scores per query head of the group.
            let mut scores = vec![0.0f32; group * seen];
            for i in 0..job.n {
                let visible = job.past + i + 1;
                // The group's query heads are adjacent in the row.
                let row = (job.offset + i) * width + kv_head * group * hd;
                let queries = &q[row..row + group * hd];
                let visible_blocks = blocks.iter().enumerate().take(visible.div_ceil(BLOCK_TOKENS));
                for (b, (keys, _)) in visible_blocks.clone() {
                    let (start, n) = (b * BLOCK_TOKENS, BLOCK_TOKENS.min(visible - b * BLOCK_TOKENS));
                    (ops.scores)(hd, queries, &keys[..n * hd], &mut scores[start..], seen);
                }
                for g in 0..group {
                    let row = &mut scores[g * seen..g * seen + visible];
                    let mut max = f32::NEG_INFINITY;
                    for s in row.iter_mut() {
                        *s *= scale;
                        max = max.max(*s);
                    }
                    let mut sum = 0.0;
                    for s in row.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    for s in row.iter_mut() {
                        *s /= sum;
                    }
                }
                let o = &mut out[i * group * hd..(i + 1) * group * hd];
                for (b, (_, values)) in visible_blocks {
                    let (start, n) = (b * BLOCK_TOKENS, BLOCK_TOKENS.min(visible - b * BLOCK_TOKENS));
                    (ops.mix)(hd, &scores[start..], seen, &values[..n * hd], o);
                }
            }
            out
        })
        .collect();
    let mut y = vec![0.0f32; q.len()];
    for (&(j, kv_head), part) in tasks.iter().zip(&parts) {
        let job = &jobs[j];
        for i in 0..job.n {
            let row = (job.offset + i) * width + kv_head * group * hd;
            y[row..row + group * hd].copy_from_slice(&part[i * group * hd..(i + 1) * group * hd]);
        }
    }
    y
}

/// Rotates `x` (`[tokens, heads * head_dim]`) by each token's position, in place: pairs `(2i, 2i + 1)`
/// of each head turn by `position * freq_i` (the interleaved RoPE that GGUF llama weights expect).
/// `cos` and `sin` are `[positions, rope_dim / 2]`.
pub fn rope(x: &mut [f32], heads: usize, head_dim: usize, positions: &[usize], cos: &[f32], sin: &[f32]) {
    let half = cos.len() / crate::batched::MAX_POSITIONS;
    for (row, &pos) in x.chunks_exact_mut(heads * head_dim).zip(positions) {
        let (c, s) = (&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]);
        for head in row.chunks_exact_mut(head_dim) {
            for (i, pair) in head.chunks_exact_mut(2).take(half).enumerate() {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * c[i] - b * s[i];
                pair[1] = a * s[i] + b * c[i];
            }
        }
    }
}

/// Dot product with eight independent sums, which the compiler keeps in one vector register (a plain
/// `sum` must keep the sequential order and stays scalar). Also used by the sentence encoder.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYOUT: KvLayout = KvLayout {
        layers: 2,
        kv_heads: 2,
        head_dim: 8,
    };

    fn value(seed: usize) -> f32 {
        ((seed * 2654435761) % 1000) as f32 / 500.0 - 1.0
    }

    /// Zeroed blocks for `positions`.
    fn blocks_for(positions: usize) -> Vec<Vec<f16>> {
        (0..positions.div_ceil(BLOCK_TOKENS))
            .map(|_| vec![f16::ZERO; LAYOUT.block_len()])
            .collect()
    }

    #[test]
    fn values_written_read_back_from_their_block_and_panel() {
        let mut blocks = blocks_for(BLOCK_TOKENS + 1);
        assert_eq!(blocks.len(), 2);
        let width = LAYOUT.kv_heads * LAYOUT.head_dim;
        for pos in 0..=BLOCK_TOKENS {
            let k: Vec<f32> = (0..width).map(|i| value(pos * 100 + i)).collect();
            let v: Vec<f32> = (0..width).map(|i| value(pos * 100 + i + 50)).collect();
            write(LAYOUT, &mut blocks[pos / BLOCK_TOKENS], 1, pos, &k, &v);
        }
        for pos in 0..=BLOCK_TOKENS {
            let values = panel(LAYOUT, &blocks[pos / BLOCK_TOKENS], 1, true, 1, BLOCK_TOKENS);
            for d in 0..LAYOUT.head_dim {
                let want = value(pos * 100 + LAYOUT.head_dim + d + 50);
                let got = values[(pos % BLOCK_TOKENS) * LAYOUT.head_dim + d].to_f32();
                assert!((got - want).abs() < 1e-3, "pos {pos} dim {d}");
            }
        }
        assert_eq!(LAYOUT.bytes_per_token(), 2 * 2 * 2 * 8 * 2);
    }

    #[test]
    fn rope_matches_candles_interleaved_rope() {
        use candle_core::{Device, Tensor};
        let (heads, hd, max) = (3, 8, crate::batched::MAX_POSITIONS);
        let cos: Vec<f32> = (0..max * hd / 2).map(|i| value(i).cos()).collect();
        let sin: Vec<f32> = (0..max * hd / 2).map(|i| value(i).sin()).collect();
        let positions = [0usize, 7, 4095, 2];
        let mut x: Vec<f32> = (0..positions.len() * heads * hd).map(|i| value(i + 11)).collect();
        let dev = Device::Cpu;
        // Candle wants [batch, heads, tokens, head_dim] and per-token tables.
        let table = |t: &[f32]| -> Vec<f32> {
            positions
                .iter()
                .flat_map(|&p| t[p * hd / 2..(p + 1) * hd / 2].to_vec())
                .collect()
        };
        let xt = Tensor::from_vec(x.clone(), (1, positions.len(), heads, hd), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let c = Tensor::from_vec(table(&cos), (positions.len(), hd / 2), &dev).unwrap();
        let s = Tensor::from_vec(table(&sin), (positions.len(), hd / 2), &dev).unwrap();
        let want: Vec<f32> = candle_nn::rotary_emb::rope_i(&xt, &c, &s)
            .and_then(|t| t.transpose(1, 2)?.flatten_all()?.to_vec1())
            .unwrap();
        rope(&mut x, heads, hd, &positions, &cos, &sin);
        for (i, (a, b)) in x.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-6, "value {i}: {a} vs {b}");
        }
    }

    /// Attention of a chunk against a direct softmax(q·k) v over the same (f16-rounded) values.
    #[test]
    fn attention_is_causal_and_matches_a_direct_computation() {
        let (heads, hd, n, past) = (4, LAYOUT.head_dim, 3, 5);
        let kvw = LAYOUT.kv_heads * hd;
        let mut blocks = blocks_for(past + n);
        let round = |x: f32| f16::from_f32(x).to_f32();
        let keys: Vec<Vec<f32>> = (0..past + n)
            .map(|p| (0..kvw).map(|i| value(p * 31 + i)).collect())
            .collect();
        let vals: Vec<Vec<f32>> = (0..past + n)
            .map(|p| (0..kvw).map(|i| value(p * 37 + i + 7)).collect())
            .collect();
        for p in 0..past + n {
            write(LAYOUT, &mut blocks[p / BLOCK_TOKENS], 0, p, &keys[p], &vals[p]);
        }
        let q: Vec<f32> = (0..n * heads * hd).map(|i| value(i + 3)).collect();
        let job = AttendJob {
            blocks: blocks.iter().map(|b| b.as_slice()).collect(),
            past,
            n,
            offset: 0,
        };
        let y = attend(LAYOUT, heads, 0, &[job], &q);
        let group = heads / LAYOUT.kv_heads;
        for i in 0..n {
            for h in 0..heads {
                let kh = h / group;
                let qr = &q[(i * heads + h) * hd..(i * heads + h + 1) * hd];
                let seen = past + i + 1;
                let s: Vec<f32> = (0..seen)
                    .map(|p| (0..hd).map(|d| qr[d] * round(keys[p][kh * hd + d])).sum::<f32>() / (hd as f32).sqrt())
                    .collect();
                let max = s.iter().copied().fold(f32::MIN, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - max).exp()).collect();
                let total: f32 = e.iter().sum();
                for d in 0..hd {
                    let want: f32 = (0..seen).map(|p| e[p] / total * round(vals[p][kh * hd + d])).sum();
                    let got = y[(i * heads + h) * hd + d];
                    assert!((got - want).abs() < 1e-5, "token {i} head {h} dim {d}: {got} vs {want}");
                }
            }
        }
    }
}
