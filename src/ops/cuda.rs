//! The CUDA side of the ops (feature `cuda`): launches the kernels of `kernels/*.cu`
//! (compiled to PTX by `build.rs`) on candle's stream. Each op's CPU path stays the
//! reference; these functions are their `cuda_fwd`.

use super::paged_attention::SeqSpan;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape};
use std::sync::atomic::{AtomicBool, Ordering};

#[allow(dead_code)]
pub(crate) mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

pub(crate) static POISON: AtomicBool = AtomicBool::new(false);

/// Tests: fill every output the kernels allocate with NaN before they run, so an
/// element a kernel fails to write shows up.
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

pub(crate) fn contiguous(l: &Layout, op: &str, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} must be contiguous")))
}

/// `(offset of row 0, row stride, elements a row)` of a layout whose dims after the
/// first are contiguous, rows any stride apart: a contiguous tensor, or a column slice
/// of a wider matrix (a fused projection's Q, K or V part).
pub(crate) fn row_strided(l: &Layout, op: &str, what: &str) -> Result<(usize, usize, usize)> {
    let (dims, stride) = (l.dims(), l.stride());
    if dims.is_empty() {
        candle_core::bail!("{op}: {what} has no rows");
    }
    let row: usize = dims[1..].iter().product();
    let mut want = 1;
    for i in (1..dims.len()).rev() {
        if dims[i] > 1 && stride[i] != want {
            candle_core::bail!("{op}: {what} must be contiguous within a row");
        }
        want *= dims[i];
    }
    let row_stride = if dims[0] > 1 { stride[0] } else { row };
    if row_stride < row {
        candle_core::bail!("{op}: {what}'s rows overlap");
    }
    Ok((l.start_offset(), row_stride, row))
}

/// The CUDA storage of a guarded tensor, or an error naming the op and the tensor.
pub(crate) fn cuda_of<'a>(s: &'a candle_core::Storage, op: &str, what: &str) -> Result<&'a CudaStorage> {
    match s {
        candle_core::Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("{op}: {what} is not on the GPU"),
    }
}

/// The device address and element count of an f32/f16/bf16 storage's buffer, for
/// kernels that take raw addresses (a table of many tensors, row views into a packed
/// tensor) and so do their own bounds checks. Read it under the storage's guard; launches
/// on the one stream are ordered before any free of the buffer.
pub(crate) fn raw_buffer(s: &CudaStorage) -> Result<(u64, usize)> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let stream = s.device.cuda_stream();
    Ok(match s.dtype() {
        DType::F32 => {
            let v = s.as_cuda_slice::<f32>()?;
            (v.device_ptr(&stream).0, v.len())
        }
        DType::F16 => {
            let v = s.as_cuda_slice::<half::f16>()?;
            (v.device_ptr(&stream).0, v.len())
        }
        DType::BF16 => {
            let v = s.as_cuda_slice::<half::bf16>()?;
            (v.device_ptr(&stream).0, v.len())
        }
        d => candle_core::bail!("raw buffer: {d:?} (f32/f16/bf16 only)"),
    })
}

/// The address of elements `range` of an f32/f16/bf16 storage, after checking the range
/// lies in it ([`raw_buffer`]).
pub(crate) fn raw_range(s: &CudaStorage, range: std::ops::Range<usize>, op: &str, what: &str) -> Result<u64> {
    let (base, len) = raw_buffer(s)?;
    if range.start > range.end || range.end > len {
        candle_core::bail!("{op}: {what}'s elements {range:?} are outside its {len}");
    }
    Ok(base + (range.start * s.dtype().size_in_bytes()) as u64)
}

/// Whether [`row_strided`] takes this layout.
pub fn is_row_strided(l: &Layout) -> bool {
    row_strided(l, "", "").is_ok()
}

pub(crate) fn suffix(dtype: DType, op: &str) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => candle_core::bail!("{op}: {d:?} is not supported on CUDA (f32/f16/bf16)"),
    })
}

pub(crate) fn poison<T: DeviceRepr>(
    dev: &CudaDevice,
    s: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
) -> Result<()> {
    let bytes = (s.len() * std::mem::size_of::<T>()) as u64;
    if bytes == 0 {
        return Ok(());
    }
    let f = dev.get_or_load_custom_func("poison_bytes", "crosskv_paged_attention", ptx::PAGED_ATTENTION)?;
    let mut b = f.builder();
    b.arg(s).arg(&bytes);
    let blocks = bytes.div_ceil(256).min(4096) as u32;
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .w()?;
    Ok(())
}

// ---------------------------------------------------------------- reshape_and_cache

pub(crate) fn reshape_and_cache(
    cache: &mut CudaStorage,
    cl: &Layout,
    new: &CudaStorage,
    nl: &Layout,
    pos: &CudaStorage,
    pl: &Layout,
) -> Result<()> {
    const OP: &str = "reshape_and_cache";
    let dims = nl.dims();
    let tokens = dims[0];
    let row: usize = dims[1..].iter().product();
    let (c0, c1) = contiguous(cl, OP, "the cache")?;
    let (n0, src_stride, _) = row_strided(nl, OP, "new rows")?;
    let n1 = n0 + dims[0].saturating_sub(1) * src_stride + row;
    let (p0, p1) = contiguous(pl, OP, "positions")?;
    if p1 - p0 != tokens {
        candle_core::bail!("{OP}: {} positions for {tokens} rows", p1 - p0);
    }
    if tokens == 0 {
        return Ok(());
    }
    if cache.dtype() != new.dtype() {
        candle_core::bail!("{OP}: cache and rows must share one of f32/f16/bf16");
    }
    let dev = cache.device.clone();
    let pos = pos.as_cuda_slice::<u32>()?.slice(p0..p1);
    let name = format!("reshape_and_cache_{}", suffix(new.dtype(), OP)?);
    let (row32, cache_rows) = (row as u32, ((c1 - c0) / row) as u64);
    let cfg = LaunchConfig {
        grid_dim: (tokens as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! go {
        ($t:ty) => {{
            let f = dev.get_or_load_custom_func(&name, "crosskv_reshape_and_cache", ptx::RESHAPE_AND_CACHE)?;
            let src = new.as_cuda_slice::<$t>()?.slice(n0..n1);
            let mut dst = cache.as_cuda_slice_mut::<$t>()?.slice_mut(c0..c1);
            let mut b = f.builder();
            let src_stride = src_stride as u64;
            b.arg(&mut dst)
                .arg(&src)
                .arg(&pos)
                .arg(&row32)
                .arg(&cache_rows)
                .arg(&src_stride);
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        }};
    }
    match new.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    }
}

// ---------------------------------------------------------------- paged attention

/// Mirrors `struct Params` in kernels/paged_attention.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct Params {
    num_seqs: u32,
    max_blocks: u32,
    block_size: u32,
    heads: u32,
    kv_heads: u32,
    hpc: u32,
    tpc: u32,
    num_parts: u32,
    part_size: u32,
    scale: f32,
}
unsafe impl DeviceRepr for Params {}

