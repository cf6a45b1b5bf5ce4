//! The runner: turns the scheduled sequences of one step (new prompts and decoding
//! sequences, mixed) into one batched forward through the paged cache, and samples.

pub mod generate;
pub mod sampler;

pub use generate::{generate, GenerateOptions, GenerateStats};
pub use sampler::{fetch_logits, Sampler, SamplingParams, StepLogits};

use crate::kv::{KvCache, KvError, KvManager, SeqId};
use crate::model::{Model, StepInput};
use crate::ops::SeqSpan;
use candle_core::{Result, Tensor};

/// One sequence's share of a step: `tokens` are computed at positions
/// `start_pos..start_pos + tokens.len()`; the manager must already hold blocks for them.
#[derive(Debug, Clone)]
pub struct SeqStep {
    pub seq: SeqId,
    pub tokens: Vec<u32>,
    pub start_pos: usize,
    /// Logits for every token of this step (prompt log-probs), not just the last.
    pub all_logits: bool,
}

pub struct Runner {
    model: Model,
    cache: KvCache,
}

fn kv_err(e: KvError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl Runner {
    /// A runner whose cache has `num_blocks` blocks of `block_size` tokens.
    pub fn new(model: Model, num_blocks: usize, block_size: usize) -> Result<Self> {
        let cfg = model.config();
        let cache = KvCache::new(
            num_blocks,
            block_size,
            cfg.num_key_value_heads,
            cfg.head_dim,
            model.dtype(),
            model.device(),
        )?;
        Ok(Runner { model, cache })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Builds the flat batch: tokens of every sequence back to back, their cache rows
    /// in every KV slot, and each slot's block tables padded to one width.
    pub fn step_input(&self, mgr: &KvManager, steps: &[SeqStep]) -> Result<StepInput> {
        let dev = self.model.device();
        let kv_layers = mgr.layout().kv_layers();
        let bs = mgr.block_size();
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); kv_layers];
        let mut seqs = Vec::with_capacity(steps.len());
        let mut logits_rows = Vec::with_capacity(steps.len());
        let mut max_blocks = 1;
        for s in steps {
            if s.tokens.is_empty() {
                candle_core::bail!("sequence {} has no tokens to compute", s.seq);
            }
            let end = s.start_pos + s.tokens.len();
            if end > self.model.max_positions() {
                candle_core::bail!(
                    "sequence {} reaches position {end}, past the model's {}",
                    s.seq,
                    self.model.max_positions()
                );
            }
            seqs.push(SeqSpan {
                q_start: ids.len() as u32,
                q_len: s.tokens.len() as u32,
                ctx_len: end as u32,
            });
            ids.extend_from_slice(&s.tokens);
            positions.extend((s.start_pos..end).map(|p| p as u32));
            if s.all_logits {
                logits_rows.extend(ids.len() as u32 - s.tokens.len() as u32..ids.len() as u32);
            } else {
                logits_rows.push(ids.len() as u32 - 1);
            }
            let tables = mgr.tables(s.seq).map_err(kv_err)?;
            for (slot, slot_rows) in rows.iter_mut().enumerate() {
                for p in s.start_pos..end {
                    slot_rows.push(mgr.cache_position(s.seq, slot, p).map_err(kv_err)?);
                }
            }
            max_blocks = max_blocks
                .max(end.div_ceil(bs))
                .max(tables.first().map_or(0, |t| t.len()));
        }
        let mut block_tables = vec![vec![0u32; steps.len() * max_blocks]; kv_layers];
        for (i, s) in steps.iter().enumerate() {
            let tables = mgr.tables(s.seq).map_err(kv_err)?;
            for (slot, table) in tables.iter().enumerate() {
                block_tables[slot][i * max_blocks..i * max_blocks + table.len()].copy_from_slice(table);
            }
        }
        let n = ids.len();
        Ok(StepInput {
            input_ids: Tensor::from_vec(ids, n, dev)?,
            positions: Tensor::from_vec(positions, n, dev)?,
            cache_rows: rows
                .into_iter()
                .map(|r| Tensor::from_vec(r, n, dev))
                .collect::<Result<_>>()?,
            seqs,
            block_tables,
            max_blocks,
            logits_rows: Tensor::new(logits_rows.as_slice(), dev)?,
        })
    }

    /// Runs one step; returns f32 logits, one row per step (its last token), or one
    /// per token for steps with `all_logits`, in step order.
    pub fn step(&self, mgr: &KvManager, steps: &[SeqStep]) -> Result<Tensor> {
        let input = self.step_input(mgr, steps)?;
        if self.model.device().is_cuda() {
            // The GPU does the work; the calling thread only queues launches on the device's
            // one stream (`ops::cuda::device`).
            return self.model.forward(&input, &self.cache);
        }
        // On the CPU the whole forward runs on a rayon worker, so each op's parallel
        // region starts without handing off to another thread.
        crate::ops::parallel::in_pool(|| self.model.forward(&input, &self.cache))
    }
}
