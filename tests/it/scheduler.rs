//! The scheduler on its own (no model): budgets, admission, preemption and prefix
//! caching, with exact block ids.

use crosskv::engine::{AdmitError, Scheduler, SchedulerConfig};
use crosskv::kv::{KvLayout, KvManager};
use std::sync::Arc;

const BS: usize = 4;

/// A 4-layer CLA2 layout (2 KV slots) with `num_blocks` blocks of 4 tokens.
fn scheduler(num_blocks: usize, max_num_seqs: usize, budget: usize, prefix_caching: bool) -> Scheduler {
    let layout = Arc::new(KvLayout::new(vec![0, 0, 2, 2], 1, 8, 4));
    Scheduler::new(
        SchedulerConfig {
            max_num_seqs,
            max_num_batched_tokens: budget,
            prefix_caching,
        },
        KvManager::new(layout, num_blocks, BS),
    )
}

fn prompt(n: usize, base: u32) -> Vec<u32> {
    (0..n as u32).map(|i| base + i).collect()
}

/// Runs one step as the engine would: every scheduled chunk computed, and each request
/// that reached its end gets one sampled token (`next`).
fn step(s: &mut Scheduler, next: u32) -> Vec<(u64, usize, usize)> {
    let out = s.schedule();
    let mut got = Vec::new();
    for sch in &out.scheduled {
        s.computed(sch);
        if sch.samples {
            s.append_token(sch.id, next);
        }
        got.push((sch.id, sch.start, sch.tokens.len()));
    }
    got
}

#[test]
fn decodes_are_scheduled_before_new_prompts() {
    let mut s = scheduler(64, 8, 16, false);
    s.add(1, prompt(6, 0), 32, true).unwrap();
    assert_eq!(step(&mut s, 99), vec![(1, 0, 6)]);
    s.add(2, prompt(20, 100), 40, true).unwrap();
    // Request 1 decodes one token first; request 2 gets what is left of the budget.
    assert_eq!(step(&mut s, 99), vec![(1, 6, 1), (2, 0, 15)]);
}

#[test]
fn long_prompts_are_prefilled_in_chunks_under_the_token_budget() {
    let mut s = scheduler(64, 8, 8, false);
    s.add(1, prompt(19, 0), 40, true).unwrap();
    assert_eq!(step(&mut s, 7), vec![(1, 0, 8)]);
    assert_eq!(step(&mut s, 7), vec![(1, 8, 8)]);
    let out = s.schedule();
    assert_eq!(out.scheduled.len(), 1);
    assert_eq!((out.scheduled[0].start, out.scheduled[0].tokens.len()), (16, 3));
    assert!(out.scheduled[0].samples, "the chunk that reaches the end is sampled");
}

