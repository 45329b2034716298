//! The KV blocks of one engine, shared between its sequences, and the prefix cache over them.
//!
//! - **A fixed budget.** The pool holds at most `capacity` blocks of [`BLOCK_TOKENS`] positions. A block
//!   is allocated when a sequence needs it and given back when no sequence holds it; storage is
//!   allocated on first use and then reused.
//! - **Prefix caching** (vLLM's automatic prefix caching). A block whose sixteen positions are all
//!   computed is *registered* under a hash chained over every token before it: block `i`'s key is
//!   `hash(key of block i-1, tokens of block i)`. The chain makes a key stand for the whole prefix,
//!   so equal keys mean equal KV. A new sequence walks its prompt block by block and takes every
//!   registered block it finds ([`Blocks::lookup`]); it computes only the rest.
//! - **Reference counts.** A block counts the sequences holding it. At zero a registered block stays
//!   registered but *idle*: reusable by the next sequence with that prefix, and the first to go, least
//!   recently used first, when a new block is needed and none is free. A sequence gives its blocks back
//!   tail first, so that its prompt's first blocks (the ones others share) are evicted last.
//! - **Written once.** A sequence writes only positions past what it holds from the cache, and the
//!   cache hands out only full blocks, ending before the prompt's last token (whose logits the sequence
//!   needs). So a shared block is never written; only a block one sequence holds alone is.
//!
//! A pool is one model version's: sequences of different versions never share one.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};

use half::f16;

use crate::kv::{BLOCK_TOKENS, KvLayout};

/// A block of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(u32);

/// Prefix-caching settings (the `[engine]` config section).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefixCaching {
    /// Whether finished sequences' blocks are kept for reuse.
    pub enabled: bool,
    /// The largest share of the pool that idle cached blocks may hold, 0 to 1. Past it, the least
    /// recently used idle block is freed at once.
    pub max_idle_share: f64,
}

impl Default for PrefixCaching {
    fn default() -> Self {
        PrefixCaching {
            enabled: true,
            max_idle_share: 1.0,
        }
    }
}

/// The pool's blocks by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Blocks the pool may hold.
    pub capacity: usize,
    /// Held by at least one sequence (or charged by a preallocated cache).
    pub in_use: usize,
    /// Registered, held by no sequence: reusable prefixes, evictable.
    pub idle: usize,
}

impl PoolStats {
    /// Blocks a sequence could get now (free, never allocated, or evictable).
    pub fn available(&self) -> usize {
        self.capacity - self.in_use
    }
}

/// What a registered block holds: the key it is registered under, and what the key was made of, so that
/// a lookup never trusts a hash alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    key: u64,
    parent: u64,
    tokens: [u32; BLOCK_TOKENS],
}

