//! The scheduler, in the vLLM V1 manner: no prefill/decode phases. Each request has
//! `num_computed` tokens catching up with its `tokens` under a per-step token budget,
//! so chunked prefill falls out for free. Running requests go first, then waiting ones
//! in arrival order while blocks allow; when blocks run out the newest running request
//! is preempted (its blocks freed, recomputed later). It never builds a tensor.

use crate::kv::{KvError, KvManager, SeqId};
use rustc_hash::FxHashMap;
use std::collections::VecDeque;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub prefix_caching: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AdmitError {
    #[error("the request needs {needed} KV blocks at its longest but the cache has only {total}")]
    NeverFits { needed: usize, total: usize },
    #[error("request {0} already exists")]
    Duplicate(SeqId),
}

#[derive(Debug)]
struct SchedRequest {
    id: SeqId,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    num_computed: usize,
    /// Prefix-cache lookups are skipped (e.g. prompt log-probs need every position).
    use_prefix_cache: bool,
    /// Most tokens of this request computed in one step.
    max_chunk: usize,
    /// In `running` (else in `waiting`).
    running: bool,
}

/// One request's share of a step: compute `tokens[start..start + len]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Scheduled {
    pub id: SeqId,
    pub start: usize,
    pub tokens: Vec<u32>,
    /// This chunk reaches the end of the request's tokens: its last logits are sampled.
    pub samples: bool,
    /// Tokens of the prompt covered by the prefix cache when first scheduled (0 else).
    pub cached_tokens: usize,
}

