//! Which instruction-set path the kernels take, chosen at run time.
//!
//! The binary is built for x86-64-v3 (AVX2, FMA, F16C); anything wider is detected with
//! `is_x86_feature_detected!` when the process starts. Every path computes the same integer sums (none of
//! them saturates: see the kernels), so the paths differ only in speed.
//!
//! `FERROSERVE_KERNELS=portable|avx2|avx-vnni|avx512-vnni` forces a path (for benchmarks that compare
//! them); a path this CPU lacks is refused, and the best one is used instead.

use std::sync::OnceLock;

/// An instruction-set path of the kernels, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust: any CPU.
    Portable,
    /// AVX2 and FMA: `maddubs` and `madd` to i32.
    Avx2,
    /// AVX-VNNI, the VEX form of `vpdpbusd` (CPUs with VNNI but without AVX-512).
    AvxVnni,
    /// AVX-512 F, BW, VL with VNNI: `vpdpbusd` in its EVEX form.
    Avx512Vnni,
}

/// The environment variable that forces a path.
pub const KERNELS_ENV: &str = "FERROSERVE_KERNELS";

impl Isa {
    /// Every path, narrowest first.
    pub const ALL: [Isa; 4] = [Isa::Portable, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni];

    /// The name used in logs, tests and `FERROSERVE_KERNELS`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avx-vnni",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }

    /// The path with this name.
    pub fn parse(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == name.trim())
    }

    /// Whether this CPU runs this path.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            match self {
                Isa::Portable => true,
                Isa::Avx2 => avx2,
                Isa::AvxVnni => avx2 && has!("avxvnni"),
                Isa::Avx512Vnni => {
                    avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// Every path this CPU runs, narrowest first.
    pub fn host() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.supported()).collect()
    }

    /// The widest path this CPU runs.
    pub fn best() -> Isa {
        Isa::host().into_iter().max().unwrap_or(Isa::Portable)
    }

    /// The path this process uses: `FERROSERVE_KERNELS` when it names a path this CPU runs, else the best.
    pub fn active() -> Isa {
        static ACTIVE: OnceLock<Isa> = OnceLock::new();
        *ACTIVE.get_or_init(|| match std::env::var(KERNELS_ENV) {
            Ok(name) => match Isa::parse(&name) {
                Some(isa) if isa.supported() => isa,
                _ => {
                    eprintln!(
                        "{KERNELS_ENV}={name:?} is not a path this CPU runs (it runs: {}); using {}",
                        Isa::host().iter().map(|i| i.name()).collect::<Vec<_>>().join(", "),
                        Isa::best().name()
                    );
                    Isa::best()
                }
            },
            Err(_) => Isa::best(),
        })
    }

    /// Panics unless this CPU runs the path: the guard before any `unsafe` kernel is handed out.
    pub(crate) fn require(self) -> Isa {
        assert!(
            self.supported(),
            "the {} kernels need a CPU feature this one lacks",
            self.name()
        );
        self
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The 256-bit integer step every x86 path shares: `acc + Σ u·s` over groups of four bytes, unsigned by
/// signed, into eight i32 lanes. Callers keep each pair of products within i16 (so `maddubs` cannot
/// saturate), which makes all three paths give the same sums.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// AVX2: `maddubs` to i16 pairs, `madd` with ones to i32, add.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub fn dp_avx2(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
    }

    /// AVX-VNNI: one `vpdpbusd` (VEX).
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    #[inline]
    pub fn dp_avx_vnni(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, u, s)
    }

    /// AVX-512 VNNI: one `vpdpbusd` (EVEX, 256 bits wide).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    pub fn dp_avx512_vnni(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, u, s)
    }

    /// The sum of eight lanes, in one fixed order, so that the one-row and four-row kernels give the same
    /// bits for the same row (a sequence's logits do not depend on its place in a batch).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub fn hsum(a: __m256) -> f32 {
        let half = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let half = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(half, _mm_shuffle_ps(half, half, 1)))
    }
}