/// The key of a block whose tokens are `tokens`, after the prefix whose key is `parent`. The hasher's keys
/// are random per pool, so no client can aim for a collision.
pub(crate) fn chain_key(hasher: &RandomState, parent: u64, tokens: &[u32]) -> u64 {
    let mut h = hasher.build_hasher();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// The key that starts every chain.
pub(crate) const ROOT_KEY: u64 = 0;

/// The pool's state, behind [`KvPool`]'s lock.
pub struct Blocks {
    layout: KvLayout,
    capacity: usize,
    /// Each block's values, allocated on first use.
    storage: Vec<Box<[f16]>>,
    /// Sequences holding each block.
    refs: Vec<u32>,
    /// What each registered block holds.
    entries: Vec<Option<Entry>>,
    /// When each idle block went idle (its key in `idle`).
    stamps: Vec<u64>,
    /// Allocated, unregistered, held by none.
    free: Vec<BlockId>,
    /// Registered blocks by key.
    index: HashMap<u64, BlockId>,
    /// Registered blocks held by none, least recently used first.
    idle: BTreeMap<u64, BlockId>,
    clock: u64,
    /// Blocks with at least one holder.
    held: usize,
    /// Blocks counted for caches preallocated outside the pool (Candle slot caches on other devices).
    charged: usize,
    caching: PrefixCaching,
    /// Keys the chain hash.
    hasher: RandomState,
}

impl Blocks {
    fn at(id: BlockId) -> usize {
        id.0 as usize
    }

    /// The counts by state.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            capacity: self.capacity,
            in_use: self.held + self.charged,
            idle: self.idle.len(),
        }
    }

    /// Sequences holding `id`.
    pub fn refs(&self, id: BlockId) -> u32 {
        self.refs[Self::at(id)]
    }

    /// Takes a block for a sequence: a free one, a new one while under capacity, or the least recently
    /// used idle one (evicting its prefix). `None` when every block is held.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = if let Some(id) = self.free.pop() {
            id
        } else if self.storage.len() + self.charged < self.capacity {
            self.storage.push(Box::default());
            self.refs.push(0);
            self.entries.push(None);
            self.stamps.push(0);
            BlockId((self.storage.len() - 1) as u32)
        } else {
            let (_, id) = self.idle.pop_first()?;
            self.unregister(id);
            id
        };
        self.refs[Self::at(id)] = 1;
        self.held += 1;
        Some(id)
    }

    fn unregister(&mut self, id: BlockId) {
        if let Some(e) = self.entries[Self::at(id)].take() {
            self.index.remove(&e.key);
        }
    }

    /// Gives back one hold on each block, tail first: a block no sequence holds becomes idle if
    /// registered (and caching is on), free otherwise.
    pub fn release(&mut self, ids: &[BlockId]) {
        for &id in ids.iter().rev() {
            let i = Self::at(id);
            assert!(self.refs[i] > 0, "block {i} released more often than taken");
            self.refs[i] -= 1;
            if self.refs[i] > 0 {
                continue;
            }
            self.held -= 1;
            if self.caching.enabled && self.entries[i].is_some() {
                self.clock += 1;
                self.stamps[i] = self.clock;
                self.idle.insert(self.clock, id);
            } else {
                self.unregister(id);
                self.free.push(id);
            }
        }
        let limit = (self.caching.max_idle_share.clamp(0.0, 1.0) * self.capacity as f64) as usize;
        while self.idle.len() > limit {
            let (_, id) = self.idle.pop_first().expect("over the limit, so not empty");
            self.unregister(id);
            self.free.push(id);
        }
    }

    /// The longest run of registered blocks that starts `tokens`, each taken (its count raised), and the
    /// key after the last. It stops before the block holding the last token, which its sequence must
    /// compute to get logits.
    pub fn lookup(&mut self, tokens: &[u32]) -> (Vec<BlockId>, u64) {
        let mut taken = Vec::new();
        let mut parent = ROOT_KEY;
        if !self.caching.enabled || tokens.is_empty() {
            return (taken, parent);
        }
        for block in tokens[..tokens.len() - 1].chunks_exact(BLOCK_TOKENS) {
            let key = chain_key(&self.hasher, parent, block);
            let Some(&id) = self.index.get(&key) else { break };
            let i = Self::at(id);
            match &self.entries[i] {
                Some(e) if e.parent == parent && e.tokens[..] == *block => {}
                _ => break,
            }
            if self.refs[i] == 0 {
                self.idle.remove(&self.stamps[i]);
                self.held += 1;
            }
            self.refs[i] += 1;
            taken.push(id);
            parent = key;
        }
        (taken, parent)
    }

    /// Registers `id`, now holding `tokens` after the prefix keyed `parent`; returns its key. A block whose
    /// key another block already has stays unregistered (two sequences computed the same prefix at once).
    pub fn register(&mut self, id: BlockId, parent: u64, tokens: &[u32]) -> u64 {
        let key = chain_key(&self.hasher, parent, tokens);
        if self.caching.enabled && !self.index.contains_key(&key) {
            let mut t = [0u32; BLOCK_TOKENS];
            t.copy_from_slice(tokens);
            self.index.insert(key, id);
            self.entries[Self::at(id)] = Some(Entry { key, parent, tokens: t });
        }
        key
    }

    /// Counts `n` blocks as held by a cache whose storage lives elsewhere (Candle slot caches, on a path
    /// that never allocates the pool's own blocks); false (nothing counted) when they do not fit.
    pub fn charge(&mut self, n: usize) -> bool {
        if self.storage.len() + self.charged + n > self.capacity {
            return false;
        }
        self.charged += n;
        true
    }

    /// Gives back `n` charged blocks.
    pub fn uncharge(&mut self, n: usize) {
        self.charged -= n;
    }

    /// One block's values, `[layer][k|v][kv_head][position][head_dim]`.
    pub fn block(&self, id: BlockId) -> &[f16] {
        &self.storage[Self::at(id)]
    }

    /// One block's values, for writing. Only a block a single sequence holds is written.
    pub fn block_mut(&mut self, id: BlockId) -> &mut [f16] {
        let i = Self::at(id);
        // Checked in release builds too: a write to a shared block would corrupt another sequence.
        assert_eq!(self.refs[i], 1, "a shared block is never written");
        let len = self.layout.block_len();
        let data = &mut self.storage[i];
        if data.is_empty() {
            *data = vec![f16::ZERO; len].into_boxed_slice();
        }
        data
    }

    /// Whether finished sequences' blocks are kept for reuse.
    pub fn caching(&self) -> bool {
        self.caching.enabled
    }

    /// Where values sit in a block.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }
}

