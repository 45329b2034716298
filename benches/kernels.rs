//! Our quantized matmul kernels (`ferroserve-kernels`), on every instruction-set path this CPU runs,
//! against Candle's `QMatMul` on the same weights, at SmolLM2-135M's shapes, in the same run, so the ratios
//! mean something on a shared, noisy machine.
//!
//! `cargo bench -p ferroserve --bench kernels`
//!
//! - `q4_1/{ours-PATH,candle}/M`: an MLP up-projection, 1536 x 576 Q4_1 (our panels), for M activation
//!   rows (1 is a single-stream decode step, 16 a 16-stream one, 64 a prefill chunk).
//! - `q4_0/...`: the same shape in Q4_0.
//! - `q8_0/{ours-PATH,candle}/M`: the output projection, 49152 x 576 Q8_0 (the tied embedding; panels too).
//!
//! PATH is `portable`, `avx2`, `avx-vnni` or `avx512-vnni`, each where the CPU has it.
//!
//! The weights are random; speed does not depend on their values.

use std::hint::black_box;
use std::time::Duration;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferroserve_kernels::{Isa, Q4Matrix, Q80Matrix};

/// A random `rows x cols` matrix quantized by Candle: Candle's matmul and the bytes our kernels read.
fn weights(rows: usize, cols: usize, dtype: GgmlDType) -> (QMatMul, Vec<u8>) {
    let dense = Tensor::randn(0f32, 0.05, (rows, cols), &Device::Cpu).expect("random weights");
    let q = QTensor::quantize(&dense, dtype).expect("quantizes");
    let bytes = q.data().expect("bytes").to_vec();
    (QMatMul::from_qtensor(q).expect("QMatMul"), bytes)
}

/// Our matmul on a path: `x` has `m` rows.
type Ours<'a> = &'a dyn Fn(Isa, &[f32], usize) -> Vec<f32>;

/// Every path of ours and Candle's, for each row count in `ms`.
fn compare(
    c: &mut Criterion,
    name: &str,
    (rows, cols): (usize, usize),
    candle: &QMatMul,
    ours: Ours<'_>,
    ms: &[usize],
) {
    let mut group = c.benchmark_group(name);
    group.sample_size(10).measurement_time(Duration::from_secs(3));
    for &m in ms {
        let x = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu).expect("activations");
        let xs: Vec<f32> = x.flatten_all().and_then(|t| t.to_vec1()).expect("values");
        group.throughput(Throughput::Elements((m * rows * cols) as u64));
        for isa in Isa::host() {
            group.bench_with_input(BenchmarkId::new(format!("ours-{isa}"), m), &m, |b, &m| {
                b.iter(|| black_box(ours(isa, black_box(&xs), m)))
            });
        }
        group.bench_with_input(BenchmarkId::new("candle", m), &m, |b, _| {
            b.iter(|| black_box(candle.forward(black_box(&x)).expect("matmul")))
        });
    }
    group.finish();
}

fn kernels(c: &mut Criterion) {
    let up = (1536, 576);
    let (candle, bytes) = weights(up.0, up.1, GgmlDType::Q4_1);
    let w = Q4Matrix::<ferroserve_kernels::BlockQ41>::from_gguf_bytes(up.0, up.1, &bytes).expect("our layout");
    compare(
        c,
        "q4_1",
        up,
        &candle,
        &|isa, x, m| w.matmul_isa(isa, x, m),
        &[1, 16, 64],
    );
    let (candle, bytes) = weights(up.0, up.1, GgmlDType::Q4_0);
    let w = Q4Matrix::<ferroserve_kernels::BlockQ40>::from_gguf_bytes(up.0, up.1, &bytes).expect("our layout");
    compare(c, "q4_0", up, &candle, &|isa, x, m| w.matmul_isa(isa, x, m), &[1, 16]);
    let out = (49152, 576);
    let (candle, bytes) = weights(out.0, out.1, GgmlDType::Q8_0);
    let w = Q80Matrix::from_gguf_bytes(out.0, out.1, &bytes).expect("our layout");
    compare(c, "q8_0", out, &candle, &|isa, x, m| w.matmul_isa(isa, x, m), &[1, 16]);
}

criterion_group!(benches, kernels);
criterion_main!(benches);
