//! Paged attention over a batch of sequences at different positions: prompts being
//! prefilled and sequences decoding one token, mixed in one call. Queries are flat
//! (`[tokens, heads, head_dim]`, each sequence's tokens contiguous); K/V are read from
//! the cache through the block table of the layer's KV slot. A query at absolute
//! position `p` attends causally to cached positions `0..=p`, so the step's own K/V
//! must have been written with `reshape_and_cache` first. GQA/MQA: query head `h`
//! reads KV head `h / (heads / kv_heads)`. An fp8 cache (`u8` e4m3 codes) is read with
//! its slot's scales ([`KvScale`]), applied to the scores and the output, not per
//! element; the CPU path also reads a float cache of another type than q.

use super::fp8::{KvScale, E4M3_TABLE};
use super::parallel::for_each_chunk_mut;
use super::{contiguous, Elem};
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use std::collections::HashSet;
use std::sync::Mutex;

#[cfg(feature = "cuda")]
mod cuda;
mod plan;

#[cfg(feature = "cuda")]
pub use cuda::{DecodeGraphAttention, DeviceTables};

/// The head dimensions the CUDA paged-attention kernels are built for.
pub const CUDA_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Where one sequence's queries sit in the flat batch, and how long its context is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSpan {
    /// Index of the sequence's first query token in the batch.
    pub q_start: u32,
    /// Number of query tokens this step (1 when decoding).
    pub q_len: u32,
    /// Tokens in the cache after this step's write (positions `0..ctx_len`).
    pub ctx_len: u32,
}

/// The shapes a step's attention runs at: `q` `[tokens, heads, head_dim]` of `dtype`,
/// caches `[_, block_size, kv_heads, head_dim]` of `dtype`, or of fp8 codes (`fp8_cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub dtype: DType,
    pub fp8_cache: bool,
}

/// Where a step's layers find their block tables.
#[derive(Clone, Copy)]
enum Tables<'a> {
    /// Each KV slot's `[seqs, max_blocks]` table, by slot.
    Slots(&'a [Vec<u32>]),
    /// One table, for a single call.
    One(&'a [u32]),
    /// None on the host: a CUDA decode graph's tables live in the runner's device
    /// buffers, checked when the runner stages them.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Device,
}

/// One step's paged attention, planned once by the caller before the layers run and
/// handed to every layer's call ([`paged_attention_run`]): every layer that reads one KV
/// slot in one step sees the same spans and block table, so the slot's checks run once;
/// on CUDA the launch plan (work list, partitions), the device copies of spans and work
/// list and the partition scratch are made once for all slots (every slot sees the same
/// spans), and each slot's table is uploaded by the first layer that reads it (20
/// layers × six driver calls a step otherwise). Make one per step (`Model::forward`
/// does) and never reuse it with other spans or tables.
pub struct PagedAttentionPlan<'a> {
    seqs: &'a [SeqSpan],
    tables: Tables<'a>,
    max_blocks: usize,
    scale: f32,
    /// KV slots whose spans and table were checked.
    checked: Mutex<HashSet<usize>>,
    /// The caller checked every slot's table (a decode graph's runner does as it stages them).
    tables_checked: bool,
    /// Each KV slot's fp8 scales (none: 1.0), [`PagedAttentionPlan::with_kv_scales`].
    kv_scales: Vec<KvScale>,
    #[cfg(feature = "cuda")]
    cuda: cuda::StepLaunch<'a>,
    /// The batch-invariant kernel's device copies of the step's token owners and tables.
    #[cfg(feature = "cuda")]
    pub(crate) fixed: Mutex<super::batch_invariant::FixedUploads>,
}

impl<'a> PagedAttentionPlan<'a> {
    /// The step's plan: `seqs` (the spans of the flat batch), `tables` (each KV slot's
    /// `[seqs.len(), max_blocks]` block table, row-major) and the shapes the layers run
    /// at. On CUDA the split-KV kernels' launch is planned here, once for the step.
    pub fn new(
        device: &Device,
        seqs: &'a [SeqSpan],
        tables: &'a [Vec<u32>],
        max_blocks: usize,
        scale: f32,
        dims: AttentionDims,
    ) -> Result<Self> {
        #[cfg(feature = "cuda")]
        let cuda = match device {
            Device::Cuda(dev) => cuda::StepLaunch::planned(dev, seqs, max_blocks, scale, dims)?,
            _ => cuda::StepLaunch::default(),
        };
        #[cfg(not(feature = "cuda"))]
        let _ = (device, dims);
        Ok(Self {
            #[cfg(feature = "cuda")]
            cuda,
            ..Self::unplanned(seqs, tables, max_blocks, scale)
        })
    }