/// One engine's KV pool: a cheap handle, shared by the caches that hold its blocks.
#[derive(Clone)]
pub struct KvPool(Arc<Mutex<Blocks>>);

impl KvPool {
    /// A pool of `capacity` blocks laid out as `layout`.
    pub fn new(layout: KvLayout, capacity: usize, caching: PrefixCaching) -> KvPool {
        KvPool(Arc::new(Mutex::new(Blocks {
            layout,
            capacity,
            storage: Vec::new(),
            refs: Vec::new(),
            entries: Vec::new(),
            stamps: Vec::new(),
            free: Vec::new(),
            index: HashMap::new(),
            idle: BTreeMap::new(),
            clock: 0,
            held: 0,
            charged: 0,
            caching,
            hasher: RandomState::new(),
        })))
    }

    /// The pool's state. A panic while it was held (a failed step) leaves the counts as they were.
    pub fn lock(&self) -> MutexGuard<'_, Blocks> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counts by state.
    pub fn stats(&self) -> PoolStats {
        self.lock().stats()
    }

    /// Whether two handles are the same pool.
    pub fn same(&self, other: &KvPool) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Blocks that positions `..end` need.
pub fn blocks_for(end: usize) -> usize {
    end.div_ceil(BLOCK_TOKENS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYOUT: KvLayout = KvLayout {
        layers: 1,
        kv_heads: 1,
        head_dim: 2,
    };

    fn pool(capacity: usize) -> KvPool {
        KvPool::new(LAYOUT, capacity, PrefixCaching::default())
    }

    fn pool_with(capacity: usize, enabled: bool, max_idle_share: f64) -> KvPool {
        KvPool::new(
            LAYOUT,
            capacity,
            PrefixCaching {
                enabled,
                max_idle_share,
            },
        )
    }

    /// A sequence's blocks for `tokens`, registered as a finished sequence's are.
    fn fill(b: &mut Blocks, tokens: &[u32]) -> Vec<BlockId> {
        let (mut ids, mut parent) = b.lookup(tokens);
        for block in tokens.chunks(BLOCK_TOKENS).skip(ids.len()) {
            let id = b.allocate().expect("room");
            if block.len() == BLOCK_TOKENS {
                parent = b.register(id, parent, block);
            }
            ids.push(id);
        }
        ids
    }

    fn prompt(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn a_finished_prefix_is_found_again_and_counts_return_to_zero() {
        let p = pool(8);
        let mut b = p.lock();
        let first = fill(&mut b, &prompt(40, 0));
        assert_eq!(first.len(), 3);
        b.release(&first);
        assert_eq!(
            b.stats(),
            PoolStats {
                capacity: 8,
                in_use: 0,
                idle: 2
            },
            "two full blocks stay cached"
        );
        // Same 32-token prefix, different tail: both full blocks are reused.
        let mut other = prompt(32, 0);
        other.extend([999, 998, 997]);
        let (hit, _) = b.lookup(&other);
        assert_eq!(hit, first[..2].to_vec());
        assert!(hit.iter().all(|&id| b.refs(id) == 1));
        b.release(&hit);
        assert!(first.iter().all(|&id| b.refs(id) == 0));
        // A prompt that is exactly the two blocks keeps its last block to compute.
        assert_eq!(b.lookup(&prompt(32, 0)).0.len(), 1);
    }

    #[test]
    fn a_different_earlier_token_breaks_the_chain() {
        let p = pool(8);
        let mut b = p.lock();
        let ids = fill(&mut b, &prompt(33, 0));
        b.release(&ids);
        let mut changed = prompt(33, 0);
        changed[3] += 1;
        assert!(
            b.lookup(&changed).0.is_empty(),
            "block 1 matches, but its prefix does not"
        );
    }

    #[test]
    fn idle_blocks_are_evicted_least_recently_used_and_tail_first() {
        let p = pool(4);
        let mut b = p.lock();
        let a = fill(&mut b, &prompt(33, 0)); // 2 full blocks + a partial
        b.release(&a);
        let c = fill(&mut b, &prompt(17, 100)); // 1 full + 1 partial
        b.release(&c);
        assert_eq!(b.stats().idle, 3);
        // The free block (c's partial) goes first, then the idle ones, oldest first: a's tail block (a[1])
        // before its head (a[0]).
        let held = b.allocate().unwrap();
        assert_eq!(b.stats().idle, 3, "free blocks go before idle ones");
        let next = b.allocate().unwrap();
        assert_eq!(next, a[1], "the tail of the oldest idle prefix goes first");
        assert_eq!(b.lookup(&prompt(33, 0)).0, vec![a[0]], "its head is still cached");
        b.release(&[a[0]]);
        assert!(b.allocate().is_some());
        assert!(b.allocate().is_some());
        assert!(b.allocate().is_none(), "every block is held");
        assert_eq!(b.refs(held), 1);
    }

    #[test]
    fn shared_blocks_stay_while_any_holder_remains() {
        let p = pool(6);
        let mut b = p.lock();
        let a = fill(&mut b, &prompt(40, 0));
        let c = fill(&mut b, &prompt(40, 0));
        assert_eq!(a[..2], c[..2], "the second copy shares the first two blocks");
        assert_ne!(a[2], c[2], "and has its own partial block");
        assert_eq!(b.refs(a[0]), 2);
        b.release(&a);
        assert_eq!(b.refs(a[0]), 1);
        assert_eq!(b.stats().in_use, 3);
        // Pressure cannot take a block someone holds.
        while b.allocate().is_some() {}
        assert_eq!(b.lookup(&prompt(40, 0)).0, c[..2].to_vec());
    }

    #[test]
    fn the_idle_share_bounds_what_stays_cached() {
        let p = pool_with(10, true, 0.2);
        let mut b = p.lock();
        let a = fill(&mut b, &prompt(64, 0));
        b.release(&a);
        assert_eq!(b.stats().idle, 2, "at most 20% of 10 blocks idle");
        assert_eq!(b.lookup(&prompt(64, 0)).0.len(), 2, "the head blocks are the ones kept");
    }

    #[test]
    fn with_caching_off_nothing_is_found() {
        let p = pool_with(4, false, 1.0);
        let mut b = p.lock();
        let a = fill(&mut b, &prompt(33, 0));
        b.release(&a);
        assert_eq!(b.stats().idle, 0);
        assert!(b.lookup(&prompt(33, 0)).0.is_empty());
    }

    #[test]
    fn charges_count_against_the_capacity() {
        let p = pool(4);
        let mut b = p.lock();
        assert!(b.charge(3));
        assert!(!b.charge(2));
        assert_eq!(b.stats().available(), 1);
        b.uncharge(3);
        assert_eq!(b.stats().available(), 4);
    }
}
