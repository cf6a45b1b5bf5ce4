//! The paged-attention launch planner: which kernel runs a step, how its query rows are
//! grouped into work items, and how long contexts are split into partitions along the
//! keys. Plain Rust (no CUDA types, built without the `cuda` feature too) so that its
//! tests run everywhere; `cuda.rs` turns a [`Plan`] into launches.

// Only the CUDA launcher uses the planner outside the tests.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use super::SeqSpan;
use candle_core::DType;

// ---------------------------------------------------------------- mirrors of kernels/paged_attention.cuh

/// kernels/paged_attention.cuh: `PA_NT` (threads per CTA of every paged-attention kernel).
pub(super) const THREADS: u32 = 128;
/// kernels/paged_attention.cuh: `PA_NONE` (a work item of a padding token no sequence owns).
pub(super) const NONE: u32 = u32::MAX;
/// kernels/paged_attention.cuh: `PA_TC_TK` (keys per shared-memory tile of the tensor-core
/// kernels); partitions are a multiple.
pub(super) const TC_TILE_KEYS: usize = 64;
/// kernels/paged_attention.cuh: `PA_TC_ROWS` (query rows per tensor-core work item).
pub(super) const TC_ROWS: usize = 64;
/// kernels/paged_attention.cuh: `PA_CC_ROWS(D)` (query rows per CUDA-core work item).
pub(super) const fn cc_rows(d: usize) -> usize {
    if d <= 128 {
        16
    } else {
        8
    }
}
/// kernels/paged_attention.cuh: `PA_CMAX` (the most partitions one cluster combines: the
/// portable cluster size).
pub(super) const MAX_CLUSTER_PARTS: usize = 8;

/// kernels/paged_attention.cuh: `struct Params`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct Params {
    pub(super) num_seqs: u32,
    pub(super) max_blocks: u32,
    pub(super) block_size: u32,
    pub(super) heads: u32,
    pub(super) kv_heads: u32,
    pub(super) hpc: u32,
    pub(super) tpc: u32,
    pub(super) num_parts: u32,
    pub(super) part_size: u32,
    pub(super) scale: f32,
}
const _: () = assert!(std::mem::size_of::<Params>() == 40);

// ---------------------------------------------------------------- the planner

/// Fewest keys per partition when a context is split along the sequence: a CTA's fixed
/// costs (Q rows, the first tile's latency, combining the warps and the partitions) are
/// paid once per partition. Measured on the H100 (the partition sweeps in docs/bench-log/): MQA
/// decode at batch 64-256 runs faster in partitions of 1024 keys than in more CTAs of 384-704.
const MIN_PART_SIZE: usize = 1024;
/// Small grids (under an eighth of a wave: batch 1-8) are split finer, down to this: a
/// single CTA streaming a whole 4096-key context would leave the GPU idle.
const MIN_PART_SIZE_SMALL_GRID: usize = 256;

/// `CROSSKV_PA_PART_SIZE` (a multiple of 64) fixes the partition size; the decode-attention
/// benchmark sweeps it. Unset: [`auto_part_size`].
fn part_size_override() -> Option<usize> {
    static P: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *P.get_or_init(|| {
        crate::env::PA_PART_SIZE
            .get()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&v| v >= TC_TILE_KEYS && v.is_multiple_of(TC_TILE_KEYS))
    })
}

/// Splits the longest context into partitions (as flash-decoding does) so that the grid
/// fills whole waves: `slots` CTAs run at once (SMs × CTAs per SM), and a grid of 1.3
/// waves takes as long as two. More partitions are taken only while they fill the waves
/// at least 5 % better: each costs a CTA's fixed work and its share of the reduction. A
/// grid under one wave (batch 1) splits until it fills it. No partition under
/// [`MIN_PART_SIZE`] keys ([`MIN_PART_SIZE_SMALL_GRID`] for tiny grids).
fn auto_part_size(max_ctx: usize, items: usize, slots: usize) -> usize {
    let (items, slots) = (items.max(1), slots.max(1));
    // Partitions of MIN_PART_SIZE that would fill under half a wave (batch 1-8, or
    // batch 64 at 1024 keys: one CTA per sequence, one warp per scheduler, each CTA
    // latency-bound) give way to finer ones, which decode faster there
    // (BENCHMARKS.md, "Measurements behind design choices").
    let min_part = if items * 8 < slots || 2 * items * max_ctx.div_ceil(MIN_PART_SIZE) <= slots {
        MIN_PART_SIZE_SMALL_GRID
    } else {
        MIN_PART_SIZE
    };
    let size = |parts: usize| max_ctx.div_ceil(parts).next_multiple_of(TC_TILE_KEYS).max(min_part);
    let fill = |part: usize| {
        let ctas = items * max_ctx.div_ceil(part).max(1);
        ctas as f64 / (ctas.div_ceil(slots) * slots) as f64
    };
    let mut best = (size(1), fill(size(1)));
    for parts in 2..=max_ctx.div_ceil(min_part) {
        let part = size(parts);
        if fill(part) > best.1 * 1.05 {
            best = (part, fill(part));
        }
    }
    best.0
}

