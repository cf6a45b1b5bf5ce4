//! CUDA launches of `kernels/flash_attention.cu` (feature `cuda`): the forward and
//! backward of `causal_attention` for f16/bf16 with head_dim 64 or 128. The CPU paths of
//! `flash_attention.rs` are the references.

use super::cuda::{contiguous, poison, ptx, suffix, POISON};
use super::flash_attention::Dims;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape};
use std::sync::atomic::Ordering;

const OP: &str = "causal_attention";
const MODULE: &str = "crosskv_flash_attention";
/// Query rows and keys per tile (`TILE_ROWS`).
const TILE: usize = 64;
/// Threads per CTA: forward (4 warps) and backward (8 warps).
const FWD_THREADS: u32 = 128;
const BWD_THREADS: u32 = 256;

/// Mirrors `struct FaParams` in kernels/flash_attention.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct FaParams {
    b: u32,
    t: u32,
    heads: u32,
    kv_heads: u32,
    tp: u32,
    n_tiles: u32,
    hsplit: u32,
    scale: f32,
}
unsafe impl DeviceRepr for FaParams {}

/// Dynamic shared memory: `FwdCfg<D>::SMEM` (Q, two stages of K and V) and
/// `BwdCfg<D>::SMEM` (K, V, two stages of Q, dO, LSE, Dsum).
fn fwd_smem(d: usize) -> usize {
    5 * TILE * d * 2
}
fn bwd_smem(d: usize) -> usize {
    2 * TILE * d * 2 + 2 * (2 * TILE * d * 2 + 2 * TILE * 4)
}

/// `fa_bwd_dq`: Q, dO, then two stages of K and V.
fn dq_smem(d: usize) -> usize {
    6 * TILE * d * 2
}

/// The kernel-name suffix, after checking what the kernels support.
fn check(d: Dims, dtype: DType) -> Result<&'static str> {
    if dtype == DType::F32 || !matches!(d.d, 64 | 128) {
        candle_core::bail!(
            "{OP}: no CUDA kernel for {dtype:?} with head_dim {} (f16/bf16, 64 or 128; causal_attention runs the composite instead)",
            d.d
        );
    }
    if d.t.div_ceil(TILE) * d.heads * d.b > i32::MAX as usize || d.t > i32::MAX as usize {
        candle_core::bail!("{OP}: {d:?} is too large for one launch");
    }
    suffix(dtype, OP)
}

fn params(d: Dims, scale: f32, hsplit: usize) -> FaParams {
    let tp = d.t.next_multiple_of(TILE);
    FaParams {
        b: d.b as u32,
        t: d.t as u32,
        heads: d.heads as u32,
        kv_heads: d.kv_heads as u32,
        tp: tp as u32,
        n_tiles: (tp / TILE) as u32,
        hsplit: hsplit as u32,
        scale,
    }
}

/// Into how many CTAs the backward splits each group's query heads: the fewest (a
/// divisor of the group) that make at least 4 CTAs per SM, so that MQA/GQA with few KV
/// heads still fills the GPU and the causal triangle's long and short CTAs even out.
/// Each split adds its partial dK, dV with atomics.
fn hsplit(dev: &CudaDevice, d: Dims) -> Result<usize> {
    let sms = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()? as usize;
    let base = d.t.div_ceil(TILE) * d.kv_heads * d.b;
    let group = d.group();
    Ok((1..=group)
        .find(|s| group.is_multiple_of(*s) && base * s >= 4 * sms)
        .unwrap_or(group))
}

