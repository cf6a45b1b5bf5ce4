//! One pool of fixed-size KV blocks (docs/cla-and-kv.md; after mistral.rs): blocks in a flat
//! `Vec`, the free list linked by index so allocate, free and removal from the middle
//! are O(1), reference counts for sharing, and content hashes kept on freed blocks so
//! a later prefix-cache hit can revive them (least recently freed are evicted first).

use std::collections::HashMap;

pub type BlockId = u32;
const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Block {
    ref_count: u32,
    hash: Option<u64>,
    prev: u32,
    next: u32,
    in_free_list: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PoolError {
    #[error("block {0} is not allocated (double free)")]
    NotAllocated(BlockId),
    #[error("block {0} does not exist")]
    OutOfRange(BlockId),
}

#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<Block>,
    free_head: u32,
    free_tail: u32,
    num_free: usize,
    /// hash → block holding that content (allocated, or free and not yet evicted).
    cached: HashMap<u64, BlockId>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        assert!(num_blocks < NIL as usize, "block ids are u32");
        let blocks = (0..num_blocks as u32)
            .map(|i| Block {
                ref_count: 0,
                hash: None,
                prev: if i == 0 { NIL } else { i - 1 },
                next: if i + 1 == num_blocks as u32 { NIL } else { i + 1 },
                in_free_list: true,
            })
            .collect();
        BlockPool {
            blocks,
            free_head: if num_blocks == 0 { NIL } else { 0 },
            free_tail: if num_blocks == 0 { NIL } else { num_blocks as u32 - 1 },
            num_free: num_blocks,
            cached: HashMap::new(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }
    pub fn num_free(&self) -> usize {
        self.num_free
    }
    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.blocks[id as usize].ref_count
    }

    fn unlink(&mut self, id: BlockId) {
        let (prev, next) = {
            let b = &self.blocks[id as usize];
            (b.prev, b.next)
        };
        if prev == NIL {
            self.free_head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.free_tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let b = &mut self.blocks[id as usize];
        b.prev = NIL;
        b.next = NIL;
        b.in_free_list = false;
        self.num_free -= 1;
    }

    fn push_back(&mut self, id: BlockId) {
        let tail = self.free_tail;
        {
            let b = &mut self.blocks[id as usize];
            b.prev = tail;
            b.next = NIL;
            b.in_free_list = true;
        }
        if tail == NIL {
            self.free_head = id;
        } else {
            self.blocks[tail as usize].next = id;
        }
        self.free_tail = id;
        self.num_free += 1;
    }

    /// Takes the least recently freed block; its cached content (if any) is evicted.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = self.free_head;
        if id == NIL {
            return None;
        }
        self.unlink(id);
        let b = &mut self.blocks[id as usize];
        b.ref_count = 1;
        if let Some(h) = b.hash.take() {
            if self.cached.get(&h) == Some(&id) {
                self.cached.remove(&h);
            }
        }
        Some(id)
    }

    /// Drops one reference; at zero the block goes to the back of the free list,
    /// keeping its hash so a prefix-cache hit can still take it back.
    pub fn free(&mut self, id: BlockId) -> Result<(), PoolError> {
        let b = self.blocks.get_mut(id as usize).ok_or(PoolError::OutOfRange(id))?;
        if b.ref_count == 0 {
            return Err(PoolError::NotAllocated(id));
        }
        b.ref_count -= 1;
        if b.ref_count == 0 {
            self.push_back(id);
        }
        Ok(())
    }

    /// Adds a reference to a block (sharing a cached prefix), reviving it from the
    /// free list if nobody held it.
    pub fn touch(&mut self, id: BlockId) -> Result<(), PoolError> {
        let in_free = self
            .blocks
            .get(id as usize)
            .ok_or(PoolError::OutOfRange(id))?
            .in_free_list;
        if in_free {
            self.unlink(id);
        }
        self.blocks[id as usize].ref_count += 1;
        Ok(())
    }

    /// Records that a full block holds the content with hash `hash`.
    pub fn set_hash(&mut self, id: BlockId, hash: u64) {
        self.blocks[id as usize].hash = Some(hash);
        self.cached.entry(hash).or_insert(id);
    }

    /// The block that holds content `hash`, if it has not been evicted.
    pub fn cached_block(&self, hash: u64) -> Option<BlockId> {
        self.cached.get(&hash).copied()
    }

    /// Free block ids from the head of the list (next to be allocated) onwards.
    pub fn free_list(&self) -> Vec<BlockId> {
        let mut out = Vec::with_capacity(self.num_free);
        let mut cur = self.free_head;
        while cur != NIL {
            out.push(cur);
            cur = self.blocks[cur as usize].next;
        }
        out
    }
}