#[derive(Debug, Default, PartialEq)]
pub struct SchedulerOutput {
    pub scheduled: Vec<Scheduled>,
    /// Requests preempted this step, newest first; they wait to be recomputed.
    pub preempted: Vec<SeqId>,
    /// Prompt tokens looked up in / served from the prefix cache this step.
    pub prefix_queries: usize,
    pub prefix_hits: usize,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: KvManager,
    /// Every request, by id: a step's per-request updates are lookups, not scans of the
    /// running list (which would make a step O(batch²)).
    reqs: FxHashMap<SeqId, SchedRequest>,
    /// Waiting ids, arrival order (preempted ones go back to the front).
    waiting: VecDeque<SeqId>,
    /// Running ids, admission order: the newest is preempted first.
    running: Vec<SeqId>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, kv: KvManager) -> Self {
        Scheduler {
            cfg,
            kv,
            reqs: FxHashMap::default(),
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    pub fn kv(&self) -> &KvManager {
        &self.kv
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }
    /// Tokens held in the cache per KV slot, over every running request.
    pub fn cached_tokens(&self) -> usize {
        self.running.iter().map(|id| self.reqs[id].num_computed).sum()
    }

    /// Queues a request. `max_total_tokens` (prompt + the most it may generate) must fit
    /// the whole cache, or it could never finish and would starve the queue.
    pub fn add(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        max_total_tokens: usize,
        use_prefix_cache: bool,
    ) -> Result<(), AdmitError> {
        let needed = max_total_tokens.div_ceil(self.kv.block_size()) * self.kv.layout().kv_layers();
        if needed > self.kv.num_blocks() {
            return Err(AdmitError::NeverFits {
                needed,
                total: self.kv.num_blocks(),
            });
        }
        if self.reqs.contains_key(&id) {
            return Err(AdmitError::Duplicate(id));
        }
        let prompt_len = prompt.len();
        self.waiting.push_back(id);
        self.reqs.insert(
            id,
            SchedRequest {
                id,
                tokens: prompt,
                prompt_len,
                num_computed: 0,
                use_prefix_cache: use_prefix_cache && self.cfg.prefix_caching,
                max_chunk: usize::MAX,
                running: false,
            },
        );
        Ok(())
    }

    /// Caps how many of a request's tokens one step computes (a request that needs the
    /// logits of every position makes a full-vocabulary row per token it computes).
    pub fn set_max_chunk(&mut self, id: SeqId, max_chunk: usize) {
        if let Some(r) = self.reqs.get_mut(&id) {
            r.max_chunk = max_chunk.max(1);
        }
    }

    /// Every request it holds, running or waiting.
    pub fn ids(&self) -> Vec<SeqId> {
        self.running.iter().chain(self.waiting.iter()).copied().collect()
    }

    pub fn tokens(&self, id: SeqId) -> Option<&[u32]> {
        self.reqs.get(&id).map(|r| r.tokens.as_slice())
    }
    pub fn prompt_len(&self, id: SeqId) -> Option<usize> {
        self.reqs.get(&id).map(|r| r.prompt_len)
    }

    /// Picks this step's work and allocates its blocks.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let (computed, len, max_chunk) = {
                let r = &self.reqs[&id];
                (r.num_computed, r.tokens.len(), r.max_chunk)
            };
            let want = (len - computed).min(budget).min(max_chunk);
            // Make room by preempting the newest running requests, possibly this one.
            let mut fits = self.kv.allocate(id, computed + want).is_ok();
            while !fits {
                let victim = self.running.pop().expect("the request itself is running");
                self.preempt(victim, &mut out);
                if self.running.len() <= i {
                    break;
                }
                fits = self.kv.allocate(id, computed + want).is_ok();
            }
            if !fits {
                break;
            }
            let r = &self.reqs[&id];
            out.scheduled.push(Scheduled {
                id,
                start: computed,
                tokens: r.tokens[computed..computed + want].to_vec(),
                samples: computed + want == len,
                cached_tokens: 0,
            });
            budget -= want;
            i += 1;
        }
        // New work only when nothing had to be preempted: admitting would just thrash.
        while out.preempted.is_empty() && budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else { break };
            let r = &self.reqs[&id];
            let (len, max_chunk) = (r.tokens.len(), r.max_chunk);
            let (mut cached, lookup) = (0, r.use_prefix_cache && r.num_computed == 0);
            if lookup {
                cached = self.kv.start_with_prefix(id, &r.tokens);
            }
            let start = cached;
            let want = (len - start).min(budget).min(max_chunk);
            if !self.kv.can_allocate(id, start + want) {
                if self.kv.contains(id) {
                    self.kv.free(id).expect("just started");
                }
                break;
            }
            self.kv.allocate(id, start + want).expect("checked above");
            if lookup {
                out.prefix_queries += len;
                out.prefix_hits += cached;
            }
            self.waiting.pop_front();
            let r = self.reqs.get_mut(&id).expect("waiting requests are known");
            r.num_computed = start;
            r.running = true;
            out.scheduled.push(Scheduled {
                id,
                start,
                tokens: r.tokens[start..start + want].to_vec(),
                samples: start + want == len,
                cached_tokens: cached,
            });
            budget -= want;
            self.running.push(id);
        }
        out
    }

    /// The decode step after one whose picks are not read yet: each of `prev` (running
    /// requests that computed their last known token in it) one position further, its
    /// token the one being picked (a placeholder here: the runner takes it from the
    /// device). Blocks for the new positions are allocated; `None` when a request is no
    /// longer such a decode or a block is missing (no preemption here: the caller
    /// schedules normally instead).
    pub fn continue_decode(&mut self, prev: &[&Scheduled]) -> Option<SchedulerOutput> {
        if prev.len() > self.cfg.max_num_batched_tokens {
            return None;
        }
        let mut out = SchedulerOutput::default();
        for s in prev {
            let r = self.reqs.get(&s.id).filter(|r| r.running)?;
            if s.tokens.len() != 1 || r.tokens.len() != s.start + 1 {
                return None;
            }
            self.kv.allocate(s.id, s.start + 2).ok()?;
            out.scheduled.push(Scheduled {
                id: s.id,
                start: s.start + 1,
                tokens: vec![0],
                samples: true,
                cached_tokens: 0,
            });
        }
        Some(out)
    }

    fn preempt(&mut self, victim: SeqId, out: &mut SchedulerOutput) {
        if self.kv.contains(victim) {
            self.kv.free(victim).expect("running requests hold blocks");
        }
        let r = self.reqs.get_mut(&victim).expect("running requests are known");
        r.num_computed = 0;
        r.running = false;
        out.preempted.push(victim);
        self.waiting.push_front(victim);
    }

    /// After a step ran: `scheduled` tokens are in the cache now; full blocks become
    /// shareable through the prefix cache.
    pub fn computed(&mut self, s: &Scheduled) {
        let prefix_caching = self.cfg.prefix_caching;
        let Some(r) = self.reqs.get_mut(&s.id).filter(|r| r.running) else {
            return;
        };
        r.num_computed = s.start + s.tokens.len();
        if prefix_caching {
            // Generated tokens are cached too: a recomputed or repeated conversation reuses them.
            self.kv.cache_full_blocks(r.id, &r.tokens, r.num_computed);
        }
    }

    /// Appends a sampled token to a running request.
    pub fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some(r) = self.reqs.get_mut(&id) {
            r.tokens.push(token);
        }
    }

    /// Removes a request (finished or aborted) and frees its blocks.
    pub fn remove(&mut self, id: SeqId) -> Result<(), KvError> {
        if let Some(r) = self.reqs.remove(&id) {
            if r.running {
                self.running.retain(|&x| x != id);
            } else {
                self.waiting.retain(|&x| x != id);
            }
        }
        if self.kv.contains(id) {
            self.kv.free(id)?;
        }
        Ok(())
    }
}
