//! The Q4_1, Q4_0 and Q8_0 kernels against a dequantize-then-multiply reference in f32, on every kernel
//! path this host runs. The Q4 panels give the same bits on every path, portable included, and for a
//! row alone or in a batch; the Q8_0 SIMD dot products agree with the portable ones and with each other,
//! bit for bit.

mod support;

use ferroserve_kernels::{
    BLOCK, Isa, Panel, PanelMatrix, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES, Q40Matrix, Q41Matrix, Q80Matrix,
};
use proptest::prelude::*;
use support::{paths, reference};

/// GGUF Q4_1 bytes for `rows x cols` weights from seeds: scales and minimums as f16, random nibbles.
fn gguf_bytes(rows: usize, cols: usize, scales: &[f32], nibbles: &[u8]) -> Vec<u8> {
    let blocks = rows * cols / BLOCK;
    let mut out = Vec::with_capacity(blocks * Q4_1_BYTES);
    for b in 0..blocks {
        let d = scales[b % scales.len()];
        let m = -scales[(b + 1) % scales.len()] * 4.0;
        out.extend(half::f16::from_f32(d).to_le_bytes());
        out.extend(half::f16::from_f32(m).to_le_bytes());
        out.extend((0..16).map(|j| nibbles[(b * 16 + j) % nibbles.len()]));
    }
    out
}

/// GGUF Q8_0 bytes: an f16 scale and 32 signed bytes per block.
fn gguf_q8_0(rows: usize, cols: usize, scales: &[f32], values: &[u8]) -> Vec<u8> {
    let blocks = rows * cols / BLOCK;
    let mut out = Vec::with_capacity(blocks * Q8_0_BYTES);
    for b in 0..blocks {
        out.extend(half::f16::from_f32(scales[b % scales.len()]).to_le_bytes());
        out.extend((0..32).map(|j| values[(b * 32 + j) % values.len()]));
    }
    out
}

/// GGUF Q4_0 bytes: an f16 scale and 16 bytes of nibbles per block.
fn gguf_q4_0(rows: usize, cols: usize, scales: &[f32], nibbles: &[u8]) -> Vec<u8> {
    let blocks = rows * cols / BLOCK;
    let mut out = Vec::with_capacity(blocks * Q4_0_BYTES);
    for b in 0..blocks {
        out.extend(half::f16::from_f32(scales[b % scales.len()]).to_le_bytes());
        out.extend((0..16).map(|j| nibbles[(b * 16 + j) % nibbles.len()]));
    }
    out
}

/// Checks a matmul on every path this host runs against the f32 product of its dequantized weights
/// (`dense`, `rows x cols`). `matmul(isa)` computes `x · Wᵀ` for the `m` rows of `xs`.
fn assert_within_rounding(
    dense: &[f32],
    (rows, cols): (usize, usize),
    xs: &[f32],
    m: usize,
    matmul: impl Fn(Isa) -> Vec<f32>,
) -> Result<(), TestCaseError> {
    let want = reference(dense, xs, m, rows, cols);
    for isa in paths("matmul") {
        let got = matmul(isa);
        // The only error is the activations' 8-bit rounding: at most half a step per value, weighted
        // by the weights.
        for r in 0..m {
            let row = &xs[r * cols..(r + 1) * cols];
            for c in 0..rows {
                let step: f32 = (0..cols / BLOCK)
                    .map(|b| {
                        let amax = row[b * BLOCK..(b + 1) * BLOCK]
                            .iter()
                            .fold(0.0f32, |a, v| a.max(v.abs()));
                        let wsum: f32 = dense[c * cols + b * BLOCK..c * cols + (b + 1) * BLOCK]
                            .iter()
                            .map(|v| v.abs())
                            .sum();
                        wsum * amax / 127.0 / 2.0
                    })
                    .sum();
                let (g, e) = (got[r * rows + c], want[r * rows + c]);
                prop_assert!(
                    (g - e).abs() <= step * 1.01 + 1e-4,
                    "{isa}: row {r} col {c}: {g} vs {e} (bound {step})"
                );
            }
        }
    }
    Ok(())
}

