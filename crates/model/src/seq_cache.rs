//! One sequence's KV cache: its block table in the engine's pool (or, on other devices, Candle slot
//! tensors), how far it is filled, and the prefix key of its full blocks, which it registers in the pool's
//! prefix cache as they fill. The model makes pools and caches for its own layout and device
//! ([`BatchedLlama::kv_pool`], [`BatchedLlama::cache_for`]).

use candle_core::{DType, Tensor};

use crate::ModelError;
use crate::batched::{BatchedLlama, MAX_POSITIONS};
use crate::kv::BLOCK_TOKENS;
use crate::pool::{BlockId, Blocks, KvPool, PrefixCaching, blocks_for};

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

impl BatchedLlama {
    /// A pool of `blocks` KV blocks for one engine. Prefix caching applies to paged caches only (the CPU
    /// path); with Candle's slot caches it is off.
    pub fn kv_pool(&self, blocks: usize, caching: PrefixCaching) -> KvPool {
        let caching = PrefixCaching {
            enabled: caching.enabled && self.paged,
            ..caching
        };
        KvPool::new(self.kv_layout(), blocks, caching)
    }

    /// A pool with no bound and no prefix caching, for caches used outside an engine (tests, tools).
    ///
    /// A pool is locked for the whole of a step, across its parallel regions: two threads stepping caches
    /// of one pool at once could deadlock the rayon workers, so each thread should have its own.
    pub fn unbounded_pool(&self) -> KvPool {
        self.kv_pool(
            usize::MAX / 2,
            PrefixCaching {
                enabled: false,
                max_idle_share: 0.0,
            },
        )
    }

    /// An empty KV cache for one sequence of at most `capacity` tokens, in a pool of its own
    /// ([`BatchedLlama::unbounded_pool`]). On the CPU nothing is allocated until tokens arrive.
    pub fn new_cache(&self, capacity: usize) -> Result<SeqCache, ModelError> {
        self.new_cache_in(&self.unbounded_pool(), capacity)
    }

    /// An empty KV cache in `pool`; sequences stepped together must share one pool.
    pub fn new_cache_in(&self, pool: &KvPool, capacity: usize) -> Result<SeqCache, ModelError> {
        self.cache_for(pool, &[], capacity, 0)?
            .ok_or_else(|| ModelError::Cache(format!("the KV pool has no room for a cache of {capacity} positions")))
    }

    /// A KV cache from `pool` for a sequence of at most `capacity` positions that starts with `tokens`:
    /// it holds the longest prefix of `tokens` the pool has cached, and blocks for the rest of `tokens`
    /// and one token more. `None` when the pool cannot spare them and still keep `headroom` blocks
    /// available (for the running sequences' next tokens).
    pub fn cache_for(
        &self,
        pool: &KvPool,
        tokens: &[u32],
        capacity: usize,
        headroom: usize,
    ) -> Result<Option<SeqCache>, ModelError> {
        let capacity = capacity.min(MAX_POSITIONS);
        let mut blocks = pool.lock();
        let empty = |store| SeqCache {
            pool: pool.clone(),
            store,
            len: 0,
            capacity,
            cached: 0,
            key: crate::pool::ROOT_KEY,
            partial: Vec::new(),
        };
        if self.paged {
            // No cache exists while the guard is held: a cache's drop takes the lock.
            let (mut ids, key) = blocks.lookup(tokens);
            let cached = ids.len() * BLOCK_TOKENS;
            let end = match tokens.len() {
                0 => 0,
                n => (n + 1).min(capacity),
            };
            let need = blocks_for(end).saturating_sub(ids.len());
            if blocks.stats().available() < need + headroom {
                blocks.release(&ids);
                return Ok(None);
            }
            for _ in 0..need {
                ids.push(blocks.allocate().expect("available blocks can be allocated"));
            }
            drop(blocks);
            let mut cache = empty(Store::Paged(ids));
            (cache.len, cache.cached, cache.key) = (cached, cached, key);
            return Ok(Some(cache));
        }
        let charged = blocks_for(capacity);
        if blocks.stats().available() < charged + headroom || !blocks.charge(charged) {
            return Ok(None);
        }
        drop(blocks);
        let s = self.shape;
        let mut cache = empty(Store::Slots {
            layers: Vec::new(),
            charged,
        });
        let layers = (0..s.layers)
            .map(|_| {
                let kv = || Tensor::zeros((1, s.kv_heads, capacity, s.head_dim), DType::F32, &self.device);
                Ok((kv()?, kv()?))
            })
            .collect::<candle_core::Result<_>>()?;
        if let Store::Slots { layers: l, .. } = &mut cache.store {
            *l = layers;
        }
        Ok(Some(cache))
    }
}