#[test]
fn max_num_seqs_caps_the_running_batch_and_the_rest_waits_in_order() {
    let mut s = scheduler(64, 2, 64, false);
    for id in 1..=3 {
        s.add(id, prompt(4, 10 * id as u32), 16, true).unwrap();
    }
    assert_eq!(step(&mut s, 1).iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(s.num_waiting(), 1);
    s.remove(1).unwrap();
    assert_eq!(step(&mut s, 1).iter().map(|x| x.0).collect::<Vec<_>>(), vec![2, 3]);
}

#[test]
fn a_request_that_can_never_fit_is_rejected_not_queued() {
    let mut s = scheduler(8, 8, 64, false);
    // 17 tokens need 5 blocks per slot × 2 slots = 10 > 8.
    assert_eq!(
        s.add(1, prompt(5, 0), 17, true),
        Err(AdmitError::NeverFits { needed: 10, total: 8 })
    );
    assert_eq!(s.num_waiting(), 0);
    s.add(2, prompt(5, 0), 16, true).unwrap();
}

#[test]
fn newest_running_request_is_preempted_first_and_resumes_from_scratch() {
    // 8 blocks = 4 per slot: two requests of 8 tokens fill the cache.
    let mut s = scheduler(8, 8, 64, false);
    s.add(1, prompt(8, 0), 16, true).unwrap();
    s.add(2, prompt(8, 50), 16, true).unwrap();
    assert_eq!(step(&mut s, 5), vec![(1, 0, 8), (2, 0, 8)]);
    assert_eq!(s.kv().num_free_blocks(), 0);
    // Both now need a 3rd block per slot: request 2 (newest) is preempted for request 1.
    let out = s.schedule();
    assert_eq!(out.preempted, vec![2]);
    assert_eq!(
        out.scheduled.iter().map(|x| (x.id, x.start)).collect::<Vec<_>>(),
        vec![(1, 8)]
    );
    for sch in &out.scheduled {
        s.computed(sch);
    }
    // Request 2 waits with its generated token kept: it is recomputed as 9 tokens.
    assert_eq!(s.tokens(2).unwrap().len(), 9);
    s.remove(1).unwrap();
    let out = s.schedule();
    assert_eq!(
        out.scheduled
            .iter()
            .map(|x| (x.id, x.start, x.tokens.len()))
            .collect::<Vec<_>>(),
        vec![(2, 0, 9)]
    );
    assert!(out.scheduled[0].samples);
}

#[test]
fn prefix_hit_skips_cached_blocks_and_shares_them() {
    let mut s = scheduler(32, 8, 64, true);
    let p = prompt(10, 0); // two full blocks + 2 tokens
    s.add(1, p.clone(), 16, true).unwrap();
    step(&mut s, 77);
    let t1: Vec<Vec<u32>> = s.kv().tables(1).unwrap().to_vec();
    // Slot 0 got blocks 0,1,2 and slot 1 blocks 3,4,5 (allocation order).
    assert_eq!(t1, vec![vec![0, 1, 2], vec![3, 4, 5]]);
    let mut p2 = p[..8].to_vec();
    p2.extend([500, 501, 502]);
    s.add(2, p2, 16, true).unwrap();
    let out = s.schedule();
    let sch = out.scheduled.iter().find(|x| x.id == 2).unwrap();
    assert_eq!((sch.start, sch.tokens.len(), sch.cached_tokens), (8, 3, 8));
    assert_eq!((out.prefix_queries, out.prefix_hits), (11, 8));
    let t2 = s.kv().tables(2).unwrap();
    assert_eq!(&t2[0][..2], &[0, 1]);
    assert_eq!(&t2[1][..2], &[3, 4]);
    assert_eq!(s.kv().pool().ref_count(0), 2);
    assert_eq!(s.kv().pool().ref_count(2), 1, "the partial block is not shared");
}

#[test]
fn prefix_hit_never_covers_the_last_prompt_token() {
    let mut s = scheduler(32, 8, 64, true);
    let p = prompt(8, 0); // exactly two full blocks
    s.add(1, p.clone(), 16, true).unwrap();
    step(&mut s, 3);
    s.remove(1).unwrap();
    s.add(2, p, 16, true).unwrap();
    let out = s.schedule();
    // Only the first block may be reused: the last token's logits must be computed.
    assert_eq!((out.scheduled[0].start, out.scheduled[0].cached_tokens), (4, 4));
}

#[test]
fn freed_cached_blocks_are_reused_until_evicted_least_recently_freed_first() {
    // 8 blocks; a 9-token prompt takes 3 per slot: slot 0 gets 0,1,2 and slot 1 3,4,5.
    let mut s = scheduler(8, 8, 64, true);
    s.add(1, prompt(9, 0), 12, true).unwrap();
    step(&mut s, 1);
    assert_eq!(s.kv().tables(1).unwrap(), &[vec![0, 1, 2], vec![3, 4, 5]]);
    s.remove(1).unwrap();
    // Never-used blocks come first, then the freed ones in the order they were freed.
    assert_eq!(s.kv().pool().free_list(), vec![6, 7, 0, 1, 2, 3, 4, 5]);
    // Another prompt takes the never-used blocks: request 1's cached blocks survive...
    s.add(2, prompt(4, 1000), 4, true).unwrap();
    step(&mut s, 1);
    assert_eq!(s.kv().tables(2).unwrap(), &[vec![6], vec![7]]);
    s.remove(2).unwrap();
    // ...so the same prompt again reuses its first two blocks in both slots.
    s.add(3, prompt(9, 0), 12, true).unwrap();
    let out = s.schedule();
    assert_eq!(out.scheduled[0].cached_tokens, 8);
    assert_eq!(&s.kv().tables(3).unwrap()[0][..2], &[0, 1]);
    assert_eq!(&s.kv().tables(3).unwrap()[1][..2], &[3, 4]);
    for sch in &out.scheduled {
        s.computed(sch);
    }
    s.remove(3).unwrap();
    // A prompt that needs the whole cache evicts every cached block (oldest first)...
    s.add(4, prompt(16, 5000), 16, true).unwrap();
    step(&mut s, 1);
    assert_eq!(s.kv().num_free_blocks(), 0);
    s.remove(4).unwrap();
    // ...and request 1's prompt no longer hits.
    s.add(5, prompt(9, 0), 12, true).unwrap();
    assert_eq!(s.schedule().scheduled[0].cached_tokens, 0);
}

#[test]
fn without_prefix_caching_nothing_is_shared() {
    let mut s = scheduler(32, 8, 64, false);
    s.add(1, prompt(10, 0), 16, true).unwrap();
    step(&mut s, 1);
    s.add(2, prompt(10, 0), 16, true).unwrap();
    let out = s.schedule();
    assert_eq!(out.scheduled.iter().find(|x| x.id == 2).unwrap().cached_tokens, 0);
    assert_eq!(out.prefix_queries, 0);
}

#[test]
fn removing_every_request_returns_every_block() {
    let mut s = scheduler(16, 8, 64, true);
    for id in 1..=3 {
        s.add(id, prompt(5, 0), 8, true).unwrap();
    }
    step(&mut s, 1);
    step(&mut s, 2);
    for id in 1..=3 {
        s.remove(id).unwrap();
    }
    assert_eq!(s.kv().num_free_blocks(), 16);
    assert!(!s.has_work());
}
