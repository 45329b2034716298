//! Quantized matmul for the CPU hot path: `out[m, n] = x[m, k] · W[n, k]ᵀ` where `W` is a GGUF matrix in
//! Q4_1, Q4_0 or Q8_0 (blocks of 32 weights with a scale, and for Q4_1 a minimum) and `x` is quantized
//! per row to 8 bits in blocks of 32 (llama.cpp's Q8_1 scheme: a scale and the scaled sum).
//!
//! Why our own: Candle 0.11 has no SIMD dot product for Q4_1, and its quantized matmul reads the whole
//! weight matrix once per activation row. Here each weight tile is read once for all rows, and each
//! weight block once for four rows.
//!
//! - [`QMatrix::from_gguf_bytes`] reads the GGUF block layout once (scales widened to f32). Q4_0 is read
//!   as Q4_1 ([`BlockQ41::from_gguf_q4_0`]), so it shares that kernel.
//! - [`QMatrix::matmul`] quantizes `x`, then splits the output columns over the rayon pool.
//! - The dot products use AVX2+FMA when the CPU has them (`is_x86_feature_detected!`), else portable
//!   code; tests check both against a dequantize-then-multiply reference.
//! - [`ChannelQ8Matrix`] is a second format for models that arrive in f32 (the filter's sentence
//!   encoder): int8 weights with a scale per row against 7-bit activations, four vector operations per
//!   block and row instead of six (see its module).

mod blocks;
mod channel;
mod dot;
mod dot_q8;

use rayon::prelude::*;

pub use blocks::{BLOCK, BlockQ8, BlockQ41, BlockQ80, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES, WeightBlock, quantize_block};
pub use channel::ChannelQ8Matrix;
pub use dot::{Dot4Fn, DotFn};

/// Output columns per work item: each item's weight rows stay in cache across all activation rows.
const COLUMN_TILE: usize = 16;

/// A block format with dot-product kernels.
pub trait Kernel: WeightBlock {
    /// The one-row and four-row dot products this CPU runs best.
    fn kernels() -> (DotFn<Self>, Dot4Fn<Self>);
    /// The portable one-row dot product (for tests).
    fn portable() -> DotFn<Self>;
}

impl Kernel for BlockQ41 {
    fn kernels() -> (DotFn<Self>, Dot4Fn<Self>) {
        (dot::select(), dot::select4())
    }
    fn portable() -> DotFn<Self> {
        dot::portable
    }
}

impl Kernel for BlockQ80 {
    fn kernels() -> (DotFn<Self>, Dot4Fn<Self>) {
        (dot_q8::select(), dot_q8::select4())
    }
    fn portable() -> DotFn<Self> {
        dot_q8::portable
    }
}

/// A quantized weight matrix, `rows` outputs by `cols` inputs.
#[derive(Debug, Clone)]
pub struct QMatrix<B> {
    /// Output features.
    rows: usize,
    /// Input features, a multiple of [`BLOCK`].
    cols: usize,
    /// Row-major blocks, `cols / BLOCK` per row.
    blocks: Vec<B>,
}

/// Q4_1 weights (and Q4_0, read as Q4_1).
pub type Q41Matrix = QMatrix<BlockQ41>;
/// Q8_0 weights.
pub type Q80Matrix = QMatrix<BlockQ80>;

impl<B: Kernel> QMatrix<B> {
    /// Reads `rows x cols` weights from GGUF bytes of this block format (row-major blocks).
    pub fn from_gguf_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Result<QMatrix<B>, String> {
        QMatrix::read(rows, cols, bytes, B::NAME, B::GGUF_BYTES, B::from_gguf)
    }

