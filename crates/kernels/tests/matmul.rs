//! The Q4_1 kernels against a dequantize-then-multiply reference in f32, and the AVX2 dot product
//! against the portable one.

use ferroserve_kernels::{BLOCK, Q4_1_BYTES, Q41Matrix, dot_fast, dot_portable, dot4_fast, quantize_block, uses_avx2};
use proptest::prelude::*;

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

fn reference(w: &[f32], x: &[f32], m: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * rows];
    for r in 0..m {
        for c in 0..rows {
            out[r * rows + c] = (0..cols).map(|i| w[c * cols + i] * x[r * cols + i]).sum();
        }
    }
    out
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
        let got = w.matmul(&xs, m);
        let dense = w.dequantize();
        let want = reference(&dense, &xs, m, rows, cols);
        // The only error is the activations' 8-bit rounding: at most half a step per value.
        for r in 0..m {
            let row = &xs[r * cols..(r + 1) * cols];
            for c in 0..rows {
                let step: f32 = (0..blocks)
                    .map(|b| {
                        let amax = row[b * BLOCK..(b + 1) * BLOCK].iter().fold(0.0f32, |a, v| a.max(v.abs()));
                        let wsum: f32 = dense[c * cols + b * BLOCK..c * cols + (b + 1) * BLOCK].iter().map(|v| v.abs()).sum();
                        wsum * amax / 127.0 / 2.0
                    })
                    .sum();
                let (g, e) = (got[r * rows + c], want[r * rows + c]);
                prop_assert!((g - e).abs() <= step * 1.01 + 1e-4, "row {r} col {c}: {g} vs {e} (bound {step})");
            }
        }
    }

    #[test]
    fn simd_and_portable_dot_products_agree(
        blocks in 1usize..9,
        nibbles in proptest::collection::vec(any::<u8>(), 16..64),
        x in proptest::collection::vec(-10.0f32..10.0, 32..96),
    ) {
        let cols = blocks * BLOCK;
        let w = Q41Matrix::from_gguf_bytes(1, cols, &gguf_bytes(1, cols, &[0.02, 0.01], &nibbles)).unwrap();
        let xs: Vec<f32> = (0..cols).map(|i| x[i % x.len()]).collect();
        let xq: Vec<_> = xs.chunks_exact(BLOCK).map(quantize_block).collect();
        let row = w.matmul(&xs, 1)[0];
        let a = dot_portable(&blocks_of(&w), &xq);
        let b = dot_fast(&blocks_of(&w), &xq);
        prop_assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{a} vs {b}");
        prop_assert!((row - b).abs() <= 1e-4 * b.abs().max(1.0), "{row} vs {b}");
    }

    #[test]
    fn four_row_and_one_row_dot_products_agree(
        blocks in 1usize..9,
        nibbles in proptest::collection::vec(any::<u8>(), 16..64),
        x in proptest::collection::vec(-10.0f32..10.0, 32..96),
    ) {
        let cols = blocks * BLOCK;
        let w = Q41Matrix::from_gguf_bytes(1, cols, &gguf_bytes(1, cols, &[0.02, 0.01], &nibbles)).unwrap();
        let rows: Vec<Vec<_>> = (0..4)
            .map(|r| (0..cols).map(|i| x[(i * (r + 1)) % x.len()] * (r as f32 - 1.5)).collect::<Vec<f32>>())
            .map(|xs| xs.chunks_exact(BLOCK).map(quantize_block).collect())
            .collect();
        let four = dot4_fast(&blocks_of(&w), [&rows[0], &rows[1], &rows[2], &rows[3]]);
        for (r, got) in four.iter().enumerate() {
            let one = dot_portable(&blocks_of(&w), &rows[r]);
            prop_assert!((got - one).abs() <= 1e-4 * one.abs().max(1.0), "row {r}: {got} vs {one}");
        }
    }
}

/// The blocks of a one-row matrix.
fn blocks_of(w: &Q41Matrix) -> Vec<ferroserve_kernels::BlockQ41> {
    w.row_blocks(0).to_vec()
}

#[test]
fn the_cpu_kernel_in_use_is_reported() {
    // On the x86-64-v3 baseline this project builds for, AVX2 is always there.
    #[cfg(target_arch = "x86_64")]
    assert!(uses_avx2());
    let w = Q41Matrix::from_gguf_bytes(2, 32, &gguf_bytes(2, 32, &[0.1], &[0x21])).unwrap();
    let v = w.dequantize();
    assert!((v[0] - (0.1 - 0.4)).abs() < 1e-3, "low nibble 1: d*1 + m = {}", v[0]);
    assert!((v[16] - (0.2 - 0.4)).abs() < 1e-3, "high nibble 2: d*2 + m = {}", v[16]);
    assert!(Q41Matrix::from_gguf_bytes(2, 33, &[]).is_err());
    assert!(Q41Matrix::from_gguf_bytes(2, 32, &[0; 10]).is_err());
}