/// Fewest keys per partition when a context is split along the sequence: a CTA's fixed
/// costs (Q rows, the first tile's latency, combining the warps and the partitions) are
/// paid once per partition. Measured on the H100 (the partition sweeps in docs/bench-log/): MQA
/// decode at batch 64-256 runs faster in partitions of 1024 keys than in more CTAs of 384-704.
const MIN_PART_SIZE: usize = 1024;
/// Small grids (under an eighth of a wave: batch 1-8) are split finer, down to this: a
/// single CTA streaming a whole 4096-key context would leave the GPU idle.
const MIN_PART_SIZE_SMALL_GRID: usize = 256;

/// `CROSSKV_PA_PART_SIZE` (a multiple of 64) fixes the partition size; the decode-attention
/// benchmark sweeps it. Unset: [`auto_part_size`].
fn part_size_override() -> Option<usize> {
    static P: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *P.get_or_init(|| {
        std::env::var("CROSSKV_PA_PART_SIZE")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&v| v >= TC_TILE_KEYS && v.is_multiple_of(TC_TILE_KEYS))
    })
}

/// Splits the longest context into partitions (as flash-decoding does) so that the grid
/// fills whole waves: `slots` CTAs run at once (SMs × CTAs per SM), and a grid of 1.3
/// waves takes as long as two. More partitions are taken only while they fill the waves
/// at least 5 % better: each costs a CTA's fixed work and its share of the reduction. A
/// grid under one wave (batch 1) splits until it fills it. No partition under
/// [`MIN_PART_SIZE`] keys ([`MIN_PART_SIZE_SMALL_GRID`] for tiny grids).
fn auto_part_size(max_ctx: usize, items: usize, slots: usize) -> usize {
    let (items, slots) = (items.max(1), slots.max(1));
    // Partitions of MIN_PART_SIZE that would fill under half a wave (batch 1-8, or
    // batch 64 at 1024 keys: one CTA per sequence, one warp per scheduler, each CTA
    // latency-bound) give way to finer ones: measured on the H200, batch 64 at 1024 keys
    // decodes in 1.72 ms with partitions of 256 against 1.78-1.88 with 1024.
    let min_part = if items * 8 < slots || 2 * items * max_ctx.div_ceil(MIN_PART_SIZE) <= slots {
        MIN_PART_SIZE_SMALL_GRID
    } else {
        MIN_PART_SIZE
    };
    let size = |parts: usize| max_ctx.div_ceil(parts).next_multiple_of(TC_TILE_KEYS).max(min_part);
    let fill = |part: usize| {
        let ctas = items * max_ctx.div_ceil(part).max(1);
        ctas as f64 / (ctas.div_ceil(slots) * slots) as f64
    };
    let mut best = (size(1), fill(size(1)));
    for parts in 2..=max_ctx.div_ceil(min_part) {
        let part = size(parts);
        if fill(part) > best.1 * 1.05 {
            best = (part, fill(part));
        }
    }
    best.0
}

const NONE: u32 = u32::MAX;

/// Which kernel runs a launch: f16/bf16 take the tensor-core kernels
/// (kernels/paged_attention_tc.cu), f32 the CUDA-core one (kernels/paged_attention.cu).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kernel {
    TensorCore,
    CudaCore,
}

impl Kernel {
    fn for_dtype(dtype: DType) -> Self {
        if dtype == DType::F32 {
            Kernel::CudaCore
        } else {
            Kernel::TensorCore
        }
    }
    /// Query rows (tokens × heads of one KV head's group) per work item: `ROWS` in the
    /// tensor-core kernels, `Cfg<D>::ROWS` in the CUDA-core one.
    fn rows(self, d: usize) -> usize {
        match self {
            Kernel::TensorCore => 64,
            Kernel::CudaCore if d <= 128 => 16,
            Kernel::CudaCore => 8,
        }
    }
    /// Query heads of one group an item may hold: a tensor-core warp holds 16 rows, and a
    /// decode step's rows (one token) must fit one warp's 16.
    fn max_heads(self, d: usize) -> usize {
        match self {
            Kernel::TensorCore => 16,
            Kernel::CudaCore => self.rows(d),
        }
    }
    /// Dynamic shared memory: `TcCfg<D, SPLIT>::SMEM` (Q rows, K/V stages, the stages'
    /// cache rows) for the tensor-core decode (`split`) or prefill kernel; none for CUDA cores.
    fn smem_bytes(self, d: usize, split: bool) -> usize {
        match self {
            Kernel::TensorCore => {
                let (q_rows, stages) = match (split, d) {
                    (true, 64) => (16, 4),
                    (true, _) => (16, 3),
                    (false, 256) => (64, 2),
                    (false, _) => (64, 3),
                };
                q_rows * d * 2 + stages * 2 * TC_TILE_KEYS * d * 2 + stages * TC_TILE_KEYS * 4
            }
            Kernel::CudaCore => 0,
        }
    }
}

/// Keys per shared-memory tile of the tensor-core kernel (`TK`); partitions are a multiple.
const TC_TILE_KEYS: usize = 64;

/// The launch plan: work items `[seq or NONE, first token, head chunk]`, heads and
/// tokens per CTA, partitions. For the tensor-core kernels the first `num_small` items
/// have ≤ 16 query rows (decode steps, padding) and go to the decode kernel, the rest
/// to the prefill kernel.
struct Plan {
    work: Vec<u32>,
    num_small: usize,
    hpc: usize,
    tpc: usize,
    num_parts: usize,
    part_size: usize,
}

