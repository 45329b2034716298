//! The Q8_0 · Q8 block dot product: portable, and AVX2+FMA chosen at run time.

#[cfg(target_arch = "x86_64")]
use crate::dot::hsum;
use crate::dot::{Dot4Fn, DotFn, avx2_available};
use crate::{BlockQ8, BlockQ80};

/// Σ over blocks of `d_w * d_x * Σ q_w·q_x`.
pub fn portable(w: &[BlockQ80], x: &[BlockQ8]) -> f32 {
    w.iter()
        .zip(x)
        .map(|(w, x)| {
            let sum: i32 = w.qs.iter().zip(&x.qs).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum();
            w.d * x.d * sum as f32
        })
        .sum()
}

/// Four portable dot products.
pub fn portable4(w: &[BlockQ80], x: [&[BlockQ8]; 4]) -> [f32; 4] {
    x.map(|x| portable(w, x))
}

/// The fastest dot product this CPU supports.
pub fn select() -> DotFn<BlockQ80> {
    #[cfg(target_arch = "x86_64")]
    if avx2_available() {
        return avx2_entry;
    }
    portable
}

/// The fastest four-row dot product this CPU supports.
pub fn select4() -> Dot4Fn<BlockQ80> {
    #[cfg(target_arch = "x86_64")]
    if avx2_available() {
        return avx2_x4_entry;
    }
    portable4
}

#[cfg(target_arch = "x86_64")]
fn avx2_entry(w: &[BlockQ80], x: &[BlockQ8]) -> f32 {
    // SAFETY: `select` returns this function only after `is_x86_feature_detected!` confirmed AVX2 and FMA.
    unsafe { avx2(w, x) }
}

#[cfg(target_arch = "x86_64")]
fn avx2_x4_entry(w: &[BlockQ80], x: [&[BlockQ8]; 4]) -> [f32; 4] {
    // SAFETY: `select` and `select4` return this function only after `is_x86_feature_detected!`
    // confirmed AVX2 and FMA.
    unsafe { avx2_x4(w, x) }
}

/// AVX2, four activation rows at once. `maddubs` wants its first operand unsigned, so it gets |w| and
/// the activations take w's sign (`sign_epi8`); pairs stay within i16 (2 * 128 * 127 = 32512). One
/// load and `abs` of each weight block serve four rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_x4(w: &[BlockQ80], x: [&[BlockQ8]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let n = x.iter().fold(w.len(), |n, r| n.min(r.len()));
    let (w, x) = (&w[..n], x.map(|r| &r[..n]));
    let mut acc = [_mm256_setzero_ps(); 4];
    let ones = _mm256_set1_epi16(1);
    for i in 0..n {
        let wb = &w[i];
        // SAFETY: `qs` is 32 bytes and `loadu` has no alignment requirement.
        let qw = unsafe { _mm256_loadu_si256(wb.qs.as_ptr().cast()) };
        let abs = _mm256_sign_epi8(qw, qw);
        for r in 0..4 {
            let xb = &x[r][i];
            // SAFETY: as above, for the activation block.
            let qx = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) };
            let pairs = _mm256_maddubs_epi16(abs, _mm256_sign_epi8(qx, qw));
            let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(wb.d * xb.d), sums, acc[r]);
        }
    }
    let mut out = [0.0f32; 4];
    for r in 0..4 {
        out[r] = hsum(acc[r]);
    }
    out
}

/// AVX2, one activation row: as [`avx2_x4`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2(w: &[BlockQ80], x: &[BlockQ8]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    let ones = _mm256_set1_epi16(1);
    for (wb, xb) in w.iter().zip(x) {
        // SAFETY: both `qs` are 32 bytes and `loadu` has no alignment requirement.
        let (qw, qx) = unsafe {
            (
                _mm256_loadu_si256(wb.qs.as_ptr().cast()),
                _mm256_loadu_si256(xb.qs.as_ptr().cast()),
            )
        };
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw));
        let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(wb.d * xb.d), sums, acc);
    }
    hsum(acc)
}
