//! `embedding`: the rows of a table `[vocab, hidden]` at u32 ids `[n]`, differentiable
//! in the table. The forward is candle's `index_select`; the backward scatters the
//! output gradient into an f32 `[vocab, hidden]` (`dtable[ids[i], :] += g[i, :]`) and
//! casts it to the table's dtype. candle's own backward (`index_add`) gives each of
//! `hidden` CUDA threads a sequential loop over all ids, which at training size (8192 ids)
//! is very slow; here every (id, column) is one atomic add. CUDA: kernels/embedding.cu.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

use super::{contiguous, u32_slice, Elem};

const OP: &str = "embedding";

/// (table `[vocab, hidden]`, ids u32 `[n]`) → `[n, hidden]`.
struct Forward;

/// (g `[n, hidden]`, ids u32 `[n]`) → f32 `[vocab, hidden]`: each g row added into the
/// row of its id.
struct Backward {
    vocab: usize,
}

fn cpu_backward<T: Elem + WithDType>(g: &[T], ids: &[u32], hidden: usize, vocab: usize) -> Result<Vec<f32>> {
    let mut acc = vec![0f32; vocab * hidden];
    for (i, &id) in ids.iter().enumerate() {
        let id = id as usize;
        if id >= vocab {
            candle_core::bail!("{OP}: id {id} at {i} is outside the vocabulary of {vocab}");
        }
        let grow = &g[i * hidden..(i + 1) * hidden];
        for (a, v) in acc[id * hidden..(id + 1) * hidden].iter_mut().zip(grow) {
            *a += v.to_f32();
        }
    }
    Ok(acc)
}

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, t: &CpuStorage, tl: &Layout, ids: &CpuStorage, il: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, hidden) = tl.shape().dims2()?;
        let n = il.shape().dims1()?;
        Ok((t.index_select(ids, tl, il, 0)?, Shape::from((n, hidden))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        t: &candle_core::CudaStorage,
        tl: &Layout,
        ids: &candle_core::CudaStorage,
        il: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (_, hidden) = tl.shape().dims2()?;
        let n = il.shape().dims1()?;
        Ok((t.index_select(ids, tl, il, 0)?, Shape::from((n, hidden))))
    }

    fn bwd(&self, table: &Tensor, ids: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let vocab = table.dim(0)?;
        let dt = g.contiguous()?.apply_op2_no_bwd(ids, &Backward { vocab })?;
        Ok((Some(dt.to_dtype(table.dtype())?), None))
    }
}

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "embedding_backward"
    }

    fn cpu_fwd(&self, g: &CpuStorage, gl: &Layout, ids: &CpuStorage, il: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, hidden) = gl.shape().dims2()?;
        let ids = u32_slice(ids, il, OP, "ids")?;
        if ids.len() != n {
            candle_core::bail!("{OP}: {} ids for {n} gradient rows", ids.len());
        }
        let acc = match g {
            CpuStorage::F32(d) => cpu_backward(contiguous(d, gl, OP, "gradient")?, ids, hidden, self.vocab)?,
            CpuStorage::F16(d) => cpu_backward(contiguous(d, gl, OP, "gradient")?, ids, hidden, self.vocab)?,
            CpuStorage::BF16(d) => cpu_backward(contiguous(d, gl, OP, "gradient")?, ids, hidden, self.vocab)?,
            d => candle_core::bail!("{OP}: {:?} gradients are not supported (f32/f16/bf16)", d.dtype()),
        };
        Ok((CpuStorage::F32(acc), Shape::from((self.vocab, hidden))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        ids: &candle_core::CudaStorage,
        il: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, hidden) = gl.shape().dims2()?;
        let out = cuda::backward(g, gl, ids, il, n, hidden, self.vocab)?;
        Ok((out, Shape::from((self.vocab, hidden))))
    }
}

/// The rows of `table` (`[vocab, hidden]`, f32/f16/bf16) at `ids` (u32 `[n]`):
/// `[n, hidden]`, the same as `table.index_select(ids, 0)`. Differentiable in the table
/// (the gradient is summed in f32, then cast to the table's dtype); ids get none. On the
/// CPU an id outside the vocabulary is an error.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (vocab, hidden) = table.dims2()?;
    if ids.rank() != 1 || ids.dtype() != DType::U32 {
        candle_core::bail!("{OP}: ids must be u32 [n], got {:?} {:?}", ids.dtype(), ids.dims());
    }
    if vocab as u64 > u32::MAX as u64 || hidden as u64 > u32::MAX as u64 {
        candle_core::bail!("{OP}: a {vocab}x{hidden} table is too large");
    }
    table.contiguous()?.apply_op2(&ids.contiguous()?, Forward)
}

#[cfg(feature = "cuda")]
mod cuda {
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
}
