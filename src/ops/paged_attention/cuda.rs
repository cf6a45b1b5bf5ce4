//! The CUDA launches of paged attention (feature `cuda`): `kernels/paged_attention.cu`
//! (f32 q on CUDA cores, over an f32 or fp8 cache; the partition reduction) and
//! `kernels/paged_attention_tc.cu` (f16/bf16 q on tensor cores, over a cache of q's type
//! or fp8; decode and prefill kernels, partitions combined in the kernel or in
//! thread-block clusters). The planner (`plan.rs`) decides the work items
//! and partitions; this file uploads the plan, sizes the scratch, asks the driver how
//! many CTAs and clusters fit, and launches.
//!
//! Over 600 lines on purpose: one launch path for three kernels and the cluster variant,
//! whose scratch sizes, partition counts and counters must agree; split, each part would
//! need the others' invariants.

use super::plan::{plan, Kernel, Params, MAX_CLUSTER_PARTS, TC_TILE_KEYS, THREADS};
use super::{AttentionDims, KvScale, PagedAttentionPlan, SeqSpan};
use crate::ops::cuda::{contiguous, poison, ptx, suffix, POISON};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

// The kernels take `Params` by value.
unsafe impl DeviceRepr for Params {}

type Slice<T> = candle_core::cuda_backend::cudarc::driver::CudaSlice<T>;
type View<'a, T> = candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>;

/// A step's launch state on CUDA, inside its [`PagedAttentionPlan`]. (One per step,
/// made once and borrowed by every layer: its size does not matter.)
#[allow(clippy::large_enum_variant)]
pub(super) enum StepLaunch<'a> {
    /// Planned for the step (by [`PagedAttentionPlan::new`], or by the first call that
    /// needs it); each slot's table uploaded by the first layer that reads it.
    Step(Mutex<StepMemo>),
    /// A decode graph's: its launch made once for the graph's shape, over the spans and
    /// tables the runner keeps at fixed addresses.
    Graph {
        graph: &'a DecodeGraphAttention,
        tables: DeviceTables<'a>,
    },
}

impl Default for StepLaunch<'_> {
    fn default() -> Self {
        StepLaunch::Step(Mutex::default())
    }
}

/// The launch every KV slot of a step shares, and each slot's block table on the device.
#[derive(Default)]
pub(super) struct StepMemo {
    prepared: Option<Prepared>,
    /// Every slot's table, slot after slot, uploaded in one copy by the step's first
    /// layer: an upload from pageable memory waits for the kernels queued before it, so
    /// one per slot, mid-step, would hold the host back to the device's pace.
    tables: Option<Slice<u32>>,
}

impl StepLaunch<'_> {
    /// The step's launch planned now for `dims`. Shapes the kernels cannot run (or no
    /// tokens) are left to the first call, which reports them as it always does.
    pub(super) fn planned(
        dev: &CudaDevice,
        seqs: &[SeqSpan],
        max_blocks: usize,
        scale: f32,
        dims: AttentionDims,
    ) -> Result<Self> {
        let AttentionDims {
            tokens,
            heads,
            kv_heads,
            head_dim: d,
            block_size,
            dtype,
            fp8_cache,
        } = dims;
        let runnable = tokens > 0
            && kv_heads > 0
            && heads.is_multiple_of(kv_heads)
            && super::CUDA_HEAD_DIMS.contains(&d)
            && matches!(dtype, DType::F32 | DType::F16 | DType::BF16);
        let mut memo = StepMemo::default();
        if runnable {
            memo.prepared = Some(prepare(
                dev,
                None,
                seqs,
                max_blocks,
                scale,
                tokens,
                heads,
                kv_heads,
                d,
                block_size,
                (dtype, fp8_cache),
                true,
            )?);
        }
        Ok(StepLaunch::Step(Mutex::new(memo)))
    }
}

/// Every KV slot's block table of a decode graph, in device buffers the runner owns
/// (`runner::block_tables`): `seqs` the `[batch, 3]` spans, `tables` slot after slot,
/// `stride` (`batch * max_blocks`) entries each.
#[derive(Clone, Copy)]
pub struct DeviceTables<'a> {
    pub seqs: &'a Slice<u32>,
    pub tables: &'a Slice<u32>,
    pub stride: usize,
}

