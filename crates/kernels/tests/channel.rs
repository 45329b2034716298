//! The per-row int8 matrix ([`ChannelQ8Matrix`]) against an f32 product of its dequantized weights, the
//! SIMD paths this host runs against the portable one and each other, and a row's result alone against
//! the same row in a batch.

mod support;

use ferroserve_kernels::{BLOCK, ChannelQ8Matrix, Isa};
use proptest::prelude::*;
use support::{paths, reference};

/// Weights and activations from seeds, with magnitudes that vary by row and column.
fn case(rows: usize, cols: usize, m: usize, w: &[f32], x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let weights = (0..rows * cols)
        .map(|i| w[i % w.len()] * (1.0 + (i / cols % 3) as f32))
        .collect();
    let xs = (0..m * cols)
        .map(|i| x[i % x.len()] * (1.0 + (i % 7) as f32 * 0.3))
        .collect();
    (weights, xs)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn matmul_is_within_the_activation_rounding_of_the_dequantized_product(
        rows in 1usize..40,
        blocks in 1usize..5,
        m in 1usize..11,
        w in proptest::collection::vec(-0.5f32..0.5, 1..64),
        x in proptest::collection::vec(-4.0f32..4.0, 1..64),
    ) {
        let cols = blocks * BLOCK;
        let (weights, xs) = case(rows, cols, m, &w, &x);
        let q = ChannelQ8Matrix::quantize(rows, cols, &weights).unwrap();
        prop_assert_eq!(q.rows(), rows);
        let dense = q.dequantize();
        let want = reference(&dense, &xs, m, rows, cols);
        let portable = q.matmul_isa(Isa::Portable, &xs, m);
        for isa in paths("channel") {
        let got = q.matmul_isa(isa, &xs, m);
        for r in 0..m {
            let row = &xs[r * cols..(r + 1) * cols];
            for c in 0..rows {
                // 7-bit activations: at most half a step (amax / 63 / 2) per value, weighted by |w|.
                let bound: f32 = (0..blocks)
                    .map(|b| {
                        let amax = row[b * BLOCK..(b + 1) * BLOCK].iter().fold(0.0f32, |a, v| a.max(v.abs()));
                        let wsum: f32 = dense[c * cols + b * BLOCK..c * cols + (b + 1) * BLOCK]
                            .iter()
                            .map(|v| v.abs())
                            .sum();
                        wsum * amax / 63.0 / 2.0
                    })
                    .sum();
                let (g, p, e) = (got[r * rows + c], portable[r * rows + c], want[r * rows + c]);
                prop_assert!((g - e).abs() <= bound * 1.01 + 1e-4, "row {r} col {c}: {g} vs {e} (bound {bound})");
                prop_assert!((g - p).abs() <= 1e-4 * p.abs().max(1.0), "{isa} row {r} col {c}: {g}, portable {p}");
            }
        }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_a_batch(
        rows in 1usize..20,
        blocks in 1usize..4,
        m in 2usize..10,
        w in proptest::collection::vec(-0.5f32..0.5, 1..64),
        x in proptest::collection::vec(-4.0f32..4.0, 1..64),
    ) {
        let cols = blocks * BLOCK;
        let (weights, xs) = case(rows, cols, m, &w, &x);
        let q = ChannelQ8Matrix::quantize(rows, cols, &weights).unwrap();
        let mut simd: Option<Vec<u32>> = None;
        for isa in paths("channel") {
            let batch = q.matmul_isa(isa, &xs, m);
            for r in 0..m {
                let alone = q.matmul_isa(isa, &xs[r * cols..(r + 1) * cols], 1);
                for c in 0..rows {
                    prop_assert_eq!(alone[c].to_bits(), batch[r * rows + c].to_bits(), "{} row {} col {}", isa, r, c);
                }
            }
            // Every SIMD path computes the same sums in the same order: the same bits.
            let bits: Vec<u32> = batch.iter().map(|v| v.to_bits()).collect();
            if isa != Isa::Portable {
                match &simd {
                    None => simd = Some(bits),
                    Some(first) => prop_assert_eq!(first, &bits, "{} differs from the first SIMD path", isa),
                }
            }
        }
    }

    #[test]
    fn quantization_keeps_each_weight_within_half_a_step_of_its_row_scale(
        rows in 1usize..6,
        blocks in 1usize..4,
        w in proptest::collection::vec(-3.0f32..3.0, 1..64),
    ) {
        let cols = blocks * BLOCK;
        let (weights, _) = case(rows, cols, 1, &w, &[1.0]);
        let back = ChannelQ8Matrix::quantize(rows, cols, &weights).unwrap().dequantize();
        for (orig, got) in weights.chunks(cols).zip(back.chunks(cols)) {
            let step = orig.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
            for (o, g) in orig.iter().zip(got) {
                prop_assert!((o - g).abs() <= step * 0.5 + 1e-6, "{o} became {g}");
            }
        }
    }
}

#[test]
fn the_map_sees_each_output_with_its_column() {
    let (rows, cols) = (3, BLOCK);
    let q = ChannelQ8Matrix::quantize(rows, cols, &vec![0.0; rows * cols]).unwrap();
    let out = q.matmul_map(&vec![1.0; 5 * cols], 5, |c, row| {
        for (v, c) in row.iter_mut().zip(c) {
            *v += c as f32 * 10.0;
        }
    });
    for r in 0..5 {
        assert_eq!(&out[r * rows..(r + 1) * rows], &[0.0, 10.0, 20.0]);
    }
}

#[test]
fn bad_shapes_are_refused() {
    assert!(
        ChannelQ8Matrix::quantize(2, 33, &[0.0; 66])
            .unwrap_err()
            .contains("multiple of 32")
    );
    assert!(
        ChannelQ8Matrix::quantize(2, 32, &[0.0; 10])
            .unwrap_err()
            .contains("10 weights")
    );
}