    fn read(
        rows: usize,
        cols: usize,
        bytes: &[u8],
        name: &str,
        block_bytes: usize,
        block: fn(&[u8]) -> B,
    ) -> Result<QMatrix<B>, String> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(format!("{cols} columns is not a multiple of {BLOCK}"));
        }
        let expected = rows * cols / BLOCK * block_bytes;
        if bytes.len() != expected {
            return Err(format!(
                "{} bytes for a {rows}x{cols} {name} matrix, expected {expected}",
                bytes.len()
            ));
        }
        let blocks = bytes.chunks_exact(block_bytes).map(block).collect();
        Ok(QMatrix { rows, cols, blocks })
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
    pub fn row_blocks(&self, r: usize) -> &[B] {
        let per_row = self.cols / BLOCK;
        &self.blocks[r * per_row..(r + 1) * per_row]
    }

    /// Row `r`'s weights as f32 (an embedding lookup).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        self.row_blocks(r).iter().flat_map(|b| b.values()).collect()
    }

    /// The weights as f32, row-major (for tests and references).
    pub fn dequantize(&self) -> Vec<f32> {
        self.blocks.iter().flat_map(|b| b.values()).collect()
    }

    /// `x` is `m x cols`, row-major; returns `m x rows`, row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "x must be m x cols");
        let per_row = self.cols / BLOCK;
        let xq: Vec<BlockQ8> = x.par_chunks_exact(BLOCK).with_min_len(64).map(quantize_block).collect();
        let (dot, dot4) = B::kernels();
        let x_row = |r: usize| &xq[r * per_row..(r + 1) * per_row];
        tiled(self.rows, m, |cols, out| {
            let width = cols.len();
            // Four activation rows at a time share each unpacked weight block; the rest one by one.
            let fours = m / 4 * 4;
            for r in (0..fours).step_by(4) {
                let xs = [x_row(r), x_row(r + 1), x_row(r + 2), x_row(r + 3)];
                for (j, c) in cols.clone().enumerate() {
                    for (k, v) in dot4(self.row_blocks(c), xs).into_iter().enumerate() {
                        out[(r + k) * width + j] = v;
                    }
                }
            }
            for r in fours..m {
                for (j, c) in cols.clone().enumerate() {
                    out[r * width + j] = dot(self.row_blocks(c), x_row(r));
                }
            }
        })
    }
}

/// The parallel frame of every matmul here: the `n` output columns in tiles of [`COLUMN_TILE`] spread over
/// rayon. `fill(columns, out)` writes one tile, `out` being `m x columns.len()`, row-major. Returns
/// `m x n`, row-major.
fn tiled(n: usize, m: usize, fill: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync) -> Vec<f32> {
    let tiles: Vec<Vec<f32>> = (0..n.div_ceil(COLUMN_TILE))
        .into_par_iter()
        .map(|tile| {
            let cols = tile * COLUMN_TILE..n.min((tile + 1) * COLUMN_TILE);
            let mut out = vec![0.0; m * cols.len()];
            fill(cols, &mut out);
            out
        })
        .collect();
    let mut out = vec![0.0; m * n];
    for (tile, values) in tiles.iter().enumerate() {
        let start = tile * COLUMN_TILE;
        let width = values.len() / m.max(1);
        for r in 0..m {
            out[r * n + start..r * n + start + width].copy_from_slice(&values[r * width..(r + 1) * width]);
        }
    }
    out
}

impl Q41Matrix {
    /// Reads `rows x cols` weights from GGUF Q4_0 bytes, as Q4_1 with `m = -8 d` (the same values).
    pub fn from_gguf_q4_0(rows: usize, cols: usize, bytes: &[u8]) -> Result<Q41Matrix, String> {
        QMatrix::read(rows, cols, bytes, "Q4_0", Q4_0_BYTES, BlockQ41::from_gguf_q4_0)
    }
}

/// Whether the AVX2 kernels are in use on this CPU.
pub fn uses_avx2() -> bool {
    dot::avx2_available()
}

/// The portable dot product, exposed so tests can compare it with the SIMD one.
pub fn dot_portable<B: Kernel>(w: &[B], x: &[BlockQ8]) -> f32 {
    B::portable()(w, x)
}

/// The dot product this CPU uses.
pub fn dot_fast<B: Kernel>(w: &[B], x: &[BlockQ8]) -> f32 {
    B::kernels().0(w, x)
}

/// The four-row dot product this CPU uses.
pub fn dot4_fast<B: Kernel>(w: &[B], x: [&[BlockQ8]; 4]) -> [f32; 4] {
    B::kernels().1(w, x)
}
