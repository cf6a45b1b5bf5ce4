//! The GPU transport of tensor parallelism: NCCL (through cudarc, candle's `nccl`
//! feature), one communicator per rank made together in this process
//! (`ncclCommInitAll`), each on its rank's device stream so the all-reduce is ordered
//! with that rank's kernels like any other launch.

use super::AllReduce;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, ReduceOp};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

/// One rank's NCCL communicator.
#[derive(Debug)]
pub struct NcclComm {
    comm: Comm,
}

// Safety: a communicator is only ever used by the one thread that runs its rank's
// forward at a time (the runner's rank threads); NCCL needs no more than that.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// Communicators for `devices` (rank = position), each on its device's stream.
    pub fn group(devices: &[Device]) -> Result<Vec<NcclComm>> {
        // NVLink multicast (NVLS) stays off wherever crosskv starts NCCL. NCCL
        // reads its environment at initialisation, which is here.
        crate::env::NCCL_NVLS_ENABLE.set("0");
        let streams = devices
            .iter()
            .map(|d| Ok(d.as_cuda_device()?.cuda_stream()))
            .collect::<Result<Vec<_>>>()?;
        let comms = Comm::from_devices(streams)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL initialisation failed: {e:?}")))?;
        Ok(comms.into_iter().map(|comm| NcclComm { comm }).collect())
    }
}

impl CustomOp1 for NcclComm {
    fn name(&self) -> &'static str {
        "nccl_all_reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("nccl_all_reduce: the tensor must be on a CUDA device")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (o0, o1) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("nccl_all_reduce: the tensor must be contiguous".into()))?;
        let dev = s.device().clone();
        let nccl = |e| candle_core::Error::Msg(format!("nccl_all_reduce: {e:?}"));
        macro_rules! go {
            ($t:ty) => {{
                let src = s.as_cuda_slice::<$t>()?.slice(o0..o1);
                let mut dst = unsafe { dev.alloc::<$t>(o1 - o0)? };
                self.comm
                    .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                    .map_err(nccl)?;
                CudaStorage::wrap_cuda_slice(dst, dev.clone())
            }};
        }
        let out = match s.dtype() {
            DType::F32 => go!(f32),
            DType::F16 => go!(half::f16),
            DType::BF16 => go!(half::bf16),
            d => candle_core::bail!("nccl_all_reduce: {d:?} is not supported"),
        };
        Ok((out, l.shape().clone()))
    }
}

impl AllReduce for NcclComm {
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}
