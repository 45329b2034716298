//! The machine's physical limits, measured, so that benchmarks can say how far a kernel is from them:
//! memory bandwidth (a STREAM-style triad over the rayon pool) and the int8 multiply-add peak of each
//! instruction path (independent dot-product instructions on registers, on every pool thread).

use std::time::Instant;

use rayon::prelude::*;

use crate::Isa;

/// Best triad bandwidth, in GB/s (10⁹ bytes), over `repeats` passes of `a = b + s·c` on three f32 arrays of
/// `bytes` each, split over the rayon pool. Bytes counted as STREAM counts them: two reads and one write
/// per element (the write-allocate read is not counted). Arrays should be far larger than the caches.
pub fn triad_gbps(bytes: usize, repeats: usize) -> f64 {
    let n = bytes / 4;
    let b = vec![1.0f32; n];
    let c = vec![2.0f32; n];
    let mut a = vec![0.0f32; n];
    let s = std::hint::black_box(3.0f32);
    let mut best = f64::MAX;
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        a.par_chunks_mut(1 << 16)
            .zip(b.par_chunks(1 << 16))
            .zip(c.par_chunks(1 << 16))
            .for_each(|((a, b), c)| {
                for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                    *a = b + s * c;
                }
            });
        best = best.min(start.elapsed().as_secs_f64());
        std::hint::black_box(&a);
    }
    (3 * n * 4) as f64 / best / 1e9
}

/// Peak int8 multiply-adds of a path's dot-product instruction on every rayon thread at once, in
/// GOPS (10⁹ operations, a multiply and an add counting two). `None` for the portable path, which has no
/// such instruction. For AVX-512 VNNI this is the 512-bit `vpdpbusd`: the machine's limit, wider than
/// the 256-bit form the kernels use.
pub fn int8_peak_gops(isa: Isa) -> Option<f64> {
    if isa == Isa::Portable || !isa.supported() {
        return None;
    }
    // About a tenth of a second per thread: long enough that waking the pool does not count.
    const ITERS: usize = 40_000_000;
    let threads = rayon::current_num_threads();
    let start = Instant::now();
    let bytes_per_iter: usize = (0..threads)
        .into_par_iter()
        .map(|_| peak_loop(isa, ITERS))
        .sum::<usize>();
    let secs = start.elapsed().as_secs_f64();
    Some(2.0 * bytes_per_iter as f64 * ITERS as f64 / secs / 1e9)
}

/// Runs `iters` rounds of eight independent instructions; returns the byte products one round computes.
fn peak_loop(isa: Isa, iters: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        let iters = std::hint::black_box(iters);
        // SAFETY: `int8_peak_gops` calls this only for a path this CPU supports.
        let (sum, width) = unsafe {
            match isa {
                Isa::Avx2 => (x86::avx2(iters), 32),
                Isa::AvxVnni => (x86::avx_vnni(iters), 32),
                Isa::Avx512Vnni => (x86::avx512_vnni(iters), 64),
                Isa::Portable => (0, 0),
            }
        };
        std::hint::black_box(sum);
        8 * width
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, iters);
        0
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    fn operands() -> (i8, i8) {
        (std::hint::black_box(3), std::hint::black_box(-2))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2(iters: usize) -> i32 {
        let (a, b) = operands();
        let (u, s, ones) = (_mm256_set1_epi8(a), _mm256_set1_epi8(b), _mm256_set1_epi16(1));
        let mut acc = [_mm256_setzero_si256(); 8];
        for _ in 0..iters {
            // Opaque each round, or the compiler computes the loop-invariant product once.
            let u = std::hint::black_box(u);
            for acc in &mut acc {
                *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones));
            }
        }
        let all = acc
            .into_iter()
            .fold(_mm256_setzero_si256(), |t, a| _mm256_add_epi32(t, a));
        _mm256_extract_epi32(all, 0)
    }

    #[target_feature(enable = "avx2,avxvnni")]
    pub unsafe fn avx_vnni(iters: usize) -> i32 {
        let (a, b) = operands();
        let (u, s) = (_mm256_set1_epi8(a), _mm256_set1_epi8(b));
        let mut acc = [_mm256_setzero_si256(); 8];
        for _ in 0..iters {
            let u = std::hint::black_box(u);
            for acc in &mut acc {
                *acc = _mm256_dpbusd_avx_epi32(*acc, u, s);
            }
        }
        let all = acc
            .into_iter()
            .fold(_mm256_setzero_si256(), |t, a| _mm256_add_epi32(t, a));
        _mm256_extract_epi32(all, 0)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn avx512_vnni(iters: usize) -> i32 {
        let (a, b) = operands();
        let (u, s) = (_mm512_set1_epi8(a), _mm512_set1_epi8(b));
        let mut acc = [_mm512_setzero_si512(); 8];
        for _ in 0..iters {
            let u = std::hint::black_box(u);
            for acc in &mut acc {
                *acc = _mm512_dpbusd_epi32(*acc, u, s);
            }
        }
        let all = acc
            .into_iter()
            .fold(_mm512_setzero_si512(), |t, a| _mm512_add_epi32(t, a));
        _mm512_reduce_add_epi32(all)
    }
}
