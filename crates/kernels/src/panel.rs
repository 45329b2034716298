//! Quantized weights (Q4_1, Q4_0, Q8_0) repacked in panels of eight output rows, so that one 256-bit vector
//! holds four weights of each of eight rows and one integer instruction advances eight outputs at once.
//!
//! A row-at-a-time kernel spends most of its instructions on what every output repeats: the nibble
//! unpacking, a scale broadcast per block and row, a horizontal sum. Here:
//! - **Layout.** A [`PanelQ4`] holds, for eight rows and one block of 32 inputs, the eight scales and
//!   minimums (f16, as in the file) and the nibbles as four vectors `v_t` (t = 0..3): lane `i` of `v_t`
//!   is bytes `4t..4t+4` of row `i`'s 16 nibble bytes. So the low nibbles of `v_t` are inputs
//!   `4t..4t+4` of every row, and the high nibbles inputs `16+4t..16+4t+4` (GGUF's order). A
//!   [`PanelQ8`] holds eight scales and eight vectors of signed bytes, vector `k` holding inputs
//!   `4k..4k+4` of every row.
//! - **Integer step.** Against one activation row, the four bytes of inputs `4k..4k+4` are broadcast to
//!   every lane, and the path's step (`vpdpbusd`, or `maddubs` then `madd`) adds each lane's four
//!   products to that lane's i32 sum. Eight steps give eight rows' exact dot products over the block
//!   (at most 32 · 15 · 127, and a pair of products at most 2 · 15 · 127: no saturation). Q8_0's weights
//!   are signed: the VNNI paths offset them by 128 (a xor) and subtract the activation block's
//!   `128 · Σx` afterwards; AVX2 multiplies |w| by x with w's sign (`sign_epi8`), a pair of products then
//!   at most 2 · 128 · 127. Both give the exact integer sum.
//! - **Scales.** Then, per block, for eight outputs at once: `acc = fma(sum, d_w · d_x, acc)`, and for Q4
//!   `acc = fma(m_w, s_x, acc)`. The portable path does the same operations in the same order per output,
//!   so every path, portable included, gives the same bits.
//! - **Batches.** Activation rows go four at a time (each weight vector unpacked once for four), then one
//!   at a time, with the same operations per row: a row's bits do not depend on its place in a batch.
//! - **Size.** Rows are padded to a multiple of eight with zero weights, whose outputs are dropped.
//!   Q4_1 and Q8_0 keep the file's 20 and 34 bytes per block; Q4_0 keeps an unused minimum slot (20
//!   bytes, not 18).

use std::marker::PhantomData;

use half::f16;
use rayon::prelude::*;

use crate::isa::Isa;
use crate::{BLOCK, BlockQ8, BlockQ80, Q4, WeightBlock, quantize_block, tiled};

/// Output rows per panel: the f32 lanes of a 256-bit vector.
pub const PANEL: usize = 8;

/// A panel format: one block of 32 inputs for eight output rows, and its kernels.
pub trait Panel: Copy + Send + Sync + std::fmt::Debug + 'static {
    /// The file's block format, packed row by row.
    type Source: WeightBlock;
    /// A panel of zero weights (the padding).
    const ZERO: Self;
    /// Packs `block` as row `i`.
    fn pack(&mut self, i: usize, block: &Self::Source);
    /// Row `i`'s 32 weights.
    fn row_values(&self, i: usize) -> [f32; BLOCK];
    /// The panel rows against one activation row, one output at a time, in the SIMD paths' order.
    fn portable(panel: &[Self], x: &[BlockQ8]) -> [f32; PANEL];
    /// The kernels of a path (which this CPU must run).
    fn simd(isa: Isa) -> (FourFn<Self>, OneFn<Self>);
}

/// A panel against four activation rows, and against one.
type FourFn<P> = fn(&[P], [&[BlockQ8]; 4]) -> [[f32; PANEL]; 4];
type OneFn<P> = fn(&[P], &[BlockQ8]) -> [f32; PANEL];

