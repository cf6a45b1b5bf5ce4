//! `widen_f32`: f16/bf16 → f32, for a decode step's logits. On CUDA one coalesced
//! kernel (`kernels/widen.cu`) instead of candle's cast, several times slower on a decode
//! step's logits (BENCHMARKS.md, "Measurements behind design choices"); the CPU path is candle's
//! cast, the reference (widening is exact, so the two agree bit for bit). f32 input is
//! returned as it is.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

#[cfg(feature = "cuda")]
mod cuda;

struct WidenF32;

impl CustomOp1 for WidenF32 {
    fn name(&self) -> &'static str {
        "widen_f32"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let y: Vec<f32> = match s {
            CpuStorage::BF16(v) => super::contiguous(v, l, op, "x")?.iter().map(|x| x.to_f32()).collect(),
            CpuStorage::F16(v) => super::contiguous(v, l, op, "x")?.iter().map(|x| x.to_f32()).collect(),
            _ => candle_core::bail!("{op}: x must be f16 or bf16"),
        };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::widen_f32(s, l)
    }
}

/// `x` as f32 (any shape; f16/bf16 widened, f32 as it is, other dtypes cast by candle).
pub fn widen_f32(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F32 => Ok(x.clone()),
        DType::F16 | DType::BF16 => x.contiguous()?.apply_op1_no_bwd(&WidenF32),
        _ => x.to_dtype(DType::F32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cpu_path_is_candles_cast() -> Result<()> {
        let x = Tensor::randn(0f32, 3.0, (3, 7), &Device::Cpu)?;
        for dt in [DType::BF16, DType::F16] {
            let h = x.to_dtype(dt)?;
            let got = widen_f32(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let want = h.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(got, want, "{dt:?}");
        }
        Ok(())
    }
}
