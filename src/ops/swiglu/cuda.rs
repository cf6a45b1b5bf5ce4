//! The CUDA launches of `swiglu` (feature `cuda`): `kernels/swiglu.cu`.

use super::OP;
use crate::ops::cuda::{contiguous, output, ptx, suffix};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result};

/// The forward (`inputs` = gate, up; `outputs` = 1) or backward (gate, up, dy; 2).
pub(super) fn run(inputs: &[(&CudaStorage, &Layout)], outputs: usize) -> Result<CudaStorage> {
    let dtype = inputs[0].0.dtype();
    if inputs.iter().any(|(s, _)| s.dtype() != dtype) {
        candle_core::bail!("{OP}: inputs of one dtype expected");
    }
    let n = inputs[0].1.shape().elem_count();
    let ranges = inputs
        .iter()
        .map(|(_, l)| contiguous(l, OP, "input"))
        .collect::<Result<Vec<_>>>()?;
    let dev = inputs[0].0.device.clone();
    let name = format!(
        "swiglu_{}_{}",
        if outputs == 1 { "fwd" } else { "bwd" },
        suffix(dtype, OP)?
    );
    let f = dev.get_or_load_custom_func(&name, "crosskv_swiglu", ptx::SWIGLU)?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 132 * 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let n64 = n as u64;
    macro_rules! go {
        ($t:ty) => {{
            let views = inputs
                .iter()
                .zip(&ranges)
                .map(|((s, _), (a, b))| Ok(s.as_cuda_slice::<$t>()?.slice(*a..*b)))
                .collect::<Result<Vec<_>>>()?;
            let mut out = output::<$t>(&dev, outputs * n)?;
            if n > 0 {
                let mut b = f.builder();
                for v in &views {
                    b.arg(v);
                }
                b.arg(&mut out).arg(&n64);
                unsafe { b.launch(cfg) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match dtype {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    })
}

/// `swiglu_packed`'s backward: `gu` `[rows, 2f]` and `dy` `[rows, f]` → `[rows, 2f]`.
pub(super) fn packed_bwd(
    s: &CudaStorage,
    l: &Layout,
    dy: &CudaStorage,
    dl: &Layout,
    rows: usize,
    f: usize,
) -> Result<CudaStorage> {
    packed_launch("swiglu_packed_bwd", &[(s, l), (dy, dl)], rows, f, 2 * rows * f)
}

/// `swiglu_packed`: `gu` `[rows, 2f]` contiguous → `[rows, f]`.
pub(super) fn packed(s: &CudaStorage, l: &Layout, rows: usize, f: usize) -> Result<CudaStorage> {
    packed_launch("swiglu_packed", &[(s, l)], rows, f, rows * f)
}

/// A `swiglu_packed*` kernel (`name`) over `inputs` (contiguous, one dtype; `gu` first)
/// of `rows` rows of `f` output columns each, into a fresh `out_len` buffer: a
/// thread per 16-byte vector of a row (the kernels' vectorised path), rows along grid y.
fn packed_launch(
    name: &str,
    inputs: &[(&CudaStorage, &Layout)],
    rows: usize,
    f: usize,
    out_len: usize,
) -> Result<CudaStorage> {
    let dtype = inputs[0].0.dtype();
    if inputs.iter().any(|(s, _)| s.dtype() != dtype) {
        candle_core::bail!("{OP}: inputs of one dtype expected");
    }
    if rows > u32::MAX as usize || f > u32::MAX as usize {
        candle_core::bail!("{OP}: [{rows}, 2 × {f}] is too large for one launch");
    }
    let ranges = inputs
        .iter()
        .map(|(_, l)| contiguous(l, OP, "input"))
        .collect::<Result<Vec<_>>>()?;
    let dev = inputs[0].0.device.clone();
    let fun = dev.get_or_load_custom_func(&format!("{name}_{}", suffix(dtype, OP)?), "crosskv_swiglu", ptx::SWIGLU)?;
    let cfg = LaunchConfig {
        grid_dim: (
            f.div_ceil(16 / dtype.size_in_bytes()).div_ceil(256).clamp(1, 64) as u32,
            rows.clamp(1, 65535) as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows32, f32_) = (rows as u32, f as u32);
    macro_rules! go {
        ($t:ty) => {{
            let views = inputs
                .iter()
                .zip(&ranges)
                .map(|((s, _), (a, b))| Ok(s.as_cuda_slice::<$t>()?.slice(*a..*b)))
                .collect::<Result<Vec<_>>>()?;
            let mut out = output::<$t>(&dev, out_len)?;
            if rows * f > 0 {
                let mut bld = fun.builder();
                for v in &views {
                    bld.arg(v);
                }
                bld.arg(&mut out).arg(&rows32).arg(&f32_);
                unsafe { bld.launch(cfg) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match dtype {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    })
}
