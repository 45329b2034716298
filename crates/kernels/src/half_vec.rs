//! f32 against f16 vectors, for attention over an f16 KV cache read in place: eight cached values are
//! widened at a time (F16C) inside the dot products and the weighted sums, instead of the cache being
//! copied into f32 first.
//!
//! The block operations serve a group of query heads that share a key/value head (grouped-query
//! attention): each cached vector is loaded and widened once for the whole group.
//! - [`HalfOps::scores`]: each query's dot product with each key;
//! - [`HalfOps::mix`]: each query's output plus its weights times the values.
//!
//! A dot product keeps eight partial sums in one register and adds them in a fixed order; a weighted sum
//! adds one position after another with fused multiply-adds. The portable functions do the same
//! arithmetic in the same order, so every path gives the same bits.

use half::f16;

use crate::isa::Isa;

/// The f16 vector operations of one path.
#[derive(Clone, Copy)]
pub struct HalfOps {
    /// `Σ a_i · b_i`, `a` and `b` of one length.
    pub dot: fn(&[f32], &[f16]) -> f32,
    /// `y += alpha · x`, `y` and `x` of one length.
    pub axpy: fn(&mut [f32], f32, &[f16]),
    /// `scores(hd, queries, keys, out, stride)`: `queries` is `g x hd` and `keys` `n x hd`; writes
    /// `out[q * stride + k] = queries[q] · keys[k]`.
    pub scores: fn(usize, &[f32], &[f16], &mut [f32], usize),
    /// `mix(hd, weights, stride, values, out)`: `values` is `n x hd` and `out` `g x hd`; adds
    /// `weights[q * stride + k] · values[k]` to `out[q]`, for `k` in order.
    pub mix: fn(usize, &[f32], usize, &[f16], &mut [f32]),
}

impl HalfOps {
    /// The operations of the path this process uses.
    pub fn active() -> HalfOps {
        HalfOps::of(Isa::active())
    }

    /// The operations of a path this CPU runs (panics otherwise). Every x86 path has AVX2 and F16C.
    pub fn of(isa: Isa) -> HalfOps {
        match isa.require() {
            Isa::Portable => PORTABLE,
            #[cfg(target_arch = "x86_64")]
            _ => HalfOps {
                dot: x86::dot,
                axpy: x86::axpy,
                scores: x86::scores,
                mix: x86::mix,
            },
            #[cfg(not(target_arch = "x86_64"))]
            _ => PORTABLE,
        }
    }
}

const PORTABLE: HalfOps = HalfOps {
    dot: portable_dot,
    axpy: portable_axpy,
    scores: portable_scores,
    mix: portable_mix,
};

/// Checks the shapes of `scores`: `g` queries of `hd`, `n` keys, room for `g` rows of `out`.
fn score_shape(hd: usize, queries: &[f32], keys: &[f16], out: &[f32], stride: usize) -> (usize, usize) {
    assert!(
        hd > 0 && queries.len().is_multiple_of(hd) && keys.len().is_multiple_of(hd),
        "whole vectors"
    );
    let (g, n) = (queries.len() / hd, keys.len() / hd);
    assert!(
        g == 0 || (n <= stride && (g - 1) * stride + n <= out.len()),
        "room for the scores"
    );
    (g, n)
}

/// Checks the shapes of `mix`: `n` values of `hd`, `g` outputs, weights for each.
fn mix_shape(hd: usize, weights: &[f32], stride: usize, values: &[f16], out: &[f32]) -> (usize, usize) {
    assert!(
        hd > 0 && values.len().is_multiple_of(hd) && out.len().is_multiple_of(hd),
        "whole vectors"
    );
    let (g, n) = (out.len() / hd, values.len() / hd);
    assert!(
        g == 0 || (n <= stride && (g - 1) * stride + n <= weights.len()),
        "a weight for each"
    );
    (g, n)
}

