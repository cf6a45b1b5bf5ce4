//! The CUDA side of the ops (feature `cuda`): launches the kernels of `kernels/*.cu`
//! (compiled to PTX by `build.rs`) on candle's stream. Each op's CPU path stays the
//! reference; these functions are their `cuda_fwd`.

use super::paged_attention::SeqSpan;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape};
use std::sync::atomic::{AtomicBool, Ordering};

#[allow(dead_code)]
mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

static POISON: AtomicBool = AtomicBool::new(false);

/// Tests: fill every output the kernels allocate with NaN before they run, so an
/// element a kernel fails to write shows up.
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

fn contiguous(l: &Layout, op: &str, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} must be contiguous")))
}

fn suffix(dtype: DType, op: &str) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => candle_core::bail!("{op}: {d:?} is not supported on CUDA (f32/f16/bf16)"),
    })
}

fn poison<T: DeviceRepr>(
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
    let (n0, n1) = contiguous(nl, OP, "new rows")?;
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
            b.arg(&mut dst).arg(&src).arg(&pos).arg(&row32).arg(&cache_rows);
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

/// Keys per partition when a context is split along the sequence.
const PART_SIZE: usize = 512;
const NONE: u32 = u32::MAX;

/// Query rows (tokens × heads of one KV head's group) per CTA: `Cfg<D>::ROWS` in the kernel.
fn rows_per_cta(d: usize) -> usize {
    if d <= 128 {
        16
    } else {
        8
    }
}

/// The launch plan: work items `[seq or NONE, first token, head chunk]`, heads and
/// tokens per CTA, partitions.
struct Plan {
    work: Vec<u32>,
    hpc: usize,
    tpc: usize,
    num_parts: usize,
}

fn plan(seqs: &[SeqSpan], tokens: usize, heads: usize, kv_heads: usize, d: usize) -> Plan {
    let rows = rows_per_cta(d);
    let group = heads / kv_heads;
    // The largest divisor of the group that fits: a decode CTA reads each K/V tile once
    // for all `hpc` query heads that share it.
    let hpc = (1..=rows.min(group))
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
    let max_ctx = seqs.iter().map(|s| s.ctx_len as usize).max().unwrap_or(0);
    Plan {
        work,
        hpc,
        tpc,
        num_parts: max_ctx.div_ceil(PART_SIZE).max(1),
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn paged_attention(
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
    let (num_blocks, block_size, kv_heads, kd) = kl.shape().dims4()?;
    if kd != d || heads % kv_heads != 0 || kl.shape() != vl.shape() {
        candle_core::bail!("{OP}: q {:?} does not match cache {:?}", ql.shape(), kl.shape());
    }
    if !matches!(d, 64 | 128 | 256) {
        candle_core::bail!("{OP}: head_dim {d} is not supported on CUDA (64, 128, 256)");
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        candle_core::bail!("{OP}: q and cache must share one of f32/f16/bf16");
    }
    let sfx = suffix(q.dtype(), OP)?;
    let (q0, q1) = contiguous(ql, OP, "q")?;
    let (k0, k1) = contiguous(kl, OP, "k cache")?;
    let (v0, v1) = contiguous(vl, OP, "v cache")?;
    let esize = q.dtype().size_in_bytes();
    if !(k0 * esize).is_multiple_of(16) || !(v0 * esize).is_multiple_of(16) {
        candle_core::bail!("{OP}: the caches must start 16-byte aligned");
    }
    // The same checks as the CPU reference: every table entry in use must be a block of
    // the cache (the kernel trusts them).
    for (s, span) in seqs.iter().enumerate() {
        let (qs, ql_, ctx) = (span.q_start as usize, span.q_len as usize, span.ctx_len as usize);
        if qs + ql_ > tokens || ql_ > ctx {
            candle_core::bail!("{OP}: sequence {s} span {span:?} does not fit {tokens} tokens");
        }
        if ctx.div_ceil(block_size) > max_blocks {
            candle_core::bail!("{OP}: sequence {s} needs more blocks than its table has");
        }
        let table = &block_table[s * max_blocks..(s + 1) * max_blocks];
        if let Some(b) = table[..ctx.div_ceil(block_size)]
            .iter()
            .find(|&&b| b as usize >= num_blocks)
        {
            candle_core::bail!("{OP}: sequence {s}'s block table holds block {b}, past the cache's {num_blocks}");
        }
    }
    let dev = q.device.clone();
    let shape = ql.shape().clone();
    if tokens == 0 {
        return Ok((shape_storage(&dev, q.dtype(), 0)?, shape));
    }
    let p = plan(seqs, tokens, heads, kv_heads, d);
    let rows = rows_per_cta(d);
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
        part_size: PART_SIZE as u32,
        scale,
    };
    let flat: Vec<u32> = seqs.iter().flat_map(|s| [s.q_start, s.q_len, s.ctx_len]).collect();
    let or_one = |v: &[u32]| if v.is_empty() { vec![0u32] } else { v.to_vec() };
    let seqs_d = dev.clone_htod(&or_one(&flat))?;
    let work_d = dev.clone_htod(&p.work)?;
    let table_d = dev.clone_htod(&or_one(block_table))?;
    let (tmp_acc, tmp_ml) = if p.num_parts > 1 {
        let n = num_work * kv_heads * p.num_parts;
        unsafe { (dev.alloc::<f32>(n * rows * d)?, dev.alloc::<f32>(n * 2 * rows)?) }
    } else {
        unsafe { (dev.alloc::<f32>(1)?, dev.alloc::<f32>(1)?) }
    };
    let attn = dev.get_or_load_custom_func(
        &format!("paged_attention_{sfx}_d{d}"),
        "crosskv_paged_attention",
        ptx::PAGED_ATTENTION,
    )?;
    let reduce = dev.get_or_load_custom_func(
        &format!("paged_attention_reduce_{sfx}"),
        "crosskv_paged_attention",
        ptx::PAGED_ATTENTION,
    )?;
    let cfg = LaunchConfig {
        grid_dim: (num_work as u32, kv_heads as u32, p.num_parts as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let rcfg = LaunchConfig {
        grid_dim: (num_work as u32, kv_heads as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let (d32, rows32) = (d as u32, rows as u32);
    macro_rules! go {
        ($t:ty) => {{
            let qv = q.as_cuda_slice::<$t>()?.slice(q0..q1);
            let kv = k.as_cuda_slice::<$t>()?.slice(k0..k1);
            let vv = v.as_cuda_slice::<$t>()?.slice(v0..v1);
            let mut out = unsafe { dev.alloc::<$t>(tokens * heads * d)? };
            if POISON.load(Ordering::Relaxed) {
                poison(&dev, &mut out)?;
            }
            let (mut tmp_acc, mut tmp_ml) = (tmp_acc, tmp_ml);
            {
                let mut b = attn.builder();
                b.arg(&mut out)
                    .arg(&mut tmp_acc)
                    .arg(&mut tmp_ml)
                    .arg(&qv)
                    .arg(&kv)
                    .arg(&vv)
                    .arg(&seqs_d)
                    .arg(&work_d)
                    .arg(&table_d)
                    .arg(&params);
                unsafe { b.launch(cfg) }.w()?;
            }
            if p.num_parts > 1 {
                let mut b = reduce.builder();
                b.arg(&mut out)
                    .arg(&tmp_acc)
                    .arg(&tmp_ml)
                    .arg(&seqs_d)
                    .arg(&work_d)
                    .arg(&params)
                    .arg(&d32)
                    .arg(&rows32);
                unsafe { b.launch(rcfg) }.w()?;
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
        for (heads, kv_heads) in [(32, 1), (8, 8), (12, 4), (34, 2)] {
            let p = plan(&seqs, 40, heads, kv_heads, 128);
            assert!(p.hpc * p.tpc <= rows_per_cta(128));
            assert_eq!(p.num_parts, 2);
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