    /// A plan whose CUDA launch is planned by the first call that needs one: the
    /// batch-invariant mode (whose kernel needs none), or a caller that does not know the
    /// shapes up front.
    pub fn unplanned(seqs: &'a [SeqSpan], tables: &'a [Vec<u32>], max_blocks: usize, scale: f32) -> Self {
        Self::with_tables(seqs, Tables::Slots(tables), max_blocks, scale)
    }

    /// A plan for a single call with one table (slot 0).
    pub(crate) fn single(seqs: &'a [SeqSpan], table: &'a [u32], max_blocks: usize, scale: f32) -> Self {
        Self::with_tables(seqs, Tables::One(table), max_blocks, scale)
    }

    fn with_tables(seqs: &'a [SeqSpan], tables: Tables<'a>, max_blocks: usize, scale: f32) -> Self {
        Self {
            seqs,
            tables,
            max_blocks,
            scale,
            checked: Mutex::default(),
            tables_checked: false,
            kv_scales: Vec::new(),
            #[cfg(feature = "cuda")]
            cuda: cuda::StepLaunch::default(),
            #[cfg(feature = "cuda")]
            fixed: Mutex::default(),
        }
    }

    /// A CUDA decode graph's step: the launch `graph` made for the graph's shape, over the
    /// spans and block tables the runner keeps in `tables` (fixed addresses, refilled and
    /// checked before each launch). `seqs` are the host spans of the captured step.
    #[cfg(feature = "cuda")]
    pub fn for_decode_graph(seqs: &'a [SeqSpan], graph: &'a DecodeGraphAttention, tables: DeviceTables<'a>) -> Self {
        Self {
            tables_checked: true,
            cuda: cuda::StepLaunch::Graph { graph, tables },
            ..Self::with_tables(seqs, Tables::Device, 0, graph.scale())
        }
    }

    /// The plan reading an fp8 cache: slot `s` was written with `scales[s]`.
    pub fn with_kv_scales(mut self, scales: Vec<KvScale>) -> Self {
        self.kv_scales = scales;
        self
    }

    /// Slot `slot`'s fp8 scales (1.0 when none were given).
    pub(crate) fn kv_scale(&self, slot: usize) -> KvScale {
        self.kv_scales.get(slot).copied().unwrap_or_default()
    }

    /// Every KV slot's table, when the plan holds them on the host by slot.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn slot_tables(&self) -> Option<&'a [Vec<u32>]> {
        match self.tables {
            Tables::Slots(t) => Some(t),
            Tables::One(_) | Tables::Device => None,
        }
    }

    /// Every KV slot's table, slot order (one for a single call; none for a decode
    /// graph, whose tables are on the device already).
    #[cfg(feature = "cuda")]
    fn host_tables(&self) -> Vec<&'a [u32]> {
        match self.tables {
            Tables::Slots(t) => t.iter().map(|t| t.as_slice()).collect(),
            Tables::One(t) => vec![t],
            Tables::Device => Vec::new(),
        }
    }

    fn table(&self, slot: usize) -> Result<&'a [u32]> {
        match self.tables {
            Tables::Slots(t) => t
                .get(slot)
                .map(|t| t.as_slice())
                .ok_or_else(|| candle_core::Error::Msg(format!("paged_attention: no block table for KV slot {slot}"))),
            Tables::One(t) => Ok(t),
            Tables::Device => Ok(&[]),
        }
    }

    /// The spans and slot `slot`'s table, checked against `q` and the cache the first
    /// time a layer reads the slot (`op` names the op in errors).
    pub(crate) fn checked_table(&self, op: &str, slot: usize, q: &Tensor, k_cache: &Tensor) -> Result<&'a [u32]> {
        let block_table = self.table(slot)?;
        let (seqs, max_blocks) = (self.seqs, self.max_blocks);
        if block_table.len() != seqs.len() * max_blocks {
            candle_core::bail!(
                "{op}: block table has {} entries, want {} × {max_blocks}",
                block_table.len(),
                seqs.len()
            );
        }
        let (tokens, _, _) = q.dims3()?;
        let (num_blocks, block_size, _, _) = k_cache.dims4()?;
        let checked = self.tables_checked || self.checked.lock().expect("plans").contains(&slot);
        if !checked {
            check_spans(seqs, block_table, max_blocks, tokens, block_size, num_blocks)?;
            self.checked.lock().expect("plans").insert(slot);
        }
        Ok(block_table)
    }

    pub(crate) fn seqs(&self) -> &'a [SeqSpan] {
        self.seqs
    }
    pub(crate) fn max_blocks(&self) -> usize {
        self.max_blocks
    }
    pub(crate) fn scale(&self) -> f32 {
        self.scale
    }
}

