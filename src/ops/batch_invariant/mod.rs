//! The ops of the batch-invariant mode (`--batch-invariant`): a matmul and a paged
//! attention whose result for a row depends on that row's inputs only, never on how many
//! rows the call has or which other sequences share the step. On the CPU the default
//! ops already are (`dense_matmul`, the paged-attention reference), and these are them;
//! on CUDA they launch `kernels/batch_invariant.cu`: one tile shape for every M instead
//! of cuBLAS's per-shape choice, and attention whose split over the keys follows the
//! query token's position alone.

#[cfg(feature = "cuda")]
mod cuda;

use super::paged_attention::{PagedAttentionPlan, SeqSpan};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// Mirrors of `kernels/batch_invariant.cu`: the tensor-core matmul's tile (`bi::BM`,
/// `bi::BN`) and threads (`bi::THREADS`), and the f32 matmul's square tile (`bi::FT`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const TILE_M: usize = 32;
const TILE_N: usize = 32;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const TC_THREADS: u32 = 128;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const F32_TILE: usize = 16;
/// Keys of one shared-memory stage (`bi::BK`): K slices are a multiple.
const TILE_K: usize = 64;
/// A matrix with fewer column tiles than this (about two CTAs an SM) splits K so the
/// launch has about this many CTAs: a decode step's few rows otherwise leave most SMs
/// idle and the weight read latency-bound.
const SPLIT_K_BELOW_CTAS: usize = 264;
/// The shortest K slice.
const MIN_K_SLICE: usize = 512;

/// `(slices, slice length)` of K for an `[n, k]` weight: a function of the weight's
/// shape alone, never of the rows, so a row sums its slices the same way in any batch.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn k_slices(n: usize, k: usize) -> (usize, usize) {
    let want = SPLIT_K_BELOW_CTAS.div_ceil(n.div_ceil(TILE_N).max(1)).max(1);
    let slices = want.min((k / MIN_K_SLICE).max(1));
    let len = k.div_ceil(slices).next_multiple_of(TILE_K).max(TILE_K);
    (k.div_ceil(len).max(1), len)
}

/// `x · wᵀ`: `x` `[.., k]`, `w` `[n, k]`, one dtype. Serving only (no backward).
pub fn fixed_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        return super::dense_matmul(x, w);
    }
    let k = x.dims().last().copied().unwrap_or(0);
    let (n, wk) = w.dims2()?;
    if wk != k {
        candle_core::bail!("fixed_matmul: x {:?} does not match w {:?}", x.shape(), w.shape());
    }
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("checked above") = n;
    let rows = x.elem_count() / k.max(1);
    let y = x
        .contiguous()?
        .reshape((rows, k))?
        .apply_op2_no_bwd(&w.contiguous()?, &FixedMatMul)?;
    y.reshape(out_dims)
}

struct FixedMatMul;

impl CustomOp2 for FixedMatMul {
    fn name(&self) -> &'static str {
        "fixed_matmul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        // `fixed_matmul` sends CPU tensors to `dense_matmul`.
        candle_core::bail!("fixed_matmul: the CPU path is dense_matmul")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::matmul(x, xl, w, wl)
    }
}

/// Paged attention (the arguments of [`super::paged_attention`]) computed per query token
/// over its own keys `0..=position`, in the same order whatever the rest of the step is.
pub fn fixed_paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[SeqSpan],
    block_table: &[u32],
    max_blocks: usize,
    scale: f32,
) -> Result<Tensor> {
    if q.device().is_cpu() {
        return super::paged_attention(q, k_cache, v_cache, seqs, block_table, max_blocks, scale);
    }
    let plan = PagedAttentionPlan::single(seqs, block_table, max_blocks, scale);
    fixed_paged_attention_run(&plan, 0, q, k_cache, v_cache)
}

/// The step's device copies for [`fixed_paged_attention_run`] (kept in its
/// [`PagedAttentionPlan`]): the token owners (the same for every layer) and each KV
/// slot's table, uploaded by the first layer that needs them.
#[cfg(feature = "cuda")]
#[derive(Default)]
pub(crate) struct FixedUploads {
    /// The token owners (`2 × tokens`), then every slot's table, each `stride` long.
    all: Option<candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>>,
    stride: usize,
    /// The slot whose table is the only one (a plan for a single call), else `None`.
    only: Option<usize>,
}

/// [`fixed_paged_attention`] of KV slot `slot` under the step's `plan`: the spans are
/// checked and uploaded once a step, each slot's table once.
pub fn fixed_paged_attention_run(
    plan: &PagedAttentionPlan<'_>,
    slot: usize,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
) -> Result<Tensor> {
    if q.device().is_cpu() {
        return super::paged_attention_run(plan, slot, q, k_cache, v_cache);
    }
    let block_table = plan.checked_table("fixed_paged_attention", slot, q, k_cache)?;
    let op = FixedAttention {
        plan,
        slot,
        seqs: plan.seqs(),
        block_table,
        max_blocks: plan.max_blocks(),
        scale: plan.scale(),
    };
    q.contiguous()?.apply_op3_no_bwd(k_cache, v_cache, &op)
}

/// For every token of the step, `(sequence, absolute position)`, or `(u32::MAX, 0)` for a
/// token no span covers (padding).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn token_owners(seqs: &[SeqSpan], tokens: usize) -> Vec<u32> {
    let mut owners = vec![u32::MAX; 2 * tokens];
    owners.iter_mut().skip(1).step_by(2).for_each(|p| *p = 0);
    for (s, span) in seqs.iter().enumerate() {
        for i in 0..span.q_len {
            let t = (span.q_start + i) as usize;
            owners[2 * t] = s as u32;
            owners[2 * t + 1] = span.ctx_len - span.q_len + i;
        }
    }
    owners
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct FixedAttention<'a> {
    plan: &'a PagedAttentionPlan<'a>,
    slot: usize,
    seqs: &'a [SeqSpan],
    block_table: &'a [u32],
    max_blocks: usize,
    scale: f32,
}

impl CustomOp3 for FixedAttention<'_> {
    fn name(&self) -> &'static str {
        "fixed_paged_attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // `fixed_paged_attention` sends CPU tensors to the paged-attention reference.
        candle_core::bail!("fixed_paged_attention: the CPU path is paged_attention")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::attention(self, q, ql, k, kl, v, vl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_is_split_by_the_weight_shape_alone() {
        // o_proj-like: 64 column tiles, K 2048: four slices of 512.
        assert_eq!(k_slices(2048, 2048), (4, 512));
        // down_proj-like: K 5472 in five slices of 1152 (the last shorter).
        assert_eq!(k_slices(2048, 5472), (5, 1152));
        // Wide matrices and short K stay whole.
        assert_eq!(k_slices(10944, 2048), (1, 2048));
        assert_eq!(k_slices(64, 200), (1, 256));
    }

    #[test]
    fn every_token_knows_its_sequence_and_position_and_padding_none() {
        let seqs = [
            SeqSpan {
                q_start: 0,
                q_len: 3,
                ctx_len: 10,
            },
            SeqSpan {
                q_start: 4,
                q_len: 1,
                ctx_len: 1,
            },
        ];
        assert_eq!(token_owners(&seqs, 5), vec![0, 7, 0, 8, 0, 9, u32::MAX, 0, 1, 0]);
    }
}
