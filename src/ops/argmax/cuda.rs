//! The CUDA launch of `argmax_rows` (feature `cuda`): `kernels/argmax.cu`.

use crate::ops::cuda::{contiguous, output, ptx};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape};

/// kernels/argmax.cu: `NT` (threads per CTA, one CTA a row).
const THREADS: u32 = 1024;

/// f32 `[rows, cols]` → u32 `[rows]`, one CTA of [`THREADS`] threads per row (kernels/argmax.cu).
pub(crate) fn argmax_rows(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "argmax_rows";
    let (rows, cols) = l.shape().dims2()?;
    if s.dtype() != DType::F32 {
        candle_core::bail!("{OP}: logits must be f32");
    }
    let (o0, o1) = contiguous(l, OP, "logits")?;
    let dev = s.device.clone();
    let mut out = output::<u32>(&dev, rows)?;
    if rows > 0 {
        let x = s.as_cuda_slice::<f32>()?.slice(o0..o1);
        let f = dev.get_or_load_custom_func("argmax_rows_f32", "crosskv_argmax", ptx::ARGMAX)?;
        let cols32 = cols as u32;
        let mut b = f.builder();
        b.arg(&x).arg(&mut out).arg(&cols32);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(rows)))
}