fn portable_scores(hd: usize, queries: &[f32], keys: &[f16], out: &mut [f32], stride: usize) {
    let (g, n) = score_shape(hd, queries, keys, out, stride);
    for q in 0..g {
        for k in 0..n {
            out[q * stride + k] = portable_dot(&queries[q * hd..(q + 1) * hd], &keys[k * hd..(k + 1) * hd]);
        }
    }
}

fn portable_mix(hd: usize, weights: &[f32], stride: usize, values: &[f16], out: &mut [f32]) {
    let (g, n) = mix_shape(hd, weights, stride, values, out);
    for q in 0..g {
        for k in 0..n {
            portable_axpy(
                &mut out[q * hd..(q + 1) * hd],
                weights[q * stride + k],
                &values[k * hd..(k + 1) * hd],
            );
        }
    }
}

/// Eight lanes of partial sums, as the SIMD path keeps them, then the lanes added in its order.
fn portable_dot(a: &[f32], b: &[f16]) -> f32 {
    assert_eq!(a.len(), b.len(), "vectors of one length");
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: Vec<(f32, f16)> = ca
        .remainder()
        .iter()
        .copied()
        .zip(cb.remainder().iter().copied())
        .collect();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            lanes[k] = x[k].mul_add(y[k].to_f32(), lanes[k]);
        }
    }
    let mut sum = reduce(lanes);
    for (x, y) in tail {
        sum = x.mul_add(y.to_f32(), sum);
    }
    sum
}

/// The SIMD path's horizontal sum: halves, then quarters, then the last pair.
fn reduce(l: [f32; 8]) -> f32 {
    let h = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let q = [h[0] + h[2], h[1] + h[3]];
    q[0] + q[1]
}

