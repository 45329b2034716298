//! What the kernel tests share.

/// `x · wᵀ` in f32: `w` is `rows x cols`, `x` is `m x cols`; returns `m x rows`.
pub fn reference(w: &[f32], x: &[f32], m: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * rows];
    for r in 0..m {
        for c in 0..rows {
            out[r * rows + c] = (0..cols).map(|i| w[c * cols + i] * x[r * cols + i]).sum();
        }
    }
    out
}

/// Every kernel path this host runs, printed so that a test log says which paths a run exercised (the
/// machines this project runs on differ: some have AVX-512 VNNI, some AVX-VNNI, some only AVX2).
pub fn paths(test: &str) -> Vec<ferroserve_kernels::Isa> {
    let host = ferroserve_kernels::Isa::host();
    let names: Vec<&str> = host.iter().map(|i| i.name()).collect();
    println!("{test}: kernel paths exercised on this host: {}", names.join(", "));
    host
}