/// `slots`: CTAs of the decode kernel that run at once (see [`auto_part_size`]).
/// `part_ctx`: the context the partitions are sized for (default: the longest span's);
/// the partitions still cover the longest span.
#[allow(clippy::too_many_arguments)]
fn plan(
    part_ctx: Option<usize>,
    seqs: &[SeqSpan],
    tokens: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    kernel: Kernel,
    slots: usize,
) -> Plan {
    let rows = kernel.rows(d);
    let group = heads / kv_heads;
    // The largest divisor of the group that fits: a decode CTA reads each K/V tile once
    // for all `hpc` query heads that share it.
    let hpc = (1..=kernel.max_heads(d).min(group))
        .rev()
        .find(|h| group.is_multiple_of(*h))
        .unwrap_or(1);
    let tpc = rows / hpc;
    let mut work = Vec::new();
    let mut covered = vec![false; tokens];
    for (s, span) in seqs.iter().enumerate() {
        for tok0 in (0..span.q_len as usize).step_by(tpc) {
            for hsub in 0..group / hpc {
                work.extend_from_slice(&[s as u32, tok0 as u32, hsub as u32]);
            }
        }
        covered[span.q_start as usize..(span.q_start + span.q_len) as usize].fill(true);
    }
    for (t, _) in covered.iter().enumerate().filter(|(_, c)| !**c) {
        for hsub in 0..group / hpc {
            work.extend_from_slice(&[NONE, t as u32, hsub as u32]);
        }
    }
    // Small items first (stable, so each kernel still walks sequences in order).
    let rows_of = |w: &[u32]| match w[0] {
        NONE => hpc,
        s => tpc.min((seqs[s as usize].q_len - w[1]) as usize) * hpc,
    };
    let (small, large): (Vec<&[u32]>, Vec<&[u32]>) = work.chunks(3).partition(|w| rows_of(w) <= 16);
    let num_small = if kernel == Kernel::TensorCore { small.len() } else { 0 };
    if kernel == Kernel::TensorCore {
        work = small.into_iter().chain(large).flatten().copied().collect();
    }
    let max_ctx = seqs.iter().map(|s| s.ctx_len as usize).max().unwrap_or(0);
    let items = work.len() / 3 * kv_heads;
    let part_size =
        part_size_override().unwrap_or_else(|| auto_part_size(part_ctx.unwrap_or(max_ctx).max(1), items, slots));
    Plan {
        work,
        num_small,
        hpc,
        tpc,
        num_parts: max_ctx.div_ceil(part_size).max(1),
        part_size,
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn paged_attention(
    plans: Option<(&super::AttentionPlans, usize)>,
    seqs: &[SeqSpan],
    block_table: &[u32],
    max_blocks: usize,
    scale: f32,
    q: &CudaStorage,
    ql: &Layout,
    k: &CudaStorage,
    kl: &Layout,
    v: &CudaStorage,
    vl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "paged_attention";
    let (tokens, heads, d) = ql.shape().dims3()?;
    let (_, block_size, kv_heads, kd) = kl.shape().dims4()?;
    if kd != d || heads % kv_heads != 0 || kl.shape() != vl.shape() {
        candle_core::bail!("{OP}: q {:?} does not match cache {:?}", ql.shape(), kl.shape());
    }
    if !super::paged_attention::CUDA_HEAD_DIMS.contains(&d) {
        candle_core::bail!("{OP}: head_dim {d} is not supported on CUDA (64, 128, 256)");
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        candle_core::bail!("{OP}: q and cache must share one of f32/f16/bf16");
    }
    suffix(q.dtype(), OP)?;
    let (q0, q1) = contiguous(ql, OP, "q")?;
    let (k0, k1) = contiguous(kl, OP, "k cache")?;
    let (v0, v1) = contiguous(vl, OP, "v cache")?;
    let esize = q.dtype().size_in_bytes();
    if !(k0 * esize).is_multiple_of(16) || !(v0 * esize).is_multiple_of(16) {
        candle_core::bail!("{OP}: the caches must start 16-byte aligned");
    }
    let dev = q.device.clone();
    let shape = ql.shape().clone();
    if tokens == 0 {
        return Ok((shape_storage(&dev, q.dtype(), 0)?, shape));
    }
    let fresh = || {
        prepare(
            &dev,
            None,
            seqs,
            max_blocks,
            scale,
            tokens,
            heads,
            kv_heads,
            d,
            block_size,
            q.dtype(),
        )
    };
    // The step's plan, made by the first layer and shared by every KV slot (they all
    // see the same spans: only their block tables differ, uploaded once per slot);
    // without a memo, a plan for this call only.
    let mut own;
    let mut memo;
    let (pr, table): (&mut Prepared, View<'_, u32>) = match plans {
        Some((p, slot)) => {
            memo = p.cuda.lock().expect("attention plans");
            let key = (tokens, heads, kv_heads, d, q.dtype());
            let memo = &mut *memo;
            if memo.prepared.as_ref().is_none_or(|pr| pr.key != key) {
                if memo.fixed.is_some() {
                    // A captured graph's buffers are fixed: a step of another shape
                    // must not replace them.
                    candle_core::bail!("{OP}: a decode graph's plans were made for another shape");
                }
                memo.prepared = Some(fresh()?);
                memo.tables.clear();
            }
            let table = match &memo.fixed {
                // The decode graph's tables: one buffer, slot after slot, refilled before
                // each launch.
                Some(f) => f.tables.slice(slot * f.stride..(slot + 1) * f.stride),
                None => match memo.tables.entry(slot) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => e.insert(upload_table(&dev, block_table)?),
                }
                .as_view(),
            };
            (memo.prepared.as_mut().expect("made above"), table)
        }
        None => {
            own = (fresh()?, upload_table(&dev, block_table)?);
            (&mut own.0, own.1.as_view())
        }
    };
    macro_rules! go {
        ($t:ty) => {{
            let qv = q.as_cuda_slice::<$t>()?.slice(q0..q1);
            let kv = k.as_cuda_slice::<$t>()?.slice(k0..k1);
            let vv = v.as_cuda_slice::<$t>()?.slice(v0..v1);
            let mut out = unsafe { dev.alloc::<$t>(tokens * heads * d)? };
            if POISON.load(Ordering::Relaxed) {
                poison(&dev, &mut out)?;
            }
            launch(&dev, pr, &table, &mut out, &qv, &kv, &vv)?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match q.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    };
    Ok((out, shape))
}

type Slice<T> = candle_core::cuda_backend::cudarc::driver::CudaSlice<T>;
type View<'a, T> = candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>;

/// A step's paged-attention memo on CUDA (inside [`super::AttentionPlans`]): the plan
/// every KV slot shares, and each slot's block table on the device.
#[derive(Default)]
pub(crate) struct CudaPlans {
    prepared: Option<Prepared>,
    tables: std::collections::HashMap<usize, Slice<u32>>,
    /// A decode graph's fixed buffers (`AttentionPlans::for_decode_graph`): then
    /// `prepared` is made once, for the graph's shape, and never replaced.
    fixed: Option<FixedTables>,
}

/// Every KV slot's `[batch, max_blocks]` block table in one device buffer, slot after
/// slot, so one copy refills them all before a graph launch; the spans likewise. Both
/// are staged in page-locked host memory: the copy is a DMA the host does not wait for.
struct FixedTables {
    tables: Slice<u32>,
    tables_staged: Pinned<u32>,
    seqs_staged: Pinned<u32>,
    /// `batch * max_blocks`: one slot's entries.
    stride: usize,
    max_blocks: usize,
    block_size: usize,
}

type Pinned<T> = candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<T>;

/// Page-locked host memory for `len` values (cached, not write-combined: the host
/// writes it piecemeal).
pub(crate) fn pinned(dev: &CudaDevice, len: usize) -> Result<Pinned<u32>> {
    let ctx = dev.cuda_stream().context().clone();
    let mut p = unsafe { ctx.alloc_pinned_with_flags::<u32>(len.max(1), 0) }.w()?;
    p.as_mut_slice().w()?.fill(0);
    Ok(p)
}

/// Where a decode graph's step writes its block tables before
/// [`super::AttentionPlans::refill_decode_graph`] copies them: slot `s`'s table of
/// row `i` at `[s * stride + i * max_blocks..][..max_blocks]`.
pub(crate) struct TableStaging<'a> {
    pub tables: &'a mut [u32],
    pub stride: usize,
    pub max_blocks: usize,
}

impl super::AttentionPlans {
    /// The attention plans of a captured decode graph (`runner::graphs`): `batch`
    /// sequences of one new token each, block tables `max_blocks` wide for each of
    /// `slots` KV slots. Its device buffers (spans, work list, tables, partition
    /// scratch) keep their addresses for the graph's life; [`Self::refill_decode_graph`]
    /// rewrites their contents before each launch. One graph serves every context the
    /// tables can hold (`max_blocks * block_size`): the tensor-core kernels split each
    /// sequence's own keys evenly over a fixed number of partitions; the f32 kernel's
    /// fixed-size partitions cover the longest context, and a shorter sequence leaves
    /// its trailing ones empty (those CTAs return at once).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn for_decode_graph(
        dev: &candle_core::Device,
        batch: usize,
        max_blocks: usize,
        slots: usize,
        (heads, kv_heads, d): (usize, usize, usize),
        block_size: usize,
        dtype: DType,
        scale: f32,
    ) -> Result<Self> {
        let cuda = dev.as_cuda_device()?;
        let longest = (max_blocks * block_size) as u32;
        let spans: Vec<SeqSpan> = (0..batch as u32)
            .map(|i| SeqSpan {
                q_start: i,
                q_len: 1,
                ctx_len: longest,
            })
            .collect();
        // Sized for the shortest context this table width serves (it is used once the
        // longest context passes half the width: `runner::graphs::blocks_bucket`), so a
        // wave is full there; longer contexts fill more partitions of the same size.
        let shortest = (max_blocks / 2).max(1) * block_size;
        let mut prepared = prepare(
            cuda,
            Some(shortest),
            &spans,
            max_blocks,
            scale,
            batch,
            heads,
            kv_heads,
            d,
            block_size,
            dtype,
        )?;
        if prepared.kernel == Kernel::TensorCore && prepared.num_parts > 1 {
            // The tensor-core kernels split each sequence's own keys evenly over the
            // partitions a wave needs at the shortest context (`part_size` 0): no
            // partition of a few keys, whatever the context. Fewer partitions than planned
            // for the widest table: the scratch is big enough.
            let parts = shortest.div_ceil(prepared.params.part_size as usize).max(1);
            prepared.params.part_size = 0;
            prepared.params.num_parts = parts as u32;
            prepared.num_parts = parts;
        }
        let plans = Self::default();
        {
            let mut memo = plans.cuda.lock().expect("attention plans");
            memo.prepared = Some(prepared);
            let len = slots * batch * max_blocks;
            memo.fixed = Some(FixedTables {
                tables: cuda.alloc_zeros::<u32>(len.max(1))?,
                tables_staged: pinned(cuda, len)?,
                seqs_staged: pinned(cuda, 3 * batch)?,
                stride: batch * max_blocks,
                max_blocks,
                block_size,
            });
        }
        // The runner checks what it stages (`runner::graphs`) instead of the forward.
        plans.checked.lock().expect("plans").extend(0..slots);
        Ok(plans)
    }

    /// Refills the graph's spans and block tables: `seqs` (one token each, as
    /// [`Self::for_decode_graph`] was made for), and the tables `write_tables` stages
    /// (checked by it: block ids inside the cache); then one copy each on the stream,
    /// ordered after the previous launch that read them.
    pub(crate) fn refill_decode_graph(
        &self,
        seqs: &[SeqSpan],
        write_tables: impl FnOnce(TableStaging<'_>) -> Result<()>,
    ) -> Result<()> {
        let mut memo = self.cuda.lock().expect("attention plans");
        let memo = &mut *memo;
        let (Some(pr), Some(fixed)) = (memo.prepared.as_mut(), memo.fixed.as_mut()) else {
            candle_core::bail!("refill_decode_graph: these plans were not made for a decode graph");
        };
        let batch = pr.key.0;
        if seqs.len() != batch {
            candle_core::bail!(
                "refill_decode_graph: {} spans for a graph of {batch} sequences",
                seqs.len()
            );
        }
        if let Some((i, s)) = seqs.iter().enumerate().find(|(i, s)| {
            s.q_start as usize != *i
                || s.q_len != 1
                || s.ctx_len == 0
                || s.ctx_len as usize > fixed.max_blocks * fixed.block_size
        }) {
            candle_core::bail!("refill_decode_graph: span {i} {s:?} does not fit the graph");
        }
        let flat = fixed.seqs_staged.as_mut_slice().w()?;
        for (dst, s) in flat.chunks_exact_mut(3).zip(seqs) {
            dst.copy_from_slice(&[s.q_start, s.q_len, s.ctx_len]);
        }
        write_tables(TableStaging {
            tables: fixed.tables_staged.as_mut_slice().w()?,
            stride: fixed.stride,
            max_blocks: fixed.max_blocks,
        })?;
        let stream = pr.seqs_d.stream().clone();
        stream.memcpy_htod(&fixed.seqs_staged, &mut pr.seqs_d).w()?;
        stream.memcpy_htod(&fixed.tables_staged, &mut fixed.tables).w()?;
        Ok(())
    }
}

/// A `[seqs, max_blocks]` block table on the device (one zero when empty: no
/// zero-length buffers).
fn upload_table(dev: &CudaDevice, block_table: &[u32]) -> Result<Slice<u32>> {
    Ok(if block_table.is_empty() {
        dev.clone_htod(&[0u32])?
    } else {
        dev.clone_htod(block_table)?
    })
}

/// Everything a paged-attention launch needs besides q, the caches, the block table
/// and the output: the plan and its device copies, the partition scratch and the
/// kernels. Launches on one stream run in order, so every layer of a step can reuse
/// the scratch (and the tensor-core kernels leave their partition counters at zero).
pub(crate) struct Prepared {
    /// (tokens, heads, kv_heads, head_dim, dtype) it was made for.
    key: (usize, usize, usize, usize, DType),
    params: Params,
    num_work: usize,
    num_small: usize,
    num_parts: usize,
    kv_heads: usize,
    d: usize,
    rows: usize,
    seqs_d: Slice<u32>,
    work_d: Slice<u32>,
    tmp_acc: Slice<f32>,
    tmp_ml: Slice<f32>,
    /// Tensor cores: per (item, KV head), how many partitions are done (zeros; the last
    /// partition resets its count).
    counters: Slice<u32>,
    kernel: Kernel,
    /// The CUDA-core kernel, or the tensor-core decode kernel.
    attn: String,
    /// The tensor-core decode kernel that combines an item's partitions in a cluster.
    attn_cluster: String,
    /// The tensor-core prefill kernel.
    attn_prefill: String,
    reduce: String,
}

#[allow(clippy::too_many_arguments)]
fn prepare(
    dev: &CudaDevice,
    part_ctx: Option<usize>,
    seqs: &[SeqSpan],
    max_blocks: usize,
    scale: f32,
    tokens: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    block_size: usize,
    dtype: DType,
) -> Result<Prepared> {
    let sfx = suffix(dtype, "paged_attention")?;
    let kernel = Kernel::for_dtype(dtype);
    let p = plan(
        part_ctx,
        seqs,
        tokens,
        heads,
        kv_heads,
        d,
        kernel,
        slots(dev, kernel, d, dtype)?,
    );
    let rows = kernel.rows(d);
    let num_work = p.work.len() / 3;
    let params = Params {
        num_seqs: seqs.len() as u32,
        max_blocks: max_blocks as u32,
        block_size: block_size as u32,
        heads: heads as u32,
        kv_heads: kv_heads as u32,
        hpc: p.hpc as u32,
        tpc: p.tpc as u32,
        num_parts: p.num_parts as u32,
        part_size: p.part_size as u32,
        scale,
    };
    let flat: Vec<u32> = seqs.iter().flat_map(|s| [s.q_start, s.q_len, s.ctx_len]).collect();
    let or_one = |v: &[u32]| if v.is_empty() { vec![0u32] } else { v.to_vec() };
    let (tmp_acc, tmp_ml) = if p.num_parts > 1 {
        let n = num_work * kv_heads * p.num_parts;
        unsafe { (dev.alloc::<f32>(n * rows * d)?, dev.alloc::<f32>(n * 2 * rows)?) }
    } else {
        unsafe { (dev.alloc::<f32>(1)?, dev.alloc::<f32>(1)?) }
    };
    let counters = if p.num_parts > 1 && kernel == Kernel::TensorCore {
        dev.alloc_zeros::<u32>(num_work * kv_heads)?
    } else {
        dev.alloc_zeros::<u32>(1)?
    };
    Ok(Prepared {
        key: (tokens, heads, kv_heads, d, dtype),
        params,
        num_work,
        num_small: p.num_small,
        num_parts: p.num_parts,
        kv_heads,
        d,
        rows,
        seqs_d: dev.clone_htod(&or_one(&flat))?,
        work_d: dev.clone_htod(&p.work)?,
        tmp_acc,
        tmp_ml,
        counters,
        kernel,
        attn: match kernel {
            Kernel::TensorCore => format!("paged_attention_tc_decode_{sfx}_d{d}"),
            Kernel::CudaCore => format!("paged_attention_{sfx}_d{d}"),
        },
        attn_cluster: format!("paged_attention_tc_decode_cluster_{sfx}_d{d}"),
        attn_prefill: format!("paged_attention_tc_prefill_{sfx}_d{d}"),
        reduce: format!("paged_attention_reduce_{sfx}"),
    })
}

/// How many CTAs of the kernel that runs decode items fit the GPU at once: SMs × the
/// occupancy the driver computes for its registers and shared memory (cached per kernel).
fn slots(dev: &CudaDevice, kernel: Kernel, d: usize, dtype: DType) -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    use std::collections::HashMap;
    use std::sync::Mutex;
    /// (head_dim, tensor cores, dtype) → slots.
    type SlotCache = Mutex<HashMap<(usize, bool, DType), usize>>;
    static CACHE: std::sync::OnceLock<SlotCache> = std::sync::OnceLock::new();
    let key = (d, kernel == Kernel::TensorCore, dtype);
    let cache = CACHE.get_or_init(Default::default);
    if let Some(&n) = cache.lock().expect("slots cache").get(&key) {
        return Ok(n);
    }
    let sfx = suffix(dtype, "paged_attention")?;
    let (f, smem) = match kernel {
        Kernel::TensorCore => {
            let name = format!("paged_attention_tc_decode_{sfx}_d{d}");
            let f = dev.get_or_load_custom_func(&name, "crosskv_paged_attention_tc", ptx::PAGED_ATTENTION_TC)?;
            let smem = kernel.smem_bytes(d, true);
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .w()?;
            (f, smem)
        }
        Kernel::CudaCore => {
            let name = format!("paged_attention_{sfx}_d{d}");
            (
                dev.get_or_load_custom_func(&name, "crosskv_paged_attention", ptx::PAGED_ATTENTION)?,
                0,
            )
        }
    };
    let per_sm = f.occupancy_max_active_blocks_per_multiprocessor(128, smem, None).w()? as usize;
    let sms = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()? as usize;
    let n = (sms * per_sm).max(1);
    cache.lock().expect("slots cache").insert(key, n);
    Ok(n)
}

/// Most partitions one cluster combines: the portable cluster size (and the kernel's CMAX).
const MAX_CLUSTER_PARTS: usize = 8;
/// Longest partition [`cluster_parts`] shrinks a plan to. A long context gains little
/// from the cluster's cheaper combination and needs the plan's CTAs to keep the memory
/// busy: on an H100, GQA8 batch 16 at 16384 keys in 3 clustered partitions of 5461 keys
/// ran 1.5 % slower than in 4 combined through global memory (222 against 219 µs).
const MAX_SHRUNK_PART_KEYS: usize = 4096;

/// How many partitions this decode launch takes if it combines them in thread-block
/// clusters (`paged_attention_tc_decode_cluster`, one cluster per item), or None for the
/// kernel that combines them through global memory. A cluster's CTAs must be resident
/// in one GPC together, so fewer clusters than CTAs / size may fit the GPU at once: a
/// grid of clusters that did not all fit ran 13-18 % slower on an H100 (MQA batch 64 at
/// 4096 keys, 64 clusters of 4 where 62 fit). The plan's partitions then shrink to the
/// most (≤ 8) whose clusters all fit: 3 in clusters beat 4 through global memory (batch 64,
/// 1024-2048 keys: 25.6 → 24.0 and 37.5 → 36.3 µs a launch in the decode graph), but
/// only down to partitions of [`MAX_SHRUNK_PART_KEYS`]. Off with `CROSSKV_PA_CLUSTER=0`
/// (for measuring what it buys).
fn cluster_parts(dev: &CudaDevice, pr: &Prepared, cfg: LaunchConfig) -> Result<Option<usize>> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *OFF.get_or_init(|| std::env::var("CROSSKV_PA_CLUSTER").is_ok_and(|v| v == "0"))
        || pr.kernel != Kernel::TensorCore
        || pr.num_parts < 2
    {
        return Ok(None);
    }
    /// (head_dim, dtype, partitions, dynamic shared memory) → clusters that fit at once.
    type FitCache = Mutex<HashMap<(usize, DType, usize, u32), u32>>;
    static FITS: std::sync::OnceLock<FitCache> = std::sync::OnceLock::new();
    let clusters = cfg.grid_dim.0 * cfg.grid_dim.1;
    // The keys the partitions cover: the plan's, or a decode graph's widest table.
    let span = match pr.params.part_size as usize {
        0 => (pr.params.max_blocks * pr.params.block_size) as usize,
        size => size * pr.num_parts,
    };
    for parts in (2..=pr.num_parts.min(MAX_CLUSTER_PARTS)).rev() {
        if parts < pr.num_parts && span.div_ceil(parts) > MAX_SHRUNK_PART_KEYS {
            break;
        }
        let key = (pr.d, pr.key.4, parts, cfg.shared_mem_bytes);
        let cached = FITS
            .get_or_init(Default::default)
            .lock()
            .expect("cluster fit cache")
            .get(&key)
            .copied();
        let fit = match cached {
            Some(n) => n,
            None => {
                let cf = dev.get_or_load_custom_func(
                    &pr.attn_cluster,
                    "crosskv_paged_attention_tc",
                    ptx::PAGED_ATTENTION_TC,
                )?;
                cf.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    cfg.shared_mem_bytes as i32,
                )
                .w()?;
                let stream = dev.cuda_stream();
                let shape = LaunchConfig {
                    grid_dim: (cfg.grid_dim.0, cfg.grid_dim.1, parts as u32),
                    ..cfg
                };
                // SAFETY: the kernel is loaded and `shape` is its launch shape.
                let n = unsafe { max_active_clusters(&cf, &stream, shape, (1, 1, parts as u32)) }?;
                tracing::debug!("paged attention: {n} clusters of {parts} fit at once");
                FITS.get_or_init(Default::default)
                    .lock()
                    .expect("cluster fit cache")
                    .insert(key, n);
                n
            }
        };
        if clusters <= fit {
            return Ok(Some(parts));
        }
    }
    Ok(None)
}

