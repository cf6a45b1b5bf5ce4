//! The CUDA launches of `cross_entropy` (feature `cuda`): `kernels/cross_entropy.cu`.

use crate::ops::cuda::{contiguous, output, ptx, suffix};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result};

const OP: &str = "cross_entropy";

/// One CTA per row: 32k-wide rows give each of 512 threads ~60 elements.
fn launch(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) fn forward(
    x: &CudaStorage,
    xl: &Layout,
    t: &CudaStorage,
    tl: &Layout,
    rows: usize,
    cols: usize,
) -> Result<CudaStorage> {
    let (x0, x1) = contiguous(xl, OP, "logits")?;
    let (t0, t1) = contiguous(tl, OP, "targets")?;
    let dev = x.device.clone();
    let mut out = output::<f32>(&dev, 2 * rows)?;
    let name = format!("cross_entropy_fwd_{}", suffix(x.dtype(), OP)?);
    let f = dev.get_or_load_custom_func(&name, "crosskv_cross_entropy", ptx::CROSS_ENTROPY)?;
    let tt = t.as_cuda_slice::<u32>()?.slice(t0..t1);
    let (r32, c32) = (rows as u32, cols as u32);
    macro_rules! go {
        ($t:ty) => {{
            let xs = x.as_cuda_slice::<$t>()?.slice(x0..x1);
            let mut b = f.builder();
            b.arg(&xs).arg(&tt).arg(&mut out).arg(&r32).arg(&c32);
            unsafe { b.launch(launch(rows)) }.w()?;
        }};
    }
    match x.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    x: &CudaStorage,
    xl: &Layout,
    t: &CudaStorage,
    tl: &Layout,
    lg: &CudaStorage,
    ll: &Layout,
    rows: usize,
    cols: usize,
) -> Result<CudaStorage> {
    let (x0, x1) = contiguous(xl, OP, "logits")?;
    let (t0, t1) = contiguous(tl, OP, "targets")?;
    let (l0, l1) = contiguous(ll, OP, "log-sum-exps")?;
    let dev = x.device.clone();
    let name = format!("cross_entropy_bwd_{}", suffix(x.dtype(), OP)?);
    let f = dev.get_or_load_custom_func(&name, "crosskv_cross_entropy", ptx::CROSS_ENTROPY)?;
    let tt = t.as_cuda_slice::<u32>()?.slice(t0..t1);
    let lgs = lg.as_cuda_slice::<f32>()?.slice(l0..l1);
    let (r32, c32) = (rows as u32, cols as u32);
    macro_rules! go {
        ($t:ty) => {{
            let xs = x.as_cuda_slice::<$t>()?.slice(x0..x1);
            let mut dx = output::<$t>(&dev, rows * cols)?;
            let mut b = f.builder();
            b.arg(&xs).arg(&tt).arg(&lgs).arg(&mut dx).arg(&r32).arg(&c32);
            unsafe { b.launch(launch(rows)) }.w()?;
            CudaStorage::wrap_cuda_slice(dx, dev.clone())
        }};
    }
    Ok(match x.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    })
}
