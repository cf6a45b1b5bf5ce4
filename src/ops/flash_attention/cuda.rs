//! CUDA launches of `kernels/flash_attention.cu` (feature `cuda`): the forward and
//! backward of `causal_attention` and its packed forms for f16/bf16 with head_dim 64 or
//! 128. The CPU paths of `mod.rs` are the references.
//!
//! Every operand is a [`Rows`]: the `[b·t]` rows of q, k or v inside a storage, any
//! (16-byte aligned) stride apart, so the kernels read column slices of a packed Q/K/V
//! in place; the backward writes dq, dk and dv where a [`GradLayout`] says, so a packed
//! input gets its gradient packed in one buffer. The kernels get raw device pointers:
//! [`Rows::check`] and [`GradLayout`]'s bounds check stand in for cudarc's slices.

use super::{Dims, GradLayout, Rows};
use crate::ops::cuda::{contiguous, poison, ptx, raw_buffer, suffix, POISON};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape};
use std::sync::atomic::Ordering;

const OP: &str = "causal_attention";
const MODULE: &str = "crosskv_flash_attention";

// ---------------------------------------------------------------- mirrors of kernels/flash_attention.cuh

/// kernels/flash_attention.cuh: `FA_TILE_ROWS` (query rows and keys per tile).
const TILE: usize = 64;
/// kernels/flash_attention.cuh: `FA_NT` (threads per CTA of the forward, `fa_bwd_dot`
/// and `fa_bwd_dq`: 4 warps).
const FWD_THREADS: u32 = 128;
/// kernels/flash_attention.cuh: `FA_NT_BWD` (threads per CTA of `fa_bwd_dkdv`: 8 warps).
const BWD_THREADS: u32 = 256;

/// kernels/flash_attention.cuh: `struct FaParams`.
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
    q_rs: u64,
    k_rs: u64,
    v_rs: u64,
    dq_rs: u64,
    dk_rs: u64,
    dv_rs: u64,
}
unsafe impl DeviceRepr for FaParams {}
const _: () = assert!(std::mem::size_of::<FaParams>() == 80);

impl Rows<'_> {
    /// `rows` rows of `width` fit the storage; offset and stride keep 16-byte alignment
    /// (the kernels' vector loads).
    fn check(&self, rows: usize, width: usize, what: &str) -> Result<()> {
        let esize = self.s.dtype().size_in_bytes();
        if !matches!(self.s.dtype(), DType::F16 | DType::BF16) {
            candle_core::bail!("{OP}: {what} is {:?} (f16/bf16)", self.s.dtype());
        }
        let len = raw_buffer(self.s)?.1;
        let end = self.offset + rows.saturating_sub(1) * self.stride + width;
        if self.stride < width || (rows > 0 && end > len) {
            candle_core::bail!(
                "{OP}: {what}: {rows} rows of {width} at {} every {} do not fit {len} elements",
                self.offset,
                self.stride
            );
        }
        if !(self.offset * esize).is_multiple_of(16) || !(self.stride * esize).is_multiple_of(16) {
            candle_core::bail!("{OP}: {what}'s rows are not 16-byte aligned");
        }
        Ok(())
    }

    /// The device address of row 0 (after [`Rows::check`]).
    fn ptr(&self) -> Result<u64> {
        Ok(raw_buffer(self.s)?.0 + (self.offset * self.s.dtype().size_in_bytes()) as u64)
    }
}

impl GradLayout {
    fn check(&self, d: Dims) -> Result<()> {
        let rows = d.b * d.t;
        for ((off, rs), width, what) in [
            (self.dq, d.heads * d.d, "dq"),
            (self.dk, d.kv_heads * d.d, "dk"),
            (self.dv, d.kv_heads * d.d, "dv"),
        ] {
            if rs < width || (rows > 0 && off + (rows - 1) * rs + width > self.len) || off % 8 != 0 || rs % 8 != 0 {
                candle_core::bail!(
                    "{OP}: {what} at {off} every {rs} does not fit {} elements aligned",
                    self.len
                );
            }
        }
        Ok(())
    }
}

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