/// Which kernel runs a launch: f16/bf16 take the tensor-core kernels
/// (kernels/paged_attention_tc.cu), f32 the CUDA-core one (kernels/paged_attention.cu).
#[derive(Clone, Copy, PartialEq, Debug)]
pub(super) enum Kernel {
    TensorCore,
    CudaCore,
}

impl Kernel {
    pub(super) fn for_dtype(dtype: DType) -> Self {
        // `CROSSKV_PA_KERNEL=cuda-core`: the CUDA-core kernel for every dtype (it has 16-bit
        // and fp8-cache instantiations too), for measuring one against the other.
        static CUDA_CORE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let forced = *CUDA_CORE.get_or_init(|| crate::env::PA_KERNEL.get().is_some_and(|v| v == "cuda-core"));
        if dtype == DType::F32 || forced {
            Kernel::CudaCore
        } else {
            Kernel::TensorCore
        }
    }
    /// Query rows (tokens × heads of one KV head's group) per work item: `PA_TC_ROWS` in
    /// the tensor-core kernels, `PA_CC_ROWS(D)` in the CUDA-core one.
    pub(super) fn rows(self, d: usize) -> usize {
        match self {
            Kernel::TensorCore => TC_ROWS,
            Kernel::CudaCore => cc_rows(d),
        }
    }
    /// Query heads of one group an item may hold: a tensor-core warp holds 16 rows, and a
    /// decode step's rows (one token) must fit one warp's 16.
    pub(super) fn max_heads(self, d: usize) -> usize {
        match self {
            Kernel::TensorCore => 16,
            Kernel::CudaCore => self.rows(d),
        }
    }
    /// Dynamic shared memory: `TcCfg<D, SPLIT, FP8>::SMEM` of
    /// kernels/paged_attention_tc.cu (Q rows, `STAGES` of K/V tiles, the stages' cache
    /// rows; over an fp8 cache, stages of codes, one more, and the converted 16-bit tile
    /// pair) for the tensor-core decode (`split`) or prefill kernel; none for CUDA cores.
    pub(super) fn smem_bytes(self, d: usize, split: bool, fp8: bool) -> usize {
        match self {
            Kernel::TensorCore => {
                let (q_rows, stages) = match (split, d) {
                    (true, 64) => (16, 4),
                    (true, _) => (16, 3),
                    (false, 256) => (64, 2),
                    (false, _) => (64, 3),
                };
                let tile = TC_TILE_KEYS * d * 2;
                let (stages, stage_tile, converted) = if fp8 {
                    (stages + 1, TC_TILE_KEYS * d, 2 * tile)
                } else {
                    (stages, tile, 0)
                };
                q_rows * d * 2 + stages * 2 * stage_tile + converted + stages * TC_TILE_KEYS * 4
            }
            Kernel::CudaCore => 0,
        }
    }
}

/// The launch plan: work items `[seq or NONE, first token, head chunk]`, heads and
/// tokens per CTA, partitions. For the tensor-core kernels the first `num_small` items
/// have ≤ 16 query rows (decode steps, padding) and go to the decode kernel, the rest
/// to the prefill kernel.
pub(super) struct Plan {
    pub(super) work: Vec<u32>,
    pub(super) num_small: usize,
    pub(super) hpc: usize,
    pub(super) tpc: usize,
    pub(super) num_parts: usize,
    pub(super) part_size: usize,
}

