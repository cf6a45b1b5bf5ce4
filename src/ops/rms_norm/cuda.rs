//! The CUDA launches of `rms_norm`, `add_rms_norm` and the RMSNorm backward (feature
//! `cuda`): `kernels/rms_norm.cu`. The CPU paths in `mod.rs` are the references; these
//! are their `cuda_fwd`.

use crate::ops::cuda::{contiguous, output, ptx, suffix};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape};

/// kernels/rms_norm.cu: `DW_SLICES` (rows of dw partial sums).
const DW_SLICES: usize = 32;

/// Rows up to this many elements get one warp each (4 rows per CTA); longer ones a CTA.
const WARP_ROW_MAX: usize = 1024;

/// The launch shape for `rows` rows of `hidden` elements of `esize` bytes:
/// `(config, warp_mode)`.
fn norm_launch(rows: usize, hidden: usize, esize: usize) -> (LaunchConfig, u32) {
    if hidden <= WARP_ROW_MAX {
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(4) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        return (cfg, 1);
    }
    // One thread per 16-byte vector, a whole number of warps, at most 1024.
    let vecs = hidden.div_ceil(16 / esize);
    let threads = vecs.div_ceil(32).clamp(1, 32) * 32;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    (cfg, 0)
}

/// `rms_norm(x, w)`, or with `residual` the fused `add_rms_norm`, whose output is
/// `[2, ..x]` (the sum, then the normed rows).
pub(crate) fn rms_norm(
    x: &CudaStorage,
    xl: &Layout,
    residual: Option<(&CudaStorage, &Layout)>,
    w: &CudaStorage,
    wl: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let op = if residual.is_some() { "add_rms_norm" } else { "rms_norm" };
    let sfx = suffix(x.dtype(), op)?;
    let hidden = xl.dims().last().copied().unwrap_or(0);
    let n = xl.shape().elem_count();
    if hidden == 0 || wl.shape().elem_count() != hidden || hidden > i32::MAX as usize {
        candle_core::bail!("{op}: weight {:?} does not match x {:?}", wl.shape(), xl.shape());
    }
    let rows = n / hidden;
    if rows > i32::MAX as usize {
        candle_core::bail!("{op}: {rows} rows is too many for one launch");
    }
    let (x0, x1) = contiguous(xl, op, "x")?;
    let (w0, w1) = contiguous(wl, op, "weight")?;
    let r_range = match residual {
        Some((r, rl)) => {
            if r.dtype() != x.dtype() || rl.shape() != xl.shape() {
                candle_core::bail!("{op}: residual {:?} does not match x {:?}", rl.shape(), xl.shape());
            }
            Some(contiguous(rl, op, "residual")?)
        }
        None => None,
    };
    if w.dtype() != x.dtype() {
        candle_core::bail!("{op}: weight is {:?}, x is {:?}", w.dtype(), x.dtype());
    }
    let shape = match residual {
        Some(_) => super::stacked(xl),
        None => xl.shape().clone(),
    };
    let dev = x.device.clone();
    let (cfg, warp) = norm_launch(rows, hidden, x.dtype().size_in_bytes());
    let (rows32, hidden32) = (rows as u32, hidden as u32);
    macro_rules! go {
        ($t:ty) => {{
            let total = if residual.is_some() { 2 * n } else { n };
            let mut out = output::<$t>(&dev, total)?;
            if rows > 0 {
                let xs = x.as_cuda_slice::<$t>()?.slice(x0..x1);
                let ws = w.as_cuda_slice::<$t>()?.slice(w0..w1);
                match (residual, r_range) {
                    (Some((r, _)), Some((r0, r1))) => {
                        let rs = r.as_cuda_slice::<$t>()?.slice(r0..r1);
                        let f = dev.get_or_load_custom_func(
                            &format!("add_rms_norm_{sfx}"),
                            "crosskv_rms_norm",
                            ptx::RMS_NORM,
                        )?;
                        let mut b = f.builder();
                        b.arg(&mut out)
                            .arg(&xs)
                            .arg(&rs)
                            .arg(&ws)
                            .arg(&rows32)
                            .arg(&hidden32)
                            .arg(&eps)
                            .arg(&warp);
                        unsafe { b.launch(cfg) }.w()?;
                    }
                    _ => {
                        let f =
                            dev.get_or_load_custom_func(&format!("rms_norm_{sfx}"), "crosskv_rms_norm", ptx::RMS_NORM)?;
                        let mut b = f.builder();
                        b.arg(&mut out)
                            .arg(&xs)
                            .arg(&ws)
                            .arg(&rows32)
                            .arg(&hidden32)
                            .arg(&eps)
                            .arg(&warp);
                        unsafe { b.launch(cfg) }.w()?;
                    }
                }
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match x.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    };
    Ok((out, shape))
}

/// Threads per CTA of the RMSNorm backward kernels: 8 warps, a row each at a time.
const NORM_BWD_THREADS: usize = 256;

/// The RMSNorm backward (`rms_norm_grads` on CUDA): x, w, g of one dtype, contiguous;
/// returns `[rows + 1, hidden]` in that dtype: dx rows, then dw (summed in f32).
pub(crate) fn rms_norm_bwd(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "rms_norm_bwd";
    let sfx = suffix(x.dtype(), OP)?;
    let (rows, hidden) = super::bwd_dims(xl, wl, gl)?;
    if w.dtype() != x.dtype() || g.dtype() != x.dtype() {
        candle_core::bail!("{OP}: x, w and g must share one dtype");
    }
    if hidden == 0 || hidden > super::BWD_MAX_HIDDEN || rows >= u32::MAX as usize {
        candle_core::bail!("{OP}: {rows} rows of {hidden} is out of range");
    }
    let (x0, x1) = contiguous(xl, OP, "x")?;
    let (w0, w1) = contiguous(wl, OP, "w")?;
    let (g0, g1) = contiguous(gl, OP, "g")?;
    let dev = x.device.clone();
    // dw is summed in f32 here (zeros: the CTAs add into it), then rounded into the last row.
    // DW_SLICES rows of partial sums, one per group of CTAs.
    let mut dw_acc = dev.alloc_zeros::<f32>(DW_SLICES * hidden)?;
    // 16-byte vectors where every row allows them (hidden a multiple of the vector, each
    // input's start aligned): the kernel for the fewest vectors per lane that hold a row.
    let vec = 16 / x.dtype().size_in_bytes();
    let aligned = [x0, w0, g0]
        .iter()
        .all(|o| (o * x.dtype().size_in_bytes()).is_multiple_of(16));
    let per_lane = [1, 2, 3, 4, 8]
        .into_iter()
        .find(|v| hidden <= 32 * v * vec)
        .filter(|_| aligned && hidden.is_multiple_of(vec));
    let name = match per_lane {
        Some(v) => format!("rms_norm_bwd_v{v}_{sfx}"),
        None => format!("rms_norm_bwd_{sfx}"),
    };
    let bwd = dev.get_or_load_custom_func(&name, "crosskv_rms_norm", ptx::RMS_NORM)?;
    // Shared memory: the scalar kernel sums dw in one row of `hidden` f32; the vector
    // kernels keep a row per warp, up to 64 KiB (bf16 rows of 2048), past the 48 KiB a
    // launch gets without asking.
    let smem = hidden * 4 * if per_lane.is_some() { NORM_BWD_THREADS / 32 } else { 1 };
    if smem > 48 * 1024 {
        bwd.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
    }
    let finish =
        dev.get_or_load_custom_func(&format!("rms_norm_bwd_finish_{sfx}"), "crosskv_rms_norm", ptx::RMS_NORM)?;
    // A warp per row, 8 per CTA, two rows per warp or more: enough CTAs to fill the GPU
    // (the step is memory-bound), few enough that dw's per-CTA atomics stay cheap.
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(16).clamp(1, 1024) as u32, 1, 1),
        block_dim: (NORM_BWD_THREADS as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let fin = LaunchConfig {
        grid_dim: (hidden.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows32, hidden32) = (rows as u32, hidden as u32);
    macro_rules! go {
        ($t:ty) => {{
            let mut out = unsafe { dev.alloc::<$t>((rows + 1) * hidden)? };
            let xs = x.as_cuda_slice::<$t>()?.slice(x0..x1);
            let ws = w.as_cuda_slice::<$t>()?.slice(w0..w1);
            let gs = g.as_cuda_slice::<$t>()?.slice(g0..g1);
            if rows > 0 {
                let mut b = bwd.builder();
                b.arg(&mut out)
                    .arg(&mut dw_acc)
                    .arg(&xs)
                    .arg(&ws)
                    .arg(&gs)
                    .arg(&rows32)
                    .arg(&hidden32)
                    .arg(&eps);
                unsafe { b.launch(cfg) }.w()?;
            }
            let mut dw = out.slice_mut(rows * hidden..);
            let mut b = finish.builder();
            b.arg(&mut dw).arg(&dw_acc).arg(&hidden32);
            unsafe { b.launch(fin) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev)
        }};
    }
    let out = match x.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    };
    Ok((out, Shape::from((rows + 1, hidden))))
}
