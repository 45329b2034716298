//! Continuous-batching decisions, apart from the model so that they can be tested alone: which waiting
//! requests join the batch, and which tokens of each running sequence go into the next step.
//!
//! Policy:
//! - First come, first served: a waiting request joins when the batch has a free sequence slot and its
//!   KV reservation (prompt + max_tokens) fits the budget. The head of the queue is never skipped, so a
//!   large request is not starved by small ones behind it. A request larger than the whole budget runs
//!   when the batch is empty.
//! - Each step, every decoding sequence contributes its one token first (decode latency is what streams
//!   feel), then prefilling sequences take what is left of `max_batch_tokens`, oldest first, as chunks of
//!   their prompts. A long prompt is thus spread over several steps and never freezes the other streams.

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
            kv_budget_tokens: 8192,
        }
    }
}

/// What the scheduler knows of a running sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqView {
    /// Prompt tokens.
    pub prompt: usize,
    /// Prompt tokens already in the KV cache.
    pub prefilled: usize,
    /// KV positions reserved for it (prompt + max_tokens).
    pub reserved: usize,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// Its last sampled token.
    Decode,
    /// These prompt tokens.
    Prefill(Range<usize>),
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

/// Whether a request reserving `need` positions may join `running`.
pub fn admits(limits: &BatchLimits, running: &[SeqView], need: usize) -> bool {
    if running.is_empty() {
        return true;
    }
    let used: usize = running.iter().map(|s| s.reserved).sum();
    running.len() < limits.max_seqs && used + need <= limits.kv_budget_tokens
}

/// The next step: `(index into running, what it runs)`, decodes first, then prefill chunks in order.
pub fn plan(limits: &BatchLimits, running: &[SeqView]) -> Vec<(usize, Take)> {
    let mut steps: Vec<(usize, Take)> = running
        .iter()
        .enumerate()
        .filter(|(_, s)| s.prefilled == s.prompt)
        .map(|(i, _)| (i, Take::Decode))
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
        if s.prefilled < s.prompt {
            let n = (s.prompt - s.prefilled).min(left);
            steps.push((i, Take::Prefill(s.prefilled..s.prefilled + n)));
            left -= n;
        }
    }
    steps
}

/// KV positions reserved by `running`, as a fraction of the budget (the `kv_usage` gauge).
pub fn kv_usage(limits: &BatchLimits, running: &[SeqView]) -> f64 {
    running.iter().map(|s| s.reserved).sum::<usize>() as f64 / limits.kv_budget_tokens.max(1) as f64
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

    fn seq(prompt: usize, prefilled: usize, reserved: usize) -> SeqView {
        SeqView {
            prompt,
            prefilled,
            reserved,
        }
    }

    const LIMITS: BatchLimits = BatchLimits {
        max_seqs: 3,
        max_batch_tokens: 8,
        kv_budget_tokens: 100,
    };

    #[test]
    fn admission_respects_slots_and_the_kv_budget() {
        assert!(
            admits(&LIMITS, &[], 500),
            "an empty batch takes even an oversized request"
        );
        assert!(admits(&LIMITS, &[seq(10, 10, 40)], 60));
        assert!(!admits(&LIMITS, &[seq(10, 10, 40)], 61), "over the KV budget");
        let full = [seq(1, 1, 1), seq(1, 1, 1), seq(1, 1, 1)];
        assert!(!admits(&LIMITS, &full, 1), "no free sequence slot");
    }

    #[test]
    fn decodes_go_first_and_prefill_is_chunked() {
        // Two decoding sequences and a 20-token prompt: 2 decode tokens + 6 prompt tokens = 8.
        let running = [seq(5, 5, 20), seq(20, 0, 40), seq(3, 3, 10)];
        assert_eq!(
            plan(&LIMITS, &running),
            vec![(0, Take::Decode), (2, Take::Decode), (1, Take::Prefill(0..6))]
        );
        // The prompt continues where it stopped, and a second prompt waits for the budget.
        let running = [seq(20, 6, 40), seq(4, 0, 10)];
        assert_eq!(plan(&LIMITS, &running), vec![(0, Take::Prefill(6..14))]);
        let running = [seq(20, 18, 40), seq(4, 0, 10)];
        assert_eq!(
            plan(&LIMITS, &running),
            vec![(0, Take::Prefill(18..20)), (1, Take::Prefill(0..4))]
        );
    }

    #[test]
    fn every_step_makes_progress() {
        let tight = BatchLimits {
            max_batch_tokens: 0,
            ..LIMITS
        };
        assert_eq!(plan(&tight, &[seq(4, 0, 8)]), vec![(0, Take::Prefill(0..1))]);
        let decoding = [seq(2, 2, 8), seq(2, 2, 8)];
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
    fn a_simulated_run_finishes_every_request_in_order_of_arrival() {
        // A mock model: each decode step finishes a sequence after `gen` tokens. The schedule must
        // admit, prefill and finish all requests without exceeding any limit.
        let requests: Vec<(usize, usize)> = vec![(30, 5), (3, 2), (50, 4), (2, 9), (7, 1)];
        let mut waiting: std::collections::VecDeque<_> = requests.iter().copied().enumerate().collect();
        let mut running: Vec<(usize, SeqView, usize)> = Vec::new();
        let mut finished = Vec::new();
        for _ in 0..1000 {
            while let Some(&(id, (p, g))) = waiting.front() {
                let views: Vec<SeqView> = running.iter().map(|r| r.1).collect();
                if !admits(&LIMITS, &views, p + g) {
                    break;
                }
                waiting.pop_front();
                running.push((id, seq(p, 0, p + g), g));
            }
            if running.is_empty() && waiting.is_empty() {
                break;
            }
            let views: Vec<SeqView> = running.iter().map(|r| r.1).collect();
            assert!(views.iter().map(|v| v.reserved).sum::<usize>() <= LIMITS.kv_budget_tokens || views.len() == 1);
            let steps = plan(&LIMITS, &views);
            let tokens: usize = steps
                .iter()
                .map(|(_, t)| match t {
                    Take::Decode => 1,
                    Take::Prefill(r) => r.len(),
                })
                .sum();
            assert!(tokens <= LIMITS.max_batch_tokens.max(views.len()));
            for (i, take) in steps {
                let r = &mut running[i];
                match take {
                    Take::Prefill(range) => r.1.prefilled = range.end,
                    Take::Decode => r.2 -= 1,
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
    }
}
