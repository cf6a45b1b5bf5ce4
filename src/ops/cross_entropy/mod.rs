//! `cross_entropy`: the mean next-token loss of logits `[rows, vocab]` against u32
//! targets `[rows]`, differentiable in the logits. One op for the forward (each row's
//! loss and log-sum-exp in one pass) and one for the backward (softmax minus the one-hot
//! target, from the saved log-sum-exp, in one pass), where candle_nn's composite
//! (log_softmax + gather, and their backward) makes ~15 passes over the logits, which
//! at training size (8k rows × 32k vocab in f32: 1 GB) cost as much as the lm_head's matmuls.
//! Computed in f32 whatever the logits' dtype. CUDA: kernels/cross_entropy.cu.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

use super::{contiguous, u32_slice, Elem};

const OP: &str = "cross_entropy";

/// (logits, targets) → f32 `[2, rows]`: each row's loss, then its log-sum-exp.
struct Forward;
/// (logits, targets, f32 `[2, rows]`: log-sum-exps, then dL/dloss per row) → dL/dlogits.
struct Backward;

fn rows_cols(l: &Layout) -> Result<(usize, usize)> {
    l.shape().dims2()
}

fn cpu_forward<T: Elem + WithDType>(x: &[T], t: &[u32], cols: usize) -> Result<Vec<f32>> {
    let rows = t.len();
    let mut out = vec![0f32; 2 * rows];
    for (r, row) in x.chunks(cols.max(1)).take(rows).enumerate() {
        let m = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(v.to_f32()));
        let s: f64 = row.iter().map(|v| ((v.to_f32() - m) as f64).exp()).sum();
        let lse = m + (s.ln() as f32);
        let target = t[r] as usize;
        if target >= cols {
            candle_core::bail!("{OP}: target {target} is outside the {cols} logits of row {r}");
        }
        out[r] = lse - row[target].to_f32();
        out[rows + r] = lse;
    }
    Ok(out)
}

fn cpu_backward<T: Elem + WithDType>(x: &[T], t: &[u32], lse_g: &[f32], cols: usize) -> Vec<T> {
    let rows = t.len();
    let mut dx = vec![T::from_f32(0.0); x.len()];
    for (r, (row, drow)) in x.chunks(cols.max(1)).zip(dx.chunks_mut(cols.max(1))).enumerate() {
        let (lse, g, target) = (lse_g[r], lse_g[rows + r], t[r] as usize);
        for (j, (v, d)) in row.iter().zip(drow.iter_mut()).enumerate() {
            let p = (v.to_f32() - lse).exp();
            *d = T::from_f32(g * (p - if j == target { 1.0 } else { 0.0 }));
        }
    }
    dx
}

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, t: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, cols) = rows_cols(xl)?;
        let t = u32_slice(t, tl, OP, "targets")?;
        let out = match x {
            CpuStorage::F32(d) => cpu_forward(contiguous(d, xl, OP, "logits")?, t, cols)?,
            CpuStorage::F16(d) => cpu_forward(contiguous(d, xl, OP, "logits")?, t, cols)?,
            CpuStorage::BF16(d) => cpu_forward(contiguous(d, xl, OP, "logits")?, t, cols)?,
            d => candle_core::bail!("{OP}: {:?} logits are not supported (f32/f16/bf16)", d.dtype()),
        };
        Ok((CpuStorage::F32(out), Shape::from((2, rows))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        t: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, cols) = rows_cols(xl)?;
        Ok((cuda::forward(x, xl, t, tl, rows, cols)?, Shape::from((2, rows))))
    }

    fn bwd(&self, x: &Tensor, t: &Tensor, res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Only the losses carry gradient (the log-sum-exps are saved for this).
        let lse_g = Tensor::stack(&[res.get(1)?, g.get(0)?.to_dtype(DType::F32)?], 0)?;
        let dx = x.apply_op3_no_bwd(t, &lse_g, &Backward)?;
        Ok((Some(dx), None))
    }
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "cross_entropy_backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        t: &CpuStorage,
        tl: &Layout,
        lg: &CpuStorage,
        ll: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, cols) = rows_cols(xl)?;
        let t = u32_slice(t, tl, OP, "targets")?;
        let lg = contiguous(lg.as_slice::<f32>()?, ll, OP, "log-sum-exps")?;
        let out = match x {
            CpuStorage::F32(d) => CpuStorage::F32(cpu_backward(contiguous(d, xl, OP, "logits")?, t, lg, cols)),
            CpuStorage::F16(d) => CpuStorage::F16(cpu_backward(contiguous(d, xl, OP, "logits")?, t, lg, cols)),
            CpuStorage::BF16(d) => CpuStorage::BF16(cpu_backward(contiguous(d, xl, OP, "logits")?, t, lg, cols)),
            d => candle_core::bail!("{OP}: {:?} logits are not supported (f32/f16/bf16)", d.dtype()),
        };
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        t: &candle_core::CudaStorage,
        tl: &Layout,
        lg: &candle_core::CudaStorage,
        ll: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, cols) = rows_cols(xl)?;
        Ok((cuda::backward(x, xl, t, tl, lg, ll, rows, cols)?, xl.shape().clone()))
    }
}

/// Mean next-token cross-entropy of `logits` (`[rows, vocab]`, f32/f16/bf16) against
/// `targets` (u32 `[rows]`), an f32 scalar; differentiable in the logits. The same value
/// as `candle_nn::loss::cross_entropy` (up to f32 rounding). On the CPU a target outside
/// the vocabulary is an error; on CUDA its row's loss is NaN.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (rows, _) = logits.dims2()?;
    if targets.dims() != [rows] || targets.dtype() != DType::U32 {
        candle_core::bail!(
            "{OP}: targets must be u32 [{rows}], got {:?} {:?}",
            targets.dtype(),
            targets.dims()
        );
    }
    if rows == 0 {
        candle_core::bail!("{OP}: no rows");
    }
    let out = logits.contiguous()?.apply_op2(&targets.contiguous()?, Forward)?;
    out.get(0)?.mean_all()
}

#[cfg(feature = "cuda")]
mod cuda;
