//! Four-bit weights (Q4_1, Q4_0) repacked in panels of eight output rows, so that one 256-bit vector holds
//! four weights of each of eight rows and one integer instruction advances eight outputs at once.
//!
//! A row-at-a-time kernel spends most of its instructions on what every output repeats: the nibble
//! unpacking, a scale broadcast per block and row, a horizontal sum. Here:
//! - **Layout.** A [`PanelBlock`] holds, for eight rows and one block of 32 inputs, the eight scales and
//!   minimums (f16, as in the file) and the nibbles as four vectors `v_t` (t = 0..3): lane `i` of `v_t`
//!   is bytes `4t..4t+4` of row `i`'s 16 nibble bytes. So the low nibbles of `v_t` are inputs
//!   `4t..4t+4` of every row, and the high nibbles inputs `16+4t..16+4t+4` (GGUF's order).
//! - **Integer step.** Against one activation row, the four bytes of inputs `4k..4k+4` are broadcast to
//!   every lane, and the path's step (`vpdpbusd`, or `maddubs` then `madd`) adds each lane's four
//!   products to that lane's i32 sum. Eight steps give eight rows' exact dot products over the block
//!   (at most 32 · 15 · 127, and a pair of products at most 2 · 15 · 127: no saturation).
//! - **Scales.** Then, per block, for eight outputs at once: `acc = fma(sum, d_w · d_x, acc)` and
//!   `acc = fma(m_w, s_x, acc)`. The portable path does the same operations in the same order per output,
//!   so every path, portable included, gives the same bits.
//! - **Batches.** Activation rows go four at a time (each weight vector unpacked once for four), then one
//!   at a time, with the same operations per row: a row's bits do not depend on its place in a batch.
//! - **Size.** Rows are padded to a multiple of eight with zero weights, whose outputs are dropped.
//!   Q4_1 keeps the file's 20 bytes per block; Q4_0 keeps an unused minimum slot (20 bytes, not 18).

use std::marker::PhantomData;

use half::f16;
use rayon::prelude::*;

use crate::isa::Isa;
use crate::{BLOCK, BlockQ8, Q4, quantize_block, tiled};

/// Output rows per panel: the f32 lanes of a 256-bit vector.
pub const PANEL: usize = 8;

/// One block of 32 inputs for the eight rows of a panel.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct PanelBlock {
    /// Scales.
    d: [f16; PANEL],
    /// Minimums (zero for Q4_0, whose minimum is `-8 d`).
    m: [f16; PANEL],
    /// Lane `i` of vector `t` is bytes `4t..4t+4` of row `i`'s nibbles.
    qs: [[u8; 32]; 4],
}

impl PanelBlock {
    const ZERO: PanelBlock = PanelBlock {
        d: [f16::ZERO; PANEL],
        m: [f16::ZERO; PANEL],
        qs: [[0; 32]; 4],
    };

    /// Row `i`'s 16 nibble bytes, in the file's order.
    fn nibbles(&self, i: usize) -> [u8; 16] {
        std::array::from_fn(|j| self.qs[j / 4][4 * i + j % 4])
    }

    /// Row `i`'s scale and minimum.
    fn dm(&self, i: usize, stores_min: bool) -> (f32, f32) {
        let d = self.d[i].to_f32();
        (d, if stores_min { self.m[i].to_f32() } else { -8.0 * d })
    }
}

/// Four-bit weights, `rows` outputs by `cols` inputs, in panels of [`PANEL`] rows.
#[derive(Debug, Clone)]
pub struct Q4Matrix<B> {
    rows: usize,
    cols: usize,
    /// Panel `p`'s block `b` is at `p * cols / BLOCK + b`.
    panels: Vec<PanelBlock>,
    format: PhantomData<B>,
}

/// The kernels of one path: a panel against four activation rows, and against one.
type FourFn = fn(&[PanelBlock], bool, [&[BlockQ8]; 4]) -> [[f32; PANEL]; 4];
type OneFn = fn(&[PanelBlock], bool, &[BlockQ8]) -> [f32; PANEL];