struct PagedAttention<'a> {
    /// The step's plan and the KV slot this call reads (the CUDA path's).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    plan: &'a PagedAttentionPlan<'a>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    slot: usize,
    seqs: &'a [SeqSpan],
    /// `[num_seqs, max_blocks]`, row-major.
    block_table: &'a [u32],
    max_blocks: usize,
    scale: f32,
    /// The slot's fp8 scales (1.0 for a float cache).
    kv_scale: KvScale,
}

/// An element of the cache as the reference reads it: a float, or an fp8 e4m3 code
/// (`u8`) before its scale.
trait CacheElem: Copy + Send + Sync + 'static {
    fn load(self) -> f32;
}
impl<T: Elem> CacheElem for T {
    #[inline]
    fn load(self) -> f32 {
        self.to_f32()
    }
}
impl CacheElem for u8 {
    #[inline]
    fn load(self) -> f32 {
        E4M3_TABLE[self as usize]
    }
}

/// `a · b` with eight independent partial sums, so the compiler can vectorise the
/// reduction (a plain float sum must stay in order and runs scalar).
#[inline]
fn dot<T: CacheElem>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].load();
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y.load()).sum();
    acc.iter().sum::<f32>() + tail
}

/// Shapes of one call: `q` `[tokens, heads, d]`, caches `[_, block_size, kv_heads, d]`.
#[derive(Clone, Copy)]
struct Dims {
    tokens: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    block_size: usize,
}

impl PagedAttention<'_> {
    fn run<T: Elem, C: CacheElem>(&self, q: &[T], k: &[C], v: &[C], dims: &Dims) -> Result<Vec<T>> {
        let Dims {
            tokens,
            heads,
            kv_heads,
            d,
            block_size,
        } = *dims;
        // token → (sequence, absolute position); `check_spans` vetted every span and
        // table entry at the op's entry, so the parallel part below cannot fail.
        let mut owner = vec![(usize::MAX, 0usize); tokens];
        for (s, span) in self.seqs.iter().enumerate() {
            let (q0, ql, ctx) = (span.q_start as usize, span.q_len as usize, span.ctx_len as usize);
            for i in 0..ql {
                owner[q0 + i] = (s, ctx - ql + i);
            }
        }
        let group = heads / kv_heads;
        // The stored K is k / k_scale: q·k = (q·stored) × k_scale. V likewise, after the sum.
        let score_scale = self.scale * self.kv_scale.k;
        let v_scale = self.kv_scale.v;
        let mut out = vec![T::from_f32(0.0); tokens * heads * d];
        // One task per (token, query head): decode steps have one token, so the
        // parallelism has to come from the heads.
        for_each_chunk_mut(&mut out, d, |i, out_h| {
            let (t, h) = (i / heads, i % heads);
            let (s, pos) = owner[t];
            if s == usize::MAX {
                return; // a padding token no sequence owns
            }
            let table = &self.block_table[s * self.max_blocks..(s + 1) * self.max_blocks];
            let n = pos + 1;
            let kvh = h / group;
            let qv: Vec<f32> = q[i * d..(i + 1) * d].iter().map(|x| x.to_f32()).collect();
            let kv_row = |j: usize| {
                let row = table[j / block_size] as usize * block_size + j % block_size;
                (row * kv_heads + kvh) * d
            };
            let mut scores: Vec<f32> = (0..n)
                .map(|j| dot(&qv, &k[kv_row(j)..kv_row(j) + d]) * score_scale)
                .collect();
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let mut acc = vec![0f32; d];
            for (j, sc) in scores.iter().enumerate() {
                let w = sc / sum;
                let off = kv_row(j);
                acc.iter_mut()
                    .zip(&v[off..off + d])
                    .for_each(|(a, b)| *a += w * b.load());
            }
            out_h
                .iter_mut()
                .zip(&acc)
                .for_each(|(o, a)| *o = T::from_f32(*a * v_scale));
        });
        Ok(out)
    }
}

