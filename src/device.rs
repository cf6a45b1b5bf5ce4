//! Which device and dtype a command runs on: `--device cpu | cuda[:N]` and `--dtype`,
//! the CUDA device every crosskv path uses (one stream of its own), and the policy of
//! its stream-ordered memory pool. Imports nothing from the crate: `tp`, `model`,
//! `runner`, `train`, the commands, the tests and the benchmarks all get their devices
//! here.

use anyhow::bail;
#[cfg(feature = "cuda")]
use anyhow::Context;
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Device};

/// `--dtype`: a compute (and KV) dtype on the command line.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl DtypeArg {
    pub fn dtype(self) -> DType {
        match self {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }
}

/// `--kv-cache-dtype` (vLLM's flag): what the KV cache stores.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Default)]
pub enum KvCacheDtypeArg {
    /// The model's compute dtype.
    #[default]
    Auto,
    Bf16,
    F16,
    F32,
    /// fp8 e4m3: one byte an element, half a 16-bit cache.
    #[value(alias = "fp8_e4m3", alias = "fp8-e4m3")]
    Fp8,
}

impl KvCacheDtypeArg {
    /// The cache's element type for a model computing in `model_dtype`.
    pub fn resolve(self, model_dtype: DType) -> crate::kv::KvDtype {
        use crate::kv::KvDtype;
        match self {
            KvCacheDtypeArg::Auto => KvDtype::of_model(model_dtype),
            KvCacheDtypeArg::Bf16 => KvDtype::BF16,
            KvCacheDtypeArg::F16 => KvDtype::F16,
            KvCacheDtypeArg::F32 => KvDtype::F32,
            KvCacheDtypeArg::Fp8 => KvDtype::Fp8E4m3,
        }
    }
}

/// `--device cpu | cuda[:N]`.
pub fn parse_device(d: &str) -> anyhow::Result<Device> {
    match d {
        "cpu" => Ok(Device::Cpu),
        d if d == "cuda" || d.starts_with("cuda:") => {
            let n = match d.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| anyhow::anyhow!("--device {d}: expected cuda or cuda:N"))?,
            };
            cuda_device(d, n)
        }
        d => bail!("--device {d}: expected cpu or cuda[:N]"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(d: &str, n: usize) -> anyhow::Result<Device> {
    cuda(n).with_context(|| format!("--device {d}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(d: &str, _n: usize) -> anyhow::Result<Device> {
    bail!("--device {d}: this build has no CUDA support (build with --features cuda)")
}

/// The CUDA device every crosskv path uses: candle's device on a stream of its own.
///
/// `Device::new_cuda` binds candle to the *per-thread* default stream, so work issued
/// from two threads (weights and KV cache made on the loading thread, the forward on
/// the engine thread, a tensor dropped on a third) lands on different streams that
/// nothing orders: a buffer could be freed on one stream while a kernel on another
/// still read it (the illegal-address crash of long batched runs). One explicit stream
/// shared by all threads keeps every launch, copy and free in one order.
///
/// With one stream there is nothing for cudarc's per-buffer event tracking to order
/// (it is on by default: two CUDA events created per allocation, recorded and waited
/// on at every launch), so it is turned off before any tensor exists on the device:
/// host time a decode step spends in the driver, not on the GPU.
#[cfg(feature = "cuda")]
pub fn cuda(ordinal: usize) -> candle_core::Result<Device> {
    let dev = candle_core::Device::new_cuda_with_stream(ordinal)?;
    if let candle_core::Device::Cuda(d) = &dev {
        // Safety: every tensor of this device is made, used and freed on its one stream,
        // and candle refuses to mix tensors of two devices in one op.
        unsafe { d.disable_event_tracking() };
    }
    Ok(dev)
}

/// Keeps memory freed on `dev` in its stream-ordered pool instead of returning it to the
/// driver. The pool's default release threshold is 0: every synchronisation hands every
/// free byte back, and the next step maps it again. A training step frees and
/// reallocates its activations (gigabytes) every step, and syncs twice per step (the
/// gradient norm, the loss): on an H100 that cost a quarter of the step (BENCHMARKS.md,
/// "Measurements behind design choices"). Training
/// turns this on; serving, whose KV cache is sized from the driver's free memory at
/// start-up, leaves the default. No effect on the CPU.
#[cfg(feature = "cuda")]
pub fn retain_freed_memory(dev: &Device) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let candle_core::Device::Cuda(d) = dev else {
        return Ok(());
    };
    let cu_dev = d.cuda_stream().context().cu_device();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a plain driver call on a valid device.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, cu_dev) }
        .result()
        .w()?;
    set_pool_attr(
        pool,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
        u64::MAX,
    )
}

/// A `u64` attribute of a stream-ordered memory pool (`runner::memory` reads its
/// high-water mark).
#[cfg(feature = "cuda")]
pub(crate) fn pool_attr(
    pool: candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool,
    attr: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
) -> candle_core::Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let mut v = 0u64;
    unsafe { sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void) }
        .result()
        .w()?;
    Ok(v)
}

/// Sets a `u64` attribute of a stream-ordered memory pool.
#[cfg(feature = "cuda")]
pub(crate) fn set_pool_attr(
    pool: candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool,
    attr: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
    value: u64,
) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let mut v = value;
    // SAFETY: the u64 attributes take a pointer to a u64, which outlives the call.
    unsafe { sys::cuMemPoolSetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void) }
        .result()
        .w()
}
