//! Continuous-batching decisions, apart from the model so that they can be tested alone: when a waiting
//! request may join the batch, and which tokens of each running sequence go into the next step.
//!
//! Policy:
//! - First come, first served (by priority, then arrival): the head of the queue joins when the batch has
//!   a free sequence slot and the KV pool can give it blocks for its prompt (the engine asks the pool).
//!   The head is never skipped, so a large request is not starved by small ones behind it.
//! - Admission does not reserve `max_tokens`: a sequence takes blocks as it grows. When the pool runs
//!   out, the most recently admitted sequence is preempted ([`victim`]) and recomputed later.
//! - A request whose prompt shares whole blocks with a running sequence that is still computing them
//!   waits for it ([`waits_for_prefix`]), then takes them from the prefix cache instead of computing
//!   them again (the copies of an `n > 1` request, a burst with one system prompt).
//! - Each step, every decoding sequence contributes its one token first (decode latency is what streams
//!   feel), then prefilling sequences take what is left of `max_batch_tokens`, oldest first, as chunks of
//!   what they have not computed. A long prompt is thus spread over several steps and never freezes the
//!   other streams.

use std::ops::Range;

/// The batching limits (the `[engine]` config section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Sequences in the batch at once.
    pub max_seqs: usize,
    /// Tokens in one step (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// KV-cache positions reserved across all running sequences.
    pub kv_budget_tokens: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_seqs: 16,
            // On 2 CPU cores a step of 128 tokens takes ~0.5 s: a prompt chunk stalls the other streams
            // that long. 256 doubled the ITL p99 at 16 streams for no more throughput (see the config).
            max_batch_tokens: 128,
            // 0.75 GB of f16 KV for SmolLM2-135M (23 KB a token), taken as used: room for 16 long
            // sequences and the prefixes of many conversations (vLLM's CPU backend defaults to 4 GiB).
            kv_budget_tokens: 32768,
        }
    }
}

/// What the scheduler knows of a running sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqView {
    /// Its tokens: prompt, and what it has generated.
    pub tokens: usize,
    /// Of those, the ones in its KV cache. One short of `tokens` means decoding (the last sampled token
    /// goes in next); fewer means prefilling (a prompt, or a preempted sequence's recomputation).
    pub computed: usize,
}

impl SeqView {
    fn pending(&self) -> usize {
        self.tokens - self.computed
    }
}

/// Where a request of priority `new` joins a waiting queue whose priorities, front to back, are `queue`:
/// behind every request of the same or a higher priority, ahead of every lower one. The queue stays
/// sorted by priority, and first come, first served within one.
pub fn queue_position(queue: impl Iterator<Item = i32>, new: i32) -> usize {
    let mut at = 0;
    for (i, p) in queue.enumerate() {
        if p >= new {
            at = i + 1;
        }
    }
    at
}

/// Whether the batch has room for one more sequence.
pub fn has_slot(limits: &BatchLimits, running: usize) -> bool {
    running < limits.max_seqs
}

/// The sequence to preempt when the KV pool runs out, given the running sequences' priorities in
/// admission order: the lowest priority, and among those the most recently admitted (vLLM's policy).
pub fn victim(priorities: &[i32]) -> Option<usize> {
    priorities
        .iter()
        .enumerate()
        .min_by_key(|&(i, &p)| (p, std::cmp::Reverse(i)))
        .map(|(i, _)| i)
}

/// Where a preempted sequence of priority `p` goes back into a waiting queue whose priorities, front to
/// back, are `queue`: ahead of every request of its own or a lower priority (it started before them),
/// behind the higher ones.
pub fn preempted_position(queue: impl Iterator<Item = i32>, p: i32) -> usize {
    queue.take_while(|&q| q > p).count()
}

/// Whether a request starting with `tokens` should wait for a running sequence (`others`: each one's
/// tokens and how many are computed) that shares at least one whole block with it and has not computed
/// that block yet. Once computed, the blocks are in the prefix cache and the request takes them.
pub fn waits_for_prefix<'a>(tokens: &[u32], others: impl Iterator<Item = (&'a [u32], usize)>, block: usize) -> bool {
    others.into_iter().any(|(other, computed)| {
        let common = tokens.iter().zip(other).take_while(|(a, b)| a == b).count();
        // The cache never hands out the block with a request's last token.
        let shareable = common.min(tokens.len().saturating_sub(1)) / block * block;
        shareable > 0 && computed < shareable
    })
}

