//! The block pool and the KV manager with exact block ids, and the accounting of
//! docs/cla-and-kv.md with the paper's 1B models.

use crosskv::config::KvSharing;
use crosskv::kv::block_pool::PoolError;
use crosskv::kv::{BlockPool, KvError, KvLayout, KvManager};
use std::sync::Arc;

fn take(pool: &mut BlockPool, n: usize) -> Vec<u32> {
    (0..n).map(|_| pool.allocate().expect("a free block")).collect()
}

#[test]
fn fresh_pool_allocates_ids_in_order_until_empty() {
    let mut pool = BlockPool::new(4);
    assert_eq!(pool.free_list(), vec![0, 1, 2, 3]);
    assert_eq!(take(&mut pool, 4), vec![0, 1, 2, 3]);
    assert_eq!(pool.allocate(), None);
    assert_eq!(pool.num_free(), 0);
    assert!((0..4).all(|b| pool.ref_count(b) == 1));
}

#[test]
fn freed_blocks_go_to_the_back_of_the_free_list() {
    let mut pool = BlockPool::new(6);
    assert_eq!(take(&mut pool, 4), vec![0, 1, 2, 3]);
    pool.free(2).unwrap();
    pool.free(0).unwrap();
    assert_eq!(pool.free_list(), vec![4, 5, 2, 0]);
    // Never-used blocks first, then the least recently freed.
    assert_eq!(take(&mut pool, 3), vec![4, 5, 2]);
    pool.free(3).unwrap();
    assert_eq!(pool.free_list(), vec![0, 3]);
    assert_eq!(take(&mut pool, 2), vec![0, 3]);
    assert_eq!(pool.num_free(), 0);
}

#[test]
fn double_free_is_an_error_and_changes_nothing() {
    let mut pool = BlockPool::new(3);
    take(&mut pool, 2);
    pool.free(1).unwrap();
    assert_eq!(pool.free(1), Err(PoolError::NotAllocated(1)));
    // Never allocated, and out of range.
    assert_eq!(pool.free(2), Err(PoolError::NotAllocated(2)));
    assert_eq!(pool.free(7), Err(PoolError::OutOfRange(7)));
    assert_eq!(pool.touch(7), Err(PoolError::OutOfRange(7)));
    assert_eq!(pool.free_list(), vec![2, 1]);
    assert_eq!(pool.num_free(), 2);
}

#[test]
fn touch_adds_a_reference_and_the_last_free_returns_the_block() {
    let mut pool = BlockPool::new(3);
    take(&mut pool, 2);
    pool.touch(1).unwrap();
    assert_eq!(pool.ref_count(1), 2);
    pool.free(1).unwrap();
    assert_eq!(pool.free_list(), vec![2], "still held once");
    pool.free(1).unwrap();
    assert_eq!(pool.free_list(), vec![2, 1]);
}

#[test]
fn touch_revives_a_freed_cached_block_without_evicting_it() {
    let mut pool = BlockPool::new(4);
    take(&mut pool, 2);
    pool.set_hash(1, 0xabc);
    pool.free(1).unwrap();
    assert_eq!(pool.cached_block(0xabc), Some(1), "a freed block keeps its content");
    assert_eq!(pool.free_list(), vec![2, 3, 1]);
    pool.touch(1).unwrap();
    assert_eq!(pool.ref_count(1), 1);
    assert_eq!(pool.num_free(), 2);
    assert_eq!(pool.free_list(), vec![2, 3]);
    assert_eq!(pool.cached_block(0xabc), Some(1));
    assert_eq!(take(&mut pool, 2), vec![2, 3]);
    assert_eq!(pool.allocate(), None);
}

#[test]
fn allocating_a_freed_cached_block_evicts_its_hash() {
    let mut pool = BlockPool::new(3);
    take(&mut pool, 3);
    pool.set_hash(0, 10);
    pool.set_hash(2, 20);
    pool.free(2).unwrap();
    pool.free(0).unwrap();
    assert_eq!(pool.free_list(), vec![2, 0]);
    assert_eq!(pool.allocate(), Some(2));
    assert_eq!(pool.cached_block(20), None, "reused block 2 no longer holds hash 20");
    assert_eq!(pool.cached_block(10), Some(0), "block 0 is still free and cached");
    assert_eq!(pool.allocate(), Some(0));
    assert_eq!(pool.cached_block(10), None);
}

/// 6 layers, kv_source [0,0,2,2,2,5]: 3 KV slots (layers 0, 2, 5).
fn manager(num_blocks: usize) -> KvManager {
    let layout = Arc::new(KvLayout::new(vec![0, 0, 2, 2, 2, 5], 2, 8, 4));
    KvManager::new(layout, num_blocks, 4)
}

