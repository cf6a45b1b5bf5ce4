//! The CUDA launches of `embedding` (feature `cuda`): `kernels/embedding.cu`.

use crate::ops::cuda::{contiguous, ptx, suffix};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result};

const OP: &str = "embedding";

/// f32 `[vocab, hidden]`: `g`'s rows added into the rows of their ids, one CTA per id.
pub(super) fn backward(
    g: &CudaStorage,
    gl: &Layout,
    ids: &CudaStorage,
    il: &Layout,
    n: usize,
    hidden: usize,
    vocab: usize,
) -> Result<CudaStorage> {
    let (g0, g1) = contiguous(gl, OP, "gradient")?;
    let (i0, i1) = contiguous(il, OP, "ids")?;
    if i1 - i0 != n {
        candle_core::bail!("{OP}: {} ids for {n} gradient rows", i1 - i0);
    }
    if n > i32::MAX as usize || hidden > u32::MAX as usize || vocab > u32::MAX as usize {
        candle_core::bail!("{OP}: {n} ids of {hidden} is too large for one launch");
    }
    let dev = g.device.clone();
    // Zeros: the kernel adds into it.
    let mut acc = dev.alloc_zeros::<f32>((vocab * hidden).max(1))?;
    if n > 0 && hidden > 0 {
        let name = format!("embedding_bwd_{}", suffix(g.dtype(), OP)?);
        let f = dev.get_or_load_custom_func(&name, "crosskv_embedding", ptx::EMBEDDING)?;
        let is = ids.as_cuda_slice::<u32>()?.slice(i0..i1);
        let (h32, v32) = (hidden as u32, vocab as u32);
        // A whole number of warps covering the row, at most 256.
        let threads = hidden.div_ceil(32).clamp(1, 8) * 32;
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! go {
            ($t:ty) => {{
                let gs = g.as_cuda_slice::<$t>()?.slice(g0..g1);
                let mut b = f.builder();
                b.arg(&gs).arg(&is).arg(&mut acc).arg(&h32).arg(&v32);
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match g.dtype() {
            DType::F32 => go!(f32),
            DType::F16 => go!(half::f16),
            _ => go!(half::bf16),
        }
    }
    Ok(CudaStorage::wrap_cuda_slice(acc, dev))
}
