//! Quantized matmul for steps with many tokens: `out[m, n] = x[m, k] · W[n, k]ᵀ` where `W` is a GGUF
//! Q4_1 matrix (blocks of 32 weights: a scale, a minimum and 4-bit values) and `x` is quantized per row
//! to 8 bits in blocks of 32 (llama.cpp's Q8_1 scheme: a scale and the scaled sum).
//!
//! Why our own: Candle 0.11 has no SIMD dot product for Q4_1, so its cost grows with every row of a
//! batch; here each block is one AVX2 multiply-add chain, and each weight tile is read once for all rows.
//!
//! - [`Q41Matrix::from_gguf_bytes`] reads the GGUF block layout once (scales widened to f32).
//! - [`Q41Matrix::matmul`] quantizes `x`, then splits the output columns over the rayon pool.
//! - The dot product uses AVX2+FMA when the CPU has them (`is_x86_feature_detected!`), else portable code;
//!   tests check both against a dequantize-then-multiply reference.

mod dot;

use rayon::prelude::*;

/// Weights per block, in Q4_1 and in the activation blocks.
pub const BLOCK: usize = 32;
/// Bytes of one GGUF Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles.
pub const Q4_1_BYTES: usize = 20;
/// Output columns per work item: each item's weight rows stay in cache across all activation rows.
const COLUMN_TILE: usize = 16;

/// One Q4_1 block with its scale and minimum widened to f32. Weight `j < 16` is the low nibble of
/// `qs[j]`, weight `j + 16` its high nibble; each is `d * q + m`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ41 {
    /// Scale.
    pub d: f32,
    /// Minimum.
    pub m: f32,
    /// 32 four-bit values.
    pub qs: [u8; 16],
}

/// One block of 32 activations quantized to i8: `x ≈ d * q`; `s = d * Σq`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8 {
    /// Scale.
    pub d: f32,
    /// Scale times the sum of `qs` (the minimum's share of the dot product).
    pub s: f32,
    /// 32 quantized values.
    pub qs: [i8; 32],
}

/// A Q4_1 weight matrix, `rows` outputs by `cols` inputs.
#[derive(Debug, Clone)]
pub struct Q41Matrix {
    /// Output features.
    rows: usize,
    /// Input features, a multiple of [`BLOCK`].
    cols: usize,
    /// Row-major blocks, `cols / BLOCK` per row.
    blocks: Vec<BlockQ41>,
}

impl Q41Matrix {
    /// Reads `rows x cols` weights from GGUF Q4_1 bytes (row-major blocks of [`Q4_1_BYTES`]).
    pub fn from_gguf_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Result<Q41Matrix, String> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(format!("{cols} columns is not a multiple of {BLOCK}"));
        }
        let expected = rows * cols / BLOCK * Q4_1_BYTES;
        if bytes.len() != expected {
            return Err(format!(
                "{} bytes for a {rows}x{cols} Q4_1 matrix, expected {expected}",
                bytes.len()
            ));
        }
        let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let blocks = bytes
            .chunks_exact(Q4_1_BYTES)
            .map(|b| BlockQ41 {
                d: f16(&b[0..2]),
                m: f16(&b[2..4]),
                qs: b[4..20].try_into().expect("16 bytes"),
            })
            .collect();
        Ok(Q41Matrix { rows, cols, blocks })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The blocks of output row `r`.
    pub fn row_blocks(&self, r: usize) -> &[BlockQ41] {
        let per_row = self.cols / BLOCK;
        &self.blocks[r * per_row..(r + 1) * per_row]
    }

    /// The weights as f32, row-major (for tests and references).
    pub fn dequantize(&self) -> Vec<f32> {
        self.blocks
            .iter()
            .flat_map(|b| {
                let lo = b.qs.map(|q| b.d * f32::from(q & 0x0F) + b.m);
                let hi = b.qs.map(|q| b.d * f32::from(q >> 4) + b.m);
                lo.into_iter().chain(hi)
            })
            .collect()
    }

    /// `x` is `m x cols`, row-major; returns `m x rows`, row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "x must be m x cols");
        let per_row = self.cols / BLOCK;
        let xq: Vec<BlockQ8> = x.chunks_exact(BLOCK).map(quantize_block).collect();
        let (dot, dot4) = (dot::select(), dot::select4());
        let x_row = |r: usize| &xq[r * per_row..(r + 1) * per_row];
        let tiles: Vec<Vec<f32>> = (0..self.rows.div_ceil(COLUMN_TILE))
            .into_par_iter()
            .map(|tile| {
                let cols = tile * COLUMN_TILE..self.rows.min((tile + 1) * COLUMN_TILE);
                let width = cols.len();
                let mut out = vec![0.0; m * width];
                // Four activation rows at a time share each unpacked weight block; the rest one by one.
                let fours = m / 4 * 4;
                for r in (0..fours).step_by(4) {
                    let xs = [x_row(r), x_row(r + 1), x_row(r + 2), x_row(r + 3)];
                    for (j, c) in cols.clone().enumerate() {
                        let v = dot4(self.row_blocks(c), xs);
                        for (k, v) in v.into_iter().enumerate() {
                            out[(r + k) * width + j] = v;
                        }
                    }
                }
                for r in fours..m {
                    for (j, c) in cols.clone().enumerate() {
                        out[r * width + j] = dot(self.row_blocks(c), x_row(r));
                    }
                }
                out
            })
            .collect();
        let mut out = vec![0.0; m * self.rows];
        for (tile, values) in tiles.iter().enumerate() {
            let start = tile * COLUMN_TILE;
            let width = values.len() / m.max(1);
            for r in 0..m {
                out[r * self.rows + start..r * self.rows + start + width]
                    .copy_from_slice(&values[r * width..(r + 1) * width]);
            }
        }
        out
    }
}

/// Quantizes 32 activations: the scale maps the largest magnitude to 127.
pub fn quantize_block(x: &[f32]) -> BlockQ8 {
    let amax = x.iter().fold(0.0_f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; 32];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * inv).round() as i8;
        sum += i32::from(*q);
    }
    BlockQ8 {
        d,
        s: d * sum as f32,
        qs,
    }
}

/// Whether the AVX2 kernel is in use on this CPU.
pub fn uses_avx2() -> bool {
    dot::avx2_available()
}

/// The portable dot product, exposed so tests can compare it with the SIMD one.
pub fn dot_portable(w: &[BlockQ41], x: &[BlockQ8]) -> f32 {
    dot::portable(w, x)
}

/// The dot product this CPU uses.
pub fn dot_fast(w: &[BlockQ41], x: &[BlockQ8]) -> f32 {
    dot::select()(w, x)
}

/// The four-row dot product this CPU uses.
pub fn dot4_fast(w: &[BlockQ41], x: [&[BlockQ8]; 4]) -> [f32; 4] {
    dot::select4()(w, x)
}
