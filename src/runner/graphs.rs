//! CUDA graphs for decode steps. A decode step issues ~15 candle ops per
//! layer, each costing more host time (allocation, launch) than the GPU needs for most
//! of them: eagerly, the step is the host's (docs/bench-log/2026-11-25.md, "Where
//! the decode step's time goes"). As vLLM does, a step of `n` one-token sequences runs instead as
//! one captured graph: launched with one driver call, its kernels back to back.
//!
//! A graph is captured per (batch bucket, block-table width bucket) and padded up to
//! it: padding sequences read one cache row and write none ([`SKIP_ROW`]). Everything
//! the graph reads that changes from step to step lives in fixed device buffers,
//! rewritten before each launch with three copies from page-locked staging: the tokens,
//! positions and cache rows ([`Buffers::inputs`]), the spans, and every slot's block
//! table ([`GraphBlockTables`]); only the blocks a sequence uses are
//! staged. The attention's partitions split each sequence's keys evenly, so one graph
//! serves every context up to its table width. Buffers the forward allocates become the
//! graph's own allocations (CUDA graph memory nodes), freed inside it.

use super::block_tables::{pinned, GraphBlockTables};
use super::{SeqStep, MAX_GRAPH_BATCH};
use crate::kv::{KvCache, KvManager};
use crate::model::{Model, StepInput};
use crate::ops::reshape_and_cache::SKIP_ROW;
use crate::ops::{DecodeGraphAttention, PagedAttentionPlan, SeqSpan};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph, PinnedHostSlice};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, DType, Layout, Result, Tensor};
use std::collections::HashMap;

/// The batch a step of `n` sequences is padded to: powers of two up to 8, then steps of
/// 16 up to 64 and of 64 beyond. Few graphs cover every batch, and a padding row costs
/// little next to the weights every step reads (at most a quarter more rows past 8).
pub fn batch_bucket(n: usize) -> usize {
    match n {
        0..=8 => n.max(1).next_power_of_two(),
        9..=64 => n.next_multiple_of(16),
        _ => n.next_multiple_of(64),
    }
}

/// The block-table width a step of at most `max_blocks` blocks per sequence is padded
/// to: a new graph each time the longest context doubles.
pub fn blocks_bucket(max_blocks: usize) -> usize {
    max_blocks.max(8).next_power_of_two()
}

/// What a decode graph reads and writes, at fixed device addresses.
struct Buffers {
    /// `[(2 + slots) * batch]` u32: token ids, positions, then each slot's cache rows.
    inputs: Tensor,
    /// What the host writes into `inputs`, staged in page-locked memory.
    inputs_staged: PinnedHostSlice<u32>,
    /// The captured forward's input: views of `inputs`, and the logits rows.
    step: StepInput,
    /// The attention's launch, made once for the graph's shape.
    attention: DecodeGraphAttention,
    /// The spans and every slot's block table the attention reads.
    tables: GraphBlockTables,
    /// `[batch, vocab]` f32: what each launch leaves.
    logits: Tensor,
    batch: usize,
    /// Per row of the staged tables: the epoch of the tables staged there and how many
    /// blocks of them (`KvManager::tables_with_epoch`). A row that keeps its sequence
    /// only has its new blocks written, so a step's staging costs O(batch), not
    /// O(batch × context).
    staged: Vec<(u64, usize)>,
    /// Recorded after the last step's uploads from the staging buffers: a step launched
    /// before the previous one finished must not rewrite them while they are read.
    uploaded: Option<candle_core::cuda_backend::cudarc::driver::CudaEvent>,
}

/// One captured decode step.
struct DecodeGraph {
    exec: Exec,
    bufs: Buffers,
    /// The run counter when it last ran (least recently used goes first).
    last_used: u64,
}

/// The most graphs a runner keeps: each holds its own activations, logits and staging
/// (up to ~150 MB at batch 512), and batch buckets × table widths could otherwise grow
/// to about a hundred as contexts lengthen.
pub const MAX_GRAPHS: usize = 24;

/// A graph executable that may move to the engine thread.
struct Exec(CudaGraph);

