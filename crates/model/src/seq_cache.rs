//! One sequence's KV cache: its block table in the engine's pool (or, on other devices, Candle slot
//! tensors), how far it is filled, and the prefix key of its full blocks, which it registers in the pool's
//! prefix cache as they fill.

use candle_core::Tensor;

use crate::kv::BLOCK_TOKENS;
use crate::pool::{BlockId, Blocks, KvPool, blocks_for};

/// One sequence's KV cache, filled up to `len`, never beyond `capacity`. Dropping it gives its blocks
/// back to the pool, where its full blocks stay cached for the next sequence with the same prefix.
pub struct SeqCache {
    /// Where its blocks come from and go back to.
    pub(crate) pool: KvPool,
    /// Where the keys and values are.
    pub(crate) store: Store,
    /// Positions filled.
    pub(crate) len: usize,
    /// Positions this sequence may reach.
    pub(crate) capacity: usize,
    /// Positions taken from the prefix cache when it was made.
    pub(crate) cached: usize,
    /// The prefix key of the full blocks, and the tokens of the block being filled.
    pub(crate) key: u64,
    pub(crate) partial: Vec<u32>,
}

pub(crate) enum Store {
    /// CPU: the block table, position `p` in block `p / BLOCK_TOKENS`.
    Paged(Vec<BlockId>),
    /// Other devices: per block, keys and values `[1, kv_heads, capacity, head_dim]`, allocated up front
    /// and counted in the pool as `charged` blocks.
    Slots {
        layers: Vec<(Tensor, Tensor)>,
        charged: usize,
    },
}

impl Drop for SeqCache {
    fn drop(&mut self) {
        let mut blocks = self.pool.lock();
        match &self.store {
            Store::Paged(ids) => blocks.release(ids),
            Store::Slots { charged, .. } => blocks.uncharge(*charged),
        }
    }
}

impl SeqCache {
    /// Tokens already in the cache: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been run yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions this cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions that came from the prefix cache, not computed for this sequence.
    pub fn cached_tokens(&self) -> usize {
        self.cached
    }

    /// Paged KV blocks held now (0 for a cache of preallocated slots).
    pub fn blocks(&self) -> usize {
        match &self.store {
            Store::Paged(ids) => ids.len(),
            Store::Slots { .. } => 0,
        }
    }

    /// The block table (empty for preallocated slots).
    pub fn block_ids(&self) -> &[BlockId] {
        match &self.store {
            Store::Paged(ids) => ids,
            Store::Slots { .. } => &[],
        }
    }

    /// Takes the blocks positions `..end` need from the pool. False when the pool has none to spare; the
    /// blocks taken so far stay.
    pub fn reserve(&mut self, end: usize) -> bool {
        let pool = self.pool.clone();
        let mut blocks = pool.lock();
        self.grow(&mut blocks, end)
    }

    pub(crate) fn grow(&mut self, blocks: &mut Blocks, end: usize) -> bool {
        let Store::Paged(ids) = &mut self.store else {
            return true;
        };
        while ids.len() < blocks_for(end) {
            match blocks.allocate() {
                Some(id) => ids.push(id),
                None => return false,
            }
        }
        true
    }

    /// Advances past `tokens`, just computed, registering each block they fill.
    pub(crate) fn record(&mut self, blocks: &mut Blocks, tokens: &[u32]) {
        for &t in tokens {
            self.len += 1;
            if let Store::Paged(ids) = &self.store {
                self.partial.push(t);
                if self.partial.len() == BLOCK_TOKENS {
                    self.key = blocks.register(ids[(self.len - 1) / BLOCK_TOKENS], self.key, &self.partial);
                    self.partial.clear();
                }
            }
        }
    }
}
