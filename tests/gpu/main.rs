//! GPU tests (`--features cuda`, run on a GPU machine by scripts/gpu-test.sh), one file
//! per topic: every CUDA kernel against its CPU reference on the same random inputs, and
//! a tiny random CLA model's logits on CUDA against the CPU. Kernel outputs are poisoned
//! (NaN) before each launch so an element a kernel fails to write shows up.

#![cfg(feature = "cuda")]

#[path = "../it/common.rs"]
mod common;

use candle_core::{DType, Device, Tensor};
use common::{flat, grads_of, Rng, Tiny};
use crosskv::kv::{KvDtype, KvManager, KvScale};
use crosskv::model::LoadOptions;
use crosskv::ops::{
    add_rms_norm, paged_attention, paged_attention_scaled, reshape_and_cache, reshape_and_cache_scaled, rms_norm, rope,
    SeqSpan,
};
use crosskv::runner::{Runner, SeqStep};
use serde_json::json;

mod batch_invariant;
mod elementwise;
mod kv_attention;
mod model;
mod sampling;
mod tensor_parallel;
mod training;

fn gpu() -> Device {
    crosskv::ops::cuda::set_poison_outputs(true);
    crosskv::device::cuda(0).expect("a CUDA device")
}

fn tol(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        _ => 1e-2,
    }
}

/// max |got - want| / max |want|; infinite when `got` has a NaN/inf (an unwritten element).
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    if got.iter().any(|x| !x.is_finite()) {
        return f32::INFINITY;
    }
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale
}

/// A random tensor on the CPU in `dtype`, and the same values on the GPU.
fn pair(rng: &mut Rng, shape: &[usize], dtype: DType, dev: &Device) -> (Tensor, Tensor) {
    let c = rng.tensor(shape, 1.0, 0.0).to_dtype(dtype).unwrap();
    let g = c.to_device(dev).unwrap();
    (c, g)
}

/// A permutation of 0..n, so block tables are scattered and interleaved.
fn shuffled(rng: &mut Rng, n: usize) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        v.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    v
}
