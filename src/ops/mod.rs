//! One custom candle op per kernel, each in a folder of its own: `<op>/mod.rs` holds the
//! op and its plain-Rust CPU path, the reference its CUDA kernel must match (and its
//! unit tests); `<op>/cuda.rs` (feature `cuda`) launches the op's `kernels/<op>.cu`.
//! `cuda/` holds what the launchers share, and crosskv's CUDA device. Ops with no
//! kernel of their own (`dense_matmul`, `qmatmul`, `parallel`) are single files.

pub mod adamw;
pub mod argmax;
pub mod batch_invariant;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dense_matmul;
pub mod embedding;
pub mod flash_attention;
pub mod fp8;
pub mod paged_attention;
pub mod parallel;
pub mod qmatmul;
pub mod reshape_and_cache;
pub mod rms_norm;
pub mod rope;
pub mod sample_rows;
pub mod swiglu;
pub mod widen;

pub use adamw::{
    adamw_update, adamw_update_mixed, adamw_update_mixed_many, sum_squares_into, sum_squares_many, MixedUpdate,
};
pub use argmax::argmax_rows;
pub use batch_invariant::{fixed_matmul, fixed_paged_attention, fixed_paged_attention_run};
pub use cross_entropy::cross_entropy;
pub use dense_matmul::dense_matmul;
pub use embedding::embedding;
pub use flash_attention::{
    causal_attention, causal_attention_composite, causal_attention_packed, causal_attention_shared_kv,
    causal_attention_with_grads,
};
pub use paged_attention::{
    paged_attention, paged_attention_run, paged_attention_scaled, AttentionDims, PagedAttentionPlan, SeqSpan,
};
#[cfg(feature = "cuda")]
pub use paged_attention::{DecodeGraphAttention, DeviceTables};
pub use qmatmul::{qmatmul, qmatmul_many, Isa, QFormat, QMatrix};
pub use reshape_and_cache::{reshape_and_cache, reshape_and_cache_scaled};
pub use rms_norm::{add_rms_norm, rms_norm};
pub use rope::{rope, rope_and_cache, rope_packed};
pub use sample_rows::{sample_rows, LogitAdjust, RowSample};
pub use swiglu::{swiglu, swiglu_packed};
pub use widen::widen_f32;

use candle_core::{CpuStorage, Layout, Result};

/// Element types the reference ops accept; they compute in f32.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}
impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}
impl Elem for half::f16 {
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}
impl Elem for half::bf16 {
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

/// The contiguous slice a layout covers, or an error naming the op.
pub(crate) fn contiguous<'a, T>(data: &'a [T], l: &Layout, op: &str, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: {what} must be contiguous"),
    }
}

pub(crate) fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str, what: &str) -> Result<&'a [u32]> {
    match s {
        CpuStorage::U32(d) => contiguous(d, l, op, what),
        _ => candle_core::bail!("{op}: {what} must be u32"),
    }
}
