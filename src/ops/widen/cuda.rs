//! The CUDA launch of `widen_f32` (feature `cuda`): `kernels/widen.cu`.

use crate::ops::cuda::{contiguous, output, ptx, suffix};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape};

/// f16/bf16 → f32, contiguous (kernels/widen.cu): four elements a thread.
pub(crate) fn widen_f32(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "widen_f32";
    const THREADS: u32 = 256;
    let sfx = suffix(s.dtype(), OP)?;
    let (o0, o1) = contiguous(l, OP, "x")?;
    let n = o1 - o0;
    let dev = s.device.clone();
    let mut y = output::<f32>(&dev, n)?;
    if n > 0 {
        let f = dev.get_or_load_custom_func(&format!("widen_f32_{sfx}"), "crosskv_widen", ptx::WIDEN)?;
        let n64 = n as u64;
        let cfg = LaunchConfig {
            grid_dim: ((n.div_ceil(4 * THREADS as usize)).min(8192) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! run {
            ($t:ty) => {{
                let x = s.as_cuda_slice::<$t>()?.slice(o0..o1);
                let mut b = f.builder();
                b.arg(&x).arg(&mut y).arg(&n64);
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match s.dtype() {
            DType::BF16 => run!(half::bf16),
            DType::F16 => run!(half::f16),
            d => candle_core::bail!("{OP}: {d:?} is not f16/bf16"),
        }
    }
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l.shape().clone()))
}