/// The inputs: one dtype, each fitting its storage, aligned.
fn check_inputs(d: Dims, q: &Rows, k: &Rows, v: &Rows) -> Result<&'static str> {
    let dtype = q.s.dtype();
    let sfx = check(d, dtype)?;
    if k.s.dtype() != dtype || v.s.dtype() != dtype {
        candle_core::bail!("{OP}: q, k and v must share one dtype");
    }
    let rows = d.b * d.t;
    q.check(rows, d.heads * d.d, "q")?;
    k.check(rows, d.kv_heads * d.d, "k")?;
    v.check(rows, d.kv_heads * d.d, "v")?;
    Ok(sfx)
}

fn params(d: Dims, scale: f32, hsplit: usize, inputs: [&Rows; 3], grads: Option<&GradLayout>) -> FaParams {
    let tp = d.t.next_multiple_of(TILE);
    let g = grads.copied().unwrap_or(GradLayout::flat(d));
    FaParams {
        b: d.b as u32,
        t: d.t as u32,
        heads: d.heads as u32,
        kv_heads: d.kv_heads as u32,
        tp: tp as u32,
        n_tiles: (tp / TILE) as u32,
        hsplit: hsplit as u32,
        scale,
        q_rs: inputs[0].stride as u64,
        k_rs: inputs[1].stride as u64,
        v_rs: inputs[2].stride as u64,
        dq_rs: g.dq.1 as u64,
        dk_rs: g.dk.1 as u64,
        dv_rs: g.dv.1 as u64,
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

/// The forward: O (q's dtype, `[b, t, heads, d]` contiguous) and LSE (f32 `[b, heads,
/// tp]`, tp = t rounded up to 64, with its shape).
pub(crate) fn forward(d: Dims, scale: f32, q: Rows, k: Rows, v: Rows) -> Result<(CudaStorage, CudaStorage, Shape)> {
    let sfx = check_inputs(d, &q, &k, &v)?;
    let dev = q.s.device.clone();
    let p = params(d, scale, 1, [&q, &k, &v], None);
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
            let (qp, kp, vp) = (q.ptr()?, k.ptr()?, v.ptr()?);
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
            b.arg(&mut out).arg(&mut lse).arg(&qp).arg(&kp).arg(&vp).arg(&p);
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match q.s.dtype() {
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    };
    let lse = CudaStorage::wrap_cuda_slice(lse, dev);
    Ok((out, lse, Shape::from((d.b, d.heads, tp))))
}

/// The backward: one buffer in q's dtype holding dq, dk, dv where `grads` says, from
/// the inputs, O and dO (contiguous `[b, t, heads, d]`) and the forward's LSE.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    d: Dims,
    scale: f32,
    [q, k, v]: [Rows; 3],
    o: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    lse: (&CudaStorage, &Layout),
    grads: GradLayout,
) -> Result<(CudaStorage, Shape)> {
    let sfx = check_inputs(d, &q, &k, &v)?;
    let dtype = q.s.dtype();
    if o.0.dtype() != dtype || g.0.dtype() != dtype || lse.0.dtype() != DType::F32 {
        candle_core::bail!("{OP}: q, k, v, O and dO must share one dtype, LSE f32");
    }
    grads.check(d)?;
    let tp = d.t.next_multiple_of(TILE);
    let q_shape = [d.b, d.t, d.heads, d.d];
    if o.1.dims() != q_shape || g.1.dims() != q_shape || lse.1.dims() != [d.b, d.heads, tp] {
        candle_core::bail!(
            "{OP}: O {:?}, dO {:?}, LSE {:?} do not fit q {q_shape:?}",
            o.1.shape(),
            g.1.shape(),
            lse.1.shape(),
        );
    }
    let (o0, o1) = contiguous(o.1, OP, "O")?;
    let (g0, g1) = contiguous(g.1, OP, "dO")?;
    let (l0, l1) = contiguous(lse.1, OP, "lse")?;
    let dev = q.s.device.clone();
    let p = params(d, scale, hsplit(&dev, d)?, [&q, &k, &v], Some(&grads));
    let nk = d.kv_len();
    // A group split over CTAs sums its dK, dV in f32 first; else they are stored directly.
    let split = p.hsplit > 1;
    let acc = dev.alloc_zeros::<f32>(if split { 2 * nk } else { 1 })?;
    let mut dsum = unsafe { dev.alloc::<f32>(d.b * d.heads * tp)? };
    let dot_cfg = config((d.b * d.heads * tp).div_ceil(FWD_THREADS as usize / 8), FWD_THREADS, 0); // 8 lanes a row
    let kv_cfg = config(
        p.n_tiles as usize * d.kv_heads * d.b * p.hsplit as usize,
        BWD_THREADS,
        bwd_smem(d.d),
    );
    let dq_cfg = config(p.n_tiles as usize * d.heads * d.b, FWD_THREADS, dq_smem(d.d));
    let cast_cfg = config(nk.div_ceil(256).min(1 << 16), 256, 0);
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
    let stream = dev.cuda_stream();
    macro_rules! go {
        ($t:ty) => {{
            let (qp, kp, vp) = (q.ptr()?, k.ptr()?, v.ptr()?);
            let ov = o.0.as_cuda_slice::<$t>()?.slice(o0..o1);
            let gv = g.0.as_cuda_slice::<$t>()?.slice(g0..g1);
            let f = load(&name("bwd_dot"), 0)?;
            let mut b = f.builder();
            b.arg(&mut dsum).arg(&ov).arg(&gv).arg(&p);
            unsafe { b.launch(dot_cfg) }.w()?;

            let mut out = if grads.zeroed {
                dev.alloc_zeros::<$t>(grads.len)?
            } else {
                let mut out = unsafe { dev.alloc::<$t>(grads.len)? };
                if POISON.load(Ordering::Relaxed) {
                    poison(&dev, &mut out)?;
                }
                out
            };
            let esize = std::mem::size_of::<$t>() as u64;
            let base = out.device_ptr_mut(&stream).0;
            let at = |off: usize| base + off as u64 * esize;
            let (dq, dk, dv) = (at(grads.dq.0), at(grads.dk.0), at(grads.dv.0));
            let acc_base = acc.device_ptr(&stream).0;
            let (dk_acc, dv_acc) = (acc_base, acc_base + if split { nk as u64 * 4 } else { 0 });
            let f = load(&name("bwd_dkdv"), bwd_smem(d.d))?;
            let mut b = f.builder();
            b.arg(&dk).arg(&dv).arg(&dk_acc).arg(&dv_acc);
            b.arg(&qp).arg(&kp).arg(&vp).arg(&gv).arg(&lse).arg(&dsum).arg(&p);
            unsafe { b.launch(kv_cfg) }.w()?;
            let f = load(&name("bwd_dq"), dq_smem(d.d))?;
            let mut b = f.builder();
            b.arg(&dq);
            b.arg(&qp).arg(&kp).arg(&vp).arg(&gv).arg(&lse).arg(&dsum).arg(&p);
            unsafe { b.launch(dq_cfg) }.w()?;
            if split {
                let f = load(&format!("fa_cast_{sfx}"), 0)?;
                let (rows, cols) = ((d.b * d.t) as u64, (d.kv_heads * d.d) as u64);
                for (dst, rs, src) in [(dk, grads.dk.1, dk_acc), (dv, grads.dv.1, dv_acc)] {
                    let rs = rs as u64;
                    let mut b = f.builder();
                    b.arg(&dst).arg(&rs).arg(&src).arg(&rows).arg(&cols);
                    unsafe { b.launch(cast_cfg) }.w()?;
                }
            }
            // The raw addresses above point into `out` and `acc`: both live until here,
            // and later frees are ordered after these launches on the one stream.
            drop(acc);
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match dtype {
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    };
    Ok((out, Shape::from(grads.len)))
}