// Safety: CUDA graphs must not be used from two threads at once (cudarc leaves
// `CudaGraph` !Send for that); the runner only touches them under its `Mutex`, one
// thread at a time, and the driver API itself is thread-safe.
unsafe impl Send for Exec {}

/// Copies the staged inputs into the graph's input tensor, in place: the buffer keeps
/// its address.
struct Upload<'a>(&'a PinnedHostSlice<u32>);

impl candle_core::InplaceOp1 for Upload<'_> {
    fn name(&self) -> &'static str {
        "decode_graph_upload"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("decode graphs run on CUDA only")
    }
    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> Result<()> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("decode graph inputs must be contiguous".into()))?;
        if b - a != self.0.len() {
            candle_core::bail!("decode graph inputs: {} values for {} slots", self.0.len(), b - a);
        }
        let stream = s.device().cuda_stream();
        let mut dst = s.as_cuda_slice_mut::<u32>()?.slice_mut(a..b);
        stream.memcpy_htod(self.0, &mut dst).w()
    }
}

impl Buffers {
    fn new(model: &Model, cache: &KvCache, batch: usize, max_blocks: usize) -> Result<Self> {
        let dev = model.device();
        let cuda = dev.as_cuda_device()?;
        let slots = model.layout().kv_layers();
        let (_, block_size, kv_heads, d) = cache.k().dims4()?;
        let attention = DecodeGraphAttention::new(
            dev,
            batch,
            max_blocks,
            (model.config().num_attention_heads, kv_heads, d),
            block_size,
            (model.dtype(), cache.dtype().is_fp8()),
            model.attention_scale(),
        )?;
        let tables = GraphBlockTables::new(cuda, batch, max_blocks, slots, block_size)?;
        let len = (2 + slots) * batch;
        let inputs = Tensor::zeros(len, DType::U32, dev)?;
        let inputs_staged = pinned(cuda, len)?;
        // The forward's host-side view. On CUDA the attention reads its spans and tables
        // from the runner's device buffers (refilled each step, and checked then), so the
        // host tables are left empty (0 blocks wide) rather than held as a copy no one
        // reads: up to 20 slots × 512 sequences × 512 blocks a graph.
        let step = StepInput {
            input_ids: inputs.narrow(0, 0, batch)?,
            positions: inputs.narrow(0, batch, batch)?,
            cache_rows: (0..slots)
                .map(|s| inputs.narrow(0, (2 + s) * batch, batch))
                .collect::<Result<_>>()?,
            seqs: (0..batch as u32)
                .map(|i| SeqSpan {
                    q_start: i,
                    q_len: 1,
                    ctx_len: 1,
                })
                .collect(),
            block_tables: vec![Vec::new(); slots],
            max_blocks: 0,
            logits_rows: Tensor::arange(0u32, batch as u32, dev)?,
        };
        let logits = Tensor::zeros((batch, model.config().vocab_size), DType::F32, dev)?;
        Ok(Buffers {
            inputs,
            inputs_staged,
            step,
            attention,
            tables,
            logits,
            batch,
            staged: vec![(0, 0); batch],
            uploaded: None,
        })
    }