/// The next step: `(index into running, the range of its tokens to run)`, decodes first, then prefill
/// chunks in order.
pub fn plan(limits: &BatchLimits, running: &[SeqView]) -> Vec<(usize, Range<usize>)> {
    let mut steps: Vec<(usize, Range<usize>)> = running
        .iter()
        .enumerate()
        .filter(|(_, s)| s.pending() == 1)
        .map(|(i, s)| (i, s.computed..s.tokens))
        .collect();
    let mut left = limits.max_batch_tokens.saturating_sub(steps.len());
    // Always make progress: with no decode token in the step, the oldest prefill gets at least one token.
    if steps.is_empty() {
        left = left.max(1);
    }
    for (i, s) in running.iter().enumerate() {
        if left == 0 {
            break;
        }
        if s.pending() > 1 {
            let n = s.pending().min(left);
            steps.push((i, s.computed..s.computed + n));
            left -= n;
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_orders_by_priority_then_arrival() {
        // Build a queue by arrival, each (priority, arrival) placed where queue_position says.
        let arrivals = [(0, 'a'), (0, 'b'), (5, 'c'), (-1, 'd'), (5, 'e'), (0, 'f')];
        let mut queue: Vec<(i32, char)> = Vec::new();
        for job in arrivals {
            let at = queue_position(queue.iter().map(|j| j.0), job.0);
            queue.insert(at, job);
        }
        let order: String = queue.iter().map(|j| j.1).collect();
        assert_eq!(order, "ceabfd", "higher first, then first come first served");
        assert_eq!(queue_position(std::iter::empty(), 3), 0);
    }

    /// A sequence of `tokens` with `computed` in its cache.
    fn seq(tokens: usize, computed: usize) -> SeqView {
        SeqView { tokens, computed }
    }

    const LIMITS: BatchLimits = BatchLimits {
        max_seqs: 3,
        max_batch_tokens: 8,
        kv_budget_tokens: 100,
    };

    #[test]
    fn slots_and_the_preemption_victim() {
        assert!(has_slot(&LIMITS, 2));
        assert!(!has_slot(&LIMITS, 3), "no free sequence slot");
        assert_eq!(victim(&[0, 0, 0]), Some(2), "the most recently admitted");
        assert_eq!(victim(&[0, -1, 0, 5]), Some(1), "the lowest priority first");
        assert_eq!(victim(&[]), None);
        assert_eq!(
            preempted_position([5, 0, 0, -1].into_iter(), 0),
            1,
            "behind 5, ahead of its equals"
        );
        assert_eq!(preempted_position([0, 0].into_iter(), 3), 0);
    }

    #[test]
    fn decodes_go_first_and_prefill_is_chunked() {
        // Two decoding sequences and a 20-token prompt: 2 decode tokens + 6 prompt tokens = 8.
        let running = [seq(6, 5), seq(20, 0), seq(4, 3)];
        assert_eq!(plan(&LIMITS, &running), vec![(0, 5..6), (2, 3..4), (1, 0..6)]);
        // The prompt continues where it stopped, and a second prompt waits for the budget.
        let running = [seq(20, 6), seq(4, 0)];
        assert_eq!(plan(&LIMITS, &running), vec![(0, 6..14)]);
        let running = [seq(20, 18), seq(4, 0)];
        assert_eq!(plan(&LIMITS, &running), vec![(0, 18..20), (1, 0..4)]);
        // A preempted sequence recomputes its prompt and generated tokens from what the cache still has.
        let running = [seq(5, 4), seq(30, 16)];
        assert_eq!(plan(&LIMITS, &running), vec![(0, 4..5), (1, 16..23)]);
    }

    #[test]
    fn every_step_makes_progress() {
        let tight = BatchLimits {
            max_batch_tokens: 0,
            ..LIMITS
        };
        assert_eq!(plan(&tight, &[seq(4, 0)]), vec![(0, 0..1)]);
        let decoding = [seq(3, 2), seq(3, 2)];
        let one = BatchLimits {
            max_batch_tokens: 1,
            ..LIMITS
        };
        assert_eq!(
            plan(&one, &decoding).len(),
            2,
            "every decoding sequence advances each step"
        );
        assert!(plan(&LIMITS, &[]).is_empty());
    }

    #[test]
    fn a_request_waits_only_for_whole_blocks_still_being_computed() {
        let a: Vec<u32> = (0..40).collect();
        let mut b = a[..35].to_vec();
        b.extend([900, 901]);
        // b shares 35 tokens with a: two whole blocks of 16.
        assert!(
            waits_for_prefix(&b, [(&a[..], 20)].into_iter(), 16),
            "a has not computed block 2"
        );
        assert!(
            !waits_for_prefix(&b, [(&a[..], 32)].into_iter(), 16),
            "both blocks are cached"
        );
        let c: Vec<u32> = (100..140).collect();
        assert!(
            !waits_for_prefix(&c, [(&a[..], 0)].into_iter(), 16),
            "nothing in common"
        );
        // A copy of a 16-token prompt: its only block holds its last token, which it computes itself.
        assert!(!waits_for_prefix(&a[..16], [(&a[..], 0)].into_iter(), 16));
    }

    #[test]
    fn a_simulated_run_finishes_every_request() {
        // A mock model: each decode step finishes a sequence after `gen` tokens, and a pool of 6 blocks of
        // 4 positions. The schedule admits, prefills, preempts and finishes every request.
        const BLOCK: usize = 4;
        let pool = 6;
        let requests: Vec<(usize, usize)> = vec![(9, 5), (3, 2), (10, 4), (2, 9), (7, 1)];
        let mut waiting: std::collections::VecDeque<(usize, SeqView, usize)> = requests
            .iter()
            .enumerate()
            .map(|(id, &(p, g))| (id, seq(p, 0), g))
            .collect();
        let mut running: Vec<(usize, SeqView, usize)> = Vec::new();
        let mut finished = Vec::new();
        let mut preempted = 0;
        let held = |r: &[(usize, SeqView, usize)]| r.iter().map(|s| s.1.computed.div_ceil(BLOCK)).sum::<usize>();
        for _ in 0..1000 {
            while let Some(&(id, view, g)) = waiting.front() {
                let need = (view.tokens + 1).div_ceil(BLOCK);
                if !has_slot(&LIMITS, running.len()) || held(&running) + need + running.len() > pool {
                    break;
                }
                waiting.pop_front();
                running.push((id, seq(view.tokens, 0), g));
            }
            if running.is_empty() && waiting.is_empty() {
                break;
            }
            // Preempt until the planned tokens fit the pool.
            loop {
                let views: Vec<SeqView> = running.iter().map(|r| r.1).collect();
                let after: usize = plan(&LIMITS, &views)
                    .iter()
                    .map(|(i, r)| r.end.div_ceil(BLOCK) - views[*i].computed.div_ceil(BLOCK))
                    .sum();
                if held(&running) + after <= pool || running.len() == 1 {
                    break;
                }
                let v = running.remove(victim(&vec![0; running.len()]).unwrap());
                preempted += 1;
                waiting.push_front((v.0, seq(v.1.tokens, 0), v.2));
            }
            let views: Vec<SeqView> = running.iter().map(|r| r.1).collect();
            for (i, range) in plan(&LIMITS, &views) {
                let r = &mut running[i];
                r.1.computed = range.end;
                if r.1.computed == r.1.tokens {
                    // Sampled: one more token, or done.
                    r.2 -= 1;
                    r.1.tokens += 1;
                }
            }
            running.retain(|r| {
                let done = r.2 == 0;
                if done {
                    finished.push(r.0);
                }
                !done
            });
        }
        let mut all = finished.clone();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4], "every request finishes: {finished:?}");
        assert!(preempted > 0, "the small pool forced preemptions");
    }
}
