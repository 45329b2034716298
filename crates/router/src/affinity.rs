//! Prefix-aware routing: which worker recently served which prompt prefixes, so that a request goes where
//! its prefix is likely still in the KV cache (SGLang's cache-aware policy, llm-d's prefix scorer).
//!
//! - **Text, not tokens.** The router never tokenizes: a prompt is rendered as its messages' roles and
//!   contents, cut into [`CHUNK_BYTES`]-byte chunks (about one 16-token KV block), and each full chunk is
//!   keyed by a hash chained over every chunk before it. Equal keys mean equal prefixes.
//! - **Approximate and bounded.** The index keeps at most `capacity` keys, dropping the oldest first, and
//!   for each key the last [`WORKERS_PER_KEY`] workers that served it. A worker's cache may have evicted
//!   what the index remembers; the cost of a wrong guess is only a cache miss.
//! - **Load first.** The worker with the longest match takes the request unless its load exceeds the
//!   least loaded worker's by more than the threshold; then, as with no match, the least loaded does.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use ferroserve_core::Input;

/// Bytes of rendered prompt per chunk.
pub const CHUNK_BYTES: usize = 64;
/// Workers remembered per prefix key.
const WORKERS_PER_KEY: usize = 4;

/// How the router picks among a model's workers (`[router] routing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// The worker with the fewest requests in flight from this router.
    LeastLoaded,
    /// The worker that recently served the longest prefix of the prompt, unless it has more than
    /// `max_imbalance` requests in flight beyond the least loaded one.
    PrefixAware {
        /// Requests in flight a prefix match may cost over the least loaded worker.
        max_imbalance: u32,
    },
}

impl Default for Routing {
    fn default() -> Self {
        Routing::PrefixAware { max_imbalance: 4 }
    }
}

/// How a prefix-aware choice went; the `outcome` of the routing metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteOutcome {
    /// Sent to the worker with the longest known prefix.
    Hit,
    /// No worker is known to hold any of the prefix: least loaded.
    Miss,
    /// The matching worker was too loaded: least loaded instead.
    Overloaded,
}

impl RouteOutcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            RouteOutcome::Hit => "hit",
            RouteOutcome::Miss => "miss",
            RouteOutcome::Overloaded => "overloaded",
        }
    }
}

/// The chained keys of a prompt's full chunks, computed once per request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixKeys(Vec<u64>);

impl PrefixKeys {
    /// The keys of `input` as the router sees it: raw text as is; a conversation as each message's role
    /// and content, separated so that no two conversations render alike.
    pub fn of(input: &Input) -> PrefixKeys {
        let mut text = Vec::new();
        match input {
            Input::Prompt(p) => text.extend_from_slice(p.as_bytes()),
            Input::Chat(messages) => {
                for m in messages {
                    text.extend_from_slice(format!("{:?}", m.role).as_bytes());
                    text.push(0);
                    text.extend_from_slice(m.content.as_bytes());
                    text.push(0);
                }
            }
        }
        let mut parent = 0u64;
        PrefixKeys(
            text.chunks_exact(CHUNK_BYTES)
                .map(|chunk| {
                    let mut h = DefaultHasher::new();
                    parent.hash(&mut h);
                    chunk.hash(&mut h);
                    parent = h.finish();
                    parent
                })
                .collect(),
        )
    }