/// The paged-attention launch of a captured decode graph (`runner::graphs`): `batch`
/// sequences of one new token each, block tables `max_blocks` wide. Its device buffers
/// (work list, partition scratch, counters) keep their addresses for the graph's life;
/// the spans and tables it reads are the runner's ([`DeviceTables`]), rewritten before
/// each launch. One graph serves every context the tables can hold (`max_blocks *
/// block_size`): the tensor-core kernels split each sequence's own keys evenly over a
/// fixed number of partitions; the f32 kernel's fixed-size partitions cover the longest
/// context, and a shorter sequence leaves its trailing ones empty (those CTAs return at
/// once).
pub struct DecodeGraphAttention {
    prepared: Mutex<Prepared>,
    scale: f32,
}

impl DecodeGraphAttention {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dev: &candle_core::Device,
        batch: usize,
        max_blocks: usize,
        (heads, kv_heads, d): (usize, usize, usize),
        block_size: usize,
        (dtype, fp8_cache): (DType, bool),
        scale: f32,
    ) -> Result<Self> {
        let cuda = dev.as_cuda_device()?;
        let spans = graph_spans(batch, max_blocks, block_size);
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
            (dtype, fp8_cache),
            false,
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
        Ok(Self {
            prepared: Mutex::new(prepared),
            scale,
        })
    }

    pub(super) fn scale(&self) -> f32 {
        self.scale
    }
}

/// The spans a decode graph is planned for: `batch` sequences of one token each at the
/// longest context the tables hold.
fn graph_spans(batch: usize, max_blocks: usize, block_size: usize) -> Vec<SeqSpan> {
    let longest = (max_blocks * block_size) as u32;
    (0..batch as u32)
        .map(|i| SeqSpan {
            q_start: i,
            q_len: 1,
            ctx_len: longest,
        })
        .collect()
}

