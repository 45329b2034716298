//! Content filter latency per prompt, on this machine (a benchmark: it measures, it asserts nothing).
//!
//! Judges every prompt of `tests/data/filter-eval-dev.jsonl` many times with the default config's rules
//! alone, its classifier alone, and both together, and prints p50 and p99 per prompt. Targets on 2
//! cores: rules p99 < 50 µs, classifier p99 < 10 ms.
//!
//! Run: `cargo bench -p ferroserve --bench filter_latency` (env: FILTER_BENCH_REPEATS, default 50).

use std::time::Instant;

use ferroserve_filter::eval::read_examples;
use ferroserve_filter::{Filter, FilterConfig};
use ferroserve_model::{embed, fetch};
use hdrhistogram::Histogram;

fn measure(name: &str, filter: &dyn Filter, texts: &[String], repeats: usize) {
    let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).unwrap();
    // One warm-up pass, not counted.
    for t in texts {
        filter.check(t);
    }
    for _ in 0..repeats {
        for t in texts {
            let start = Instant::now();
            std::hint::black_box(filter.check(t));
            h.record((start.elapsed().as_nanos() as u64).max(1)).unwrap();
        }
    }
    println!(
        "{name:<10} {:>6} checks  p50 {:>9.1} us  p99 {:>9.1} us  max {:>9.1} us",
        h.len(),
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
}

fn main() {
    let repeats: usize = std::env::var("FILTER_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let data = std::fs::read_to_string(format!("{root}/tests/data/filter-eval-dev.jsonl")).unwrap();
    let texts: Vec<String> = read_examples(&data).unwrap().into_iter().map(|e| e.text).collect();
    let files = fetch::ensure_all(&embed::MINILM, &fetch::default_cache_dir(), &fetch::Quiet).unwrap();
    let embedder = embed::Embedder::load(&files[0], &files[1], &files[2]).unwrap();
    ferroserve_filter::semantic::install(ferroserve_filter::semantic::EmbedService::start(embedder, None));
    let config = FilterConfig::load(std::path::Path::new(&format!("{root}/configs/filters/default.toml"))).unwrap();

    let mut rules = config.clone();
    (rules.semantic, rules.classifier) = (None, None);
    let mut classifier = config.clone();
    (classifier.rules.categories, classifier.semantic) = (Vec::new(), None);
    println!("{} prompts x {repeats} repeats, one thread", texts.len());
    measure("rules", &rules.compile().unwrap(), &texts, repeats);
    measure(
        "classifier",
        &classifier.compile().unwrap(),
        &texts,
        repeats.div_ceil(5),
    );
    measure("both", &config.compile().unwrap(), &texts, repeats.div_ceil(5));
}