/// A panel matrix on every path: within rounding of the reference, the same bits as the portable path, and
/// the same bits for each row alone as in the batch.
fn assert_panels<P: Panel>(w: &PanelMatrix<P>, xs: &[f32], m: usize) -> Result<(), TestCaseError> {
    let (rows, cols) = (w.rows(), w.cols());
    assert_within_rounding(&w.dequantize(), (rows, cols), xs, m, |isa| w.matmul_isa(isa, xs, m))?;
    let portable = w.matmul_isa(Isa::Portable, xs, m);
    for isa in paths("panels") {
        let batch = w.matmul_isa(isa, xs, m);
        prop_assert_eq!(
            batch.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{} differs from the portable path",
            isa
        );
        for r in 0..m {
            let alone = w.matmul_isa(isa, &xs[r * cols..(r + 1) * cols], 1);
            for c in 0..rows {
                prop_assert_eq!(
                    alone[c].to_bits(),
                    batch[r * rows + c].to_bits(),
                    "{} row {} col {}",
                    isa,
                    r,
                    c
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn matmul_matches_dequantize_then_multiply(
        rows in 1usize..40,
        blocks in 1usize..5,
        m in 1usize..11,
        scales in proptest::collection::vec(0.001f32..0.05, 1..8),
        nibbles in proptest::collection::vec(any::<u8>(), 1..64),
        x in proptest::collection::vec(-4.0f32..4.0, 1..64),
    ) {
        let cols = blocks * BLOCK;
        let w = Q41Matrix::from_gguf_bytes(rows, cols, &gguf_bytes(rows, cols, &scales, &nibbles)).unwrap();
        let xs: Vec<f32> = (0..m * cols).map(|i| x[i % x.len()] * (1.0 + (i % 7) as f32 * 0.1)).collect();
        assert_panels(&w, &xs, m)?;
    }

    #[test]
    fn q8_0_matmul_matches_dequantize_then_multiply(
        rows in 1usize..40,
        blocks in 1usize..5,
        m in 1usize..11,
        scales in proptest::collection::vec(0.001f32..0.05, 1..8),
        values in proptest::collection::vec(any::<u8>(), 1..64),
        x in proptest::collection::vec(-4.0f32..4.0, 1..64),
    ) {
        let cols = blocks * BLOCK;
        let w = Q80Matrix::from_gguf_bytes(rows, cols, &gguf_q8_0(rows, cols, &scales, &values)).unwrap();
        let xs: Vec<f32> = (0..m * cols).map(|i| x[i % x.len()] * (1.0 + (i % 7) as f32 * 0.1)).collect();
        assert_panels(&w, &xs, m)?;
    }

    #[test]
    fn q4_0_is_d_times_q_minus_8_and_multiplies_alike(
        rows in 1usize..20,
        blocks in 1usize..4,
        m in 1usize..7,
        scales in proptest::collection::vec(0.001f32..0.05, 1..8),
        nibbles in proptest::collection::vec(any::<u8>(), 1..64),
        x in proptest::collection::vec(-4.0f32..4.0, 1..64),
    ) {
        let cols = blocks * BLOCK;
        let w = Q40Matrix::from_gguf_bytes(rows, cols, &gguf_q4_0(rows, cols, &scales, &nibbles)).unwrap();
        // Q4_0's value is d * (q - 8).
        let dense = w.dequantize();
        for (i, v) in dense.iter().enumerate() {
            let (block, j) = (i / BLOCK, i % BLOCK);
            let byte = nibbles[(block * 16 + j % 16) % nibbles.len()];
            let q = if j < 16 { byte & 0x0F } else { byte >> 4 };
            let d = half::f16::from_f32(scales[block % scales.len()]).to_f32();
            prop_assert_eq!(*v, d * (f32::from(q) - 8.0));
        }
        let xs: Vec<f32> = (0..m * cols).map(|i| x[i % x.len()]).collect();
        assert_panels(&w, &xs, m)?;
    }
}

#[test]
fn the_kernel_paths_are_detected_and_named() {
    let host = paths("detect");
    // On the x86-64-v3 baseline this project builds for, AVX2 is always there.
    #[cfg(target_arch = "x86_64")]
    assert!(host.contains(&Isa::Avx2), "{host:?}");
    assert!(host.contains(&Isa::Portable));
    assert_eq!(Isa::best(), *host.iter().max().unwrap());
    assert!(
        host.contains(&Isa::active()),
        "the active path {} runs here",
        Isa::active()
    );
    for isa in Isa::ALL {
        assert_eq!(Isa::parse(isa.name()), Some(isa));
    }
    assert_eq!(Isa::parse("avx1024"), None);
    // The roofline's measurements exist where the paths do.
    let triad = ferroserve_kernels::roofline::triad_gbps(1 << 20, 1);
    assert!(triad.is_finite() && triad > 0.0, "{triad}");
    assert_eq!(ferroserve_kernels::roofline::int8_peak_gops(Isa::Portable), None);
    println!("active kernel path: {}", Isa::active());
}

#[test]
fn a_q4_1_block_reads_as_the_file_has_it() {
    let w = Q41Matrix::from_gguf_bytes(2, 32, &gguf_bytes(2, 32, &[0.1], &[0x21])).unwrap();
    let v = w.dequantize();
    assert!((v[0] - (0.1 - 0.4)).abs() < 1e-3, "low nibble 1: d*1 + m = {}", v[0]);
    assert!((v[16] - (0.2 - 0.4)).abs() < 1e-3, "high nibble 2: d*2 + m = {}", v[16]);
    assert_eq!(
        std::mem::size_of::<ferroserve_kernels::BlockQ41>(),
        Q4_1_BYTES,
        "no widened scales"
    );
    assert_eq!(std::mem::size_of::<ferroserve_kernels::BlockQ40>(), Q4_0_BYTES);
    assert_eq!(std::mem::size_of::<ferroserve_kernels::BlockQ80>(), Q8_0_BYTES);
    use ferroserve_kernels::{PANEL, PanelQ4, PanelQ8};
    assert_eq!(
        std::mem::size_of::<PanelQ4<ferroserve_kernels::BlockQ41>>(),
        PANEL * Q4_1_BYTES,
        "as the file"
    );
    assert_eq!(std::mem::size_of::<PanelQ8>(), PANEL * Q8_0_BYTES, "as the file");
    assert!(Q41Matrix::from_gguf_bytes(2, 33, &[]).is_err());
    assert!(Q41Matrix::from_gguf_bytes(2, 32, &[0; 10]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn f16_dot_and_axpy_give_the_same_bits_on_every_path(
        a in proptest::collection::vec(-4.0f32..4.0, 0..80),
        alpha in -2.0f32..2.0,
    ) {
        let b: Vec<half::f16> = a.iter().rev().map(|v| half::f16::from_f32(v * 0.7)).collect();
        let want_dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y.to_f32()).sum();
        let portable = ferroserve_kernels::HalfOps::of(Isa::Portable);
        for isa in paths("f16 vectors") {
            let ops = ferroserve_kernels::HalfOps::of(isa);
            let got = (ops.dot)(&a, &b);
            prop_assert_eq!(got.to_bits(), (portable.dot)(&a, &b).to_bits(), "{} dot", isa);
            prop_assert!((got - want_dot).abs() <= 1e-4 * want_dot.abs().max(1.0), "{isa}: {got} vs {want_dot}");
            let (mut y, mut y0) = (a.clone(), a.clone());
            (ops.axpy)(&mut y, alpha, &b);
            (portable.axpy)(&mut y0, alpha, &b);
            prop_assert_eq!(
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                y0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{} axpy",
                isa
            );
        }
    }

    #[test]
    fn grouped_scores_and_mixes_give_the_same_bits_on_every_path(
        hd in 1usize..80,
        g in 1usize..7,
        n in 0usize..20,
        seed in proptest::collection::vec(-3.0f32..3.0, 16..64),
    ) {
        let v = |i: usize| seed[i % seed.len()] * (1.0 + (i % 5) as f32 * 0.2);
        let queries: Vec<f32> = (0..g * hd).map(v).collect();
        let keys: Vec<half::f16> = (0..n * hd).map(|i| half::f16::from_f32(v(i + 7))).collect();
        let stride = n + 3;
        let weights: Vec<f32> = (0..g * stride).map(|i| v(i + 3).abs() / 10.0).collect();
        let portable = ferroserve_kernels::HalfOps::of(Isa::Portable);
        for isa in paths("f16 blocks") {
            let ops = ferroserve_kernels::HalfOps::of(isa);
            let (mut got, mut want) = (vec![0.0f32; g * stride], vec![0.0f32; g * stride]);
            (ops.scores)(hd, &queries, &keys, &mut got, stride);
            (portable.scores)(hd, &queries, &keys, &mut want, stride);
            prop_assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{} scores", isa);
            // Each score is the plain dot product.
            for q in 0..g {
                for k in 0..n {
                    let dot = (ops.dot)(&queries[q * hd..(q + 1) * hd], &keys[k * hd..(k + 1) * hd]);
                    prop_assert_eq!(got[q * stride + k].to_bits(), dot.to_bits());
                }
            }
            let (mut got, mut want) = (queries.clone(), queries.clone());
            (ops.mix)(hd, &weights, stride, &keys, &mut got);
            (portable.mix)(hd, &weights, stride, &keys, &mut want);
            prop_assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{} mix", isa);
            // The same as a weighted sum position by position.
            let mut one_by_one = queries.clone();
            for q in 0..g {
                for k in 0..n {
                    (ops.axpy)(&mut one_by_one[q * hd..(q + 1) * hd], weights[q * stride + k], &keys[k * hd..(k + 1) * hd]);
                }
            }
            prop_assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), one_by_one.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        }
    }
}