fn portable_axpy(y: &mut [f32], alpha: f32, x: &[f16]) {
    assert_eq!(y.len(), x.len(), "vectors of one length");
    for (y, x) in y.iter_mut().zip(x) {
        *y = alpha.mul_add(x.to_f32(), *y);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    // The sum of eight lanes in the portable `reduce`'s order.
    use crate::isa::x86::hsum;

    pub fn dot(a: &[f32], b: &[f16]) -> f32 {
        assert_eq!(a.len(), b.len(), "vectors of one length");
        // SAFETY: `HalfOps::of` hands this out only after `Isa::require` confirmed an x86 SIMD path, all of
        // which have AVX2, FMA and F16C; the lengths were checked above.
        unsafe { dot_inner(a, b) }
    }

    pub fn axpy(y: &mut [f32], alpha: f32, x: &[f16]) {
        assert_eq!(y.len(), x.len(), "vectors of one length");
        // SAFETY: as in `dot`.
        unsafe { axpy_inner(y, alpha, x) }
    }

    /// Query heads a block operation holds in registers at once; larger groups go in several passes.
    const GROUP: usize = 4;

    pub fn scores(hd: usize, queries: &[f32], keys: &[f16], out: &mut [f32], stride: usize) {
        let (g, n) = super::score_shape(hd, queries, keys, out, stride);
        for q0 in (0..g).step_by(GROUP) {
            let q1 = g.min(q0 + GROUP);
            // SAFETY: as in `dot`; the shapes were checked above.
            unsafe {
                scores_inner(
                    hd,
                    &queries[q0 * hd..q1 * hd],
                    &keys[..n * hd],
                    &mut out[q0 * stride..],
                    stride,
                )
            }
        }
    }

    pub fn mix(hd: usize, weights: &[f32], stride: usize, values: &[f16], out: &mut [f32]) {
        let (g, n) = super::mix_shape(hd, weights, stride, values, out);
        for q0 in (0..g).step_by(GROUP) {
            let q1 = g.min(q0 + GROUP);
            // SAFETY: as in `dot`; the shapes were checked above.
            unsafe {
                mix_inner(
                    hd,
                    &weights[q0 * stride..],
                    stride,
                    &values[..n * hd],
                    &mut out[q0 * hd..q1 * hd],
                )
            }
        }
    }

    /// Up to [`GROUP`] queries against every key: each key's eight-value chunks are widened once for all
    /// of them. Per (query, key), the same operations in the same order as [`dot_inner`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scores_inner(hd: usize, queries: &[f32], keys: &[f16], out: &mut [f32], stride: usize) {
        let (g, n, full) = (queries.len() / hd, keys.len() / hd, hd / 8 * 8);
        for k in 0..n {
            let key = &keys[k * hd..(k + 1) * hd];
            let mut acc = [_mm256_setzero_ps(); GROUP];
            for c in (0..full).step_by(8) {
                // SAFETY: `c + 8 <= full <= hd`; `loadu` has no alignment requirement.
                let kv = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(key.as_ptr().add(c).cast()) });
                for (q, acc) in acc.iter_mut().enumerate().take(g) {
                    // SAFETY: query `q` has `hd` values and `c + 8 <= hd`.
                    let qv = unsafe { _mm256_loadu_ps(queries.as_ptr().add(q * hd + c)) };
                    *acc = _mm256_fmadd_ps(qv, kv, *acc);
                }
            }
            for (q, acc) in acc.iter().enumerate().take(g) {
                let mut sum = hsum(*acc);
                for i in full..hd {
                    sum = queries[q * hd + i].mul_add(key[i].to_f32(), sum);
                }
                out[q * stride + k] = sum;
            }
        }
    }

    /// Up to [`GROUP`] outputs, eight values at a time held in registers across every position: each
    /// value chunk is widened once for all of them. Per output value, the same fused multiply-adds in the
    /// same order as [`axpy_inner`] called position by position.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn mix_inner(hd: usize, weights: &[f32], stride: usize, values: &[f16], out: &mut [f32]) {
        let (g, n, full) = (out.len() / hd, values.len() / hd, hd / 8 * 8);
        for c in (0..full).step_by(8) {
            let mut acc = [_mm256_setzero_ps(); GROUP];
            for (q, acc) in acc.iter_mut().enumerate().take(g) {
                // SAFETY: output `q` has `hd` values and `c + 8 <= hd`.
                *acc = unsafe { _mm256_loadu_ps(out.as_ptr().add(q * hd + c)) };
            }
            for k in 0..n {
                // SAFETY: value `k` has `hd` values and `c + 8 <= hd`.
                let v = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(values.as_ptr().add(k * hd + c).cast()) });
                for (q, acc) in acc.iter_mut().enumerate().take(g) {
                    *acc = _mm256_fmadd_ps(_mm256_set1_ps(weights[q * stride + k]), v, *acc);
                }
            }
            for (q, acc) in acc.iter().enumerate().take(g) {
                // SAFETY: as for the loads.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(q * hd + c), *acc) };
            }
        }
        for q in 0..g {
            for k in 0..n {
                let w = weights[q * stride + k];
                for i in full..hd {
                    out[q * hd + i] = w.mul_add(values[k * hd + i].to_f32(), out[q * hd + i]);
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_inner(a: &[f32], b: &[f16]) -> f32 {
        let n = a.len() / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        for i in (0..n).step_by(8) {
            // SAFETY: `i + 8 <= n <= len` for both; `loadu` has no alignment requirement.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_cvtph_ps(_mm_loadu_si128(b.as_ptr().add(i).cast())),
                )
            };
            acc = _mm256_fmadd_ps(x, y, acc);
        }
        let mut sum = hsum(acc);
        for i in n..a.len() {
            sum = a[i].mul_add(b[i].to_f32(), sum);
        }
        sum
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn axpy_inner(y: &mut [f32], alpha: f32, x: &[f16]) {
        let n = y.len() / 8 * 8;
        let a = _mm256_set1_ps(alpha);
        for i in (0..n).step_by(8) {
            // SAFETY: `i + 8 <= n <= len` for both; unaligned loads and stores.
            unsafe {
                let xv = _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().add(i).cast()));
                let yv = _mm256_loadu_ps(y.as_ptr().add(i));
                _mm256_storeu_ps(y.as_mut_ptr().add(i), _mm256_fmadd_ps(a, xv, yv));
            }
        }
        for i in n..y.len() {
            y[i] = alpha.mul_add(x[i].to_f32(), y[i]);
        }
    }
}
