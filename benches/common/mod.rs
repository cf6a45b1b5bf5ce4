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