/// One layer's launch under the step's `plan`, reading KV slot `slot` (whose host table
/// is `block_table`): the `cuda_fwd` of paged attention.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    plan: &PagedAttentionPlan<'_>,
    slot: usize,
    block_table: &[u32],
    q: &CudaStorage,
    ql: &Layout,
    k: &CudaStorage,
    kl: &Layout,
    v: &CudaStorage,
    vl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "paged_attention";
    let (seqs, max_blocks, scale) = (plan.seqs(), plan.max_blocks(), plan.scale());
    let (tokens, heads, d) = ql.shape().dims3()?;
    let (_, block_size, kv_heads, kd) = kl.shape().dims4()?;
    if kd != d || heads % kv_heads != 0 || kl.shape() != vl.shape() {
        candle_core::bail!("{OP}: q {:?} does not match cache {:?}", ql.shape(), kl.shape());
    }
    if !super::CUDA_HEAD_DIMS.contains(&d) {
        candle_core::bail!("{OP}: head_dim {d} is not supported on CUDA (64, 128, 256)");
    }
    let fp8 = k.dtype() == DType::U8;
    if k.dtype() != v.dtype() || (q.dtype() != k.dtype() && !fp8) {
        candle_core::bail!("{OP}: on CUDA the caches must be q's f32/f16/bf16, or fp8 (u8)");
    }
    suffix(q.dtype(), OP)?;
    let (q0, q1) = contiguous(ql, OP, "q")?;
    let (k0, k1) = contiguous(kl, OP, "k cache")?;
    let (v0, v1) = contiguous(vl, OP, "v cache")?;
    let esize = k.dtype().size_in_bytes();
    if !(k0 * esize).is_multiple_of(16) || !(v0 * esize).is_multiple_of(16) {
        candle_core::bail!("{OP}: the caches must start 16-byte aligned");
    }
    let dev = q.device.clone();
    let shape = ql.shape().clone();
    if tokens == 0 {
        return Ok((shape_storage(&dev, q.dtype(), 0)?, shape));
    }
    let key = (tokens, heads, kv_heads, d, q.dtype(), fp8);
    let kv_scale = plan.kv_scale(slot);
    // The step's launch, shared by every KV slot (they all see the same spans: only
    // their block tables differ, uploaded once per slot).
    let mut step_memo;
    let mut graph_memo;
    let (pr, spans, table): (&mut Prepared, Option<&Slice<u32>>, View<'_, u32>) = match &plan.cuda {
        StepLaunch::Step(m) => {
            step_memo = m.lock().expect("attention plans");
            let memo = &mut *step_memo;
            if memo.prepared.as_ref().is_none_or(|pr| pr.key != key) {
                memo.prepared = Some(prepare(
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
                    (q.dtype(), fp8),
                    true,
                )?);
                memo.tables = None;
            }
            let all = plan.host_tables();
            let stride = block_table.len();
            if all.iter().any(|t| t.len() != stride) {
                candle_core::bail!("{OP}: the KV slots' block tables differ in size");
            }
            let table = if all.len() > 1 && stride > 0 {
                if memo.tables.is_none() {
                    memo.tables = Some(upload_table(&dev, &all.concat())?);
                }
                let at = slot * stride;
                memo.tables.as_ref().expect("uploaded above").slice(at..at + stride)
            } else {
                // One table (a single call): its own upload.
                if memo.tables.is_none() {
                    memo.tables = Some(upload_table(&dev, block_table)?);
                }
                memo.tables.as_ref().expect("uploaded above").as_view()
            };
            // The spans: the plan's own upload (`Prepared::seqs_d`).
            (memo.prepared.as_mut().expect("made above"), None, table)
        }
        StepLaunch::Graph { graph, tables } => {
            graph_memo = graph.prepared.lock().expect("attention plans");
            if graph_memo.key != key {
                // A captured graph's buffers are fixed: a step of another shape must not
                // replace them.
                candle_core::bail!("{OP}: a decode graph's plans were made for another shape");
            }
            // The decode graph's tables: one buffer, slot after slot, refilled before
            // each launch.
            let table = tables.tables.slice(slot * tables.stride..(slot + 1) * tables.stride);
            (&mut *graph_memo, Some(tables.seqs), table)
        }
    };
    macro_rules! go {
        ($t:ty) => {{
            let qv = q.as_cuda_slice::<$t>()?.slice(q0..q1);
            let mut out = unsafe { dev.alloc::<$t>(tokens * heads * d)? };
            if POISON.load(Ordering::Relaxed) {
                poison(&dev, &mut out)?;
            }
            if fp8 {
                let kv = k.as_cuda_slice::<u8>()?.slice(k0..k1);
                let vv = v.as_cuda_slice::<u8>()?.slice(v0..v1);
                launch(&dev, pr, spans, &table, &mut out, &qv, (&kv, &vv), kv_scale)?;
            } else {
                let kv = k.as_cuda_slice::<$t>()?.slice(k0..k1);
                let vv = v.as_cuda_slice::<$t>()?.slice(v0..v1);
                launch(&dev, pr, spans, &table, &mut out, &qv, (&kv, &vv), kv_scale)?;
            }
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
struct Prepared {
    /// (tokens, heads, kv_heads, head_dim, q dtype, fp8 cache) it was made for.
    key: (usize, usize, usize, usize, DType, bool),
    params: Params,
    num_work: usize,
    num_small: usize,
    num_parts: usize,
    kv_heads: usize,
    d: usize,
    rows: usize,
    /// The spans on the device: the plan's own upload, or None for a decode graph,
    /// which reads the runner's ([`DeviceTables::seqs`]).
    seqs_d: Option<Slice<u32>>,
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
    (dtype, fp8_cache): (DType, bool),
    upload_spans: bool,
) -> Result<Prepared> {
    let sfx = suffix(dtype, "paged_attention")?;
    let f8 = fp8_infix(fp8_cache);
    let kernel = Kernel::for_dtype(dtype);
    let p = plan(
        part_ctx,
        seqs,
        tokens,
        heads,
        kv_heads,
        d,
        kernel,
        slots(dev, kernel, d, (dtype, fp8_cache))?,
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
        key: (tokens, heads, kv_heads, d, dtype, fp8_cache),
        params,
        num_work,
        num_small: p.num_small,
        num_parts: p.num_parts,
        kv_heads,
        d,
        rows,
        seqs_d: if upload_spans {
            Some(dev.clone_htod(&or_one(&flat))?)
        } else {
            None
        },
        work_d: dev.clone_htod(&p.work)?,
        tmp_acc,
        tmp_ml,
        counters,
        kernel,
        attn: decode_kernel(kernel, sfx, fp8_cache, d),
        attn_cluster: format!("paged_attention_tc_decode_cluster_{sfx}{f8}_d{d}"),
        attn_prefill: format!("paged_attention_tc_prefill_{sfx}{f8}_d{d}"),
        reduce: format!("paged_attention_reduce_{sfx}"),
    })
}

/// The kernel that runs decode items (the CUDA-core one runs every item).
fn decode_kernel(kernel: Kernel, sfx: &str, fp8_cache: bool, d: usize) -> String {
    let f8 = fp8_infix(fp8_cache);
    match kernel {
        Kernel::TensorCore => format!("paged_attention_tc_decode_{sfx}{f8}_d{d}"),
        Kernel::CudaCore => format!("paged_attention_{sfx}{f8}_d{d}"),
    }
}

/// An fp8 cache's kernels have the names of the 16-bit ones with `_kvfp8` before the
/// head dim.
fn fp8_infix(fp8_cache: bool) -> &'static str {
    if fp8_cache {
        "_kvfp8"
    } else {
        ""
    }
}

/// How many CTAs of the kernel that runs decode items fit the GPU at once: SMs × the
/// occupancy the driver computes for its registers and shared memory (cached per kernel).
fn slots(dev: &CudaDevice, kernel: Kernel, d: usize, (dtype, fp8_cache): (DType, bool)) -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    use std::collections::HashMap;
    use std::sync::Mutex;
    /// (head_dim, tensor cores, dtype, fp8 cache) → slots.
    type SlotCache = Mutex<HashMap<(usize, bool, DType, bool), usize>>;
    static CACHE: std::sync::OnceLock<SlotCache> = std::sync::OnceLock::new();
    let key = (d, kernel == Kernel::TensorCore, dtype, fp8_cache);
    let cache = CACHE.get_or_init(Default::default);
    if let Some(&n) = cache.lock().expect("slots cache").get(&key) {
        return Ok(n);
    }
    let sfx = suffix(dtype, "paged_attention")?;
    let (f, smem) = match kernel {
        Kernel::TensorCore => {
            let name = decode_kernel(kernel, sfx, fp8_cache, d);
            let f = dev.get_or_load_custom_func(&name, "crosskv_paged_attention_tc", ptx::PAGED_ATTENTION_TC)?;
            let smem = kernel.smem_bytes(d, true, fp8_cache);
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .w()?;
            (f, smem)
        }
        Kernel::CudaCore => {
            let name = decode_kernel(kernel, sfx, fp8_cache, d);
            (
                dev.get_or_load_custom_func(&name, "crosskv_paged_attention", ptx::PAGED_ATTENTION)?,
                0,
            )
        }
    };
    let per_sm = f
        .occupancy_max_active_blocks_per_multiprocessor(THREADS, smem, None)
        .w()? as usize;
    let sms = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()? as usize;
    let n = (sms * per_sm).max(1);
    cache.lock().expect("slots cache").insert(key, n);
    Ok(n)
}