#[test]
fn a_sequence_gets_one_table_per_kv_slot_with_exact_ids() {
    let mut m = manager(30);
    assert_eq!(m.blocks_needed(7, 9), 9, "3 slots × ceil(9 / 4) blocks");
    m.allocate(7, 9).unwrap();
    assert_eq!(m.tables(7).unwrap(), &[vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8]]);
    assert_eq!(m.num_free_blocks(), 21);
    assert_eq!(m.blocks_needed(7, 12), 0, "12 tokens still fit 3 blocks");
    assert_eq!(m.blocks_needed(7, 13), 3, "one more block in each of 3 slots");
    m.allocate(7, 12).unwrap();
    assert_eq!(m.num_free_blocks(), 21);
    m.allocate(7, 13).unwrap();
    assert_eq!(
        m.tables(7).unwrap(),
        &[vec![0, 1, 2, 9], vec![3, 4, 5, 10], vec![6, 7, 8, 11]]
    );
    m.allocate(8, 1).unwrap();
    assert_eq!(m.tables(8).unwrap(), &[vec![12], vec![13], vec![14]]);
    assert_eq!(m.num_used_blocks(), 15);
    assert!(matches!(m.tables(99), Err(KvError::UnknownSequence(99))));
}

#[test]
fn allocate_is_all_or_nothing_when_out_of_blocks() {
    let mut m = manager(10);
    m.allocate(1, 8).unwrap();
    assert_eq!(m.num_free_blocks(), 4);
    assert!(!m.can_allocate(2, 8));
    assert_eq!(m.allocate(2, 8), Err(KvError::OutOfBlocks { needed: 6, free: 4 }));
    assert_eq!(m.num_free_blocks(), 4);
    assert!(!m.contains(2), "a failed first allocation leaves no tables behind");
    // Growing an existing sequence: fits once, then not.
    assert!(m.can_allocate(1, 12));
    m.allocate(1, 12).unwrap();
    assert_eq!(m.num_free_blocks(), 1);
    let before = m.tables(1).unwrap().to_vec();
    assert_eq!(m.allocate(1, 13), Err(KvError::OutOfBlocks { needed: 3, free: 1 }));
    assert_eq!(m.tables(1).unwrap(), before.as_slice());
    assert_eq!(m.num_free_blocks(), 1);
    assert_eq!(m.pool().free_list(), vec![9]);
}

#[test]
fn consumer_layer_reads_exactly_its_producers_blocks() {
    let mut m = manager(40);
    m.allocate(1, 5).unwrap();
    m.allocate(2, 10).unwrap();
    for seq in [1, 2] {
        let tables = m.tables(seq).unwrap();
        for (layer, slot) in [(0, 0), (1, 0), (2, 1), (3, 1), (4, 1), (5, 2)] {
            let t = m.table_for_layer(seq, layer).unwrap();
            assert_eq!(t, tables[slot].as_slice(), "seq {seq} layer {layer}");
            assert_eq!(
                t.as_ptr(),
                tables[slot].as_ptr(),
                "seq {seq} layer {layer}: a copy, not an alias"
            );
        }
        let producer = |l| m.table_for_layer(seq, l).unwrap().as_ptr();
        assert_ne!(producer(0), producer(2));
        assert_ne!(producer(2), producer(5));
    }
    assert_eq!(m.table_for_layer(1, 4).unwrap(), &[2, 3]);
    assert_eq!(m.table_for_layer(1, 5).unwrap(), &[4, 5]);
    assert_eq!(m.table_for_layer(2, 1).unwrap(), &[6, 7, 8]);
}

#[test]
fn cache_position_is_block_times_block_size_plus_offset() {
    let mut m = manager(30);
    m.allocate(1, 2).unwrap(); // blocks 0, 1, 2
    m.allocate(2, 4).unwrap(); // blocks 3, 4, 5
    m.allocate(1, 6).unwrap(); // blocks 6, 7, 8 appended to seq 1's slots
    assert_eq!(m.tables(1).unwrap(), &[vec![0, 6], vec![1, 7], vec![2, 8]]);
    assert_eq!(m.cache_position(1, 0, 0).unwrap(), 0);
    assert_eq!(m.cache_position(1, 0, 3).unwrap(), 3);
    assert_eq!(m.cache_position(1, 0, 4).unwrap(), 6 * 4);
    assert_eq!(m.cache_position(1, 0, 5).unwrap(), 6 * 4 + 1);
    assert_eq!(m.cache_position(1, 2, 1).unwrap(), 2 * 4 + 1);
    assert_eq!(m.cache_position(1, 1, 7).unwrap(), 7 * 4 + 3);
    assert_eq!(m.cache_position(2, 1, 2).unwrap(), 4 * 4 + 2);
    assert!(matches!(m.cache_position(1, 0, 8), Err(KvError::OutOfBlocks { .. })));
    assert!(matches!(m.cache_position(3, 0, 0), Err(KvError::UnknownSequence(3))));
}

