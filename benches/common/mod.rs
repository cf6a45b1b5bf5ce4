//! Helpers the benchmarks share (each includes this as `mod common`; a directory, so
//! cargo does not take it for a benchmark of its own). Each bench uses some of it.
#![allow(dead_code)]

use candle_core::Device;

/// `--device`: the given one, else CUDA in builds with the `cuda` feature, else the CPU.
pub fn device(arg: Option<&str>) -> anyhow::Result<Device> {
    let default = if cfg!(feature = "cuda") { "cuda" } else { "cpu" };
    crosskv::device::parse_device(arg.unwrap_or(default))
}

/// The median of timings (the upper middle of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The GPU time in ms of each of `iters` runs of `f`, back to back on `dev`'s stream: a
/// CUDA event recorded before the first run and after each.
#[cfg(feature = "cuda")]
pub fn gpu_times(
    dev: &Device,
    iters: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> candle_core::Result<Vec<f32>> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    use candle_core::cuda_backend::WrapErr;
    let stream = dev.as_cuda_device()?.cuda_stream();
    let ctx = stream.context().clone();
    let events = (0..=iters)
        .map(|_| ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .w()?;
    events[0].record(&stream).w()?;
    for e in &events[1..] {
        f()?;
        e.record(&stream).w()?;
    }
    stream.synchronize().w()?;
    events
        .windows(2)
        .map(|w| w[0].elapsed_ms(&w[1]))
        .collect::<std::result::Result<Vec<_>, _>>()
        .w()
}

/// Device-to-device copies of `bytes` bytes, `iters` times: each copy's GPU time in ms.
#[cfg(feature = "cuda")]
pub fn copy_times(dev: &Device, bytes: usize, iters: usize) -> candle_core::Result<Vec<f32>> {
    use candle_core::cuda_backend::WrapErr;
    let cuda = dev.as_cuda_device()?;
    let stream = cuda.cuda_stream();
    let src = cuda.alloc_zeros::<u8>(bytes)?;
    let mut dst = unsafe { cuda.alloc::<u8>(bytes)? };
    gpu_times(dev, iters, || stream.memcpy_dtod(&src, &mut dst).w())
}