/// Longest partition [`cluster_parts`] shrinks a plan to. A long context gains little
/// from the cluster's cheaper combination and needs the plan's CTAs to keep the memory
/// busy: 3 clustered partitions of 5461 keys ran slower than 4 combined through global
/// memory (BENCHMARKS.md, "Measurements behind design choices").
const MAX_SHRUNK_PART_KEYS: usize = 4096;

/// How many partitions this decode launch takes if it combines them in thread-block
/// clusters (`paged_attention_tc_decode_cluster`, one cluster per item), or None for the
/// kernel that combines them through global memory. A cluster's CTAs must be resident
/// in one GPC together, so fewer clusters than CTAs / size may fit the GPU at once, and
/// a grid of clusters that do not all fit runs markedly slower. The plan's partitions
/// then shrink to the most (≤ 8) whose clusters all fit: 3 in clusters beat 4 through
/// global memory at batch 64, but only down to partitions of [`MAX_SHRUNK_PART_KEYS`]
/// (BENCHMARKS.md, "Measurements behind design choices"). Off with `CROSSKV_PA_CLUSTER=0`
/// (for measuring what it buys).
fn cluster_parts(dev: &CudaDevice, pr: &Prepared, cfg: LaunchConfig) -> Result<Option<usize>> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *OFF.get_or_init(|| crate::env::PA_CLUSTER.get().is_some_and(|v| v == "0"))
        || pr.kernel != Kernel::TensorCore
        || pr.num_parts < 2
    {
        return Ok(None);
    }
    /// (head_dim, dtype, fp8 cache, partitions, dynamic shared memory) → clusters that
    /// fit at once.
    type FitCache = Mutex<HashMap<(usize, DType, bool, usize, u32), u32>>;
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
        let key = (pr.d, pr.key.4, pr.key.5, parts, cfg.shared_mem_bytes);
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
fn launch_decode_in_clusters<T, C>(
    dev: &CudaDevice,
    pr: &Prepared,
    seqs: &Slice<u32>,
    parts: usize,
    (base, n, smem): (u32, usize, usize),
    out: &mut Slice<T>,
    (q, k, v): (&View<'_, T>, &View<'_, C>, &View<'_, C>),
    table: &View<'_, u32>,
    kv_scale: KvScale,
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
    // block_table, (params, work_base), counters, and over an fp8 cache (k_scale, v_scale).
    let mut ptrs = [
        out.device_ptr_mut(&stream).0,
        // The partition scratch and counters, unused by this kernel.
        pr.tmp_acc.device_ptr(&stream).0,
        pr.tmp_ml.device_ptr(&stream).0,
        q.device_ptr(&stream).0,
        k.device_ptr(&stream).0,
        v.device_ptr(&stream).0,
        seqs.device_ptr(&stream).0,
        pr.work_d.device_ptr(&stream).0,
        table.device_ptr(&stream).0,
        pr.counters.device_ptr(&stream).0,
    ];
    let mut args: Vec<*mut std::ffi::c_void> = ptrs[..9].iter_mut().map(|p| p as *mut u64 as *mut _).collect();
    args.push(&mut params as *mut Params as *mut _);
    args.push(&mut base as *mut u32 as *mut _);
    args.push(&mut ptrs[9] as *mut u64 as *mut _);
    let (mut k_scale, mut v_scale) = (kv_scale.k, kv_scale.v);
    if pr.key.5 {
        args.push(&mut k_scale as *mut f32 as *mut _);
        args.push(&mut v_scale as *mut f32 as *mut _);
    }
    let cfg = LaunchConfig {
        grid_dim: (n as u32, pr.kv_heads as u32, parts as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: one pointer per kernel parameter, each to a value of its type that lives
    // past the call; the grid's z is the cluster's.
    unsafe { launch_in_clusters(&f, &stream, cfg, (1, 1, parts as u32), &mut args) }
}

/// The launches of one layer: `seqs` the spans on the device (None: the plan's own); the
/// caches of q's type `T`, or fp8 codes (`C` = u8) read with `kv_scale`.
#[allow(clippy::too_many_arguments)]
fn launch<T: DeviceRepr, C: DeviceRepr>(
    dev: &CudaDevice,
    pr: &mut Prepared,
    seqs: Option<&Slice<u32>>,
    table: &View<'_, u32>,
    out: &mut Slice<T>,
    q: &View<'_, T>,
    (k, v): (&View<'_, C>, &View<'_, C>),
    kv_scale: KvScale,
) -> Result<()> {
    let seqs = match seqs {
        Some(s) => s,
        None => pr.seqs_d.as_ref().expect("a step's plan uploads its spans"),
    };
    // The reduction: `THREADS` threads, 4 elements of a row each.
    let rows_per_reduce = THREADS as usize / (pr.d / 4);
    let rcfg = LaunchConfig {
        grid_dim: (
            pr.num_work as u32,
            pr.kv_heads as u32,
            pr.rows.div_ceil(rows_per_reduce) as u32,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (d32, rows32) = (pr.d as u32, pr.rows as u32);
    let (kv_heads, num_parts) = (pr.kv_heads as u32, pr.num_parts as u32);
    let grid = move |n: usize, smem: usize| LaunchConfig {
        grid_dim: (n as u32, kv_heads, num_parts),
        block_dim: (THREADS, 1, 1),
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
                .arg(seqs)
                .arg(&pr.work_d)
                .arg(table)
                .arg(&pr.params);
            if pr.key.5 {
                b.arg(&kv_scale.k).arg(&kv_scale.v);
            }
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
                let smem = pr.kernel.smem_bytes(pr.d, split, pr.key.5);
                let base = base as u32;
                let parts = if split {
                    cluster_parts(dev, pr, grid(n, smem))?
                } else {
                    None
                };
                if let Some(parts) = parts {
                    launch_decode_in_clusters(dev, pr, seqs, parts, (base, n, smem), out, (q, k, v), table, kv_scale)?;
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
                    .arg(seqs)
                    .arg(&pr.work_d)
                    .arg(table)
                    .arg(&pr.params)
                    .arg(&base)
                    .arg(&mut pr.counters);
                if pr.key.5 {
                    b.arg(&kv_scale.k).arg(&kv_scale.v);
                }
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
            .arg(seqs)
            .arg(&pr.work_d)
            .arg(&pr.params)
            .arg(&d32)
            .arg(&rows32);
        unsafe { b.launch(rcfg) }.w()?;
    }
    Ok(())
}

/// An empty output: `n` (at least one) zeroed elements of `dtype`.
fn shape_storage(dev: &CudaDevice, dtype: DType, n: usize) -> Result<CudaStorage> {
    Ok(match dtype {
        DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<f32>(n.max(1))?, dev.clone()),
        DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<half::f16>(n.max(1))?, dev.clone()),
        _ => CudaStorage::wrap_cuda_slice(dev.alloc_zeros::<half::bf16>(n.max(1))?, dev.clone()),
    })
}
