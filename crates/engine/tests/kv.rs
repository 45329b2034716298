//! The engine's KV pool with the real SmolLM2 GGUF: prefix caching gives the same text and reports the
//! cached tokens, copies of one prompt share its blocks, a small pool preempts without changing a seeded
//! stream, and every block comes back.

mod support;

use std::time::SystemTime;

use ferroserve_core::{Backend, ChatMessage, Completion, Event, Input, Role, Sampling, ValidRequest};
use ferroserve_engine::{BatchLimits, EngineConfig, EngineHandle, PrefixCaching};
use ferroserve_model::LoadedModel;
use futures::StreamExt;
use support::{spec, weights};

fn engine(kv_budget_tokens: usize, caching: bool) -> EngineHandle {
    let model = LoadedModel::load_sharing(&spec(), Some(weights())).expect("model loads");
    EngineHandle::start(
        model,
        EngineConfig {
            batch: BatchLimits {
                kv_budget_tokens,
                ..BatchLimits::default()
            },
            prefix_caching: PrefixCaching {
                enabled: caching,
                max_idle_share: 1.0,
            },
            ..EngineConfig::default()
        },
    )
}

const SYSTEM: &str = "You are the help desk of a small public library. You answer questions about opening \
    hours, loans, renewals, fines, the reading room and events, briefly and politely. You never invent a \
    policy. Opening hours: Monday to Friday 9 to 18, Saturday 10 to 14, closed on Sunday.";

fn request(id: &str, question: &str, max_tokens: u32, sampling: Sampling) -> ValidRequest {
    ValidRequest {
        request_id: id.into(),
        input: Input::Chat(vec![
            ChatMessage {
                role: Role::System,
                content: SYSTEM.into(),
            },
            ChatMessage {
                role: Role::User,
                content: question.into(),
            },
        ]),
        max_tokens,
        sampling,
        stop: Vec::new(),
        arrived: SystemTime::now(),
        priority: 0,
        continuation: Vec::new(),
        top_logprobs: None,
        constraint: None,
    }
}

fn seeded(seed: u64) -> Sampling {
    Sampling {
        temperature: 0.9,
        seed,
        ignore_eos: true,
        ..Sampling::GREEDY
    }
}

/// Runs `requests` at once; each one's token ids and completion, in order.
async fn run_all(engine: &EngineHandle, requests: Vec<ValidRequest>) -> Vec<(Vec<u32>, Completion)> {
    let mut streams = Vec::new();
    for r in requests {
        streams.push(engine.generate(r).await.expect("accepted"));
    }
    let collect = streams.into_iter().map(|mut s| async move {
        let mut ids = Vec::new();
        while let Some(event) = s.next().await {
            match event.expect("no error") {
                Event::Token(t) => ids.extend(t.token_ids),
                Event::Complete(c) => return (ids, c),
            }
        }
        panic!("the stream ended without a completion");
    });
    futures::future::join_all(collect).await
}

/// Waits until the engine holds no request, then returns its KV report.
async fn idle(engine: &EngineHandle) -> ferroserve_engine::KvReport {
    let mut stats = engine.watch_stats();
    while let Some(s) = stats.next().await {
        if s.running == 0 && s.waiting == 0 {
            break;
        }
    }
    engine.kv()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_prompt_comes_from_the_cache_with_the_same_text() {
    let cached = engine(8192, true);
    let plain = engine(8192, false);
    let ask = |id: &str| request(id, "When are you open on Saturday?", 12, Sampling::GREEDY);
    let first = run_all(&cached, vec![ask("a")]).await.remove(0);
    assert_eq!(first.1.usage.cached_tokens, 0, "nothing was cached yet");
    let second = run_all(&cached, vec![ask("b")]).await.remove(0);
    let prompt = second.1.usage.prompt_tokens;
    assert_eq!(
        second.1.usage.cached_tokens,
        (prompt - 1) / 16 * 16,
        "every full block before the last prompt token is reused"
    );
    let reference = run_all(&plain, vec![ask("c")]).await.remove(0);
    assert_eq!(reference.1.usage.cached_tokens, 0, "caching off caches nothing");
    assert_eq!(first.0, reference.0, "the same greedy text with caching on");
    assert_eq!(second.0, reference.0, "and from the cache");
    let kv = idle(&cached).await;
    assert_eq!(kv.blocks.in_use, 0, "every block is back: {kv:?}");
    assert!(kv.blocks.idle > 0, "and the prompt's blocks stay cached");
    assert_eq!(idle(&plain).await.blocks.idle, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_one_prompt_share_its_blocks() {
    let e = engine(8192, true);
    let copies: Vec<ValidRequest> = (0..3)
        .map(|i| request(&format!("copy-{i}"), "Can I renew a loan online?", 4, seeded(i)))
        .collect();
    let done = run_all(&e, copies).await;
    let prompt = done[0].1.usage.prompt_tokens;
    let cached: Vec<u32> = done.iter().map(|d| d.1.usage.cached_tokens).collect();
    assert_eq!(cached[0], 0, "the first copy computes the prompt");
    assert!(
        cached[1..].iter().all(|&c| c == (prompt - 1) / 16 * 16),
        "the others wait for it and take its blocks: {cached:?} of {prompt}"
    );
    assert_eq!(idle(&e).await.blocks.in_use, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_pool_preempts_and_seeded_streams_stay_exact() {
    // Four requests of ~100 prompt tokens and 90 generated: about 48 blocks together, in a pool of 24.
    let ask = |i: u64| {
        request(
            &format!("r{i}"),
            &format!("Question {i}: tell me about fines."),
            90,
            seeded(i),
        )
    };
    let roomy = engine(8192, true);
    let want = run_all(&roomy, (0..4).map(ask).collect()).await;
    let tight = engine(384, true);
    let got = run_all(&tight, (0..4).map(ask).collect()).await;
    let kv = idle(&tight).await;
    assert!(kv.preemptions > 0, "the small pool preempted: {kv:?}");
    assert_eq!(idle(&roomy).await.preemptions, 0);
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w.0, g.0, "request {i}: the same tokens after preemption");
        assert_eq!(g.1.usage.completion_tokens, 90);
    }
    assert_eq!(kv.blocks.in_use, 0, "every block is back after preemptions: {kv:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_gives_its_blocks_back() {
    let e = engine(8192, true);
    let mut stream = e
        .generate(request("gone", "Tell me a long story.", 200, seeded(7)))
        .await
        .expect("accepted");
    // Wait for the first token, then leave.
    while let Some(ev) = stream.next().await {
        if matches!(ev.expect("no error"), Event::Token(_)) {
            break;
        }
    }
    drop(stream);
    let kv = idle(&e).await;
    assert_eq!(kv.blocks.in_use, 0, "cancelled: {kv:?}");
    assert!(kv.blocks.idle > 0, "its full prompt blocks stay cached");
}