    /// Full chunks.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the prompt is shorter than one chunk.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One prefix key's entry.
#[derive(Debug, Default)]
struct Entry {
    /// Workers (by location, shared between the keys of one recording), most recent last.
    workers: Vec<Arc<str>>,
    /// Times the key is in the recording queue.
    queued: u32,
}

/// Which workers served which prefixes.
#[derive(Debug)]
pub struct PrefixIndex {
    keys: HashMap<u64, Entry>,
    /// Keys in the order they were last recorded, with duplicates; the oldest goes first.
    order: VecDeque<u64>,
    capacity: usize,
}

impl PrefixIndex {
    /// An index of at most `capacity` keys.
    pub fn new(capacity: usize) -> PrefixIndex {
        PrefixIndex {
            keys: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// For each worker that served a prefix of `keys`, the chunks of the longest one.
    pub fn matches(&self, keys: &PrefixKeys) -> HashMap<&str, usize> {
        let mut depth = HashMap::new();
        for (i, key) in keys.0.iter().enumerate() {
            let Some(entry) = self.keys.get(key) else { break };
            for w in &entry.workers {
                depth.insert(&**w, i + 1);
            }
        }
        depth
    }

    /// Records that `worker` now serves `keys`.
    pub fn record(&mut self, keys: &PrefixKeys, worker: &str) {
        let worker: Arc<str> = Arc::from(worker);
        for &key in &keys.0 {
            let entry = self.keys.entry(key).or_default();
            entry.workers.retain(|w| *w != worker);
            entry.workers.push(Arc::clone(&worker));
            if entry.workers.len() > WORKERS_PER_KEY {
                entry.workers.remove(0);
            }
            entry.queued += 1;
            self.order.push_back(key);
        }
        // The queue holds a key once per recording; compact it before it grows far past the bound,
        // keeping each key's latest place.
        if self.order.len() > 4 * self.capacity {
            let mut seen = std::collections::HashSet::new();
            let mut newest_first: Vec<u64> = self.order.drain(..).rev().filter(|k| seen.insert(*k)).collect();
            newest_first.reverse();
            for entry in self.keys.values_mut() {
                entry.queued = 1;
            }
            self.order = newest_first.into();
        }
        while self.keys.len() > self.capacity {
            let Some(old) = self.order.pop_front() else { break };
            // A key recorded again later is still further on in the queue: only its last place evicts it.
            if let Some(entry) = self.keys.get_mut(&old) {
                entry.queued -= 1;
                if entry.queued == 0 {
                    self.keys.remove(&old);
                }
            }
        }
    }

    /// Forgets a worker (it left the pool).
    pub fn forget(&mut self, worker: &str) {
        self.keys.retain(|_, entry| {
            entry.workers.retain(|w| &**w != worker);
            !entry.workers.is_empty()
        });
    }
}

/// A candidate worker: its location and load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// Where it is.
    pub location: &'a str,
    /// Requests in flight there from this router.
    pub load: u32,
}

/// Chooses among `candidates` (non-empty, in tie-break order) for a request with `keys`: the index of
/// the choice, and how prefix matching went (`None` under least-loaded routing).
pub fn choose(
    routing: Routing,
    index: &PrefixIndex,
    keys: &PrefixKeys,
    candidates: &[Candidate<'_>],
) -> (usize, Option<RouteOutcome>) {
    let least = candidates
        .iter()
        .enumerate()
        .min_by_key(|(_, c)| c.load)
        .map_or(0, |(i, _)| i);
    let Routing::PrefixAware { max_imbalance } = routing else {
        return (least, None);
    };
    let matches = index.matches(keys);
    let best = candidates
        .iter()
        .enumerate()
        .filter_map(|(i, c)| matches.get(c.location).map(|&d| (i, d)))
        // Longest match; among equals, the less loaded, then the earlier.
        .max_by_key(|&(i, d)| (d, std::cmp::Reverse(candidates[i].load), std::cmp::Reverse(i)));
    match best {
        None => (least, Some(RouteOutcome::Miss)),
        Some((i, _)) if candidates[i].load > candidates[least].load + max_imbalance => {
            (least, Some(RouteOutcome::Overloaded))
        }
        Some((i, _)) => (i, Some(RouteOutcome::Hit)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> PrefixKeys {
        PrefixKeys::of(&Input::Prompt(s.to_string()))
    }

    fn long(prefix: &str, chunks: usize) -> String {
        let mut s = String::new();
        while s.len() < chunks * CHUNK_BYTES {
            s.push_str(prefix);
        }
        s.truncate(chunks * CHUNK_BYTES);
        s
    }

    const ROUTING: Routing = Routing::PrefixAware { max_imbalance: 2 };

    fn cands<'a>(loads: &[(&'a str, u32)]) -> Vec<Candidate<'a>> {
        loads
            .iter()
            .map(|&(location, load)| Candidate { location, load })
            .collect()
    }