/// Eight rows of a Q4_1 or Q4_0 block.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct PanelQ4<B> {
    /// Scales.
    d: [f16; PANEL],
    /// Minimums (zero for Q4_0, whose minimum is `-8 d`).
    m: [f16; PANEL],
    /// Lane `i` of vector `t` is bytes `4t..4t+4` of row `i`'s nibbles.
    qs: [[u8; 32]; 4],
    format: PhantomData<B>,
}

impl<B: Q4> PanelQ4<B> {
    /// Row `i`'s 16 nibble bytes, in the file's order.
    fn nibbles(&self, i: usize) -> [u8; 16] {
        std::array::from_fn(|j| self.qs[j / 4][4 * i + j % 4])
    }

    /// Row `i`'s scale and minimum.
    fn dm(&self, i: usize) -> (f32, f32) {
        let d = self.d[i].to_f32();
        (d, if B::STORES_MIN { self.m[i].to_f32() } else { -8.0 * d })
    }
}

impl<B: Q4 + std::fmt::Debug> Panel for PanelQ4<B> {
    type Source = B;
    const ZERO: Self = PanelQ4 {
        d: [f16::ZERO; PANEL],
        m: [f16::ZERO; PANEL],
        qs: [[0; 32]; 4],
        format: PhantomData,
    };

    fn pack(&mut self, i: usize, w: &B) {
        let (d, m) = w.dm();
        self.d[i] = f16::from_f32(d);
        if B::STORES_MIN {
            self.m[i] = f16::from_f32(m);
        }
        for (j, &q) in w.nibbles().iter().enumerate() {
            self.qs[j / 4][4 * i + j % 4] = q;
        }
    }

    fn row_values(&self, i: usize) -> [f32; BLOCK] {
        let (d, m) = self.dm(i);
        let qs = self.nibbles(i);
        std::array::from_fn(|j| {
            let q = if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 };
            d * f32::from(q) + m
        })
    }

    fn portable(panel: &[Self], x: &[BlockQ8]) -> [f32; PANEL] {
        std::array::from_fn(|i| {
            panel.iter().zip(x).fold(0.0f32, |acc, (pb, xb)| {
                let qs = pb.nibbles(i);
                let sum: i32 = (0..16)
                    .map(|j| {
                        i32::from(qs[j] & 0x0F) * i32::from(xb.qs[j]) + i32::from(qs[j] >> 4) * i32::from(xb.qs[j + 16])
                    })
                    .sum();
                let (d, m) = pb.dm(i);
                let acc = (sum as f32).mul_add(d * xb.d, acc);
                m.mul_add(xb.s, acc)
            })
        })
    }

    fn simd(isa: Isa) -> (FourFn<Self>, OneFn<Self>) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => (x86::avx2::q4_four, x86::avx2::q4_one),
            #[cfg(target_arch = "x86_64")]
            Isa::AvxVnni => (x86::avx_vnni::q4_four, x86::avx_vnni::q4_one),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => (x86::avx512_vnni::q4_four, x86::avx512_vnni::q4_one),
            _ => (|p, x| x.map(|x| Self::portable(p, x)), Self::portable),
        }
    }
}

/// Eight rows of a Q8_0 block.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct PanelQ8 {
    /// Scales.
    d: [f16; PANEL],
    /// Lane `i` of vector `k` is inputs `4k..4k+4` of row `i`.
    qs: [[i8; 32]; 8],
}

impl Panel for PanelQ8 {
    type Source = BlockQ80;
    const ZERO: Self = PanelQ8 {
        d: [f16::ZERO; PANEL],
        qs: [[0; 32]; 8],
    };

    fn pack(&mut self, i: usize, w: &BlockQ80) {
        self.d[i] = w.d;
        for (j, &q) in w.qs.iter().enumerate() {
            self.qs[j / 4][4 * i + j % 4] = q;
        }
    }