#[test]
fn freeing_every_sequence_returns_every_block() {
    let mut m = manager(24);
    m.allocate(1, 7).unwrap();
    m.allocate(2, 3).unwrap();
    m.allocate(1, 9).unwrap();
    m.allocate(3, 12).unwrap();
    assert_eq!(m.num_free_blocks(), 24 - 9 - 3 - 9);
    assert_eq!(m.free(2), Ok(3));
    assert_eq!(m.free(1), Ok(9));
    assert_eq!(m.free(1), Err(KvError::UnknownSequence(1)));
    assert_eq!(m.free(3), Ok(9));
    assert_eq!(m.num_free_blocks(), m.num_blocks());
    assert_eq!(m.num_used_blocks(), 0);
    let mut all = m.pool().free_list();
    all.sort();
    assert_eq!(all, (0..24).collect::<Vec<_>>());
    // Never-used blocks come first, then those of seq 2, freed before seq 1's.
    m.allocate(4, 5).unwrap();
    assert_eq!(m.tables(4).unwrap(), &[vec![21, 22], vec![23, 6], vec![7, 8]]);
}

fn paper_1b(share_factor: usize) -> KvLayout {
    let src = KvSharing::ShareFactor(share_factor).kv_source(20).unwrap();
    KvLayout::new(src, 1, 128, 2)
}

#[test]
fn paper_1b_models_bytes_per_token() {
    let (mqa, cla2, cla3) = (paper_1b(1), paper_1b(2), paper_1b(3));
    assert_eq!((mqa.kv_layers(), cla2.kv_layers(), cla3.kv_layers()), (20, 10, 7));
    assert_eq!(mqa.kv_bytes_per_token(), 10240, "H128-MQA");
    assert_eq!(cla2.kv_bytes_per_token(), 5120, "H128-MQA-CLA2");
    assert_eq!(cla3.kv_bytes_per_token(), 3584, "H128-MQA-CLA3");
    for l in [&mqa, &cla2, &cla3] {
        assert_eq!(l.non_cla_kv_bytes_per_token(), 10240);
        assert_eq!(l.block_bytes(16), 16 * 2 * 128 * 2);
    }
    assert_eq!(cla2.uniform_share_factor(), Some(2));
    assert_eq!(cla3.uniform_share_factor(), Some(3));
}

#[test]
fn cla2_doubles_capacity_under_one_budget() {
    // 20 000 blocks of 16 tokens (8192 bytes each), a multiple of 20 and 10 producers;
    // 8191 spare bytes do not make another block.
    let budget = 20_000 * 8192 + 8191;
    let (mqa, cla2, cla3) = (
        paper_1b(1).capacity(budget, 16, 1024),
        paper_1b(2).capacity(budget, 16, 1024),
        paper_1b(3).capacity(budget, 16, 1024),
    );
    for r in [&mqa, &cla2, &cla3] {
        assert_eq!((r.num_blocks, r.block_bytes, r.kv_cache_bytes), (20_000, 8192, budget));
        assert_eq!(r.non_cla_capacity_tokens, 16_000);
        assert_eq!(r.non_cla_max_concurrency, 15, "floor(20000 / (20 × 64))");
    }
    assert_eq!(mqa.capacity_tokens, 16_000, "floor(20000 / 20) × 16");
    assert_eq!(cla2.capacity_tokens, 32_000, "floor(20000 / 10) × 16");
    assert_eq!(cla2.capacity_tokens, 2 * mqa.capacity_tokens);
    assert_eq!(cla3.capacity_tokens, 2857 * 16, "floor(20000 / 7) × 16");
    assert_eq!(mqa.max_concurrency, 15);
    assert_eq!(cla2.max_concurrency, 31, "floor(20000 / (10 × 64))");
    assert_eq!(cla3.max_concurrency, 44, "floor(20000 / (7 × 64))");
}

