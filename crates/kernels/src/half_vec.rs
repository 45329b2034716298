//! f32 against f16 vectors, for attention over an f16 KV cache read in place: eight cached values are
//! widened at a time (F16C) inside the dot product and the weighted sum, instead of the cache being
//! copied into f32 first.
//!
//! Both SIMD functions keep eight partial sums in one register and add them in a fixed order; the
//! portable ones do the same arithmetic in the same order, so every path gives the same bits.

use half::f16;

use crate::isa::Isa;

/// The f16 vector operations of one path.
#[derive(Clone, Copy)]
pub struct HalfOps {
    /// `Σ a_i · b_i`, `a` and `b` of one length.
    pub dot: fn(&[f32], &[f16]) -> f32,
    /// `y += alpha · x`, `y` and `x` of one length.
    pub axpy: fn(&mut [f32], f32, &[f16]),
}

impl HalfOps {
    /// The operations of the path this process uses.
    pub fn active() -> HalfOps {
        HalfOps::of(Isa::active())
    }

    /// The operations of a path this CPU runs (panics otherwise). Every x86 path has AVX2 and F16C.
    pub fn of(isa: Isa) -> HalfOps {
        match isa.require() {
            Isa::Portable => HalfOps {
                dot: portable_dot,
                axpy: portable_axpy,
            },
            #[cfg(target_arch = "x86_64")]
            _ => HalfOps {
                dot: x86::dot,
                axpy: x86::axpy,
            },
            #[cfg(not(target_arch = "x86_64"))]
            _ => HalfOps {
                dot: portable_dot,
                axpy: portable_axpy,
            },
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
        let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let q = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let mut sum = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
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