/// A cluster-dimension launch attribute.
fn cluster_attribute(dims: (u32, u32, u32)) -> candle_core::cuda_backend::cudarc::driver::sys::CUlaunchAttribute {
    use candle_core::cuda_backend::cudarc::driver::sys;
    // SAFETY: a plain C struct and union of integers, for which all zeros is valid.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim.x = dims.0;
    attr.value.clusterDim.y = dims.1;
    attr.value.clusterDim.z = dims.2;
    attr
}

fn launch_config(
    cfg: LaunchConfig,
    stream: &candle_core::cuda_backend::cudarc::driver::CudaStream,
    attr: &mut candle_core::cuda_backend::cudarc::driver::sys::CUlaunchAttribute,
) -> candle_core::cuda_backend::cudarc::driver::sys::CUlaunchConfig {
    candle_core::cuda_backend::cudarc::driver::sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: attr,
        numAttrs: 1,
    }
}

/// How many clusters of `dims` CTAs of `f` fit the GPU at once (0: none, the launch
/// would fail).
///
/// # Safety
/// `f` is a loaded kernel and `cfg` its launch shape.
unsafe fn max_active_clusters(
    f: &candle_core::cuda_backend::cudarc::driver::CudaFunction,
    stream: &candle_core::cuda_backend::cudarc::driver::CudaStream,
    cfg: LaunchConfig,
    dims: (u32, u32, u32),
) -> Result<u32> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let mut attr = cluster_attribute(dims);
    let config = launch_config(cfg, stream, &mut attr);
    let mut n: std::ffi::c_int = 0;
    stream.context().bind_to_thread().w()?;
    sys::cuOccupancyMaxActiveClusters(&mut n, f.cu_function(), &config)
        .result()
        .w()?;
    Ok(n.max(0) as u32)
}

