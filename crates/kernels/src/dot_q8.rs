//! The Q8_0 · Q8 block dot product: portable, and one x86 kernel per [`Isa`] path from one body.
//!
//! The integer step wants one operand unsigned, so it gets |w| and the activations take w's sign
//! (`sign_epi8`); a pair of products stays within i16 (2 · 128 · 127 = 32512), so every path gets the
//! same sums. One load and `abs` of each weight block serve four rows.

use crate::isa::Isa;
use crate::{BlockQ8, BlockQ80};

/// A row of weight blocks against a row of activation blocks.
pub type DotFn<B> = fn(&[B], &[BlockQ8]) -> f32;

/// A row of weight blocks against four rows of activation blocks: each weight block is unpacked once.
pub type Dot4Fn<B> = fn(&[B], [&[BlockQ8]; 4]) -> [f32; 4];

/// Σ over blocks of `d_w * d_x * Σ q_w·q_x`.
pub fn portable(w: &[BlockQ80], x: &[BlockQ8]) -> f32 {
    w.iter()
        .zip(x)
        .map(|(w, x)| {
            let sum: i32 = w.qs.iter().zip(&x.qs).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum();
            w.d.to_f32() * x.d * sum as f32
        })
        .sum()
}

/// Four portable dot products.
pub fn portable4(w: &[BlockQ80], x: [&[BlockQ8]; 4]) -> [f32; 4] {
    x.map(|x| portable(w, x))
}

/// The one-row kernel of a path this CPU runs (panics otherwise).
pub fn select(isa: Isa) -> DotFn<BlockQ80> {
    match isa.require() {
        Isa::Portable => portable,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::avx2::one,
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => x86::avx_vnni::one,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => x86::avx512_vnni::one,
        #[cfg(not(target_arch = "x86_64"))]
        _ => portable,
    }
}

/// The four-row kernel of a path this CPU runs (panics otherwise).
pub fn select4(isa: Isa) -> Dot4Fn<BlockQ80> {
    match isa.require() {
        Isa::Portable => portable4,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::avx2::four,
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => x86::avx_vnni::four,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => x86::avx512_vnni::four,
        #[cfg(not(target_arch = "x86_64"))]
        _ => portable4,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    macro_rules! q8_path {
        ($path:ident, $features:literal, $dp:path) => {
            pub mod $path {
                use std::arch::x86_64::*;

                use crate::isa::x86::hsum;
                use crate::{BlockQ8, BlockQ80};

                /// Safe entry: `select` hands this out only after checking the CPU.
                pub fn one(w: &[BlockQ80], x: &[BlockQ8]) -> f32 {
                    // SAFETY: `select` returned this function only after `Isa::require` confirmed the
                    // path's features on this CPU.
                    unsafe { one_inner(w, x) }
                }

                /// Safe entry: as [`one`].
                pub fn four(w: &[BlockQ80], x: [&[BlockQ8]; 4]) -> [f32; 4] {
                    // SAFETY: as in `one`.
                    unsafe { four_inner(w, x) }
                }

                /// `d_w · d_x · Σ q_w·q_x` of one block (`abs` = |q_w|), added to `acc`.
                #[target_feature(enable = $features)]
                #[inline]
                fn block(qw: __m256i, abs: __m256i, d: f32, xb: &BlockQ8, acc: __m256) -> __m256 {
                    // SAFETY: `qs` is 32 bytes and `loadu` has no alignment requirement.
                    let qx = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) };
                    let sums = _mm256_cvtepi32_ps($dp(_mm256_setzero_si256(), abs, _mm256_sign_epi8(qx, qw)));
                    _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), sums, acc)
                }

                #[target_feature(enable = $features)]
                #[inline]
                fn load(wb: &BlockQ80) -> (__m256i, __m256i, f32) {
                    // SAFETY: `qs` is 32 bytes and `loadu` has no alignment requirement.
                    let qw = unsafe { _mm256_loadu_si256(wb.qs.as_ptr().cast()) };
                    // The scale from a 32-bit load (see the Q4 kernels: no 16-bit insert and its false
                    // dependency); the high half, the first two weights, is ignored.
                    // SAFETY: the scale and the first two weights are 4 bytes inside the block.
                    let bits = unsafe { std::ptr::read_unaligned((wb as *const BlockQ80).cast::<i32>()) };
                    let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
                    (qw, _mm256_sign_epi8(qw, qw), d)
                }

                #[target_feature(enable = $features)]
                unsafe fn one_inner(w: &[BlockQ80], x: &[BlockQ8]) -> f32 {
                    let mut acc = _mm256_setzero_ps();
                    for (wb, xb) in w.iter().zip(x) {
                        let (qw, abs, d) = load(wb);
                        acc = block(qw, abs, d, xb, acc);
                    }
                    hsum(acc)
                }

                /// As `one_inner` for four rows, with the same operations per row.
                #[target_feature(enable = $features)]
                unsafe fn four_inner(w: &[BlockQ80], x: [&[BlockQ8]; 4]) -> [f32; 4] {
                    let n = x.iter().fold(w.len(), |n, r| n.min(r.len()));
                    let (w, x) = (&w[..n], x.map(|r| &r[..n]));
                    let mut acc = [_mm256_setzero_ps(); 4];
                    for i in 0..n {
                        let (qw, abs, d) = load(&w[i]);
                        for r in 0..4 {
                            acc[r] = block(qw, abs, d, &x[r][i], acc[r]);
                        }
                    }
                    acc.map(|a| hsum(a))
                }
            }
        };
    }

    q8_path!(avx2, "avx2,fma,f16c", crate::isa::x86::dp_avx2);
    q8_path!(avx_vnni, "avx2,fma,f16c,avxvnni", crate::isa::x86::dp_avx_vnni);
    q8_path!(
        avx512_vnni,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        crate::isa::x86::dp_avx512_vnni
    );
}
