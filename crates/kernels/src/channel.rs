//! Int8 weights with one scale per output row, against 7-bit activations with one scale per block of 32:
//! the format for models that arrive in f32 (the filter's sentence encoder), where we choose the layout.
//!
//! Why not Q8_0 for them: a Q8_0 · Q8 block costs six vector operations per activation row (two sign
//! flips, because `maddubs` wants one operand unsigned, then `maddubs`, `madd`, a convert and an FMA
//! with the product of two scales). Here the weights are stored unsigned, `u = q + 128`, and the
//! activations keep 7 bits (|x| ≤ 63), so `maddubs(u, x)` needs no sign flip and cannot saturate (a pair
//! sums to at most 2·255·63 = 32130). With one weight scale per row the block's FMA takes the activation
//! scale straight from memory. That leaves four operations per block and row.
//!
//! The offset comes out once per output: Σ_b d_b Σ_i (q_i + 128) x_i = Σ_b d_b Σ_i q_i x_i +
//! 128 · Σ_b d_b Σ_i x_i, and the last sum belongs to the activation row alone.

use std::ops::Range;

use rayon::prelude::*;

use crate::BLOCK;
use crate::isa::Isa;

/// Largest activation magnitude after quantization (7 bits).
const X_MAX: f32 = 63.0;

/// Int8 weights, `rows` outputs by `cols` inputs, one f32 scale per output row.
#[derive(Debug, Clone)]
pub struct ChannelQ8Matrix {
    rows: usize,
    cols: usize,
    /// Per output row: weight = scale · (u − 128).
    scale: Vec<f32>,
    /// Row-major, offset by 128.
    u: Vec<u8>,
}

/// Activation rows quantized for [`ChannelQ8Matrix`]: per block of 32 a scale and 7-bit values.
struct Activations {
    m: usize,
    blocks: usize,
    /// Per row and block.
    d: Vec<f32>,
    q: Vec<i8>,
    /// Per row: 128 · Σ_b d_b Σ_i q_i, the weight offset's share of every output of that row.
    offset: Vec<f32>,
}

impl Activations {
    fn quantize(x: &[f32], m: usize, cols: usize) -> Activations {
        let blocks = cols / BLOCK;
        let mut d = vec![0.0f32; m * blocks];
        let mut q = vec![0i8; m * cols];
        let mut offset = vec![0.0f32; m];
        x.par_chunks_exact(cols)
            .zip(d.par_chunks_exact_mut(blocks))
            .zip(q.par_chunks_exact_mut(cols))
            .zip(offset.par_iter_mut())
            .with_min_len(4)
            .for_each(|(((x, d), q), offset)| {
                let mut total = 0.0f32;
                for ((x, d), q) in x.chunks_exact(BLOCK).zip(d.iter_mut()).zip(q.chunks_exact_mut(BLOCK)) {
                    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                    *d = amax / X_MAX;
                    let inv = if *d > 0.0 { 1.0 / *d } else { 0.0 };
                    let mut sum = 0i32;
                    for (q, v) in q.iter_mut().zip(x) {
                        *q = (v * inv).round().clamp(-X_MAX, X_MAX) as i8;
                        sum += i32::from(*q);
                    }
                    total += *d * sum as f32;
                }
                *offset = 128.0 * total;
            });
        Activations {
            m,
            blocks,
            d,
            q,
            offset,
        }
    }

    fn row(&self, r: usize) -> (&[f32], &[i8]) {
        (
            &self.d[r * self.blocks..(r + 1) * self.blocks],
            &self.q[r * self.blocks * BLOCK..(r + 1) * self.blocks * BLOCK],
        )
    }
}

/// Raw sums Σ_b d_b Σ_i u_i x_i of weight rows `cols` against every activation row, into `out`
/// (`m x cols.len()`, row-major).
type TileFn = fn(&ChannelQ8Matrix, &Activations, Range<usize>, &mut [f32]);

/// Portable: one weight row against one activation row.
fn portable(u: &[u8], d: &[f32], x: &[i8]) -> f32 {
    u.chunks_exact(BLOCK)
        .zip(x.chunks_exact(BLOCK))
        .zip(d)
        .map(|((u, x), d)| {
            let sum: i32 = u.iter().zip(x).map(|(u, x)| i32::from(*u) * i32::from(*x)).sum();
            d * sum as f32
        })
        .sum()
}