/// Launches `f` in thread-block clusters of `dims` CTAs (cudarc's launch builder takes no
/// launch attributes).
///
/// # Safety
/// `args` as for `cuLaunchKernel`: one pointer per kernel parameter, to a value of the
/// parameter's type, each valid for the call; the grid a multiple of `dims`.
unsafe fn launch_in_clusters(
    f: &candle_core::cuda_backend::cudarc::driver::CudaFunction,
    stream: &candle_core::cuda_backend::cudarc::driver::CudaStream,
    cfg: LaunchConfig,
    dims: (u32, u32, u32),
    args: &mut [*mut std::ffi::c_void],
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let mut attr = cluster_attribute(dims);
    let config = launch_config(cfg, stream, &mut attr);
    stream.context().bind_to_thread().w()?;
    sys::cuLaunchKernelEx(&config, f.cu_function(), args.as_mut_ptr(), std::ptr::null_mut())
        .result()
        .w()
}

/// The decode items' launch of [`launch`] when [`cluster_parts`] chose `parts`
/// partitions in clusters: the kernel `paged_attention_tc_decode_cluster` over the `n`
/// items from `base` (`smem` bytes of dynamic shared memory), the plan's keys split over
/// `parts`.
#[allow(clippy::too_many_arguments)]
fn launch_decode_in_clusters<T>(
    dev: &CudaDevice,
    pr: &Prepared,
    parts: usize,
    (base, n, smem): (u32, usize, usize),
    out: &mut Slice<T>,
    (q, k, v): (&View<'_, T>, &View<'_, T>, &View<'_, T>),
    table: &View<'_, u32>,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    let f = dev.get_or_load_custom_func(&pr.attn_cluster, "crosskv_paged_attention_tc", ptx::PAGED_ATTENTION_TC)?;
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .w()?;
    // Fewer partitions than planned: the same keys, split coarser (the scratch is sized
    // for the plan's, and this kernel leaves it alone).
    let mut params = pr.params;
    if parts < pr.num_parts && params.part_size > 0 {
        let span = params.part_size as usize * pr.num_parts;
        params.part_size = span.div_ceil(parts).next_multiple_of(TC_TILE_KEYS) as u32;
    }
    params.num_parts = parts as u32;
    let mut base = base;
    let stream = dev.cuda_stream();
    // The parameters in the kernel's order: out, tmp_acc, tmp_ml, q, k, v, seqs, work,
    // block_table, (params, work_base), counters.
    let mut ptrs = [
        out.device_ptr_mut(&stream).0,
        // The partition scratch and counters, unused by this kernel.
        pr.tmp_acc.device_ptr(&stream).0,
        pr.tmp_ml.device_ptr(&stream).0,
        q.device_ptr(&stream).0,
        k.device_ptr(&stream).0,
        v.device_ptr(&stream).0,
        pr.seqs_d.device_ptr(&stream).0,
        pr.work_d.device_ptr(&stream).0,
        table.device_ptr(&stream).0,
        pr.counters.device_ptr(&stream).0,
    ];
    let mut args: Vec<*mut std::ffi::c_void> = ptrs[..9].iter_mut().map(|p| p as *mut u64 as *mut _).collect();
    args.push(&mut params as *mut Params as *mut _);
    args.push(&mut base as *mut u32 as *mut _);
    args.push(&mut ptrs[9] as *mut u64 as *mut _);
    let cfg = LaunchConfig {
        grid_dim: (n as u32, pr.kv_heads as u32, parts as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: one pointer per kernel parameter, each to a value of its type that lives
    // past the call; the grid's z is the cluster's.
    unsafe { launch_in_clusters(&f, &stream, cfg, (1, 1, parts as u32), &mut args) }
}

fn launch<T: DeviceRepr>(
    dev: &CudaDevice,
    pr: &mut Prepared,
    table: &View<'_, u32>,
    out: &mut Slice<T>,
    q: &View<'_, T>,
    k: &View<'_, T>,
    v: &View<'_, T>,
) -> Result<()> {
    // The reduction: 128 threads, 4 elements of a row each.
    let rows_per_reduce = 128 / (pr.d / 4);
    let rcfg = LaunchConfig {
        grid_dim: (
            pr.num_work as u32,
            pr.kv_heads as u32,
            pr.rows.div_ceil(rows_per_reduce) as u32,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let (d32, rows32) = (pr.d as u32, pr.rows as u32);
    let (kv_heads, num_parts) = (pr.kv_heads as u32, pr.num_parts as u32);
    let grid = move |n: usize, smem: usize| LaunchConfig {
        grid_dim: (n as u32, kv_heads, num_parts),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    match pr.kernel {
        Kernel::CudaCore => {
            let f = dev.get_or_load_custom_func(&pr.attn, "crosskv_paged_attention", ptx::PAGED_ATTENTION)?;
            let mut b = f.builder();
            b.arg(&mut *out)
                .arg(&mut pr.tmp_acc)
                .arg(&mut pr.tmp_ml)
                .arg(q)
                .arg(k)
                .arg(v)
                .arg(&pr.seqs_d)
                .arg(&pr.work_d)
                .arg(table)
                .arg(&pr.params);
            unsafe { b.launch(grid(pr.num_work, 0)) }.w()?;
        }
        Kernel::TensorCore => {
            // Decode items [0, num_small), then prefill items from work_base = num_small.
            let launches = [
                (&pr.attn, 0, pr.num_small, true),
                (&pr.attn_prefill, pr.num_small, pr.num_work - pr.num_small, false),
            ];
            for (name, base, n, split) in launches {
                if n == 0 {
                    continue;
                }
                let smem = pr.kernel.smem_bytes(pr.d, split);
                let base = base as u32;
                let parts = if split {
                    cluster_parts(dev, pr, grid(n, smem))?
                } else {
                    None
                };
                if let Some(parts) = parts {
                    launch_decode_in_clusters(dev, pr, parts, (base, n, smem), out, (q, k, v), table)?;
                    continue;
                }
                let f = dev.get_or_load_custom_func(name, "crosskv_paged_attention_tc", ptx::PAGED_ATTENTION_TC)?;
                // Above 48 KiB of dynamic shared memory a kernel must opt in.
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
                .w()?;
                let mut b = f.builder();
                b.arg(&mut *out)
                    .arg(&mut pr.tmp_acc)
                    .arg(&mut pr.tmp_ml)
                    .arg(q)
                    .arg(k)
                    .arg(v)
                    .arg(&pr.seqs_d)
                    .arg(&pr.work_d)
                    .arg(table)
                    .arg(&pr.params)
                    .arg(&base)
                    .arg(&mut pr.counters);
                unsafe { b.launch(grid(n, smem)) }.w()?;
            }
        }
    }
    // The tensor-core kernels combine their partitions themselves.
    if pr.num_parts > 1 && pr.kernel == Kernel::CudaCore {
        let f = dev.get_or_load_custom_func(&pr.reduce, "crosskv_paged_attention", ptx::PAGED_ATTENTION)?;
        let mut b = f.builder();
        b.arg(&mut *out)
            .arg(&pr.tmp_acc)
            .arg(&pr.tmp_ml)
            .arg(&pr.seqs_d)
            .arg(&pr.work_d)
            .arg(&pr.params)
            .arg(&d32)
            .arg(&rows32);
        unsafe { b.launch(rcfg) }.w()?;
    }
    Ok(())
}

/// Benchmarks only (benches/decode_attention.rs): runs the paged-attention kernels on
/// bf16 `q` `[tokens, heads, d]` and caches `[blocks, block_size, kv_heads, d]` `iters`
/// times back to back, the plan and its device copies made once, and returns each run's
/// GPU time in ms (CUDA events around its launches) and the last output.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn bench_paged_attention(
    q: &candle_core::Tensor,
    k_cache: &candle_core::Tensor,
    v_cache: &candle_core::Tensor,
    seqs: &[SeqSpan],
    block_table: &[u32],
    max_blocks: usize,
    scale: f32,
    iters: usize,
) -> Result<(Vec<f32>, candle_core::Tensor)> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    let dev = q.device().as_cuda_device()?.clone();
    let (tokens, heads, d) = q.dims3()?;
    let (_, block_size, kv_heads, _) = k_cache.dims4()?;
    let mut pr = prepare(
        &dev,
        None,
        seqs,
        max_blocks,
        scale,
        tokens,
        heads,
        kv_heads,
        d,
        block_size,
        DType::BF16,
    )?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k_cache.storage_and_layout();
    let (vs, vl) = v_cache.storage_and_layout();
    // Views from each tensor's start: the caches may be narrowed out of one buffer.
    fn as_cuda<'a>(s: &'a candle_core::Storage, l: &Layout) -> Result<View<'a, half::bf16>> {
        if !l.is_contiguous() {
            candle_core::bail!("bench_paged_attention: tensors must be contiguous");
        }
        match s {
            candle_core::Storage::Cuda(c) => Ok(c.as_cuda_slice::<half::bf16>()?.slice(l.start_offset()..)),
            _ => candle_core::bail!("bench_paged_attention: tensors must be on CUDA"),
        }
    }
    let (qv, kv, vv) = (as_cuda(&qs, ql)?, as_cuda(&ks, kl)?, as_cuda(&vs, vl)?);
    let table = upload_table(&dev, block_table)?;
    let mut out = unsafe { dev.alloc::<half::bf16>(tokens * heads * d)? };
    let stream = dev.cuda_stream();
    let ctx = stream.context().clone();
    let events = (0..=iters)
        .map(|_| ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .w()?;
    events[0].record(&stream).w()?;
    for e in &events[1..] {
        launch(&dev, &mut pr, &table.as_view(), &mut out, &qv, &kv, &vv)?;
        e.record(&stream).w()?;
    }
    stream.synchronize().w()?;
    let times = events
        .windows(2)
        .map(|w| w[0].elapsed_ms(&w[1]))
        .collect::<std::result::Result<Vec<_>, _>>()
        .w()?;
    drop((qs, ks, vs));
    let out = candle_core::Tensor::from_storage(
        candle_core::Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone())),
        (tokens, heads, d),
        candle_core::op::BackpropOp::none(),
        false,
    );
    Ok((times, out))
}

/// Benchmarks only: device-to-device copies of `bytes` bytes, `iters` times; each
/// copy's GPU time in ms.
#[doc(hidden)]
pub fn bench_copy(dev: &candle_core::Device, bytes: usize, iters: usize) -> Result<Vec<f32>> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    let dev = dev.as_cuda_device()?.clone();
    let stream = dev.cuda_stream();
    let ctx = stream.context().clone();
    let mut src = unsafe { dev.alloc::<u8>(bytes)? };
    poison(&dev, &mut src)?;
    let mut dst = unsafe { dev.alloc::<u8>(bytes)? };
    let events = (0..=iters)
        .map(|_| ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .w()?;
    events[0].record(&stream).w()?;
    for e in &events[1..] {
        stream.memcpy_dtod(&src, &mut dst).w()?;
        e.record(&stream).w()?;
    }
    stream.synchronize().w()?;
    events
        .windows(2)
        .map(|w| w[0].elapsed_ms(&w[1]))
        .collect::<std::result::Result<Vec<_>, _>>()
        .w()
}

fn shape_storage(dev: &CudaDevice, dtype: DType, n: usize) -> Result<CudaStorage> {
    Ok(match dtype {
        DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<f32>(n.max(1))?, dev.clone()),
        DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<half::f16>(n.max(1))?, dev.clone()),
        _ => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<half::bf16>(n.max(1))?, dev.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_contexts_are_split_to_fill_whole_waves() {
        // 396 slots (132 SMs × 3). MQA, 64 decode items of 4096 keys: 4 partitions of
        // 1024 (one wave), not 8 of 512 (1.3 waves).
        assert_eq!(auto_part_size(4096, 64, 396), 1024);
        // 16 × 4 items of 16384 keys: 6 partitions, one full wave.
        assert_eq!(auto_part_size(16384, 64, 396), 2752);
        // 32 × 16 items of 4096 keys: 3 partitions (1536 CTAs, 3.9 waves).
        assert_eq!(auto_part_size(4096, 512, 396), 1408);
        // 256 items of 1024 keys, or many items: no split.
        assert_eq!(auto_part_size(1024, 256, 396), 1024);
        assert_eq!(auto_part_size(1024, 4096, 396), 1024);
        // 64 items of 1024 keys would be 64 CTAs in 264 slots (d128): 4 partitions of
        // 256 instead, one wave.
        assert_eq!(auto_part_size(1024, 64, 264), 256);
        assert_eq!(auto_part_size(1025, 64, 264), 320);
        // One sequence (batch 1) splits as far as it can: 16 partitions of 256 keys.
        assert_eq!(auto_part_size(4096, 1, 396), 256);
        // Never below 256 keys.
        assert_eq!(auto_part_size(300, 1, 396), 256);
        assert_eq!(auto_part_size(100, 1, 396), 256);
    }

    #[test]
    fn plan_covers_every_token_and_head_once() {
        let seqs = [
            SeqSpan {
                q_start: 0,
                q_len: 1,
                ctx_len: 700,
            },
            SeqSpan {
                q_start: 2,
                q_len: 37,
                ctx_len: 40,
            },
        ];
        for (kernel, (heads, kv_heads)) in [Kernel::TensorCore, Kernel::CudaCore]
            .into_iter()
            .flat_map(|k| [(32, 1), (8, 8), (12, 4), (34, 2), (16, 1)].map(|h| (k, h)))
        {
            let p = plan(None, &seqs, 40, heads, kv_heads, 128, kernel, 100_000);
            assert!(p.hpc * p.tpc <= kernel.rows(128));
            assert!(p.hpc <= kernel.max_heads(128));
            assert!(p.num_parts >= 2 && p.num_parts == 700usize.div_ceil(p.part_size));
            // Tensor cores: the decode kernel's items (≤ 16 rows) first, then the prefill kernel's.
            let rows = |w: &[u32]| match w[0] {
                NONE => p.hpc,
                s => (p.tpc as u32).min(seqs[s as usize].q_len - w[1]) as usize * p.hpc,
            };
            for (i, w) in p.work.chunks(3).enumerate() {
                assert_eq!(
                    rows(w) <= 16 && kernel == Kernel::TensorCore,
                    i < p.num_small,
                    "{heads}/{kv_heads}"
                );
            }
            let mut seen = vec![0; 40 * heads / kv_heads];
            for w in p.work.chunks(3) {
                let (first, n) = if w[0] == NONE {
                    (w[1] as usize, 1)
                } else {
                    let s = seqs[w[0] as usize];
                    let n = (p.tpc as u32).min(s.q_len - w[1]) as usize;
                    ((s.q_start + w[1]) as usize, n)
                };
                for t in first..first + n {
                    for h in 0..p.hpc {
                        seen[t * heads / kv_heads + w[2] as usize * p.hpc + h] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{heads}/{kv_heads}: {seen:?}");
        }
    }
}
