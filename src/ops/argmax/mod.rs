//! `argmax_rows`: each row's argmax of f32 logits `[rows, vocab]` → u32 `[rows]`, the
//! first maximum on ties, NaN never picked (an all-NaN row gives 0): exactly the CPU
//! sampler's greedy pick ([`argmax`], defined here at the bottom layer), and always a
//! valid token id. On CUDA it spares the copy of whole rows to the host for greedy decoding.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

#[cfg(feature = "cuda")]
mod cuda;

/// The first largest value's index; NaN never wins, and a row with nothing above -inf
/// gives 0 (`argmax_rows` does the same on the device).
pub fn argmax(logits: &[f32]) -> u32 {
    let (mut best, mut best_v) = (0, f32::NEG_INFINITY);
    for (i, &l) in logits.iter().enumerate() {
        if l > best_v {
            (best, best_v) = (i, l);
        }
    }
    best as u32
}

struct ArgmaxRows;

impl CustomOp1 for ArgmaxRows {
    fn name(&self) -> &'static str {
        "argmax_rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, cols) = l.shape().dims2()?;
        let x = match s {
            CpuStorage::F32(v) => super::contiguous(v, l, self.name(), "logits")?,
            _ => candle_core::bail!("argmax_rows: logits must be f32"),
        };
        let out: Vec<u32> = (0..rows).map(|r| argmax(&x[r * cols..(r + 1) * cols])).collect();
        Ok((CpuStorage::U32(out), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::argmax_rows(s, l)
    }
}

/// `logits`: f32 `[rows, vocab]` → u32 `[rows]`.
pub fn argmax_rows(logits: &Tensor) -> Result<Tensor> {
    let (_, cols) = logits.dims2()?;
    if cols == 0 {
        candle_core::bail!("argmax_rows: rows are empty");
    }
    logits.contiguous()?.apply_op1_no_bwd(&ArgmaxRows)
}

#[cfg(test)]
mod tests {
    use super::argmax;

    #[test]
    fn argmax_takes_the_first_max_and_never_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 2.0, f32::NAN]), 2);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -1e30]), 1);
    }
}
