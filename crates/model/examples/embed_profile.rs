//! Times one sentence embedding per call, our int8 encoder against Candle's f32 BERT in the same run,
//! over the filter's labeled dev prompts (one prompt per call, as a request's filter check does).
//!
//! `cargo run --release -p ferroserve-model --example embed_profile [REPEATS]`

use std::time::Instant;

use ferroserve_model::embed::{Backend, Embedder, MINILM};
use ferroserve_model::fetch::{self, Quiet};

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let repeats: usize = std::env::args().nth(1).and_then(|r| r.parse().ok()).unwrap_or(10);
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/filter-eval-dev.jsonl");
    let texts: Vec<String> = std::fs::read_to_string(data)
        .expect("the dev prompts")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let files = fetch::ensure_all(&MINILM, &fetch::default_cache_dir(), &Quiet).unwrap();
    // `EMBED_PROFILE_ONLY_INT8=1` skips the reference (for a profiler).
    let backends = if std::env::var_os("EMBED_PROFILE_ONLY_INT8").is_some() {
        vec![Backend::Int8]
    } else {
        vec![Backend::Int8, Backend::Candle]
    };
    let models: Vec<(Backend, Embedder)> = backends
        .into_iter()
        .map(|b| (b, Embedder::load_with(&files[0], &files[1], &files[2], b).unwrap()))
        .collect();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); models.len()];
    // Per prompt, the int8 time of its best run, to show what the slow ones have in common.
    let mut per_prompt = vec![f64::MAX; texts.len()];
    for round in 0..=repeats {
        for (i, text) in texts.iter().enumerate() {
            for (k, (_, model)) in models.iter().enumerate() {
                let start = Instant::now();
                std::hint::black_box(model.embed(&[text.as_str()]).unwrap());
                let ms = start.elapsed().as_secs_f64() * 1e3;
                if round > 0 {
                    times[k].push(ms);
                    if k == 0 {
                        per_prompt[i] = per_prompt[i].min(ms);
                    }
                }
            }
        }
    }
    println!(
        "{} prompts x {repeats} repeats, one call per prompt, interleaved",
        texts.len()
    );
    let mut p50s = Vec::new();
    for ((backend, _), t) in models.iter().zip(&mut times) {
        t.sort_by(f64::total_cmp);
        let (p50, p99) = (percentile(t, 0.5), percentile(t, 0.99));
        p50s.push(p50);
        println!(
            "{backend:?}: p50 {p50:6.2} ms  p99 {p99:6.2} ms  max {:6.2} ms",
            t[t.len() - 1]
        );
    }
    if let [int8, candle] = p50s[..] {
        println!("int8 / candle at p50: {:.2}x the time", int8 / candle);
    }
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by(|&a, &b| per_prompt[b].total_cmp(&per_prompt[a]));
    for &i in order.iter().take(3).chain(order.iter().rev().take(1)) {
        println!(
            "int8 best {:6.2} ms, {} words: {}",
            per_prompt[i],
            texts[i].split_whitespace().count(),
            texts[i]
        );
    }
}
