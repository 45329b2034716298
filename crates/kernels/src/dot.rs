//! The four-bit block dot product (Q4_1, and Q4_0 through the same code: see [`Q4`]) against Q8
//! activations: portable, and one x86 kernel per [`Isa`] path, generated from one body.
//!
//! Per block: the 16 nibble bytes become 32 unsigned bytes (low nibbles, then high nibbles, the order of
//! the activations); the path's integer step multiplies them with the signed activations into eight
//! i32 sums (a pair of products is at most 2 · 15 · 127 = 3810, so AVX2's `maddubs` cannot saturate and
//! every path gets the same sums); one FMA applies `d_w · d_x`, and the minimum's share `m_w · s_x` is
//! added once per block.

use crate::isa::Isa;
use crate::{BlockQ8, Q4};

/// A row of weight blocks against a row of activation blocks.
pub type DotFn<B> = fn(&[B], &[BlockQ8]) -> f32;

/// A row of weight blocks against four rows of activation blocks: each weight block is unpacked once.
pub type Dot4Fn<B> = fn(&[B], [&[BlockQ8]; 4]) -> [f32; 4];

/// Σ over blocks of `d_w * d_x * Σ q4·q8 + m_w * s_x`.
pub fn portable<B: Q4>(w: &[B], x: &[BlockQ8]) -> f32 {
    w.iter()
        .zip(x)
        .map(|(w, x)| {
            let qs = w.nibbles();
            let mut sum = 0i32;
            for j in 0..16 {
                sum += i32::from(qs[j] & 0x0F) * i32::from(x.qs[j]);
                sum += i32::from(qs[j] >> 4) * i32::from(x.qs[j + 16]);
            }
            let (d, m) = w.dm();
            d * x.d * sum as f32 + m * x.s
        })
        .sum()
}

/// Four portable dot products.
pub fn portable4<B: Q4>(w: &[B], x: [&[BlockQ8]; 4]) -> [f32; 4] {
    x.map(|x| portable(w, x))
}

/// The one-row kernel of a path this CPU runs (panics otherwise).
pub fn select<B: Q4>(isa: Isa) -> DotFn<B> {
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
pub fn select4<B: Q4>(isa: Isa) -> Dot4Fn<B> {
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
    /// One module per path: the same body, compiled for the path's features, with its integer step.
    macro_rules! q4_path {
        ($path:ident, $features:literal, $mul:path) => {
            pub mod $path {
                use std::arch::x86_64::*;

                use crate::isa::x86::hsum;
                use crate::{BlockQ8, Q4};

                /// Safe entry: [`super::super::select`] hands this out only after checking the CPU.
                pub fn one<B: Q4>(w: &[B], x: &[BlockQ8]) -> f32 {
                    // SAFETY: `select` returned this function only after `Isa::require` confirmed the
                    // path's features on this CPU.
                    unsafe { one_inner(w, x) }
                }

                /// Safe entry: as [`one`].
                pub fn four<B: Q4>(w: &[B], x: [&[BlockQ8]; 4]) -> [f32; 4] {
                    // SAFETY: as in `one`.
                    unsafe { four_inner(w, x) }
                }

                /// One block's nibbles as 32 unsigned bytes: low nibbles, then high nibbles.
                #[target_feature(enable = $features)]
                #[inline]
                fn unpack<B: Q4>(w: &B) -> __m256i {
                    // SAFETY: the nibbles are 16 bytes and `loadu` has no alignment requirement.
                    let packed = unsafe { _mm_loadu_si128(w.nibbles().as_ptr().cast()) };
                    let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
                    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
                }

                /// Scale and minimum widened together from one 32-bit load (`vmovd` zeroes the rest of
                /// the register: a 16-bit insert would merge into a register the loop also uses, and
                /// chain each block to the previous one). The same values as [`Q4::dm`].
                #[target_feature(enable = $features)]
                #[inline]
                fn dm<B: Q4>(w: &B) -> (f32, f32) {
                    let both = _mm_cvtph_ps(_mm_cvtsi32_si128(w.scale_bits() as i32));
                    let d = _mm_cvtss_f32(both);
                    let m = if B::STORES_MIN {
                        _mm_cvtss_f32(_mm_movehdup_ps(both))
                    } else {
                        -8.0 * d
                    };
                    (d, m)
                }

                /// `d_w · d_x · Σ q4·q8` of one block, added to `acc`.
                #[target_feature(enable = $features)]
                #[inline]
                fn block(q4: __m256i, d: f32, xb: &BlockQ8, acc: __m256) -> __m256 {
                    // SAFETY: `qs` is 32 bytes and `loadu` has no alignment requirement.
                    let q8 = unsafe { _mm256_loadu_si256(xb.qs.as_ptr().cast()) };
                    let sums = _mm256_cvtepi32_ps($mul(q4, q8));
                    _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), sums, acc)
                }

                #[target_feature(enable = $features)]
                unsafe fn one_inner<B: Q4>(w: &[B], x: &[BlockQ8]) -> f32 {
                    let mut acc = _mm256_setzero_ps();
                    let mut mins = 0.0f32;
                    for (wb, xb) in w.iter().zip(x) {
                        let (d, m) = dm(wb);
                        acc = block(unpack(wb), d, xb, acc);
                        mins += m * xb.s;
                    }
                    hsum(acc) + mins
                }

                /// As `one_inner` for four rows: each weight block is unpacked once, and the four
                /// accumulators stay in registers. A row gets the same operations in the same order as
                /// in `one_inner`, so the same bits.
                #[target_feature(enable = $features)]
                unsafe fn four_inner<B: Q4>(w: &[B], x: [&[BlockQ8]; 4]) -> [f32; 4] {
                    let n = x.iter().fold(w.len(), |n, r| n.min(r.len()));
                    let (w, x) = (&w[..n], x.map(|r| &r[..n]));
                    let mut acc = [_mm256_setzero_ps(); 4];
                    let mut mins = [0.0f32; 4];
                    for i in 0..n {
                        let wb = &w[i];
                        let (d, m) = dm(wb);
                        let q4 = unpack(wb);
                        for r in 0..4 {
                            acc[r] = block(q4, d, &x[r][i], acc[r]);
                            mins[r] += m * x[r][i].s;
                        }
                    }
                    std::array::from_fn(|r| hsum(acc[r]) + mins[r])
                }
            }
        };
    }

    q4_path!(avx2, "avx2,fma,f16c", crate::isa::x86::mul_avx2);
    q4_path!(avx_vnni, "avx2,fma,f16c,avxvnni", crate::isa::x86::mul_avx_vnni);
    q4_path!(
        avx512_vnni,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        crate::isa::x86::mul_avx512_vnni
    );
}