    /// Stages the step of `steps` (one token each) in the graph's buffers, padded: ids,
    /// positions and every slot's cache rows, the spans, and every slot's table, each
    /// checked against the cache; then copies them to the device.
    /// `ids`: the token ids already on the device (the previous step's picks), in place
    /// of the steps' own.
    fn fill(
        &mut self,
        mgr: &KvManager,
        steps: &[SeqStep],
        num_blocks: usize,
        on_device: Option<&Tensor>,
    ) -> Result<()> {
        if let Some(e) = self.uploaded.take() {
            e.synchronize().w()?;
        }
        let (batch, n) = (self.batch, steps.len());
        let slots = self.step.cache_rows.len();
        let bs = mgr.block_size();
        let staged = self.inputs_staged.as_mut_slice().w()?;
        let (ids, rest) = staged.split_at_mut(batch);
        let (positions, rows) = rest.split_at_mut(batch);
        let mut seqs = Vec::with_capacity(batch);
        let mut tables = Vec::with_capacity(n);
        for (i, s) in steps.iter().enumerate() {
            ids[i] = s.tokens[0];
            positions[i] = s.start_pos as u32;
            let (epoch, t) = mgr.tables_with_epoch(s.seq).map_err(kv_err)?;
            let block = s.start_pos / bs;
            for (slot, table) in t.iter().enumerate().take(slots) {
                let b = table.get(block).ok_or_else(|| {
                    candle_core::Error::Msg(format!("sequence {} has no block for position {}", s.seq, s.start_pos))
                })?;
                rows[slot * batch + i] = b * bs as u32 + (s.start_pos % bs) as u32;
            }
            tables.push((epoch, t));
            seqs.push(SeqSpan {
                q_start: i as u32,
                q_len: 1,
                ctx_len: s.start_pos as u32 + 1,
            });
        }
        // Padding: token 0 at position 0, written nowhere, attending to one key (row 0
        // of its table, block 0: any block will do, its output row is dropped).
        ids[n..].fill(0);
        positions[n..].fill(0);
        for slot in 0..slots {
            rows[slot * batch + n..(slot + 1) * batch].fill(SKIP_ROW);
        }
        seqs.extend((n as u32..batch as u32).map(|i| SeqSpan {
            q_start: i,
            q_len: 1,
            ctx_len: 1,
        }));
        let staged = &mut self.staged;
        self.tables.refill(&seqs, |t| {
            for (i, (s, &(epoch, tables))) in steps.iter().zip(&tables).enumerate() {
                let used = (s.start_pos + 1).div_ceil(bs);
                // The blocks this row already holds, when it held these tables last step.
                let from = match staged[i] {
                    (e, held) if e == epoch && held <= used => held,
                    _ => 0,
                };
                for (slot, table) in tables.iter().enumerate() {
                    let src = table.get(from..used).ok_or_else(|| {
                        candle_core::Error::Msg(format!("sequence {} has no block for position {}", s.seq, s.start_pos))
                    })?;
                    if let Some(b) = src.iter().find(|&&b| b as usize >= num_blocks) {
                        candle_core::bail!(
                            "sequence {}'s table holds block {b}, past the cache's {num_blocks}",
                            s.seq
                        );
                    }
                    let at = slot * t.stride + i * t.max_blocks;
                    t.tables[at + from..at + used].copy_from_slice(src);
                }
                staged[i] = (epoch, used);
            }
            for slot in 0..slots {
                for i in n..batch {
                    t.tables[slot * t.stride + i * t.max_blocks] = 0;
                }
            }
            staged[n..].fill((0, 0));
            Ok(())
        })?;
        self.inputs.inplace_op1(&Upload(&self.inputs_staged))?;
        if let Some(ids) = on_device {
            // Ordered on the stream after the upload, and after the step that picked them.
            self.inputs.slice_set(ids, 0, 0)?;
        }
        let stream = self.inputs.device().as_cuda_device()?.cuda_stream();
        self.uploaded = Some(stream.record_event(None).w()?);
        Ok(())
    }

    /// The step the graph holds, issued on the stream: the forward, its logits copied
    /// into [`Buffers::logits`].
    fn forward(&self, model: &Model, cache: &KvCache) -> Result<()> {
        let plan = PagedAttentionPlan::for_decode_graph(&self.step.seqs, &self.attention, self.tables.device_tables())
            .with_kv_scales(model.kv_scales().to_vec());
        let out = model
            .forward_planned(&self.step, cache, &plan, true)?
            .ok_or_else(|| candle_core::Error::Msg("no logits".into()))?;
        self.logits.slice_set(&out, 0, 0)
    }
}