    #[test]
    fn the_longest_match_wins_when_its_load_is_close() {
        let system = long("You are a helpful assistant. ", 6);
        let mut index = PrefixIndex::new(1000);
        index.record(
            &text(&format!("{}{}", &system[..2 * CHUNK_BYTES], long("other", 4))),
            "a",
        );
        index.record(&text(&format!("{system}{}", long("question one? ", 2))), "b");
        let ask = text(&format!("{system}{}", long("question two! ", 2)));
        let c = cands(&[("a", 0), ("b", 1)]);
        assert_eq!(
            choose(ROUTING, &index, &ask, &c),
            (1, Some(RouteOutcome::Hit)),
            "b holds 6 chunks of it, a only 2"
        );
        assert_eq!(index.matches(&ask).get("b"), Some(&6));
        assert_eq!(choose(Routing::LeastLoaded, &index, &ask, &c), (0, None));
    }

    #[test]
    fn a_loaded_match_gives_way_to_the_least_loaded() {
        let prompt = text(&long("shared system prompt ", 5));
        let mut index = PrefixIndex::new(1000);
        index.record(&prompt, "a");
        assert_eq!(
            choose(ROUTING, &index, &prompt, &cands(&[("a", 3), ("b", 1)])),
            (0, Some(RouteOutcome::Hit)),
            "2 over the least loaded is within the threshold"
        );
        assert_eq!(
            choose(ROUTING, &index, &prompt, &cands(&[("a", 4), ("b", 1)])),
            (1, Some(RouteOutcome::Overloaded))
        );
        assert_eq!(
            choose(
                ROUTING,
                &index,
                &text(&long("unrelated ", 5)),
                &cands(&[("a", 1), ("b", 0)])
            ),
            (1, Some(RouteOutcome::Miss))
        );
        // A prompt under one chunk never matches.
        assert_eq!(
            choose(ROUTING, &index, &text("hi"), &cands(&[("a", 0), ("b", 0)])).1,
            Some(RouteOutcome::Miss)
        );
    }

    #[test]
    fn a_different_early_chunk_breaks_the_match_and_roles_count() {
        let mut index = PrefixIndex::new(1000);
        let base = long("abcdefgh", 4);
        index.record(&text(&base), "a");
        let mut changed = base.clone();
        changed.replace_range(0..1, "X");
        assert!(index.matches(&text(&changed)).is_empty());
        let user = |content: &str, role| {
            PrefixKeys::of(&Input::Chat(vec![ferroserve_core::ChatMessage {
                role,
                content: content.into(),
            }]))
        };
        assert_ne!(
            user(&base, ferroserve_core::Role::User),
            user(&base, ferroserve_core::Role::System)
        );
    }

    #[test]
    fn the_index_stays_bounded_and_forgets_workers() {
        let mut index = PrefixIndex::new(50);
        for i in 0..200 {
            index.record(
                &text(&long(&format!("prompt {i} "), 3)),
                if i % 2 == 0 { "a" } else { "b" },
            );
            assert!(index.len() <= 50);
            assert!(index.order.len() <= 4 * 50 + 3);
        }
        let recent = text(&long("prompt 199 ", 3));
        assert_eq!(index.matches(&recent).get("b"), Some(&3), "the newest stay");
        assert!(
            index.matches(&text(&long("prompt 0 ", 3))).is_empty(),
            "the oldest went"
        );
        index.forget("b");
        assert!(index.matches(&recent).is_empty());
    }
}
