//! Quantized matmul for the CPU hot path: `out[m, n] = x[m, k] · W[n, k]ᵀ` where `W` is a GGUF matrix in
//! Q4_1, Q4_0 or Q8_0 (blocks of 32 weights with a scale, and for Q4_1 a minimum) and `x` is quantized
//! per row to 8 bits in blocks of 32 (llama.cpp's Q8_1 scheme: a scale and the scaled sum).
//!
//! Why our own: Candle 0.11 has no SIMD dot product for Q4_1, and its quantized matmul reads the whole
//! weight matrix once per activation row. Here each weight tile is read once for all rows, and each
//! weight panel once for four rows.
//!
//! - Q4_1, Q4_0 and Q8_0 ([`PanelMatrix`]) are repacked at load in panels of eight output rows, so that
//!   one integer instruction advances eight outputs (see the `panel` module); every path gives the same
//!   bits, and the bytes per block stay the file's.
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
mod half_vec;
mod isa;
mod panel;
pub mod roofline;

use rayon::prelude::*;

pub use blocks::{
    BLOCK, BlockQ8, BlockQ40, BlockQ41, BlockQ80, Q4, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES, WeightBlock, quantize_block,
};
pub use channel::ChannelQ8Matrix;
pub use half_vec::HalfOps;
pub use isa::{Isa, KERNELS_ENV};
pub use panel::{PANEL, Panel, PanelMatrix, PanelQ4, PanelQ8, Q4Matrix};

/// Output columns per work item: each item's weight rows stay in cache across all activation rows. A
/// multiple of the Q4 panel height, so that a tile is whole panels.
const COLUMN_TILE: usize = 16;

/// Q4_1 weights, in panels.
pub type Q41Matrix = Q4Matrix<BlockQ41>;
/// Q4_0 weights, in panels.
pub type Q40Matrix = Q4Matrix<BlockQ40>;
/// Q8_0 weights, in panels.
pub type Q80Matrix = PanelMatrix<PanelQ8>;

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

const _: () = assert!(COLUMN_TILE.is_multiple_of(PANEL), "a tile is whole panels");