impl DecodeGraph {
    /// Captures the forward of `bufs` (already filled with a step) after an eager
    /// warm-up of that step, which it computes: its cache writes are the graph's own,
    /// so the launch that follows repeats them.
    fn capture(model: &Model, cache: &KvCache, bufs: Buffers) -> Result<Self> {
        let cuda = model.device().as_cuda_device()?;
        let stream = cuda.cuda_stream();
        // candle uploads a few shape vectors (index_select's); with its cache on they are
        // uploaded once, by the warm-up, and reused by the capture, which may not copy
        // from the host. The warm-up also loads every kernel.
        let _cached_uploads = cuda.enable_cuda_graph_htod_cache();
        bufs.forward(model, cache)?;
        stream.synchronize().w()?;
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .w()?;
        let captured = bufs.forward(model, cache);
        // Always ends the capture, so a failed one leaves the stream usable.
        let exec = stream.end_capture(sys::CUgraphInstantiate_flags(0)).w();
        captured?;
        let exec = exec?.ok_or_else(|| candle_core::Error::Msg("the decode graph captured nothing".into()))?;
        exec.upload().w()?;
        Ok(DecodeGraph {
            exec: Exec(exec),
            bufs,
            last_used: 0,
        })
    }
}

fn kv_err(e: crate::kv::KvError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// The runner's captured decode graphs, by (batch, block-table width).
#[derive(Default)]
pub(super) struct DecodeGraphs {
    graphs: HashMap<(usize, usize), DecodeGraph>,
    /// Graph runs so far (the clock of `DecodeGraph::last_used`).
    runs: u64,
    /// The most graphs kept; 0 means [`MAX_GRAPHS`].
    pub(super) limit: usize,
    /// A capture failed: this runner stays eager (the error was logged once).
    failed: bool,
}

impl DecodeGraphs {
    /// Runs `steps` as a graph when a graph can take them (every sequence one token and
    /// one logits row, at most [`MAX_GRAPH_BATCH`]): f32 logits `[n, vocab]`. `None`:
    /// run them eagerly.
    pub(super) fn run(
        &mut self,
        model: &Model,
        cache: &KvCache,
        mgr: &KvManager,
        steps: &[SeqStep],
        ids: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let n = steps.len();
        if ids.is_some_and(|t| t.dims() != [n]) {
            candle_core::bail!("decode graph: device token ids of another batch than {n}");
        }
        if self.failed || n == 0 || n > MAX_GRAPH_BATCH || steps.iter().any(|s| s.tokens.len() != 1) {
            return Ok(None);
        }
        let mut max_blocks = 1;
        for s in steps {
            max_blocks = max_blocks.max(s.end(model)?.div_ceil(mgr.block_size()));
        }
        let num_blocks = cache.k().dim(0)?;
        let key = (batch_bucket(n), blocks_bucket(max_blocks));
        let limit = if self.limit == 0 { MAX_GRAPHS } else { self.limit };
        if !self.graphs.contains_key(&key) && self.graphs.len() >= limit {
            self.evict_least_recent(model)?;
        }
        self.runs += 1;
        let graph = match self.graphs.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let g = e.into_mut();
                g.bufs.fill(mgr, steps, num_blocks, ids)?;
                g
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                let captured = Buffers::new(model, cache, key.0, key.1).and_then(|mut bufs| {
                    bufs.fill(mgr, steps, num_blocks, ids)?;
                    DecodeGraph::capture(model, cache, bufs)
                });
                match captured {
                    Ok(g) => {
                        tracing::debug!(
                            "captured a decode graph for batch {} and tables {} blocks wide",
                            key.0,
                            key.1
                        );
                        e.insert(g)
                    }
                    Err(err) => {
                        tracing::warn!("decode steps run without CUDA graphs: capturing one failed: {err}");
                        self.failed = true;
                        return Ok(None);
                    }
                }
            }
        };
        graph.last_used = self.runs;
        graph.exec.0.launch().w()?;
        // A copy: the next launch overwrites the graph's logits while the engine may
        // still hold these.
        Ok(Some(graph.bufs.logits.narrow(0, 0, n)?.copy()?))
    }

    /// Graphs held now.
    pub(super) fn len(&self) -> usize {
        self.graphs.len()
    }

    /// Drops the graph that ran longest ago, once the GPU has finished with it.
    fn evict_least_recent(&mut self, model: &Model) -> Result<()> {
        let Some(key) = self.graphs.iter().min_by_key(|(_, g)| g.last_used).map(|(k, _)| *k) else {
            return Ok(());
        };
        model.device().synchronize()?;
        self.graphs.remove(&key);
        tracing::debug!(
            "dropped the decode graph for batch {} and tables {} blocks wide",
            key.0,
            key.1
        );
        Ok(())
    }
}