    fn row_values(&self, i: usize) -> [f32; BLOCK] {
        let d = self.d[i].to_f32();
        std::array::from_fn(|j| d * f32::from(self.qs[j / 4][4 * i + j % 4]))
    }

    fn portable(panel: &[Self], x: &[BlockQ8]) -> [f32; PANEL] {
        std::array::from_fn(|i| {
            panel.iter().zip(x).fold(0.0f32, |acc, (pb, xb)| {
                let sum: i32 = (0..BLOCK)
                    .map(|j| i32::from(pb.qs[j / 4][4 * i + j % 4]) * i32::from(xb.qs[j]))
                    .sum();
                (sum as f32).mul_add(pb.d[i].to_f32() * xb.d, acc)
            })
        })
    }

    fn simd(isa: Isa) -> (FourFn<Self>, OneFn<Self>) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => (x86::avx2::q8_four, x86::avx2::q8_one),
            #[cfg(target_arch = "x86_64")]
            Isa::AvxVnni => (x86::avx_vnni::q8_four, x86::avx_vnni::q8_one),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => (x86::avx512_vnni::q8_four, x86::avx512_vnni::q8_one),
            _ => (|p, x| x.map(|x| Self::portable(p, x)), Self::portable),
        }
    }
}

/// Weights, `rows` outputs by `cols` inputs, in panels of [`PANEL`] rows.
#[derive(Debug, Clone)]
pub struct PanelMatrix<P> {
    rows: usize,
    cols: usize,
    /// Panel `p`'s block `b` is at `p * cols / BLOCK + b`.
    panels: Vec<P>,
}

/// Four-bit weights in panels.
pub type Q4Matrix<B> = PanelMatrix<PanelQ4<B>>;

