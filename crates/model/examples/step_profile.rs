//! Times the batched forward on the real default model: one prefill chunk (64, 256 and 512 tokens; 512 is
//! llama-bench's pp512), then decode steps for 1, 4, 8 and 16 sequences that each hold `CONTEXT` tokens.
//! Milliseconds per step, best and median of a few. Then the roofline: this machine's memory bandwidth
//! (a triad) and int8 peak, and how close single-stream decode comes to the bandwidth bound and 16-stream
//! decode to the compute bound.
//!
//! `cargo run --release -p ferroserve-model --example step_profile [prefill|decode|all [BATCH...]]`
//! (`FERROSERVE_KERNELS=avx2` measures another kernel path; `STEP_PROFILE_REPEATS` sets the repeats.)

use std::time::Instant;

use candle_core::Device;
use ferroserve_kernels::{Isa, roofline};
use ferroserve_model::batched::{BatchedLlama, Chunk, SeqCache};
use ferroserve_model::fetch::{self, DEFAULT_MODEL, Quiet};
use ferroserve_model::gguf::GgufFile;

/// Tokens already in each sequence's cache when decode is timed.
const CONTEXT: usize = 128;
/// Timed repetitions per figure, unless `STEP_PROFILE_REPEATS` says otherwise (more, for a profiler).
fn repeats() -> usize {
    std::env::var("STEP_PROFILE_REPEATS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(7)
}

fn summary(mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    format!("best {:7.1} ms  median {:7.1} ms", ms[0], ms[ms.len() / 2])
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| 100 + (i * 7 + salt * 13) % 5000).collect()
}

/// This process's resident memory now, in MiB (Linux; 0 elsewhere).
fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    kb.unwrap_or(0) / 1024
}

fn main() {
    println!("RSS at start: {} MiB", rss_mib());
    let path = fetch::ensure(&DEFAULT_MODEL, &fetch::default_cache_dir(), &Quiet).expect("default model");
    let mut gguf = GgufFile::open(&path).expect("gguf");
    println!("RSS with the GGUF header read: {} MiB", rss_mib());
    let model = BatchedLlama::load(&mut gguf, &Device::Cpu).expect("weights");
    drop(gguf);
    println!("RSS with the weights loaded: {} MiB", rss_mib());

    let args: Vec<String> = std::env::args().skip(1).collect();
    let part = args.first().map(String::as_str).unwrap_or("all");
    let batches: Vec<usize> = match args.get(1..) {
        Some(rest) if !rest.is_empty() => rest.iter().map(|b| b.parse().expect("a batch size")).collect(),
        _ => vec![1, 4, 8, 16],
    };
    println!("kernel path: {} (this CPU runs: {:?})", Isa::active(), Isa::host());
    let prefills: &[usize] = if part == "decode" { &[] } else { &[64, 256, 512] };
    for &n in prefills {
        let tokens = prompt(n, 0);
        let ms: Vec<f64> = (0..repeats().min(4))
            .map(|_| {
                let mut cache = model.new_cache(n).expect("cache");
                let t = Instant::now();
                model
                    .forward(&mut [Chunk {
                        cache: &mut cache,
                        tokens: &tokens,
                    }])
                    .expect("prefill");
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        let best = ms.iter().copied().fold(f64::MAX, f64::min);
        println!(
            "prefill {n:4} tokens: {}  ({:.0} tok/s best)",
            summary(ms),
            n as f64 / best * 1e3
        );
    }

    let batches = if part == "prefill" { Vec::new() } else { batches };
    let mut median_ms = Vec::new();
    for &batch in &batches {
        let pool = model.unbounded_pool();
        let mut caches: Vec<SeqCache> = (0..batch)
            .map(|s| {
                let mut cache = model.new_cache_in(&pool, CONTEXT + repeats() + 1).expect("cache");
                let tokens = prompt(CONTEXT, s as u32);
                model
                    .forward(&mut [Chunk {
                        cache: &mut cache,
                        tokens: &tokens,
                    }])
                    .expect("prefill");
                cache
            })
            .collect();
        let blocks: usize = caches.iter().map(SeqCache::blocks).sum();
        println!(
            "RSS with {batch} sequences of {CONTEXT} tokens cached ({blocks} KV blocks, {} KiB each): {} MiB",
            model.kv_layout().bytes_per_token() * ferroserve_model::kv::BLOCK_TOKENS / 1024,
            rss_mib()
        );
        let ms: Vec<f64> = (0..repeats())
            .map(|r| {
                let next = [(200 + r) as u32];
                let mut chunks: Vec<Chunk<'_>> =
                    caches.iter_mut().map(|cache| Chunk { cache, tokens: &next }).collect();
                let t = Instant::now();
                model.forward(&mut chunks).expect("decode");
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        let best = ms.iter().copied().fold(f64::MAX, f64::min);
        let mut sorted = ms.clone();
        sorted.sort_by(f64::total_cmp);
        median_ms.push((batch, sorted[sorted.len() / 2]));
        let median = summary(ms);
        println!(
            "decode batch {batch:2} at {CONTEXT} ctx: {median}  ({:.0} tok/s best)",
            batch as f64 / best * 1e3
        );
    }
    if part != "prefill" {
        print_roofline(&model, &median_ms);
    }
}

/// The decode steps measured (batch, median ms) against this machine's bandwidth and int8 peak.
fn print_roofline(model: &BatchedLlama, steps: &[(usize, f64)]) {
    let Some((params, bytes)) = model.matmul_footprint() else {
        println!("roofline: a matrix runs through Candle; no footprint");
        return;
    };
    let triad = roofline::triad_gbps(256 << 20, 5);
    let isa = Isa::active();
    let peak = roofline::int8_peak_gops(isa);
    let kv_bytes = CONTEXT * model.kv_layout().bytes_per_token();
    println!(
        "roofline: weights {:.1} M multiplied per token, {:.1} MB read per step; KV {:.2} MB per sequence at {CONTEXT} ctx",
        params as f64 / 1e6,
        bytes as f64 / 1e6,
        kv_bytes as f64 / 1e6
    );
    println!(
        "roofline: triad bandwidth {triad:.1} GB/s; int8 peak {} ({} path{})",
        peak.map_or("-".into(), |p| format!("{p:.0} GOPS")),
        isa,
        if isa == Isa::Avx512Vnni {
            ", 512-bit vpdpbusd"
        } else {
            ""
        }
    );
    for &(batch, ms) in steps {
        let moved = (bytes + batch * kv_bytes) as f64;
        let gbps = moved / (ms / 1e3) / 1e9;
        let gops = 2.0 * params as f64 * batch as f64 / (ms / 1e3) / 1e9;
        println!(
            "roofline: batch {batch:2}: {gbps:5.1} GB/s = {:4.0} % of the bandwidth bound; {gops:6.1} GOPS = {} of the int8 peak",
            100.0 * gbps / triad,
            peak.map_or("-".into(), |p| format!("{:.1} %", 100.0 * gops / p))
        );
    }
}
