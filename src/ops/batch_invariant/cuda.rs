//! Launches of `kernels/batch_invariant.cu` (feature `cuda`).

use super::{k_slices, token_owners, FixedAttention, F32_TILE, TC_THREADS, TILE_M, TILE_N};
use crate::ops::cuda::{contiguous, output, ptx, suffix};
use crate::ops::paged_attention::CUDA_HEAD_DIMS;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape};

const MODULE: &str = "crosskv_batch_invariant";

/// `x` `[m, k]`, `w` `[n, k]` → `[m, n]`.
pub(super) fn matmul(x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "fixed_matmul";
    let (m, k) = xl.shape().dims2()?;
    let (n, wk) = wl.shape().dims2()?;
    if wk != k || x.dtype() != w.dtype() {
        candle_core::bail!(
            "{OP}: x {:?} {:?} does not match w {:?} {:?}",
            xl.shape(),
            x.dtype(),
            wl.shape(),
            w.dtype()
        );
    }
    if m > u32::MAX as usize || n > u32::MAX as usize || k > u32::MAX as usize {
        candle_core::bail!("{OP}: {m}×{n}×{k} is too large for one launch");
    }
    let sfx = suffix(x.dtype(), OP)?;
    let (x0, x1) = contiguous(xl, OP, "x")?;
    let (w0, w1) = contiguous(wl, OP, "w")?;
    let esize = x.dtype().size_in_bytes();
    if x.dtype() != DType::F32
        && (!k.is_multiple_of(8) || !(x0 * esize).is_multiple_of(16) || !(w0 * esize).is_multiple_of(16))
    {
        candle_core::bail!("{OP}: rows of {k} {:?} elements must start 16-byte aligned", x.dtype());
    }
    let dev = x.device.clone();
    let shape = Shape::from((m, n));
    let tile = if x.dtype() == DType::F32 { F32_TILE } else { TILE_M };
    let cfg = LaunchConfig {
        grid_dim: (
            n.div_ceil(if x.dtype() == DType::F32 { F32_TILE } else { TILE_N }) as u32,
            m.div_ceil(tile) as u32,
            1,
        ),
        block_dim: (
            if x.dtype() == DType::F32 {
                (F32_TILE * F32_TILE) as u32
            } else {
                TC_THREADS
            },
            1,
            1,
        ),
        shared_mem_bytes: 0,
    };
    let (m32, n32, k32) = (m as u32, n as u32, k as u32);
    let (slices, slice_len) = k_slices(n, k);
    macro_rules! go {
        ($t:ty) => {{
            let mut out = output::<$t>(&dev, m * n)?;
            if m > 0 && n > 0 {
                let xs = x.as_cuda_slice::<$t>()?.slice(x0..x1);
                let ws = w.as_cuda_slice::<$t>()?.slice(w0..w1);
                let f = dev.get_or_load_custom_func(&format!("bi_matmul_{sfx}"), MODULE, ptx::BATCH_INVARIANT)?;
                let ks = slice_len as u32;
                if slices == 1 {
                    let mut b = f.builder();
                    let no_partials = 0u64;
                    b.arg(&mut out)
                        .arg(&no_partials)
                        .arg(&xs)
                        .arg(&ws)
                        .arg(&m32)
                        .arg(&n32)
                        .arg(&k32)
                        .arg(&ks);
                    unsafe { b.launch(cfg) }.w()?;
                } else {
                    let mut part = unsafe { dev.alloc::<f32>(slices * m * n)? };
                    let mut b = f.builder();
                    b.arg(&mut out)
                        .arg(&mut part)
                        .arg(&xs)
                        .arg(&ws)
                        .arg(&m32)
                        .arg(&n32)
                        .arg(&k32)
                        .arg(&ks);
                    let split = LaunchConfig {
                        grid_dim: (cfg.grid_dim.0, cfg.grid_dim.1, slices as u32),
                        ..cfg
                    };
                    unsafe { b.launch(split) }.w()?;
                    let sum =
                        dev.get_or_load_custom_func(&format!("bi_sum_partials_{sfx}"), MODULE, ptx::BATCH_INVARIANT)?;
                    let mut b = sum.builder();
                    let (len, slices32) = ((m * n) as u64, slices as u32);
                    b.arg(&mut out).arg(&part).arg(&len).arg(&slices32);
                    let threads = 256;
                    let blocks = (m * n).div_ceil(threads).min(65_535) as u32;
                    let sum_cfg = LaunchConfig {
                        grid_dim: (blocks, 1, 1),
                        block_dim: (threads as u32, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    unsafe { b.launch(sum_cfg) }.w()?;
                }
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    macro_rules! go_f32 {
        () => {{
            let mut out = output::<f32>(&dev, m * n)?;
            if m > 0 && n > 0 {
                let xs = x.as_cuda_slice::<f32>()?.slice(x0..x1);
                let ws = w.as_cuda_slice::<f32>()?.slice(w0..w1);
                let f = dev.get_or_load_custom_func("bi_matmul_f32", MODULE, ptx::BATCH_INVARIANT)?;
                let mut b = f.builder();
                b.arg(&mut out).arg(&xs).arg(&ws).arg(&m32).arg(&n32).arg(&k32);
                unsafe { b.launch(cfg) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match x.dtype() {
        DType::F32 => go_f32!(),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    };
    Ok((out, shape))
}

/// `q` `[tokens, heads, d]`, caches `[blocks, block_size, kv_heads, d]`.
pub(super) fn attention(
    op: &FixedAttention<'_>,
    q: &CudaStorage,
    ql: &Layout,
    k: &CudaStorage,
    kl: &Layout,
    v: &CudaStorage,
    vl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "fixed_paged_attention";
    let (tokens, heads, d) = ql.shape().dims3()?;
    let (_, block_size, kv_heads, kd) = kl.shape().dims4()?;
    if kd != d || heads % kv_heads != 0 || kl.shape() != vl.shape() {
        candle_core::bail!("{OP}: q {:?} does not match cache {:?}", ql.shape(), kl.shape());
    }
    if !CUDA_HEAD_DIMS.contains(&d) {
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
    let dev = q.device.clone();
    let shape = ql.shape().clone();
    let table: &[u32] = if op.block_table.is_empty() {
        &[0]
    } else {
        op.block_table
    };
    let (max_blocks, block_size32) = (op.max_blocks as u32, block_size as u32);
    let (heads32, kv_heads32) = (heads as u32, kv_heads as u32);
    let cfg = LaunchConfig {
        grid_dim: (heads as u32, tokens as u32, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut memo = op.plan.fixed.lock().expect("attention plans");
    let uploads = &mut *memo;
    let slot = op.slot;
    macro_rules! go {
        ($t:ty) => {{
            let mut out = output::<$t>(&dev, tokens * heads * d)?;
            if tokens > 0 {
                if uploads.all.is_none() {
                    // The owners and every slot's table in one copy, made by the first
                    // layer: a copy from pageable memory waits for the stream, which this
                    // early in the step holds only the first layer's projections.
                    let mut flat = token_owners(op.seqs, tokens);
                    let slots: Vec<&[u32]> = match op.plan.slot_tables() {
                        Some(all) => all.iter().map(|t| t.as_slice()).collect(),
                        None => vec![table],
                    };
                    uploads.stride = slots.iter().map(|t| t.len()).max().unwrap_or(0).max(1);
                    uploads.only = op.plan.slot_tables().is_none().then_some(slot);
                    for t in &slots {
                        flat.extend_from_slice(t);
                        flat.resize(flat.len() + uploads.stride - t.len(), 0);
                    }
                    uploads.all = Some(dev.clone_htod(&flat)?);
                }
                if uploads.only.is_some_and(|s| s != slot) {
                    candle_core::bail!("{OP}: a single-call plan used for KV slot {slot}");
                }
                let all = uploads.all.as_ref().expect("uploaded above");
                let at = 2 * tokens
                    + if uploads.only.is_some() {
                        0
                    } else {
                        slot * uploads.stride
                    };
                let owners_d = all.slice(0..2 * tokens);
                let table_d = all.slice(at..at + uploads.stride);
                let qs = q.as_cuda_slice::<$t>()?.slice(q0..q1);
                let ks = k.as_cuda_slice::<$t>()?.slice(k0..k1);
                let vs = v.as_cuda_slice::<$t>()?.slice(v0..v1);
                let f =
                    dev.get_or_load_custom_func(&format!("bi_attention_{sfx}_d{d}"), MODULE, ptx::BATCH_INVARIANT)?;
                let mut b = f.builder();
                b.arg(&mut out)
                    .arg(&qs)
                    .arg(&ks)
                    .arg(&vs)
                    .arg(&owners_d)
                    .arg(&table_d)
                    .arg(&max_blocks)
                    .arg(&block_size32)
                    .arg(&heads32)
                    .arg(&kv_heads32)
                    .arg(&op.scale);
                unsafe { b.launch(cfg) }.w()?;
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
