//! The Q4_1 · Q8 block dot product (Q4_0 runs here too, read as Q4_1): portable, and AVX2+FMA chosen at
//! run time.

use crate::{BlockQ8, BlockQ41};

/// A row of weight blocks against a row of activation blocks.
pub type DotFn<B> = fn(&[B], &[BlockQ8]) -> f32;

/// A row of weight blocks against four rows of activation blocks: each weight block is unpacked once.
pub type Dot4Fn<B> = fn(&[B], [&[BlockQ8]; 4]) -> [f32; 4];

/// Four portable dot products.
pub fn portable4(w: &[BlockQ41], x: [&[BlockQ8]; 4]) -> [f32; 4] {
    x.map(|x| portable(w, x))
}

/// Σ over blocks of `d_w * d_x * Σ q4·q8 + m_w * s_x`.
pub fn portable(w: &[BlockQ41], x: &[BlockQ8]) -> f32 {
    w.iter()
        .zip(x)
        .map(|(w, x)| {
            let mut sum = 0i32;
            for j in 0..16 {
                sum += i32::from(w.qs[j] & 0x0F) * i32::from(x.qs[j]);
                sum += i32::from(w.qs[j] >> 4) * i32::from(x.qs[j + 16]);
            }
            w.d * x.d * sum as f32 + w.m * x.s
        })
        .sum()
}

/// Whether this CPU runs the AVX2 kernel.
pub fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The fastest dot product this CPU supports.
pub fn select() -> DotFn<BlockQ41> {
    #[cfg(target_arch = "x86_64")]
    if avx2_available() {
        return avx2_entry;
    }
    portable
}

/// The fastest four-row dot product this CPU supports.
pub fn select4() -> Dot4Fn<BlockQ41> {
    #[cfg(target_arch = "x86_64")]
    if avx2_available() {
        return avx2_x4_entry;
    }
    portable4
}

#[cfg(target_arch = "x86_64")]
fn avx2_x4_entry(w: &[BlockQ41], x: [&[BlockQ8]; 4]) -> [f32; 4] {
    // SAFETY: `select4` returns this function only after `is_x86_feature_detected!` confirmed AVX2 and FMA.
    unsafe { avx2_x4(w, x) }
}

#[cfg(target_arch = "x86_64")]
fn avx2_entry(w: &[BlockQ41], x: &[BlockQ8]) -> f32 {
    // SAFETY: `select` returns this function only after `is_x86_feature_detected!` confirmed AVX2 and FMA.
    unsafe { avx2(w, x) }
}

/// AVX2: the 16 nibble bytes become 32 unsigned bytes (low nibbles, then high nibbles, the same order
/// as the activations), `maddubs` multiplies them with the signed activations into i16 pairs (at most
/// 2 * 15 * 127 = 3810, no overflow), `madd` widens to i32, and one FMA per block applies the scales.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2(w: &[BlockQ41], x: &[BlockQ8]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(x.len());
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0.0f32;
    let nibbles = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for i in 0..n {
        let (wb, xb) = (&w[i], &x[i]);
        // SAFETY: `qs` is 16 bytes and `loadu` has no alignment requirement.
        let packed = unsafe { _mm_loadu_si128(wb.qs.as_ptr().cast()) };
        let high = _mm_srli_epi16(packed, 4);
        let q4 = _mm256_and_si256(_mm256_set_m128i(high, packed), nibbles);
        // SAFETY: `qs` is 32 bytes and `loadu` has no alignment requirement.
        let q8 = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) };
        let pairs = _mm256_maddubs_epi16(q4, q8);
        let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(wb.d * xb.d), sums, acc);
        mins += wb.m * xb.s;
    }
    hsum(acc) + mins
}

/// AVX2, four activation rows at once: as [`avx2`], but each weight block's nibbles are unpacked once and
/// multiplied with all four rows, and the four accumulators stay in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_x4(w: &[BlockQ41], x: [&[BlockQ8]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let n = x.iter().fold(w.len(), |n, r| n.min(r.len()));
    let (w, x) = (&w[..n], x.map(|r| &r[..n]));
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut mins = [0.0f32; 4];
    let nibbles = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for i in 0..n {
        let wb = &w[i];
        // SAFETY: `qs` is 16 bytes and `loadu` has no alignment requirement.
        let packed = unsafe { _mm_loadu_si128(wb.qs.as_ptr().cast()) };
        let q4 = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), nibbles);
        for r in 0..4 {
            let xb = &x[r][i];
            // SAFETY: `qs` is 32 bytes and `loadu` has no alignment requirement.
            let q8 = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) };
            let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q4, q8), ones));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(wb.d * xb.d), sums, acc[r]);
            mins[r] += wb.m * xb.s;
        }
    }
    let mut out = [0.0f32; 4];
    for r in 0..4 {
        out[r] = hsum(acc[r]) + mins[r];
    }
    out
}

/// The sum of eight lanes, in one fixed order, so that the one-row and four-row kernels give the same
/// bits for the same row (a sequence's logits do not depend on its place in a batch).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn hsum(a: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let half = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    let half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    _mm_cvtss_f32(_mm_add_ss(half, _mm_shuffle_ps(half, half, 1)))
}
