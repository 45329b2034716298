//! Structured output's own costs, on this machine (a benchmark: it measures, it asserts nothing):
//! - compiling a JSON schema cold (a schema the cache has not seen) and cached (the same schema again);
//! - the mask time of one step with 16 constrained streams (llguidance's `compute_mask` for each), the
//!   streams following random tokens that their masks allow, as a sampler would;
//! - applying a mask to a step's logits and following the chosen token, per stream.
//!
//! Run: `cargo bench -p ferroserve --bench constraints` (env: CONSTRAINT_BENCH_STEPS, default 200).

use std::time::{Duration, Instant};

use ferroserve_core::{Constraint, GenerationDefaults};
use ferroserve_engine::{Grammars, Guide, prepare_all};
use ferroserve_model::device::DeviceSpec;
use ferroserve_model::fetch::{self, DEFAULT_MODEL, Quiet};
use ferroserve_model::{LoadedModel, ModelSpec};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ORDER: &str = include_str!("schemas/order.json");
const ORDER_LINES: &str = include_str!("schemas/order-lines.json");

fn report(name: &str, h: &Histogram<u64>) {
    println!(
        "{name:<44} n={:>6}  p50 {:>9.1} us  p99 {:>9.1} us  max {:>9.1} us",
        h.len(),
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 100_000_000_000, 3).expect("bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.record((d.as_nanos() as u64).max(1)).expect("in range");
}

fn schema(text: &str) -> Constraint {
    Constraint::JsonSchema {
        schema: text.into(),
        strict: true,
    }
}

fn main() {
    let steps: usize = std::env::var("CONSTRAINT_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let path = fetch::ensure(&DEFAULT_MODEL, &fetch::default_cache_dir(), &Quiet).expect("default model");
    let text = LoadedModel::load(&ModelSpec {
        name: "smollm2".into(),
        version: "bench".into(),
        path,
        device: DeviceSpec::Cpu,
        defaults: GenerationDefaults::default(),
    })
    .expect("model loads")
    .text;
    let vocab = text.tokenizer.vocab_size();

    let started = Instant::now();
    let grammars = Grammars::new(&text, 64).expect("a byte-level vocabulary");
    println!(
        "vocabulary of {vocab} tokens; the compiler for it took {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );

    // Cold: 20 schemas the cache has not seen (the order schema, its notes' maxLength varied).
    let (mut cold, mut cached) = (histogram(), histogram());
    for i in 0..20 {
        let c = schema(&ORDER.replace("\"maxLength\": 200", &format!("\"maxLength\": {}", 201 + i)));
        let t = Instant::now();
        std::hint::black_box(grammars.guide(&c).expect("compiles"));
        record(&mut cold, t.elapsed());
    }
    let c = schema(ORDER);
    grammars.guide(&c).expect("compiles");
    for _ in 0..1000 {
        let t = Instant::now();
        std::hint::black_box(grammars.guide(&c).expect("cached"));
        record(&mut cached, t.elapsed());
    }
    report("compile benches/schemas/order.json, cold", &cold);
    report("compile benches/schemas/order.json, cached", &cached);

    // 16 streams under the order-lines schema, each step: all masks (as the mask thread computes them),
    // then per stream the mask applied to random logits, the best allowed token taken and followed.
    let lines = schema(ORDER_LINES);
    let mut guides: Vec<Guide> = (0..16).map(|_| grammars.guide(&lines).expect("compiles").0).collect();
    let mut rng = StdRng::seed_from_u64(7);
    let (mut masks, mut follow) = (histogram(), histogram());
    let mut logits = vec![0f32; vocab];
    for _ in 0..steps {
        let refs: Vec<&mut Guide> = guides.iter_mut().collect();
        record(&mut masks, prepare_all(refs));
        for g in &mut guides {
            logits.iter_mut().for_each(|l| *l = rng.random::<f32>());
            let t = Instant::now();
            g.mask(&mut logits).expect("a mask");
            let best = (0..vocab)
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                .expect("some token");
            g.commit(best as u32).expect("an allowed token");
            record(&mut follow, t.elapsed());
        }
    }
    report("masks of one step, 16 constrained streams", &masks);
    report("apply a mask and follow the token, per stream", &follow);
}