impl<B: Q4> Q4Matrix<B> {
    /// Reads `rows x cols` weights from GGUF bytes of this block format (row-major blocks) and repacks
    /// them.
    pub fn from_gguf_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Result<Q4Matrix<B>, String> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(format!("{cols} columns is not a multiple of {BLOCK}"));
        }
        let per_row = cols / BLOCK;
        let expected = rows * per_row * B::GGUF_BYTES;
        if bytes.len() != expected {
            return Err(format!(
                "{} bytes for a {rows}x{cols} {} matrix, expected {expected}",
                bytes.len(),
                B::NAME
            ));
        }
        let block = |r: usize, b: usize| B::from_gguf(&bytes[(r * per_row + b) * B::GGUF_BYTES..][..B::GGUF_BYTES]);
        let mut panels = vec![PanelBlock::ZERO; rows.div_ceil(PANEL) * per_row];
        for (r, b) in (0..rows).flat_map(|r| (0..per_row).map(move |b| (r, b))) {
            let (w, i) = (block(r, b), r % PANEL);
            let pb = &mut panels[r / PANEL * per_row + b];
            let (d, m) = w.dm();
            pb.d[i] = f16::from_f32(d);
            if B::STORES_MIN {
                pb.m[i] = f16::from_f32(m);
            }
            for (j, &q) in w.nibbles().iter().enumerate() {
                pb.qs[j / 4][4 * i + j % 4] = q;
            }
        }
        Ok(Q4Matrix {
            rows,
            cols,
            panels,
            format: PhantomData,
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes the weights take (what a pass over the matrix reads), padding included.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.panels.as_slice())
    }

    fn panel(&self, p: usize) -> &[PanelBlock] {
        let per_row = self.cols / BLOCK;
        &self.panels[p * per_row..(p + 1) * per_row]
    }

    /// Row `r`'s weights as f32 (an embedding lookup).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let i = r % PANEL;
        self.panel(r / PANEL)
            .iter()
            .flat_map(|pb| {
                let (d, m) = pb.dm(i, B::STORES_MIN);
                let qs = pb.nibbles(i);
                (0..BLOCK).map(move |j| {
                    let q = if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 };
                    d * f32::from(q) + m
                })
            })
            .collect()
    }

    /// The weights as f32, row-major (for tests and references).
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.rows).flat_map(|r| self.dequantize_row(r)).collect()
    }

    /// `x` is `m x cols`, row-major; returns `m x rows`, row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_isa(Isa::active(), x, m)
    }

    /// As [`Q4Matrix::matmul`] on a given path (which this CPU must run), for tests and benchmarks.
    pub fn matmul_isa(&self, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "x must be m x cols");
        self.matmul_quantized(isa, &quantize(x), m)
    }

    /// Several matrices of the same input width applied to the same `x` (a layer's query, key and value
    /// projections; gate and up): the activations are quantized once, and every matrix's tiles share one
    /// parallel region. Returns one `m x rows` result per matrix.
    pub fn matmul_group(mats: &[&Q4Matrix<B>], x: &[f32], m: usize) -> Vec<Vec<f32>> {
        let cols = mats.first().map_or(0, |w| w.cols);
        assert!(mats.iter().all(|w| w.cols == cols), "one input width");
        assert_eq!(x.len(), m * cols, "x must be m x cols");
        let (isa, xq) = (Isa::active(), quantize(x));
        mats.par_iter().map(|w| w.matmul_quantized(isa, &xq, m)).collect()
    }

    fn matmul_quantized(&self, isa: Isa, xq: &[BlockQ8], m: usize) -> Vec<f32> {
        let per_row = self.cols / BLOCK;
        let x_row = |r: usize| &xq[r * per_row..(r + 1) * per_row];
        let (four, one) = select(isa);
        let min = B::STORES_MIN;
        tiled(self.rows, m, |cols, out| {
            let width = cols.len();
            // Tiles start at multiples of the panel height, so a tile is whole panels (the last one maybe
            // cut short by the matrix's end).
            for p in cols.start / PANEL..cols.end.div_ceil(PANEL) {
                let (panel, j) = (self.panel(p), p * PANEL - cols.start);
                let lanes = PANEL.min(cols.end - p * PANEL);
                let fours = m / 4 * 4;
                for r in (0..fours).step_by(4) {
                    let v = four(panel, min, [x_row(r), x_row(r + 1), x_row(r + 2), x_row(r + 3)]);
                    for (k, v) in v.iter().enumerate() {
                        out[(r + k) * width + j..][..lanes].copy_from_slice(&v[..lanes]);
                    }
                }
                for r in fours..m {
                    out[r * width + j..][..lanes].copy_from_slice(&one(panel, min, x_row(r))[..lanes]);
                }
            }
        })
    }
}

/// Activation rows quantized block by block.
fn quantize(x: &[f32]) -> Vec<BlockQ8> {
    x.par_chunks_exact(BLOCK).with_min_len(64).map(quantize_block).collect()
}

/// The kernels of a path this CPU runs (panics otherwise).
fn select(isa: Isa) -> (FourFn, OneFn) {
    match isa.require() {
        Isa::Portable => (|p, min, x| x.map(|x| portable(p, min, x)), portable),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => (x86::avx2::four, x86::avx2::one),
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => (x86::avx_vnni::four, x86::avx_vnni::one),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => (x86::avx512_vnni::four, x86::avx512_vnni::one),
        #[cfg(not(target_arch = "x86_64"))]
        _ => (|p, min, x| x.map(|x| portable(p, min, x)), portable),
    }
}