fn tile_portable(w: &ChannelQ8Matrix, act: &Activations, cols: Range<usize>, out: &mut [f32]) {
    let width = cols.len();
    for r in 0..act.m {
        let (d, q) = act.row(r);
        for (j, c) in cols.clone().enumerate() {
            out[r * width + j] = portable(w.row(c), d, q);
        }
    }
}

/// The tile function of a path this CPU runs (panics otherwise).
fn select(isa: Isa) -> TileFn {
    match isa.require() {
        Isa::Portable => tile_portable,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::avx2::tile,
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => x86::avx_vnni::tile,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => x86::avx512_vnni::tile,
        #[cfg(not(target_arch = "x86_64"))]
        _ => tile_portable,
    }
}

/// Checks what the x86 tiles rely on: activation rows as wide as weight rows, and the tile inside both.
fn check_tile(w: &ChannelQ8Matrix, act: &Activations, cols: &Range<usize>, out: &[f32]) {
    assert_eq!(act.blocks * BLOCK, w.cols, "activation rows match the weight rows");
    assert!(
        cols.end <= w.rows && out.len() == act.m * cols.len(),
        "the tile lies inside the matrix"
    );
    assert!(act.q.len() == act.m * w.cols && act.d.len() == act.m * act.blocks);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// One module per path: the same body, compiled for the path's features, with its integer step.
    /// Activation rows go four at a time (each weight block loaded once for all four), then one at a
    /// time, with the same operations per row, so a row's bits do not depend on its place in the batch.
    macro_rules! channel_path {
        ($path:ident, $features:literal, $dp:path) => {
            pub mod $path {
                use std::arch::x86_64::*;
                use std::ops::Range;

                use super::super::{Activations, ChannelQ8Matrix, check_tile};
                use crate::BLOCK;
                use crate::isa::x86::hsum;

                /// Safe entry: `select` hands this out only after checking the CPU.
                pub fn tile(w: &ChannelQ8Matrix, act: &Activations, cols: Range<usize>, out: &mut [f32]) {
                    check_tile(w, act, &cols, out);
                    // SAFETY: `select` returned this function only after `Isa::require` confirmed the
                    // path's features; the shapes were checked above.
                    unsafe { tile_inner(w, act, cols, out) }
                }

                #[target_feature(enable = $features)]
                unsafe fn tile_inner(w: &ChannelQ8Matrix, act: &Activations, cols: Range<usize>, out: &mut [f32]) {
                    let width = cols.len();
                    let fours = act.m / 4 * 4;
                    for r in (0..fours).step_by(4) {
                        for (j, c) in cols.clone().enumerate() {
                            // SAFETY: rows r..r+4 and weight row c exist (checked by `tile`).
                            let v = unsafe { rows::<4>(w, act, c, r) };
                            for (k, v) in v.into_iter().enumerate() {
                                out[(r + k) * width + j] = v;
                            }
                        }
                    }
                    for r in fours..act.m {
                        for (j, c) in cols.clone().enumerate() {
                            // SAFETY: as above, for row r.
                            out[r * width + j] = unsafe { rows::<1>(w, act, c, r) }[0];
                        }
                    }
                }

                /// Weight row `c` against activation rows `r..r + N`: per block the integer step,
                /// convert, FMA with the block's activation scale.
                ///
                /// # Safety
                /// The CPU has the path's features; `c < w.rows`, `r + N <= act.m`, and `act` was
                /// quantized for `w.cols`.
                #[target_feature(enable = $features)]
                #[inline]
                unsafe fn rows<const N: usize>(w: &ChannelQ8Matrix, act: &Activations, c: usize, r: usize) -> [f32; N] {
                    let mut acc = [_mm256_setzero_ps(); N];
                    let u = w.u[c * w.cols..(c + 1) * w.cols].as_ptr();
                    let x = act.q[r * w.cols..(r + N) * w.cols].as_ptr();
                    let d = act.d[r * act.blocks..(r + N) * act.blocks].as_ptr();
                    for b in 0..act.blocks {
                        // SAFETY: block `b` of weight row `c` lies inside the slice taken above.
                        let wb = unsafe { _mm256_loadu_si256(u.add(b * BLOCK).cast()) };
                        for (k, acc) in acc.iter_mut().enumerate() {
                            // SAFETY: block `b` of activation row `r + k` lies inside the slices above.
                            let (xk, dk) = unsafe {
                                (
                                    _mm256_loadu_si256(x.add(k * w.cols + b * BLOCK).cast()),
                                    *d.add(k * act.blocks + b),
                                )
                            };
                            let sums = _mm256_cvtepi32_ps($dp(_mm256_setzero_si256(), wb, xk));
                            *acc = _mm256_fmadd_ps(_mm256_set1_ps(dk), sums, *acc);
                        }
                    }
                    acc.map(|a| hsum(a))
                }
            }
        };
    }

    channel_path!(avx2, "avx2,fma,f16c", crate::isa::x86::dp_avx2);
    channel_path!(avx_vnni, "avx2,fma,f16c,avxvnni", crate::isa::x86::dp_avx_vnni);
    channel_path!(
        avx512_vnni,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        crate::isa::x86::dp_avx512_vnni
    );
}

