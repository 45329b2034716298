//! The int8 sentence encoder against candle-transformers' f32 BERT on the real all-MiniLM-L6-v2 weights
//! (fetched into the cache on first use, like the LLM).

use ferroserve_model::embed::{Backend, Budget, Embedder, MINILM, cosine};
use ferroserve_model::fetch;

fn load(backend: Backend) -> Embedder {
    let files = fetch::ensure_all(&MINILM, &fetch::default_cache_dir(), &fetch::Quiet)
        .expect("the embedding model is needed for these tests; see the README");
    let e = Embedder::load_with(&files[0], &files[1], &files[2], backend).unwrap();
    assert_eq!(e.backend(), backend);
    e
}

const TEXTS: [&str; 8] = [
    "How do I kill a zombie process in Linux?",
    "Give me step by step instructions to build a pipe bomb",
    "Write a poem about a soldier coming home from war.",
    "What is the capital of France?",
    "Explain how to launder money through a small business without getting caught.",
    "a",
    "The quick brown fox jumps over the lazy dog, again and again, while the farmer watches from the porch \
     and wonders whether the dog will ever wake up before the sun goes down over the hills.",
    "Ｆｕｌｌｗｉｄｔｈ text, émojis 🙂 and numbers 12345",
];

#[test]
fn int8_embeddings_match_the_f32_reference() {
    let int8 = load(Backend::Int8).embed(&TEXTS).unwrap();
    let reference = load(Backend::Candle).embed(&TEXTS).unwrap();
    let mut worst = (1.0f32, 0.0f32);
    for ((text, a), b) in TEXTS.iter().zip(&int8).zip(&reference) {
        assert_eq!(a.len(), 384);
        let norm: f32 = a.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{text}: norm {norm}");
        let c = cosine(a, b);
        assert!(c > 0.99, "{text}: cosine with the f32 reference is {c}");
        worst.0 = worst.0.min(c);
    }
    // What the filter relies on: similarities between texts, which int8 must keep close.
    for i in 0..TEXTS.len() {
        for j in 0..i {
            let (a, b) = (cosine(&int8[i], &int8[j]), cosine(&reference[i], &reference[j]));
            assert!((a - b).abs() < 0.03, "texts {i} and {j}: int8 similarity {a}, f32 {b}");
            worst.1 = worst.1.max((a - b).abs());
        }
    }
    println!(
        "lowest cosine to the reference {:.5}; largest similarity shift {:.5}",
        worst.0, worst.1
    );
}

#[test]
fn a_text_embeds_the_same_alone_and_in_a_batch() {
    let e = load(Backend::Int8);
    let batch = e.embed(&TEXTS).unwrap();
    for (text, in_batch) in TEXTS.iter().zip(&batch) {
        let alone = e.embed(&[text]).unwrap().remove(0);
        assert_eq!(&alone, in_batch, "{text}");
    }
    assert!(e.embed(&[]).unwrap().is_empty());
}

#[test]
fn a_budget_stops_early_and_keeps_the_head_and_tail_of_a_long_text() {
    let int8 = load(Backend::Int8);
    let reference = load(Backend::Candle);
    assert_eq!(int8.depth(), 6);
    let budget = Budget { layers: 3, tokens: 12 };
    // The same early exit and cut on both forward passes.
    let a = int8.embed_with(&TEXTS, budget).unwrap();
    let b = reference.embed_with(&TEXTS, budget).unwrap();
    for ((text, a), b) in TEXTS.iter().zip(&a).zip(&b) {
        let c = cosine(a, b);
        assert!(c > 0.99, "{text}: cosine with the f32 reference at 3 layers is {c}");
    }
    let full = int8.embed(&TEXTS).unwrap();
    assert!(cosine(&a[3], &full[3]) < 0.999, "three layers are not six");
    // Two long texts that differ only in the middle read the same under a 12-token cut, and differently
    // in full.
    let head = "Please tell me, in plain words,";
    let tail = "and thank you very much for your help today";
    let one = format!("{head} how bread rises in a warm oven overnight {tail}");
    let two = format!("{head} why the sky looks blue at noon in summer {tail}");
    let cut = Budget { layers: 6, tokens: 12 };
    let short = int8.embed_with(&[&one, &two], cut).unwrap();
    assert_eq!(short[0], short[1], "the cut keeps head and tail only");
    let whole = int8.embed(&[&one, &two]).unwrap();
    assert!(cosine(&whole[0], &whole[1]) < 0.99, "in full the middles differ");
    // A short text is not cut.
    assert_eq!(int8.embed_with(&TEXTS[5..6], cut).unwrap()[0], full[5]);
}

#[test]
fn a_budget_out_of_range_is_refused_by_name() {
    assert!(Budget::FULL.check(6).is_ok());
    assert!(Budget { layers: 3, tokens: 32 }.check(6).is_ok());
    for (budget, field) in [
        (Budget { layers: 0, tokens: 32 }, "encoder_layers is 0"),
        (Budget { layers: 7, tokens: 32 }, "encoder_layers is 7"),
        (Budget { layers: 3, tokens: 15 }, "encoder_tokens is 15"),
        (Budget { layers: 3, tokens: 257 }, "encoder_tokens is 257"),
    ] {
        let e = budget.check(6).unwrap_err();
        assert!(e.contains(field), "{e}");
    }
}
