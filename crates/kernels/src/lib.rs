//! Quantized matmul for the CPU hot path: `out[m, n] = x[m, k] · W[n, k]ᵀ` where `W` is a GGUF matrix in
//! Q4_1, Q4_0 or Q8_0 (blocks of 32 weights with a scale, and for Q4_1 a minimum) and `x` is quantized
//! per row to 8 bits in blocks of 32 (llama.cpp's Q8_1 scheme: a scale and the scaled sum).
//!
//! Why our own: Candle 0.11 has no SIMD dot product for Q4_1, and its quantized matmul reads the whole
//! weight matrix once per activation row. Here each weight tile is read once for all rows, and each
//! weight block once for four rows.
//!
//! - Q4_1 and Q4_0 ([`Q4Matrix`]) are repacked at load in panels of eight output rows, so that one
//!   integer instruction advances eight outputs (see the `panel` module); every path gives the same bits.
//! - Q8_0 ([`QMatrix`]) keeps the GGUF block layout, f16 scales included, and each weight block is read
//!   once for four activation rows.
//! - Every matmul quantizes `x`, then splits the output columns over the rayon pool.
//! - The dot products take the widest path this CPU runs ([`Isa`]: AVX-512 VNNI, AVX-VNNI, AVX2, or
//!   portable), chosen at run time; tests compare every path the host runs with the portable one and
//!   with a dequantize-then-multiply reference.
//! - [`HalfOps`] are f32 · f16 dot products and weighted sums, for attention over the f16 KV cache.
//! - [`ChannelQ8Matrix`] is a second format for models that arrive in f32 (the filter's sentence
//!   encoder): int8 weights with a scale per row against 7-bit activations, four vector operations per
//!   block and row instead of six (see its module).

mod blocks;
mod channel;
mod dot_q8;
mod half_vec;
mod isa;
mod panel;
pub mod roofline;

use rayon::prelude::*;

pub use blocks::{
    BLOCK, BlockQ8, BlockQ40, BlockQ41, BlockQ80, Q4, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES, WeightBlock, quantize_block,
};
pub use channel::ChannelQ8Matrix;
pub use dot_q8::{Dot4Fn, DotFn};
pub use half_vec::HalfOps;
pub use isa::{Isa, KERNELS_ENV};
pub use panel::{PANEL, PanelBlock, Q4Matrix};

/// Output columns per work item: each item's weight rows stay in cache across all activation rows. A
/// multiple of the Q4 panel height, so that a tile is whole panels.
const COLUMN_TILE: usize = 16;

/// A block format with dot-product kernels.
pub trait Kernel: WeightBlock {
    /// The one-row and four-row dot products of a path (which this CPU must run: it panics otherwise).
    fn kernels(isa: Isa) -> (DotFn<Self>, Dot4Fn<Self>);
}

impl Kernel for BlockQ80 {
    fn kernels(isa: Isa) -> (DotFn<Self>, Dot4Fn<Self>) {
        (dot_q8::select(isa), dot_q8::select4(isa))
    }
}

/// A quantized weight matrix in the file's row-major block layout, `rows` outputs by `cols` inputs (Q8_0).
#[derive(Debug, Clone)]
pub struct QMatrix<B> {
    /// Output features.
    rows: usize,
    /// Input features, a multiple of [`BLOCK`].
    cols: usize,
    /// Row-major blocks, `cols / BLOCK` per row.
    blocks: Vec<B>,
}

/// Q4_1 weights, in panels.
pub type Q41Matrix = Q4Matrix<BlockQ41>;
/// Q4_0 weights, in panels.
pub type Q40Matrix = Q4Matrix<BlockQ40>;
/// Q8_0 weights.
pub type Q80Matrix = QMatrix<BlockQ80>;

impl<B: Kernel> QMatrix<B> {
    /// Reads `rows x cols` weights from GGUF bytes of this block format (row-major blocks).
    pub fn from_gguf_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Result<QMatrix<B>, String> {
        let (name, block_bytes) = (B::NAME, B::GGUF_BYTES);
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
        let blocks = bytes.chunks_exact(block_bytes).map(B::from_gguf).collect();
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

    /// Bytes the weights take (what a pass over the matrix reads).
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.blocks.as_slice())
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
        self.matmul_isa(Isa::active(), x, m)
    }

    /// As [`QMatrix::matmul`] on a given path (which this CPU must run), for tests and benchmarks.
    pub fn matmul_isa(&self, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "x must be m x cols");
        let per_row = self.cols / BLOCK;
        let xq: Vec<BlockQ8> = x.par_chunks_exact(BLOCK).with_min_len(64).map(quantize_block).collect();
        let (dot, dot4) = B::kernels(isa);
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
pub(crate) fn tiled(n: usize, m: usize, fill: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync) -> Vec<f32> {
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

/// The one-row dot product of a path (which this CPU must run), for tests.
pub fn dot_with<B: Kernel>(isa: Isa, w: &[B], x: &[BlockQ8]) -> f32 {
    B::kernels(isa).0(w, x)
}

/// The four-row dot product of a path (which this CPU must run), for tests.
pub fn dot4_with<B: Kernel>(isa: Isa, w: &[B], x: [&[BlockQ8]; 4]) -> [f32; 4] {
    B::kernels(isa).1(w, x)
}

const _: () = assert!(COLUMN_TILE.is_multiple_of(PANEL), "a tile is whole panels");
