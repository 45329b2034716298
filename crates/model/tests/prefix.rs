//! Prefix caching in the KV pool, on the real SmolLM2 GGUF: a sequence that starts from cached blocks gets
//! the logits it would get computing everything, shared blocks survive pressure, and every block is given
//! back.

mod support;

use ferroserve_model::batched::{Chunk, SeqCache, argmax};
use ferroserve_model::kv::BLOCK_TOKENS;
use ferroserve_model::pool::{KvPool, PrefixCaching};
use support::fixture;

const SYSTEM: &str = "You are a careful assistant for a library. You answer questions about opening hours, \
    loans, renewals and fines, briefly and politely, and you never invent a policy you were not told.";

fn tokens(text: &str) -> Vec<u32> {
    fixture().tokenizer.encode(text).expect("encodes")
}

/// Runs `prompt` from wherever `cache` starts, then `steps` greedy tokens: the logits after the prompt
/// and after each generated token.
fn run(cache: &mut SeqCache, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let m = &fixture().model;
    let start = cache.len();
    let mut out = m
        .forward(&mut [Chunk {
            cache,
            tokens: &prompt[start..],
        }])
        .unwrap();
    for _ in 0..steps {
        let next = argmax(out.last().unwrap()) as u32;
        out.extend(m.forward(&mut [Chunk { cache, tokens: &[next] }]).unwrap());
    }
    out
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn pool(blocks: usize) -> KvPool {
    fixture().model.kv_pool(blocks, PrefixCaching::default())
}

fn cache(pool: &KvPool, prompt: &[u32]) -> SeqCache {
    fixture()
        .model
        .cache_for(pool, prompt, 512, 0)
        .unwrap()
        .expect("the pool has room")
}

#[test]
fn a_cached_prefix_gives_the_logits_and_text_of_computing_it() {
    let prompt = tokens(&format!(
        "{SYSTEM}\nQuestion: when does the library open on Sunday?\nAnswer:"
    ));
    assert!(prompt.len() > 3 * BLOCK_TOKENS, "{} tokens", prompt.len());
    // Reference: no caching at all.
    let mut plain = fixture().model.new_cache(512).unwrap();
    let want = run(&mut plain, &prompt, 6);

    let pool = pool(64);
    let mut first = cache(&pool, &prompt);
    assert_eq!(first.cached_tokens(), 0, "nothing cached yet");
    let got = run(&mut first, &prompt, 6);
    drop(first);
    let mut second = cache(&pool, &prompt);
    let full = (prompt.len() - 1) / BLOCK_TOKENS * BLOCK_TOKENS;
    assert_eq!(
        second.cached_tokens(),
        full,
        "every full block before the last token is reused"
    );
    let again = run(&mut second, &prompt, 6);
    for (step, ((w, g), a)) in want.iter().zip(&got).zip(&again).enumerate() {
        assert!(max_abs_diff(w, g) <= 1e-4, "step {step}: {}", max_abs_diff(w, g));
        assert!(
            max_abs_diff(w, a) <= 1e-4,
            "step {step} from the cache: {}",
            max_abs_diff(w, a)
        );
    }
    let greedy = |l: &[Vec<f32>]| l.iter().map(|x| argmax(x)).collect::<Vec<_>>();
    assert_eq!(greedy(&want), greedy(&again), "the same greedy text");

    // The next turn resends the whole conversation: the first turn's blocks, generated tokens included,
    // are found again.
    let mut turn = prompt.clone();
    turn.extend(greedy(&again)[..6].iter().map(|&t| t as u32));
    turn.extend(tokens("\nQuestion: and on Monday?\nAnswer:"));
    drop(second);
    let third = cache(&pool, &turn);
    assert!(
        third.cached_tokens() >= (prompt.len() + 6) / BLOCK_TOKENS * BLOCK_TOKENS,
        "{} of {} tokens cached",
        third.cached_tokens(),
        turn.len()
    );
    drop(third);
    let stats = pool.stats();
    assert_eq!(stats.in_use, 0, "every block is given back: {stats:?}");
    assert!(stats.idle > 0);
}

#[test]
fn eviction_under_pressure_never_touches_a_running_sequence() {
    let prompt = tokens(&format!("{SYSTEM}\nQuestion: how long is a loan?\nAnswer:"));
    let mut plain = fixture().model.new_cache(512).unwrap();
    let want = run(&mut plain, &prompt, 8);

    // Just enough blocks for the running sequence and a little more.
    let blocks = (prompt.len() + 8).div_ceil(BLOCK_TOKENS) + 3;
    let pool = pool(blocks);
    let mut warm = cache(&pool, &prompt);
    run(&mut warm, &prompt, 0);
    drop(warm);
    // The running sequence shares the cached prompt blocks, and computes its tail.
    let mut running = cache(&pool, &prompt);
    assert!(running.cached_tokens() > 0);
    let mut got = run(&mut running, &prompt, 0);
    // Other prompts churn through every block nobody holds, evicting all idle ones, between the running
    // sequence's decode steps.
    for step in 0..8 {
        let other = tokens(&format!(
            "Unrelated text number {step} about rivers, mountains and the sea."
        ));
        let mut c = fixture()
            .model
            .cache_for(&pool, &other, 64, 0)
            .unwrap()
            .expect("room for one more");
        run(&mut c, &other, 0);
        assert!(
            running.block_ids().iter().all(|&id| pool.lock().refs(id) >= 1),
            "a running sequence's blocks stay held"
        );
        drop(c);
        let next = argmax(got.last().unwrap()) as u32;
        got.extend(
            fixture()
                .model
                .forward(&mut [Chunk {
                    cache: &mut running,
                    tokens: &[next],
                }])
                .unwrap(),
        );
    }
    for (step, (w, g)) in want.iter().zip(&got).enumerate() {
        assert!(max_abs_diff(w, g) <= 1e-4, "step {step}: {}", max_abs_diff(w, g));
    }
    drop(running);
    assert_eq!(pool.stats().in_use, 0, "every block is given back");
    // A pool too full for a request says so instead of failing mid-run.
    let held: Vec<SeqCache> = (0..blocks)
        .map_while(|i| {
            fixture()
                .model
                .cache_for(&pool, &tokens(&format!("filler {i}")), 32, 0)
                .unwrap()
        })
        .collect();
    assert!(fixture().model.cache_for(&pool, &prompt, 512, 0).unwrap().is_none());
    drop(held);
}