/// A panel against one activation row, one output at a time, in the SIMD paths' order of operations.
fn portable(panel: &[PanelBlock], stores_min: bool, x: &[BlockQ8]) -> [f32; PANEL] {
    std::array::from_fn(|i| {
        panel.iter().zip(x).fold(0.0f32, |acc, (pb, xb)| {
            let qs = pb.nibbles(i);
            let sum: i32 = (0..16)
                .map(|j| {
                    i32::from(qs[j] & 0x0F) * i32::from(xb.qs[j]) + i32::from(qs[j] >> 4) * i32::from(xb.qs[j + 16])
                })
                .sum();
            let (d, m) = pb.dm(i, stores_min);
            let acc = (sum as f32).mul_add(d * xb.d, acc);
            m.mul_add(xb.s, acc)
        })
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// One module per path: the same body, compiled for the path's features, with its accumulating
    /// integer step `$dp(acc, unsigned, signed)`.
    macro_rules! panel_path {
        ($path:ident, $features:literal, $dp:path) => {
            pub mod $path {
                use std::arch::x86_64::*;

                use super::super::{PANEL, PanelBlock};
                use crate::BlockQ8;

                /// Safe entry: `select` hands this out only after checking the CPU.
                pub fn four(panel: &[PanelBlock], min: bool, x: [&[BlockQ8]; 4]) -> [[f32; PANEL]; 4] {
                    let n = x.iter().fold(panel.len(), |n, r| n.min(r.len()));
                    // SAFETY: `select` returned this function only after `Isa::require` confirmed the
                    // path's features on this CPU; every row is cut to the same length.
                    unsafe { rows(&panel[..n], min, x.map(|r| &r[..n])) }
                }

                /// Safe entry: as [`four`], for one row.
                pub fn one(panel: &[PanelBlock], min: bool, x: &[BlockQ8]) -> [f32; PANEL] {
                    let n = panel.len().min(x.len());
                    // SAFETY: as in `four`.
                    let [out] = unsafe { rows(&panel[..n], min, [&x[..n]]) };
                    out
                }

                /// The four bytes of inputs `4k..4k + 4` of an activation block, in every lane.
                #[target_feature(enable = $features)]
                #[inline]
                fn group(xb: &BlockQ8, k: usize) -> __m256i {
                    let bytes = [xb.qs[4 * k], xb.qs[4 * k + 1], xb.qs[4 * k + 2], xb.qs[4 * k + 3]];
                    _mm256_set1_epi32(i32::from_le_bytes(bytes.map(|b| b as u8)))
                }

                /// A panel against `R` activation rows of the panel's length.
                ///
                /// # Safety
                /// The CPU has the path's features.
                #[target_feature(enable = $features)]
                unsafe fn rows<const R: usize>(
                    panel: &[PanelBlock],
                    min: bool,
                    x: [&[BlockQ8]; R],
                ) -> [[f32; PANEL]; R] {
                    let mask = _mm256_set1_epi8(0x0F);
                    let mut acc = [_mm256_setzero_ps(); R];
                    for (b, pb) in panel.iter().enumerate() {
                        let mut sums = [_mm256_setzero_si256(); R];
                        for t in 0..4 {
                            // SAFETY: each vector is 32 bytes and `loadu` has no alignment requirement.
                            let v = unsafe { _mm256_loadu_si256(pb.qs[t].as_ptr().cast()) };
                            let low = _mm256_and_si256(v, mask);
                            let high = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                            for r in 0..R {
                                sums[r] = $dp(sums[r], low, group(&x[r][b], t));
                                sums[r] = $dp(sums[r], high, group(&x[r][b], t + 4));
                            }
                        }
                        // SAFETY: eight f16 values are 16 bytes; `loadu` has no alignment requirement.
                        let d = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(pb.d.as_ptr().cast()) });
                        let m = if min {
                            // SAFETY: as for the scales.
                            _mm256_cvtph_ps(unsafe { _mm_loadu_si128(pb.m.as_ptr().cast()) })
                        } else {
                            _mm256_mul_ps(d, _mm256_set1_ps(-8.0))
                        };
                        for r in 0..R {
                            let xb = &x[r][b];
                            let scale = _mm256_mul_ps(d, _mm256_set1_ps(xb.d));
                            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), scale, acc[r]);
                            acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(xb.s), acc[r]);
                        }
                    }
                    acc.map(|a| {
                        let mut out = [0.0f32; PANEL];
                        // SAFETY: `out` is eight f32; `storeu` has no alignment requirement.
                        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), a) };
                        out
                    })
                }
            }
        };
    }

    panel_path!(avx2, "avx2,fma,f16c", crate::isa::x86::dp_avx2);
    panel_path!(avx_vnni, "avx2,fma,f16c,avxvnni", crate::isa::x86::dp_avx_vnni);
    panel_path!(
        avx512_vnni,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        crate::isa::x86::dp_avx512_vnni
    );
}
