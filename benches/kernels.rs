//! Our quantized matmul kernels (`ferroserve-kernels`) against Candle's `QMatMul` on the same weights, at
//! SmolLM2-135M's shapes, in the same run, so the ratio means something on a shared, noisy machine.
//!
//! `cargo bench -p ferroserve-model --bench kernels`
//!
//! - `q4_1/{ours,candle}/M`: an MLP up-projection, 1536 x 576 Q4_1, for M activation rows (1 is a
//!   single-stream decode step, 16 a 16-stream one, 64 a prefill chunk).
//! - `q8_0/{ours,candle}/M`: the output projection, 49152 x 576 Q8_0 (the tied embedding).
//!
//! The weights are random; speed does not depend on their values.

use std::hint::black_box;
use std::time::Duration;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferroserve_kernels::{Kernel, QMatrix};

/// A random `rows x cols` matrix quantized by Candle, and the same bytes read by our kernel.
fn weights<B: Kernel>(rows: usize, cols: usize, dtype: GgmlDType) -> (QMatMul, QMatrix<B>) {
    let dense = Tensor::randn(0f32, 0.05, (rows, cols), &Device::Cpu).expect("random weights");
    let q = QTensor::quantize(&dense, dtype).expect("quantizes");
    let ours = QMatrix::<B>::from_gguf_bytes(rows, cols, &q.data().expect("bytes")).expect("our layout");
    (QMatMul::from_qtensor(q).expect("QMatMul"), ours)
}

fn compare<B: Kernel>(c: &mut Criterion, name: &str, rows: usize, cols: usize, dtype: GgmlDType, ms: &[usize]) {
    let (candle, ours) = weights::<B>(rows, cols, dtype);
    let mut group = c.benchmark_group(name);
    group.sample_size(10).measurement_time(Duration::from_secs(3));
    for &m in ms {
        let x = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu).expect("activations");
        let xs: Vec<f32> = x.flatten_all().and_then(|t| t.to_vec1()).expect("values");
        group.throughput(Throughput::Elements((m * rows * cols) as u64));
        group.bench_with_input(BenchmarkId::new("ours", m), &m, |b, &m| {
            b.iter(|| black_box(ours.matmul(black_box(&xs), m)))
        });
        group.bench_with_input(BenchmarkId::new("candle", m), &m, |b, _| {
            b.iter(|| black_box(candle.forward(black_box(&x)).expect("matmul")))
        });
    }
    group.finish();
}

fn kernels(c: &mut Criterion) {
    compare::<ferroserve_kernels::BlockQ41>(c, "q4_1", 1536, 576, GgmlDType::Q4_1, &[1, 16, 64]);
    compare::<ferroserve_kernels::BlockQ80>(c, "q8_0", 49152, 576, GgmlDType::Q8_0, &[1, 16]);
}

criterion_group!(benches, kernels);
criterion_main!(benches);
