//! What every op's CUDA launcher shares (feature `cuda`): the PTX of `kernels/*.cu`
//! (compiled by `build.rs`), layout checks, raw device addresses, output allocation
//! and the test poisoning of outputs. Each op's launches live beside it, in
//! `ops/<op>/cuda.rs`; its CPU path stays the reference they must match.
//!
//! The last section makes crosskv's CUDA device and sets its memory-pool policy.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result};
use std::sync::atomic::{AtomicBool, Ordering};

#[allow(dead_code)]
pub(crate) mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

pub(crate) static POISON: AtomicBool = AtomicBool::new(false);

/// Tests: fill every output the kernels allocate with NaN before they run, so an
/// element a kernel fails to write shows up.
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

pub(crate) fn contiguous(l: &Layout, op: &str, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} must be contiguous")))
}

/// `(offset of row 0, row stride, elements a row)` of a layout whose dims after the
/// first are contiguous, rows any stride apart: a contiguous tensor, or a column slice
/// of a wider matrix (a fused projection's Q, K or V part).
pub(crate) fn row_strided(l: &Layout, op: &str, what: &str) -> Result<(usize, usize, usize)> {
    let (dims, stride) = (l.dims(), l.stride());
    if dims.is_empty() {
        candle_core::bail!("{op}: {what} has no rows");
    }
    let row: usize = dims[1..].iter().product();
    let mut want = 1;
    for i in (1..dims.len()).rev() {
        if dims[i] > 1 && stride[i] != want {
            candle_core::bail!("{op}: {what} must be contiguous within a row");
        }
        want *= dims[i];
    }
    let row_stride = if dims[0] > 1 { stride[0] } else { row };
    if row_stride < row {
        candle_core::bail!("{op}: {what}'s rows overlap");
    }
    Ok((l.start_offset(), row_stride, row))
}

/// The CUDA storage of a guarded tensor, or an error naming the op and the tensor.
pub(crate) fn cuda_of<'a>(s: &'a candle_core::Storage, op: &str, what: &str) -> Result<&'a CudaStorage> {
    match s {
        candle_core::Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("{op}: {what} is not on the GPU"),
    }
}

/// The device address and element count of an f32/f16/bf16 storage's buffer, for
/// kernels that take raw addresses (a table of many tensors, row views into a packed
/// tensor) and so do their own bounds checks. Read it under the storage's guard; launches
/// on the one stream are ordered before any free of the buffer.
pub(crate) fn raw_buffer(s: &CudaStorage) -> Result<(u64, usize)> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let stream = s.device.cuda_stream();
    Ok(match s.dtype() {
        DType::F32 => {
            let v = s.as_cuda_slice::<f32>()?;
            (v.device_ptr(&stream).0, v.len())
        }
        DType::F16 => {
            let v = s.as_cuda_slice::<half::f16>()?;
            (v.device_ptr(&stream).0, v.len())
        }
        DType::BF16 => {
            let v = s.as_cuda_slice::<half::bf16>()?;
            (v.device_ptr(&stream).0, v.len())
        }
        d => candle_core::bail!("raw buffer: {d:?} (f32/f16/bf16 only)"),
    })
}

/// The address of elements `range` of an f32/f16/bf16 storage, after checking the range
/// lies in it ([`raw_buffer`]).
pub(crate) fn raw_range(s: &CudaStorage, range: std::ops::Range<usize>, op: &str, what: &str) -> Result<u64> {
    let (base, len) = raw_buffer(s)?;
    if range.start > range.end || range.end > len {
        candle_core::bail!("{op}: {what}'s elements {range:?} are outside its {len}");
    }
    Ok(base + (range.start * s.dtype().size_in_bytes()) as u64)
}

/// Whether [`row_strided`] takes this layout.
pub fn is_row_strided(l: &Layout) -> bool {
    row_strided(l, "", "").is_ok()
}

pub(crate) fn suffix(dtype: DType, op: &str) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => candle_core::bail!("{op}: {d:?} is not supported on CUDA (f32/f16/bf16)"),
    })
}

pub(crate) fn poison<T: DeviceRepr>(
    dev: &CudaDevice,
    s: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
) -> Result<()> {
    let bytes = (s.len() * std::mem::size_of::<T>()) as u64;
    if bytes == 0 {
        return Ok(());
    }
    let f = dev.get_or_load_custom_func("poison_bytes", "crosskv_paged_attention", ptx::PAGED_ATTENTION)?;
    let mut b = f.builder();
    b.arg(s).arg(&bytes);
    let blocks = bytes.div_ceil(256).min(4096) as u32;
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .w()?;
    Ok(())
}

/// An output of `n` elements (at least one allocated), NaN-filled when tests ask.
pub(crate) fn output<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    let mut out = unsafe { dev.alloc::<T>(n.max(1))? };
    if POISON.load(Ordering::Relaxed) {
        poison(dev, &mut out)?;
    }
    Ok(out)
}
