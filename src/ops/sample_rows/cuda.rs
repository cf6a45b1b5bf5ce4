//! The CUDA launch of `sample_rows` (feature `cuda`): `kernels/sample_rows.cu`.

use super::SPEC_WORDS;
use crate::ops::cuda::{contiguous, output, ptx};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape};

/// kernels/sample_rows.cu: `NT` (threads per CTA, one CTA a sampled row).
const THREADS: u32 = 1024;

pub(super) fn sample_rows(
    logits: &CudaStorage,
    ll: &Layout,
    specs: &CudaStorage,
    sl: &Layout,
    entries: &CudaStorage,
    el: &Layout,
    scratch_rows: usize,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "sample_rows";
    let (_, vocab) = ll.shape().dims2()?;
    if logits.dtype() != DType::F32 || specs.dtype() != DType::U32 || entries.dtype() != DType::U32 {
        candle_core::bail!("{OP}: logits f32, specs and entries u32");
    }
    let (x0, x1) = contiguous(ll, OP, "logits")?;
    let (s0, s1) = contiguous(sl, OP, "specs")?;
    let (e0, e1) = contiguous(el, OP, "entries")?;
    let rows = (s1 - s0) / SPEC_WORDS;
    let dev = logits.device.clone();
    let mut out = output::<u32>(&dev, rows)?;
    // Rows with adjustments are copied here and changed; the logits stay as they are.
    let mut scratch = unsafe { dev.alloc::<f32>((scratch_rows * vocab).max(1))? };
    if rows > 0 {
        let x = logits.as_cuda_slice::<f32>()?.slice(x0..x1);
        let s = specs.as_cuda_slice::<u32>()?.slice(s0..s1);
        let e = entries.as_cuda_slice::<u32>()?.slice(e0..e1);
        let f = dev.get_or_load_custom_func("sample_rows_f32", "crosskv_sample_rows", ptx::SAMPLE_ROWS)?;
        let vocab32 = vocab as u32;
        let mut b = f.builder();
        b.arg(&x).arg(&vocab32).arg(&s).arg(&e).arg(&mut scratch).arg(&mut out);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(rows)))
}