impl CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "paged_attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (tokens, heads, d) = ql.shape().dims3()?;
        let (_, block_size, kv_heads, kd) = kl.shape().dims4()?;
        if kd != d || heads % kv_heads != 0 || kl.shape() != vl.shape() {
            candle_core::bail!(
                "paged_attention: q {:?} does not match cache {:?}",
                ql.shape(),
                kl.shape()
            );
        }
        let n = self.name();
        let dims = Dims {
            tokens,
            heads,
            kv_heads,
            d,
            block_size,
        };
        // The same reference for each element type of q and of the cache.
        macro_rules! run {
            ($variant:ident, $q:ident) => {{
                let q = contiguous($q, ql, n, "q")?;
                CpuStorage::$variant(match (ks, vs) {
                    (CpuStorage::F32(k), CpuStorage::F32(v)) => self.run(q, k_of(k, kl)?, k_of(v, vl)?, &dims)?,
                    (CpuStorage::F16(k), CpuStorage::F16(v)) => self.run(q, k_of(k, kl)?, k_of(v, vl)?, &dims)?,
                    (CpuStorage::BF16(k), CpuStorage::BF16(v)) => self.run(q, k_of(k, kl)?, k_of(v, vl)?, &dims)?,
                    (CpuStorage::U8(k), CpuStorage::U8(v)) => self.run(q, k_of(k, kl)?, k_of(v, vl)?, &dims)?,
                    _ => candle_core::bail!(
                        "paged_attention: the K and V caches must share one of f32/f16/bf16/fp8 (u8)"
                    ),
                })
            }};
        }
        fn k_of<'s, C>(c: &'s [C], l: &Layout) -> Result<&'s [C]> {
            contiguous(c, l, "paged_attention", "cache")
        }
        let out = match qs {
            CpuStorage::F32(q) => run!(F32, q),
            CpuStorage::F16(q) => run!(F16, q),
            CpuStorage::BF16(q) => run!(BF16, q),
            _ => candle_core::bail!("paged_attention: q must be f32, f16 or bf16"),
        };
        Ok((out, ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::run(self.plan, self.slot, self.block_table, qs, ql, ks, kl, vs, vl)
    }
}

/// Every span fits the batch and every table entry in use is a block of the cache.
/// Checked once at the op's entry for every backend: the CPU loop and the CUDA kernels
/// trust them.
pub(crate) fn check_spans(
    seqs: &[SeqSpan],
    block_table: &[u32],
    max_blocks: usize,
    tokens: usize,
    block_size: usize,
    num_blocks: usize,
) -> Result<()> {
    for (s, span) in seqs.iter().enumerate() {
        let (q0, ql, ctx) = (span.q_start as usize, span.q_len as usize, span.ctx_len as usize);
        if q0 + ql > tokens || ql > ctx {
            candle_core::bail!("paged_attention: sequence {s} span {span:?} does not fit {tokens} tokens");
        }
        if ctx.div_ceil(block_size) > max_blocks {
            candle_core::bail!("paged_attention: sequence {s} needs more blocks than its table has");
        }
        let table = &block_table[s * max_blocks..(s + 1) * max_blocks];
        if let Some(b) = table[..ctx.div_ceil(block_size)]
            .iter()
            .find(|&&b| b as usize >= num_blocks)
        {
            candle_core::bail!(
                "paged_attention: sequence {s}'s block table holds block {b}, past the cache's {num_blocks}"
            );
        }
    }
    Ok(())
}

/// `q`: `[tokens, heads, head_dim]`; caches: `[num_blocks, block_size, kv_heads, head_dim]`;
/// `block_table`: `[seqs.len(), max_blocks]` row-major, the KV slot's tables. A single
/// call: its plan is made for it alone ([`paged_attention_run`] shares one over a step).
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[SeqSpan],
    block_table: &[u32],
    max_blocks: usize,
    scale: f32,
) -> Result<Tensor> {
    paged_attention_scaled(
        q,
        k_cache,
        v_cache,
        seqs,
        block_table,
        max_blocks,
        scale,
        KvScale::default(),
    )
}

/// [`paged_attention`] over caches that may be fp8 (`u8` e4m3 codes) written with
/// `kv_scale`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_scaled(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[SeqSpan],
    block_table: &[u32],
    max_blocks: usize,
    scale: f32,
    kv_scale: KvScale,
) -> Result<Tensor> {
    let plan = PagedAttentionPlan::single(seqs, block_table, max_blocks, scale).with_kv_scales(vec![kv_scale]);
    paged_attention_run(&plan, 0, q, k_cache, v_cache)
}

/// One layer's paged attention under the step's `plan`: `q` `[tokens, heads, head_dim]`
/// against the caches (`[num_blocks, block_size, kv_heads, head_dim]`) of KV slot `slot`,
/// through that slot's block table.
pub fn paged_attention_run(
    plan: &PagedAttentionPlan<'_>,
    slot: usize,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
) -> Result<Tensor> {
    let block_table = plan.checked_table("paged_attention", slot, q, k_cache)?;
    let op = PagedAttention {
        plan,
        slot,
        seqs: plan.seqs,
        block_table,
        max_blocks: plan.max_blocks,
        scale: plan.scale,
        kv_scale: plan.kv_scale(slot),
    };
    q.contiguous()?.apply_op3_no_bwd(k_cache, v_cache, &op)
}
