//! The CUDA launch of `reshape_and_cache` (feature `cuda`): `kernels/reshape_and_cache.cu`,
//! a copy into a cache of the rows' type or a conversion into an fp8 (`u8`) one.

use crate::ops::cuda::{contiguous, ptx, row_strided, suffix};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result};

pub(super) fn reshape_and_cache(
    cache: &mut CudaStorage,
    cl: &Layout,
    new: &CudaStorage,
    nl: &Layout,
    pos: &CudaStorage,
    pl: &Layout,
    inv_scale: f32,
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
    let fp8 = cache.dtype() == DType::U8;
    if cache.dtype() != new.dtype() && !fp8 {
        candle_core::bail!("{OP}: on CUDA the cache must be the rows' f32/f16/bf16, or fp8 (u8)");
    }
    let dev = cache.device.clone();
    let pos = pos.as_cuda_slice::<u32>()?.slice(p0..p1);
    let name = if fp8 {
        format!("reshape_and_cache_fp8_{}", suffix(new.dtype(), OP)?)
    } else {
        format!("reshape_and_cache_{}", suffix(new.dtype(), OP)?)
    };
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
            let src_stride = src_stride as u64;
            if fp8 {
                let mut dst = cache.as_cuda_slice_mut::<u8>()?.slice_mut(c0..c1);
                let mut b = f.builder();
                b.arg(&mut dst)
                    .arg(&src)
                    .arg(&pos)
                    .arg(&row32)
                    .arg(&cache_rows)
                    .arg(&src_stride)
                    .arg(&inv_scale);
                unsafe { b.launch(cfg) }.w()?;
            } else {
                let mut dst = cache.as_cuda_slice_mut::<$t>()?.slice_mut(c0..c1);
                let mut b = f.builder();
                b.arg(&mut dst)
                    .arg(&src)
                    .arg(&pos)
                    .arg(&row32)
                    .arg(&cache_rows)
                    .arg(&src_stride);
                unsafe { b.launch(cfg) }.w()?;
            }
            Ok(())
        }};
    }
    match new.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    }
}