/// `slots`: CTAs of the decode kernel that run at once (see [`auto_part_size`]).
/// `part_ctx`: the context the partitions are sized for (default: the longest span's);
/// the partitions still cover the longest span.
#[allow(clippy::too_many_arguments)]
pub(super) fn plan(
    part_ctx: Option<usize>,
    seqs: &[SeqSpan],
    tokens: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    kernel: Kernel,
    slots: usize,
) -> Plan {
    let rows = kernel.rows(d);
    let group = heads / kv_heads;
    // The largest divisor of the group that fits: a decode CTA reads each K/V tile once
    // for all `hpc` query heads that share it.
    let hpc = (1..=kernel.max_heads(d).min(group))
        .rev()
        .find(|h| group.is_multiple_of(*h))
        .unwrap_or(1);
    let tpc = rows / hpc;
    let mut work = Vec::new();
    let mut covered = vec![false; tokens];
    for (s, span) in seqs.iter().enumerate() {
        for tok0 in (0..span.q_len as usize).step_by(tpc) {
            for hsub in 0..group / hpc {
                work.extend_from_slice(&[s as u32, tok0 as u32, hsub as u32]);
            }
        }
        covered[span.q_start as usize..(span.q_start + span.q_len) as usize].fill(true);
    }
    for (t, _) in covered.iter().enumerate().filter(|(_, c)| !**c) {
        for hsub in 0..group / hpc {
            work.extend_from_slice(&[NONE, t as u32, hsub as u32]);
        }
    }
    // Small items first (stable, so each kernel still walks sequences in order).
    let rows_of = |w: &[u32]| match w[0] {
        NONE => hpc,
        s => tpc.min((seqs[s as usize].q_len - w[1]) as usize) * hpc,
    };
    let (small, large): (Vec<&[u32]>, Vec<&[u32]>) = work.chunks(3).partition(|w| rows_of(w) <= 16);
    let num_small = if kernel == Kernel::TensorCore { small.len() } else { 0 };
    if kernel == Kernel::TensorCore {
        work = small.into_iter().chain(large).flatten().copied().collect();
    }
    let max_ctx = seqs.iter().map(|s| s.ctx_len as usize).max().unwrap_or(0);
    let items = work.len() / 3 * kv_heads;
    let part_size =
        part_size_override().unwrap_or_else(|| auto_part_size(part_ctx.unwrap_or(max_ctx).max(1), items, slots));
    Plan {
        work,
        num_small,
        hpc,
        tpc,
        num_parts: max_ctx.div_ceil(part_size).max(1),
        part_size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_contexts_are_split_to_fill_whole_waves() {
        // 396 slots (132 SMs × 3). MQA, 64 decode items of 4096 keys: 4 partitions of
        // 1024 (one wave), not 8 of 512 (1.3 waves).
        assert_eq!(auto_part_size(4096, 64, 396), 1024);
        // 16 × 4 items of 16384 keys: 6 partitions, one full wave.
        assert_eq!(auto_part_size(16384, 64, 396), 2752);
        // 32 × 16 items of 4096 keys: 3 partitions (1536 CTAs, 3.9 waves).
        assert_eq!(auto_part_size(4096, 512, 396), 1408);
        // 256 items of 1024 keys, or many items: no split.
        assert_eq!(auto_part_size(1024, 256, 396), 1024);
        assert_eq!(auto_part_size(1024, 4096, 396), 1024);
        // 64 items of 1024 keys would be 64 CTAs in 264 slots (d128): 4 partitions of
        // 256 instead, one wave.
        assert_eq!(auto_part_size(1024, 64, 264), 256);
        assert_eq!(auto_part_size(1025, 64, 264), 320);
        // One sequence (batch 1) splits as far as it can: 16 partitions of 256 keys.
        assert_eq!(auto_part_size(4096, 1, 396), 256);
        // Never below 256 keys.
        assert_eq!(auto_part_size(300, 1, 396), 256);
        assert_eq!(auto_part_size(100, 1, 396), 256);
    }

    #[test]
    fn plan_covers_every_token_and_head_once() {
        let seqs = [
            SeqSpan {
                q_start: 0,
                q_len: 1,
                ctx_len: 700,
            },
            SeqSpan {
                q_start: 2,
                q_len: 37,
                ctx_len: 40,
            },
        ];
        for (kernel, (heads, kv_heads)) in [Kernel::TensorCore, Kernel::CudaCore]
            .into_iter()
            .flat_map(|k| [(32, 1), (8, 8), (12, 4), (34, 2), (16, 1)].map(|h| (k, h)))
        {
            let p = plan(None, &seqs, 40, heads, kv_heads, 128, kernel, 100_000);
            assert!(p.hpc * p.tpc <= kernel.rows(128));
            assert!(p.hpc <= kernel.max_heads(128));
            assert!(p.num_parts >= 2 && p.num_parts == 700usize.div_ceil(p.part_size));
            // Tensor cores: the decode kernel's items (≤ 16 rows) first, then the prefill kernel's.
            let rows = |w: &[u32]| match w[0] {
                NONE => p.hpc,
                s => (p.tpc as u32).min(seqs[s as usize].q_len - w[1]) as usize * p.hpc,
            };
            for (i, w) in p.work.chunks(3).enumerate() {
                assert_eq!(
                    rows(w) <= 16 && kernel == Kernel::TensorCore,
                    i < p.num_small,
                    "{heads}/{kv_heads}"
                );
            }
            let mut seen = vec![0; 40 * heads / kv_heads];
            for w in p.work.chunks(3) {
                let (first, n) = if w[0] == NONE {
                    (w[1] as usize, 1)
                } else {
                    let s = seqs[w[0] as usize];
                    let n = (p.tpc as u32).min(s.q_len - w[1]) as usize;
                    ((s.q_start + w[1]) as usize, n)
                };
                for t in first..first + n {
                    for h in 0..p.hpc {
                        seen[t * heads / kv_heads + w[2] as usize * p.hpc + h] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{heads}/{kv_heads}: {seen:?}");
        }
    }
}