#[test]
fn max_concurrency_rounds_the_sequence_up_to_whole_blocks() {
    let budget = 20_000 * 8192;
    let cla2 = paper_1b(2);
    // 1025 tokens take 65 blocks per slot: floor(20000 / 650) = 30, not 20000 / 640 = 31.
    assert_eq!(cla2.capacity(budget, 16, 1025).max_concurrency, 30);
    assert_eq!(cla2.capacity(budget, 16, 1025).non_cla_max_concurrency, 15);
    assert_eq!(cla2.capacity(budget, 16, 1).max_concurrency, 2000);
    // A budget smaller than a block holds nothing.
    let tiny = cla2.capacity(8191, 16, 16);
    assert_eq!((tiny.num_blocks, tiny.capacity_tokens, tiny.max_concurrency), (0, 0, 0));
    // --kv-cache-tokens: enough whole blocks in every slot.
    assert_eq!(cla2.bytes_for_tokens(1000, 16), 63 * 10 * 8192);
    let r = cla2.capacity(cla2.bytes_for_tokens(1000, 16), 16, 1000);
    assert_eq!((r.capacity_tokens, r.max_concurrency), (1008, 1));
}

#[test]
fn blocks_used_per_slot_are_kept_exactly_through_sharing_frees_and_evictions() {
    // A seeded walk of allocations, prefix-cache hits, growth and frees; after every
    // operation the kept counts equal a recount of every table.
    let mut m = manager(48);
    let mut rng = 0x1234_5678_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Few distinct prompts, so later sequences hit the prefix cache.
    let prompts: Vec<Vec<u32>> = (0..3).map(|p| (0..17).map(|t| p * 100 + t).collect()).collect();
    let mut live: Vec<u64> = Vec::new();
    for seq in 0..400u64 {
        match next() % 4 {
            0 | 1 => {
                let tokens = &prompts[(next() % 3) as usize];
                let cached = m.start_with_prefix(seq, tokens);
                let want = tokens.len().min(cached + 4 + (next() % 8) as usize);
                if m.allocate(seq, want).is_ok() {
                    m.cache_full_blocks(seq, tokens, want);
                    live.push(seq);
                } else if m.contains(seq) {
                    m.free(seq).unwrap();
                }
            }
            2 if !live.is_empty() => {
                let s = live.swap_remove((next() % live.len() as u64) as usize);
                m.free(s).unwrap();
            }
            _ if !live.is_empty() => {
                let s = live[(next() % live.len() as u64) as usize];
                let _ = m.allocate(s, 17 + (next() % 12) as usize);
            }
            _ => {}
        }
        assert_eq!(
            m.used_blocks_per_slot(),
            m.count_used_blocks_per_slot(),
            "after op {seq}"
        );
        assert_eq!(m.used_blocks_per_slot().iter().sum::<usize>(), m.num_used_blocks());
    }
    for s in live {
        m.free(s).unwrap();
    }
    assert_eq!(m.used_blocks_per_slot(), vec![0, 0, 0]);
}

#[test]
fn a_tables_epoch_lasts_while_they_grow_and_changes_when_they_are_made_again() {
    let mut m = manager(30);
    m.allocate(1, 2).unwrap();
    m.allocate(2, 2).unwrap();
    let (e1, _) = m.tables_with_epoch(1).unwrap();
    let (e2, _) = m.tables_with_epoch(2).unwrap();
    assert_ne!(e1, e2);
    // Growing keeps the epoch, and the entries seen under it.
    let before = m.tables(1).unwrap().to_vec();
    m.allocate(1, 9).unwrap();
    let (again, tables) = m.tables_with_epoch(1).unwrap();
    assert_eq!(again, e1);
    for (old, new) in before.iter().zip(tables) {
        assert_eq!(&new[..old.len()], old.as_slice());
    }
    // Freed and allocated again (a preempted sequence coming back): a new epoch, even
    // where the id and the first block ids repeat.
    m.free(1).unwrap();
    m.allocate(1, 2).unwrap();
    let (e3, _) = m.tables_with_epoch(1).unwrap();
    assert!(e3 != e1 && e3 != e2);
    // Tables started from the prefix cache get one too.
    let toks: Vec<u32> = (0..12).collect();
    m.free(1).unwrap();
    m.allocate(1, 12).unwrap();
    m.cache_full_blocks(1, &toks, 12);
    let (e4, _) = m.tables_with_epoch(1).unwrap();
    assert_eq!(m.start_with_prefix(5, &toks), 8);
    let (e5, _) = m.tables_with_epoch(5).unwrap();
    assert!(![e1, e2, e3, e4].contains(&e5));
    assert!(matches!(m.tables_with_epoch(9), Err(KvError::UnknownSequence(9))));
}
