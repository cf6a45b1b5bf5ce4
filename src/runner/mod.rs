//! The runner: turns the scheduled sequences of one step (new prompts and decoding
//! sequences, mixed) into one batched forward through the paged cache, and samples.

#[cfg(feature = "cuda")]
mod block_tables;
pub mod generate;
#[cfg(feature = "cuda")]
pub mod graphs;
pub mod memory;
pub mod sampler;

pub use generate::{decode_batch, generate, BatchStats, GenerateOptions, GenerateStats};
pub use sampler::{fetch_logits, Sampler, SamplingParams, StepLogits};

use crate::kv::{KvCache, KvError, KvManager, SeqId};
use crate::model::{Model, StepInput};
use crate::ops::SeqSpan;
use candle_core::{Result, Tensor};

/// The largest decode batch run as a CUDA graph: a CLA cache holds batches of many
/// hundreds of sequences, where an eager step's launches would cost more than its
/// kernels; larger steps run eagerly.
pub const MAX_GRAPH_BATCH: usize = 1024;

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

impl SeqStep {
    /// The position after this step's tokens, checked: at least one token, and no
    /// position past the model's.
    fn end(&self, model: &Model) -> Result<usize> {
        if self.tokens.is_empty() {
            candle_core::bail!("sequence {} has no tokens to compute", self.seq);
        }
        let end = self.start_pos + self.tokens.len();
        if end > model.max_positions() {
            candle_core::bail!(
                "sequence {} reaches position {end}, past the model's {}",
                self.seq,
                model.max_positions()
            );
        }
        Ok(end)
    }
}

pub struct Runner {
    model: Model,
    cache: KvCache,
    /// Tensor parallelism: ranks 1.. (rank 0 is `model` and `cache`), each with its own
    /// cache of its KV heads; every rank runs every step, on its own thread.
    peers: Vec<(Model, KvCache)>,
    /// Decode steps as CUDA graphs (`Runner::set_cuda_graphs`); `None`: every step eager.
    #[cfg(feature = "cuda")]
    graphs: Option<std::sync::Mutex<graphs::DecodeGraphs>>,
    /// Page-locked buffers the launched steps' picks are copied into (two in turn when
    /// steps overlap).
    #[cfg(feature = "cuda")]
    pinned_picks: std::sync::Mutex<Vec<candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<u32>>>,
    /// The picks on their way to a pinned buffer, padded to its length.
    #[cfg(feature = "cuda")]
    picks_staging: std::sync::Mutex<Option<candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>>>,
}

/// A decode step on the device, launched by [`Runner::launch_decode`], not waited for.
pub struct LaunchedDecode {
    logits: Tensor,
    /// Each row's greedy pick, on the device: the next step's input ids.
    pub picks: Tensor,
    #[cfg(feature = "cuda")]
    host: candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<u32>,
    /// Recorded after the copy into `host`.
    #[cfg(feature = "cuda")]
    copied: candle_core::cuda_backend::cudarc::driver::CudaEvent,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    n: usize,
}

/// A step's inputs on the host, before each rank uploads them to its device.
#[derive(Debug)]
struct HostStep {
    ids: Vec<u32>,
    positions: Vec<u32>,
    /// Per KV slot, `[tokens]` cache rows, slot after slot.
    rows: Vec<u32>,
    seqs: Vec<SeqSpan>,
    block_tables: Vec<Vec<u32>>,
    max_blocks: usize,
    logits_rows: Vec<u32>,
}

