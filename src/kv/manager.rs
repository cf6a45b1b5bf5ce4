//! Per-sequence block tables: one table per KV slot; a consumer layer aliases its
//! producer's table. The whole interface is a handful of verbs (allocate, free,
//! can_allocate, tables); it never sees a tensor or a request's text.

use super::block_pool::{BlockId, BlockPool, PoolError};
use super::layout::KvLayout;
use rustc_hash::FxHashMap;
use std::sync::Arc;

pub type SeqId = u64;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KvError {
    #[error("KV cache is full: {needed} blocks needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
    #[error("sequence {0} has no KV blocks")]
    UnknownSequence(SeqId),
    #[error(transparent)]
    Pool(#[from] PoolError),
}

/// The blocks of one sequence: `tables[slot]` lists the blocks of that KV slot.
#[derive(Debug, Clone, Default)]
struct SeqBlocks {
    tables: Vec<Vec<BlockId>>,
    /// Tokens the tables have room for, rounded up to whole blocks.
    num_tokens: usize,
    /// Leading blocks whose content hash is recorded (prefix caching).
    hashed_blocks: usize,
    /// Chain hash of the last hashed block.
    last_hash: u64,
    /// Names these tables for their life: they only ever grow at the end, so a copy
    /// made under the same epoch stays a valid prefix (a preempted sequence gets new
    /// tables, and a new epoch, when it comes back).
    epoch: u64,
}

/// Chain hash of one full block: its tokens and everything before it (the parent).
pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// A block's cache key: the same tokens hold different K/V in each slot.
fn slot_key(chain: u64, slot: usize) -> u64 {
    chain_hash(chain, &[slot as u32, u32::MAX])
}

#[derive(Debug)]
pub struct KvManager {
    pool: BlockPool,
    layout: Arc<KvLayout>,
    block_size: usize,
    /// By id (sequential integers: a plain multiplicative hash is enough).
    seqs: FxHashMap<SeqId, SeqBlocks>,
    /// Distinct blocks held per KV slot, kept as blocks gain their first reference and
    /// lose their last (status reads it every step; recounting is O(total blocks)).
    used_per_slot: Vec<usize>,
    next_epoch: u64,
}

impl KvManager {
    pub fn new(layout: Arc<KvLayout>, num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0);
        KvManager {
            pool: BlockPool::new(num_blocks),
            block_size,
            seqs: FxHashMap::default(),
            used_per_slot: vec![0; layout.kv_layers()],
            next_epoch: 1,
            layout,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }
    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }
    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free()
    }
    pub fn num_used_blocks(&self) -> usize {
        self.pool.num_blocks() - self.pool.num_free()
    }
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Blocks needed so that `seq` can hold `total_tokens` tokens in every slot.
    pub fn blocks_needed(&self, seq: SeqId, total_tokens: usize) -> usize {
        let have = self
            .seqs
            .get(&seq)
            .map_or(0, |s| s.tables.first().map_or(0, |t| t.len()));
        let want = total_tokens.div_ceil(self.block_size);
        want.saturating_sub(have) * self.layout.kv_layers()
    }

    /// Admission check: can `seq` grow to `total_tokens` tokens now?
    pub fn can_allocate(&self, seq: SeqId, total_tokens: usize) -> bool {
        self.blocks_needed(seq, total_tokens) <= self.pool.num_free()
    }

    /// Grows `seq`'s tables (creating them on first use) to hold `total_tokens`
    /// tokens. All or nothing: on `OutOfBlocks` nothing was taken.
    pub fn allocate(&mut self, seq: SeqId, total_tokens: usize) -> Result<(), KvError> {
        let needed = self.blocks_needed(seq, total_tokens);
        if needed > self.pool.num_free() {
            return Err(KvError::OutOfBlocks {
                needed,
                free: self.pool.num_free(),
            });
        }
        let kv_layers = self.layout.kv_layers();
        let next_epoch = &mut self.next_epoch;
        let entry = self.seqs.entry(seq).or_insert_with(|| {
            *next_epoch += 1;
            SeqBlocks {
                tables: vec![Vec::new(); kv_layers],
                epoch: *next_epoch,
                ..Default::default()
            }
        });
        let want = total_tokens.div_ceil(self.block_size);
        for (slot, table) in entry.tables.iter_mut().enumerate() {
            while table.len() < want {
                table.push(self.pool.allocate().expect("free blocks were counted above"));
                self.used_per_slot[slot] += 1;
            }
        }
        entry.num_tokens = entry.num_tokens.max(want * self.block_size);
        Ok(())
    }

    /// Returns every block of `seq` to the pool; returns how many were freed.
    pub fn free(&mut self, seq: SeqId) -> Result<usize, KvError> {
        let s = self.seqs.remove(&seq).ok_or(KvError::UnknownSequence(seq))?;
        let mut n = 0;
        for (slot, table) in s.tables.into_iter().enumerate() {
            for id in table {
                self.pool.free(id)?;
                if self.pool.ref_count(id) == 0 {
                    self.used_per_slot[slot] -= 1;
                }
                n += 1;
            }
        }
        Ok(n)
    }

    /// Starts `seq` on the longest run of leading full blocks of `tokens` that every KV
    /// slot still has cached, sharing those blocks (ref-counted). The last token is never
    /// covered, so its logits are always computed. Returns the tokens covered (0 on a
    /// miss); `seq` must not exist yet.
    pub fn start_with_prefix(&mut self, seq: SeqId, tokens: &[u32]) -> usize {
        debug_assert!(!self.seqs.contains_key(&seq));
        let bs = self.block_size;
        let kv_layers = self.layout.kv_layers();
        let usable = tokens.len().saturating_sub(1) / bs;
        let mut chain = 0u64;
        let mut hits: Vec<Vec<BlockId>> = vec![Vec::new(); kv_layers];
        for b in 0..usable {
            let h = chain_hash(chain, &tokens[b * bs..(b + 1) * bs]);
            let found: Option<Vec<BlockId>> = (0..kv_layers)
                .map(|slot| self.pool.cached_block(slot_key(h, slot)))
                .collect();
            let Some(found) = found else { break };
            for (slot, id) in found.into_iter().enumerate() {
                hits[slot].push(id);
            }
            chain = h;
        }
        let n = hits[0].len();
        if n == 0 {
            return 0;
        }
        for (slot, table) in hits.iter().enumerate() {
            for &id in table {
                if self.pool.ref_count(id) == 0 {
                    self.used_per_slot[slot] += 1;
                }
                self.pool.touch(id).expect("cached blocks exist");
            }
        }
        self.seqs.insert(
            seq,
            SeqBlocks {
                tables: hits,
                num_tokens: n * bs,
                hashed_blocks: n,
                last_hash: chain,
                epoch: self.next_epoch + 1,
            },
        );
        self.next_epoch += 1;
        n * bs
    }

    /// Records the content hash of every block of `seq` that the first `computed` of
    /// `tokens` fill, so later requests with the same prefix can share them.
    pub fn cache_full_blocks(&mut self, seq: SeqId, tokens: &[u32], computed: usize) {
        let bs = self.block_size;
        let Some(s) = self.seqs.get_mut(&seq) else { return };
        let full = (computed.min(tokens.len()) / bs).min(s.tables.first().map_or(0, |t| t.len()));
        while s.hashed_blocks < full {
            let b = s.hashed_blocks;
            let h = chain_hash(s.last_hash, &tokens[b * bs..(b + 1) * bs]);
            for (slot, table) in s.tables.iter().enumerate() {
                self.pool.set_hash(table[b], slot_key(h, slot));
            }
            s.last_hash = h;
            s.hashed_blocks += 1;
        }
    }

    /// Distinct blocks in use per KV slot (a prefix block shared by several
    /// sequences counts once).
    pub fn used_blocks_per_slot(&self) -> Vec<usize> {
        self.used_per_slot.clone()
    }

    /// `used_blocks_per_slot` recounted from every table: what the kept counts must
    /// equal (tests).
    pub fn count_used_blocks_per_slot(&self) -> Vec<usize> {
        (0..self.layout.kv_layers())
            .map(|slot| {
                let ids: std::collections::HashSet<BlockId> = self
                    .seqs
                    .values()
                    .flat_map(|s| s.tables[slot].iter().copied())
                    .collect();
                ids.len()
            })
            .collect()
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// The per-slot block tables of `seq` (index = KV slot).
    pub fn tables(&self, seq: SeqId) -> Result<&[Vec<BlockId>], KvError> {
        self.seqs
            .get(&seq)
            .map(|s| s.tables.as_slice())
            .ok_or(KvError::UnknownSequence(seq))
    }

    /// `tables(seq)` and their epoch: tables seen under one epoch keep their entries and
    /// only grow.
    pub fn tables_with_epoch(&self, seq: SeqId) -> Result<(u64, &[Vec<BlockId>]), KvError> {
        self.seqs
            .get(&seq)
            .map(|s| (s.epoch, s.tables.as_slice()))
            .ok_or(KvError::UnknownSequence(seq))
    }

    /// The table layer `layer` reads: its producer's slot table (aliased, not copied).
    pub fn table_for_layer(&self, seq: SeqId, layer: usize) -> Result<&[BlockId], KvError> {
        let slot = self.layout.slot_of_layer(layer);
        Ok(&self.tables(seq)?[slot])
    }

    /// Cache position (block * block_size + offset) of token `pos` of `seq` in `slot`.
    pub fn cache_position(&self, seq: SeqId, slot: usize, pos: usize) -> Result<u32, KvError> {
        let table = &self.tables(seq)?[slot];
        let block = table.get(pos / self.block_size).ok_or_else(|| KvError::OutOfBlocks {
            needed: pos / self.block_size + 1 - table.len(),
            free: self.pool.num_free(),
        })?;
        Ok(block * self.block_size as u32 + (pos % self.block_size) as u32)
    }
}
