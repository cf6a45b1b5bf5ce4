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
mod cuda;