fn config(blocks: usize, threads: u32, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

/// The forward: O (q's dtype, q's shape) and LSE (f32 `[b, heads, tp]`, tp = t rounded
/// up to 64, with its shape).
pub(crate) fn forward(
    d: Dims,
    scale: f32,
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, CudaStorage, Shape)> {
    let sfx = check(d, q.0.dtype())?;
    if k.0.dtype() != q.0.dtype() || v.0.dtype() != q.0.dtype() {
        candle_core::bail!("{OP}: q, k and v must share one dtype");
    }
    let (q0, q1) = contiguous(q.1, OP, "q")?;
    let (k0, k1) = contiguous(k.1, OP, "k")?;
    let (v0, v1) = contiguous(v.1, OP, "v")?;
    let dev = q.0.device.clone();
    let p = params(d, scale, 1);
    let tp = p.tp as usize;
    let mut lse = unsafe { dev.alloc::<f32>(d.b * d.heads * tp)? };
    if POISON.load(Ordering::Relaxed) {
        poison(&dev, &mut lse)?;
    }
    let smem = fwd_smem(d.d);
    let cfg = config(p.n_tiles as usize * d.heads * d.b, FWD_THREADS, smem);
    let name = format!("fa_fwd_{sfx}_d{}", d.d);
    macro_rules! go {
        ($t:ty) => {{
            let qv = q.0.as_cuda_slice::<$t>()?.slice(q0..q1);
            let kv = k.0.as_cuda_slice::<$t>()?.slice(k0..k1);
            let vv = v.0.as_cuda_slice::<$t>()?.slice(v0..v1);
            let mut out = unsafe { dev.alloc::<$t>(d.q_len())? };
            if POISON.load(Ordering::Relaxed) {
                poison(&dev, &mut out)?;
            }
            let f = dev.get_or_load_custom_func(&name, MODULE, ptx::FLASH_ATTENTION)?;
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .w()?;
            let mut b = f.builder();
            b.arg(&mut out).arg(&mut lse).arg(&qv).arg(&kv).arg(&vv).arg(&p);
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match q.0.dtype() {
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    };
    let lse = CudaStorage::wrap_cuda_slice(lse, dev);
    Ok((out, lse, Shape::from((d.b, d.heads, tp))))
}

/// The backward: `[dq | dk | dv]` flat in q's dtype, from `x` = q, k, v, O, dO and the
/// forward's LSE.
pub(crate) fn backward(
    d: Dims,
    scale: f32,
    x: [(&CudaStorage, &Layout); 5],
    lse: (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dtype = x[0].0.dtype();
    let sfx = check(d, dtype)?;
    if x.iter().any(|(s, _)| s.dtype() != dtype) || lse.0.dtype() != DType::F32 {
        candle_core::bail!("{OP}: q, k, v, O and dO must share one dtype, LSE f32");
    }
    let p = params(d, scale, 1);
    let tp = p.tp as usize;
    if x[3].1.shape() != x[0].1.shape() || x[4].1.shape() != x[0].1.shape() || lse.1.dims() != [d.b, d.heads, tp] {
        candle_core::bail!(
            "{OP}: O {:?}, dO {:?}, LSE {:?} do not fit q {:?}",
            x[3].1.shape(),
            x[4].1.shape(),
            lse.1.shape(),
            x[0].1.shape()
        );
    }
    let what = ["q", "k", "v", "O", "dO"];
    let mut ranges = [(0, 0); 5];
    for (i, (_, l)) in x.iter().enumerate() {
        ranges[i] = contiguous(l, OP, what[i])?;
    }
    let (l0, l1) = contiguous(lse.1, OP, "lse")?;
    let dev = x[0].0.device.clone();
    let p = params(d, scale, hsplit(&dev, d)?);
    let (nq, nk) = (d.q_len(), d.kv_len());
    let n = nq + 2 * nk;
    // A group split over CTAs sums its dK, dV in f32 first; else they are stored directly.
    let split = p.hsplit > 1;
    let mut acc = dev.alloc_zeros::<f32>(if split { 2 * nk } else { 1 })?;
    let mut dsum = unsafe { dev.alloc::<f32>(d.b * d.heads * tp)? };
    let dot_cfg = config((d.b * d.heads * tp).div_ceil(4), FWD_THREADS, 0);
    let kv_cfg = config(
        p.n_tiles as usize * d.kv_heads * d.b * p.hsplit as usize,
        BWD_THREADS,
        bwd_smem(d.d),
    );
    let dq_cfg = config(p.n_tiles as usize * d.heads * d.b, FWD_THREADS, dq_smem(d.d));
    let cast_cfg = config((2 * nk).div_ceil(256).min(1 << 16), 256, 0);
    let lse = lse.0.as_cuda_slice::<f32>()?.slice(l0..l1);
    let name = |k: &str| format!("fa_{k}_{sfx}_d{}", d.d);
    let load = |name: &str, smem: usize| -> Result<_> {
        let f = dev.get_or_load_custom_func(name, MODULE, ptx::FLASH_ATTENTION)?;
        if smem > 0 {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .w()?;
        }
        Ok(f)
    };
    macro_rules! go {
        ($t:ty) => {{
            let s = |i: usize| -> Result<_> { Ok(x[i].0.as_cuda_slice::<$t>()?.slice(ranges[i].0..ranges[i].1)) };
            let (qv, kv, vv, ov, gv) = (s(0)?, s(1)?, s(2)?, s(3)?, s(4)?);
            let f = load(&name("bwd_dot"), 0)?;
            let mut b = f.builder();
            b.arg(&mut dsum).arg(&ov).arg(&gv).arg(&p);
            unsafe { b.launch(dot_cfg) }.w()?;

            let mut out = unsafe { dev.alloc::<$t>(n)? };
            if POISON.load(Ordering::Relaxed) {
                poison(&dev, &mut out)?;
            }
            let (mut out_dq, mut out_kv) = out.split_at_mut(nq);
            {
                let (mut dk, mut dv) = out_kv.split_at_mut(nk);
                let (mut dk_acc, mut dv_acc) = if split {
                    acc.split_at_mut(nk)
                } else {
                    acc.split_at_mut(0) // not read: the kernel stores dK, dV directly
                };
                let f = load(&name("bwd_dkdv"), bwd_smem(d.d))?;
                let mut b = f.builder();
                b.arg(&mut dk).arg(&mut dv).arg(&mut dk_acc).arg(&mut dv_acc);
                b.arg(&qv).arg(&kv).arg(&vv).arg(&gv).arg(&lse).arg(&dsum).arg(&p);
                unsafe { b.launch(kv_cfg) }.w()?;
            }
            let f = load(&name("bwd_dq"), dq_smem(d.d))?;
            let mut b = f.builder();
            b.arg(&mut out_dq);
            b.arg(&qv).arg(&kv).arg(&vv).arg(&gv).arg(&lse).arg(&dsum).arg(&p);
            unsafe { b.launch(dq_cfg) }.w()?;
            if split {
                let f = load(&format!("fa_cast_{sfx}"), 0)?;
                let n64 = (2 * nk) as u64;
                let mut b = f.builder();
                b.arg(&mut out_kv).arg(&acc).arg(&n64);
                unsafe { b.launch(cast_cfg) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match dtype {
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    };
    Ok((out, Shape::from(n)))
}