impl ChannelQ8Matrix {
    /// Quantizes `rows x cols` f32 weights (row-major): each row's largest magnitude maps to 127.
    pub fn quantize(rows: usize, cols: usize, weights: &[f32]) -> Result<ChannelQ8Matrix, String> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(format!("{cols} columns is not a multiple of {BLOCK}"));
        }
        if weights.len() != rows * cols {
            return Err(format!("{} weights for a {rows}x{cols} matrix", weights.len()));
        }
        let mut scale = Vec::with_capacity(rows);
        let mut u = Vec::with_capacity(rows * cols);
        for row in weights.chunks_exact(cols) {
            let d = row.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            scale.push(d);
            u.extend(
                row.iter()
                    .map(|v| ((v * inv).round().clamp(-127.0, 127.0) as i32 + 128) as u8),
            );
        }
        Ok(ChannelQ8Matrix { rows, cols, scale, u })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The weights as f32, row-major (for tests and references).
    pub fn dequantize(&self) -> Vec<f32> {
        self.u
            .chunks_exact(self.cols)
            .zip(&self.scale)
            .flat_map(|(row, d)| row.iter().map(move |u| d * (i32::from(*u) - 128) as f32))
            .collect()
    }

    fn row(&self, c: usize) -> &[u8] {
        &self.u[c * self.cols..(c + 1) * self.cols]
    }

    /// `x` is `m x cols`, row-major; returns `m x rows`, row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(select(Isa::active()), x, m, |_, _| {})
    }

    /// As [`ChannelQ8Matrix::matmul`], then `f(columns, outputs)` on each output row's share of a tile
    /// (a bias, an activation), inside the parallel tiles, so that the element-wise work after a matmul
    /// is split over the pool too and runs on slices the compiler can vectorize.
    pub fn matmul_map(&self, x: &[f32], m: usize, f: impl Fn(Range<usize>, &mut [f32]) + Sync) -> Vec<f32> {
        self.matmul_with(select(Isa::active()), x, m, f)
    }

    /// As [`ChannelQ8Matrix::matmul`] on a given path (which this CPU must run), for tests and benchmarks.
    pub fn matmul_isa(&self, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(select(isa), x, m, |_, _| {})
    }

    fn matmul_with(&self, tile: TileFn, x: &[f32], m: usize, f: impl Fn(Range<usize>, &mut [f32]) + Sync) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "x must be m x cols");
        let act = Activations::quantize(x, m, self.cols);
        crate::tiled(self.rows, m, |cols, out| {
            tile(self, &act, cols.clone(), out);
            let scale = &self.scale[cols.clone()];
            for (row, offset) in out.chunks_exact_mut(cols.len()).zip(&act.offset) {
                for (v, s) in row.iter_mut().zip(scale) {
                    *v = s * (*v - offset);
                }
                f(cols.clone(), row);
            }
        })
    }
}