impl<P: Panel> PanelMatrix<P> {
    /// Reads `rows x cols` weights from GGUF bytes of this block format (row-major blocks) and repacks
    /// them.
    pub fn from_gguf_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Result<PanelMatrix<P>, String> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(format!("{cols} columns is not a multiple of {BLOCK}"));
        }
        type B<P> = <P as Panel>::Source;
        let per_row = cols / BLOCK;
        let expected = rows * per_row * B::<P>::GGUF_BYTES;
        if bytes.len() != expected {
            return Err(format!(
                "{} bytes for a {rows}x{cols} {} matrix, expected {expected}",
                bytes.len(),
                B::<P>::NAME
            ));
        }
        let size = B::<P>::GGUF_BYTES;
        let mut panels = vec![P::ZERO; rows.div_ceil(PANEL) * per_row];
        for (r, b) in (0..rows).flat_map(|r| (0..per_row).map(move |b| (r, b))) {
            let block = B::<P>::from_gguf(&bytes[(r * per_row + b) * size..][..size]);
            panels[r / PANEL * per_row + b].pack(r % PANEL, &block);
        }
        Ok(PanelMatrix { rows, cols, panels })
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

    fn panel(&self, p: usize) -> &[P] {
        let per_row = self.cols / BLOCK;
        &self.panels[p * per_row..(p + 1) * per_row]
    }

    /// Row `r`'s weights as f32 (an embedding lookup).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        self.panel(r / PANEL)
            .iter()
            .flat_map(|pb| pb.row_values(r % PANEL))
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
    pub fn matmul_group(mats: &[&PanelMatrix<P>], x: &[f32], m: usize) -> Vec<Vec<f32>> {
        let cols = mats.first().map_or(0, |w| w.cols);
        assert!(mats.iter().all(|w| w.cols == cols), "one input width");
        assert_eq!(x.len(), m * cols, "x must be m x cols");
        let (isa, xq) = (Isa::active(), quantize(x));
        mats.par_iter().map(|w| w.matmul_quantized(isa, &xq, m)).collect()
    }

    fn matmul_quantized(&self, isa: Isa, xq: &[BlockQ8], m: usize) -> Vec<f32> {
        let per_row = self.cols / BLOCK;
        let x_row = |r: usize| &xq[r * per_row..(r + 1) * per_row];
        let (four, one) = select::<P>(isa);
        tiled(self.rows, m, |cols, out| {
            let width = cols.len();
            // Tiles start at multiples of the panel height, so a tile is whole panels (the last one maybe
            // cut short by the matrix's end).
            for p in cols.start / PANEL..cols.end.div_ceil(PANEL) {
                let (panel, j) = (self.panel(p), p * PANEL - cols.start);
                let lanes = PANEL.min(cols.end - p * PANEL);
                let fours = m / 4 * 4;
                for r in (0..fours).step_by(4) {
                    let v = four(panel, [x_row(r), x_row(r + 1), x_row(r + 2), x_row(r + 3)]);
                    for (k, v) in v.iter().enumerate() {
                        out[(r + k) * width + j..][..lanes].copy_from_slice(&v[..lanes]);
                    }
                }
                for r in fours..m {
                    out[r * width + j..][..lanes].copy_from_slice(&one(panel, x_row(r))[..lanes]);
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
fn select<P: Panel>(isa: Isa) -> (FourFn<P>, OneFn<P>) {
    match isa.require() {
        Isa::Portable => (|p, x| x.map(|x| P::portable(p, x)), P::portable),
        simd => P::simd(simd),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// AVX2's Q8_0 step: |w| times x with w's sign, `maddubs` then `madd`; no offset to take back.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub fn q8_avx2(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// One module per path: the same bodies, compiled for the path's features, with its accumulating
    /// integer step `$dp(acc, unsigned, signed)`, its Q8_0 step `$q8(acc, signed weights, x)`, and
    /// whether that step leaves the 128 offset to take back (`$offset`).
    macro_rules! panel_path {
        ($path:ident, $features:literal, $dp:path, $q8:path, $offset:literal) => {
            pub mod $path {
                use std::arch::x86_64::*;

                use super::super::{PANEL, PanelQ4, PanelQ8};
                use crate::{BlockQ8, Q4};

                /// Safe entry: `select` hands this out only after checking the CPU.
                pub fn q4_four<B: Q4>(panel: &[PanelQ4<B>], x: [&[BlockQ8]; 4]) -> [[f32; PANEL]; 4] {
                    let n = x.iter().fold(panel.len(), |n, r| n.min(r.len()));
                    // SAFETY: `select` returned this function only after `Isa::require` confirmed the
                    // path's features on this CPU; every row is cut to the same length.
                    unsafe { q4_rows(&panel[..n], x.map(|r| &r[..n])) }
                }

                /// Safe entry: as [`q4_four`], for one row.
                pub fn q4_one<B: Q4>(panel: &[PanelQ4<B>], x: &[BlockQ8]) -> [f32; PANEL] {
                    let n = panel.len().min(x.len());
                    // SAFETY: as in `q4_four`.
                    let [out] = unsafe { q4_rows(&panel[..n], [&x[..n]]) };
                    out
                }

                /// Safe entry: as [`q4_four`], for Q8_0 panels.
                pub fn q8_four(panel: &[PanelQ8], x: [&[BlockQ8]; 4]) -> [[f32; PANEL]; 4] {
                    let n = x.iter().fold(panel.len(), |n, r| n.min(r.len()));
                    // SAFETY: as in `q4_four`.
                    unsafe { q8_rows(&panel[..n], x.map(|r| &r[..n])) }
                }

                /// Safe entry: as [`q8_four`], for one row.
                pub fn q8_one(panel: &[PanelQ8], x: &[BlockQ8]) -> [f32; PANEL] {
                    let n = panel.len().min(x.len());
                    // SAFETY: as in `q4_four`.
                    let [out] = unsafe { q8_rows(&panel[..n], [&x[..n]]) };
                    out
                }

                /// The four bytes of inputs `4k..4k + 4` of an activation block, in every lane.
                #[target_feature(enable = $features)]
                #[inline]
                fn group(xb: &BlockQ8, k: usize) -> __m256i {
                    let bytes = [xb.qs[4 * k], xb.qs[4 * k + 1], xb.qs[4 * k + 2], xb.qs[4 * k + 3]];
                    _mm256_set1_epi32(i32::from_le_bytes(bytes.map(|b| b as u8)))
                }

                /// Eight f16 values widened.
                #[target_feature(enable = $features)]
                #[inline]
                fn widen(h: &[half::f16; PANEL]) -> __m256 {
                    // SAFETY: eight f16 values are 16 bytes; `loadu` has no alignment requirement.
                    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(h.as_ptr().cast()) })
                }

                /// The accumulators' lanes.
                #[target_feature(enable = $features)]
                #[inline]
                fn lanes<const R: usize>(acc: [__m256; R]) -> [[f32; PANEL]; R] {
                    acc.map(|a| {
                        let mut out = [0.0f32; PANEL];
                        // SAFETY: `out` is eight f32; `storeu` has no alignment requirement.
                        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), a) };
                        out
                    })
                }

                /// A Q4 panel against `R` activation rows of the panel's length.
                ///
                /// # Safety
                /// The CPU has the path's features.
                #[target_feature(enable = $features)]
                unsafe fn q4_rows<B: Q4, const R: usize>(
                    panel: &[PanelQ4<B>],
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
                        let d = widen(&pb.d);
                        let m = if B::STORES_MIN {
                            widen(&pb.m)
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
                    lanes(acc)
                }

                /// A Q8_0 panel against `R` activation rows of the panel's length.
                ///
                /// # Safety
                /// The CPU has the path's features.
                #[target_feature(enable = $features)]
                unsafe fn q8_rows<const R: usize>(panel: &[PanelQ8], x: [&[BlockQ8]; R]) -> [[f32; PANEL]; R] {
                    let mut acc = [_mm256_setzero_ps(); R];
                    for (b, pb) in panel.iter().enumerate() {
                        let mut sums = [_mm256_setzero_si256(); R];
                        for k in 0..8 {
                            // SAFETY: each vector is 32 bytes and `loadu` has no alignment requirement.
                            let w = unsafe { _mm256_loadu_si256(pb.qs[k].as_ptr().cast()) };
                            for r in 0..R {
                                sums[r] = $q8(sums[r], w, group(&x[r][b], k));
                            }
                        }
                        let d = widen(&pb.d);
                        for r in 0..R {
                            let xb = &x[r][b];
                            if $offset {
                                sums[r] = _mm256_sub_epi32(sums[r], _mm256_set1_epi32(xb.offset));
                            }
                            let scale = _mm256_mul_ps(d, _mm256_set1_ps(xb.d));
                            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), scale, acc[r]);
                        }
                    }
                    lanes(acc)
                }
            }
        };
    }

    /// The VNNI paths' Q8_0 step: the weights offset to unsigned (`w ^ 0x80 = w + 128`), one `vpdpbusd`.
    macro_rules! q8_vnni {
        ($name:ident, $features:literal, $dp:path) => {
            #[target_feature(enable = $features)]
            #[inline]
            pub fn $name(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
                $dp(acc, _mm256_xor_si256(w, _mm256_set1_epi8(-128)), x)
            }
        };
    }
    q8_vnni!(q8_avx_vnni, "avx2,fma,f16c,avxvnni", crate::isa::x86::dp_avx_vnni);
    q8_vnni!(
        q8_avx512_vnni,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        crate::isa::x86::dp_avx512_vnni
    );

    panel_path!(avx2, "avx2,fma,f16c", crate::isa::x86::dp_avx2, super::q8_avx2, false);
    panel_path!(
        avx_vnni,
        "avx2,fma,f16c,avxvnni",
        crate::isa::x86::dp_avx_vnni,
        super::q8_avx_vnni,
        true
    );
    panel_path!(
        avx512_vnni,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        crate::isa::x86::dp_avx512_vnni,
        super::q8_avx512_vnni,
        true
    );
}