impl HostStep {
    fn upload(&self, dev: &candle_core::Device) -> Result<StepInput> {
        let n = self.ids.len();
        let slots = self.block_tables.len();
        // One upload for every slot's rows (a copy each would cost a driver call per slot).
        let all_rows = Tensor::from_slice(&self.rows, (slots, n), dev)?;
        Ok(StepInput {
            input_ids: Tensor::from_slice(&self.ids, n, dev)?,
            positions: Tensor::from_slice(&self.positions, n, dev)?,
            cache_rows: (0..slots).map(|s| all_rows.get(s)).collect::<Result<_>>()?,
            seqs: self.seqs.clone(),
            block_tables: self.block_tables.clone(),
            max_blocks: self.max_blocks,
            logits_rows: Tensor::from_slice(&self.logits_rows, self.logits_rows.len(), dev)?,
        })
    }
}

fn kv_err(e: KvError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl Runner {
    /// A runner whose cache has `num_blocks` blocks of `block_size` tokens.
    pub fn new(model: Model, num_blocks: usize, block_size: usize) -> Result<Self> {
        Self::tensor_parallel(vec![model], num_blocks, block_size)
    }

    /// A runner over the ranks of one tensor-parallel model (rank order, rank 0 first;
    /// their all-reduce already connected, see `tp::connect`): one block table for all,
    /// `num_blocks` blocks of each rank's own KV heads on each rank's device.
    pub fn tensor_parallel(models: Vec<Model>, num_blocks: usize, block_size: usize) -> Result<Self> {
        let mut ranks = models.into_iter().map(|mut model| {
            // Serving only: stacked q/k/v and gate/up matmuls on CUDA.
            model.fuse_projections()?;
            let cache = KvCache::new(
                num_blocks,
                block_size,
                model.kv_heads(),
                model.config().head_dim,
                model.kv_cache_dtype(),
                model.device(),
            )?;
            Ok((model, cache))
        });
        let (model, cache) = ranks
            .next()
            .unwrap_or_else(|| Err(candle_core::Error::Msg("a runner needs at least one model".into())))?;
        let peers = ranks.collect::<Result<Vec<_>>>()?;
        Ok(Runner {
            model,
            cache,
            peers,
            #[cfg(feature = "cuda")]
            graphs: None,
            #[cfg(feature = "cuda")]
            pinned_picks: Default::default(),
            #[cfg(feature = "cuda")]
            picks_staging: Default::default(),
        })
    }

    /// Runs decode steps (every sequence one new token, up to
    /// [`MAX_GRAPH_BATCH`]) as CUDA graphs, captured per batch size and table
    /// width on first use, as vLLM does (`--enforce-eager` turns it off). Only for one
    /// CUDA rank; elsewhere, and in builds without `cuda`, steps stay eager. Returns
    /// whether graphs are on.
    pub fn set_cuda_graphs(&mut self, on: bool) -> bool {
        #[cfg(feature = "cuda")]
        {
            // The batch-invariant kernels upload each step's tables themselves: no graphs.
            let usable = on && self.model.device().is_cuda() && self.peers.is_empty() && !self.model.batch_invariant();
            self.graphs = usable.then(Default::default);
            usable
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = on;
            false
        }
    }

    /// Keeps at most `n` decode graphs (default `graphs::MAX_GRAPHS`), dropping the one
    /// that ran longest ago to capture another. No effect without graphs.
    pub fn set_cuda_graphs_limit(&mut self, n: usize) {
        #[cfg(feature = "cuda")]
        if let Some(g) = &mut self.graphs {
            g.get_mut().expect("decode graphs").limit = n.max(1);
        }
        #[cfg(not(feature = "cuda"))]
        let _ = n;
    }

    /// Decode graphs held now.
    pub fn cuda_graphs_captured(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.graphs {
            return g.lock().map_or(0, |g| g.len());
        }
        0
    }

    /// Every rank's cache, rank order.
    pub fn rank_caches(&self) -> impl Iterator<Item = &KvCache> {
        std::iter::once(&self.cache).chain(self.peers.iter().map(|(_, c)| c))
    }

    /// Ranks of the model (1 without tensor parallelism).
    pub fn world_size(&self) -> usize {
        1 + self.peers.len()
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
        self.step_host(mgr, steps)?.upload(self.model.device())
    }

    fn step_host(&self, mgr: &KvManager, steps: &[SeqStep]) -> Result<HostStep> {
        let kv_layers = mgr.layout().kv_layers();
        let bs = mgr.block_size();
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); kv_layers];
        let mut seqs = Vec::with_capacity(steps.len());
        let mut logits_rows = Vec::with_capacity(steps.len());
        let mut max_blocks = 1;
        for s in steps {
            let end = s.end(&self.model)?;
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
            for (table, slot_rows) in tables.iter().zip(rows.iter_mut()) {
                if table.len() * bs < end {
                    return Err(kv_err(KvError::OutOfBlocks {
                        needed: end.div_ceil(bs) - table.len(),
                        free: mgr.num_free_blocks(),
                    }));
                }
                slot_rows.extend((s.start_pos..end).map(|p| table[p / bs] * bs as u32 + (p % bs) as u32));
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
        Ok(HostStep {
            ids,
            positions,
            rows: rows.concat(),
            seqs,
            block_tables,
            max_blocks,
            logits_rows,
        })
    }

    /// Runs one step; returns f32 logits, one row per step (its last token), or one
    /// per token for steps with `all_logits`, in step order.
    pub fn step(&self, mgr: &KvManager, steps: &[SeqStep]) -> Result<Tensor> {
        if !self.peers.is_empty() {
            return self.step_tensor_parallel(&self.step_host(mgr, steps)?);
        }
        #[cfg(feature = "cuda")]
        if let Some(logits) = self.graph_step(mgr, steps, None)? {
            return Ok(logits);
        }
        let input = self.step_input(mgr, steps)?;
        if self.model.device().is_cuda() {
            // The GPU does the work; the calling thread only queues launches on the device's
            // one stream (`device::cuda`).
            return self.model.forward(&input, &self.cache);
        }
        // On the CPU the whole forward runs on a rayon worker, so each op's parallel
        // region starts without handing off to another thread.
        crate::ops::parallel::in_pool(|| self.model.forward(&input, &self.cache))
    }

    /// The step as a decode graph, when graphs are on and one takes it (`ids`: token ids
    /// already on the device); `None`: run it eagerly.
    #[cfg(feature = "cuda")]
    fn graph_step(&self, mgr: &KvManager, steps: &[SeqStep], ids: Option<&Tensor>) -> Result<Option<Tensor>> {
        match &self.graphs {
            Some(graphs) => graphs
                .lock()
                .expect("decode graphs")
                .run(&self.model, &self.cache, mgr, steps, ids),
            None => Ok(None),
        }
    }

    /// Launches a decode step (every sequence one token) as a CUDA graph and returns
    /// without waiting for it: its picks come back by [`Runner::wait_decode`], while
    /// the host prepares the next step. `ids`: the step's token ids on the device (a
    /// launched step's [`LaunchedDecode::picks`], rows chosen), in place of the steps'
    /// own, so a step can be launched before the host knows its tokens. `sampling`: how
    /// each row is picked on the device, when not every pick is the argmax. `None`: the
    /// step cannot run so (no graphs, or not a decode step a graph takes); run it with
    /// [`Runner::step`].
    pub fn launch_decode(
        &self,
        mgr: &KvManager,
        steps: &[SeqStep],
        ids: Option<&Tensor>,
        sampling: Option<&[crate::ops::RowSample]>,
    ) -> Result<Option<LaunchedDecode>> {
        #[cfg(feature = "cuda")]
        if self.graphs.is_some() {
            let Some(logits) = self.graph_step(mgr, steps, ids)? else {
                return Ok(None);
            };
            let picks = match sampling {
                Some(rows) => crate::ops::sample_rows(&logits, rows)?,
                None => crate::ops::argmax_rows(&logits)?,
            };
            let mut host = self.pinned_picks.lock().expect("pinned picks").pop();
            if host.as_ref().is_none_or(|h| h.len() < steps.len()) {
                host = Some(block_tables::pinned(
                    self.model.device().as_cuda_device()?,
                    MAX_GRAPH_BATCH,
                )?);
            }
            let mut host = host.expect("made above");
            {
                use candle_core::cuda_backend::WrapErr;
                let (storage, layout) = picks.storage_and_layout();
                let candle_core::Storage::Cuda(c) = &*storage else {
                    candle_core::bail!("launch_decode: picks off the device");
                };
                let n = steps.len();
                let src = c
                    .as_cuda_slice::<u32>()?
                    .slice(layout.start_offset()..layout.start_offset() + n);
                // A copy to the host moves the whole destination: the picks go through a
                // device buffer of the pinned buffer's length (ordered on the stream, so
                // one serves every step in flight).
                let stream = c.device.cuda_stream();
                let mut staging = self.picks_staging.lock().expect("picks staging");
                if staging.as_ref().is_none_or(|d| d.len() != host.len()) {
                    *staging = Some(stream.alloc_zeros::<u32>(host.len()).w()?);
                }
                let staging = staging.as_mut().expect("made above");
                stream.memcpy_dtod(&src, &mut staging.slice_mut(0..n)).w()?;
                stream.memcpy_dtoh(&*staging, &mut host).w()?;
                // The pinned buffer's own event is not recorded on candle's stream (it
                // leaves stream synchronization to its user): this one marks the copy.
                let copied = stream.record_event(None).w()?;
                return Ok(Some(LaunchedDecode {
                    logits,
                    picks: picks.clone(),
                    host,
                    copied,
                    n,
                }));
            }
        }
        let _ = (mgr, steps, ids, sampling);
        Ok(None)
    }

    /// Waits for a launched step's picks (only for them: work queued after it runs on).
    #[cfg(feature = "cuda")]
    pub fn wait_decode(&self, l: LaunchedDecode) -> Result<(Tensor, Vec<u32>)> {
        use candle_core::cuda_backend::WrapErr;
        l.copied.synchronize().w()?;
        let picks = l.host.as_slice().w()?[..l.n].to_vec();
        self.pinned_picks.lock().expect("pinned picks").push(l.host);
        Ok((l.logits, picks))
    }

    /// Without CUDA no step is ever launched ([`Runner::launch_decode`] says `None`).
    #[cfg(not(feature = "cuda"))]
    pub fn wait_decode(&self, l: LaunchedDecode) -> Result<(Tensor, Vec<u32>)> {
        let picks = l.picks.to_vec1::<u32>()?;
        Ok((l.logits, picks))
    }

    /// Every rank runs the step on its own thread (they meet in each layer's
    /// all-reduce); rank 0's logits are the step's. Other ranks skip the `lm_head`.
    /// Not through the CPU pool (`ops::parallel::in_pool`): a rank waiting in an
    /// all-reduce must not hold a pool worker another rank's ops need. A rank that
    /// fails aborts the group's all-reduce, so the others return instead of waiting
    /// for it (then every later step fails: the ranks are out of step).
    fn step_tensor_parallel(&self, host: &HostStep) -> Result<Tensor> {
        let run = |model: &Model, cache: &KvCache, logits: bool| {
            let out = host
                .upload(model.device())
                .and_then(|input| model.forward_rank(&input, cache, logits));
            if out.is_err() {
                model.abort_all_reduce();
            }
            out
        };
        std::thread::scope(|s| {
            let peers: Vec<_> = self
                .peers
                .iter()
                .map(|(model, cache)| s.spawn(move || run(model, cache, false).map(|_| ())))
                .collect();
            let logits = run(&self.model, &self.cache, true);
            for p in peers {
                p.join()
                    .map_err(|_| candle_core::Error::Msg("a tensor-parallel rank panicked".into()))??;
            }
            logits?.ok_or_else(|| candle_core::Error::Msg("rank 0 returned no logits".into()))
        })
    }
}
