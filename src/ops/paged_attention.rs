//! Paged attention over a batch of sequences at different positions: prompts being
//! prefilled and sequences decoding one token, mixed in one call. Queries are flat
//! (`[tokens, heads, head_dim]`, each sequence's tokens contiguous); K/V are read from
//! the cache through the block table of the layer's KV slot. A query at absolute
//! position `p` attends causally to cached positions `0..=p`, so the step's own K/V
//! must have been written with `reshape_and_cache` first. GQA/MQA: query head `h`
//! reads KV head `h / (heads / kv_heads)`.

use super::parallel::for_each_chunk_mut;
use super::{contiguous, Elem};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// The head dimensions the CUDA paged-attention kernels are built for.
pub const CUDA_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Where one sequence's queries sit in the flat batch, and how long its context is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSpan {
    /// Index of the sequence's first query token in the batch.
    pub q_start: u32,
    /// Number of query tokens this step (1 when decoding).
    pub q_len: u32,
    /// Tokens in the cache after this step's write (positions `0..ctx_len`).
    pub ctx_len: u32,
}

/// A per-step memo for paged attention: every layer that reads one KV slot in one step
/// sees the same spans and block table, so the slot's checks run once; on CUDA the
/// launch plan, the device copies of spans and work list and the scratch are made once
/// for all slots (every slot sees the same spans), and each slot's table is uploaded
/// once (20 layers × six driver calls a step otherwise). Make one per step
/// (`Model::forward` does) and never reuse it with other spans or tables.
#[derive(Default)]
pub struct AttentionPlans {
    pub(crate) checked: std::sync::Mutex<std::collections::HashSet<usize>>,
    #[cfg(feature = "cuda")]
    pub(crate) cuda: std::sync::Mutex<super::cuda::CudaPlans>,
    /// The batch-invariant kernel's device copies of the step's token owners and tables.
    #[cfg(feature = "cuda")]
    pub(crate) fixed: std::sync::Mutex<super::batch_invariant::FixedUploads>,
}

struct PagedAttention<'a> {
    /// The step's memo and the slot these tables belong to (read by the CUDA path).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    plans: Option<(&'a AttentionPlans, usize)>,
    seqs: &'a [SeqSpan],
    /// `[num_seqs, max_blocks]`, row-major.
    block_table: &'a [u32],
    max_blocks: usize,
    scale: f32,
}

/// `a · b` with eight independent partial sums, so the compiler can vectorise the
/// reduction (a plain float sum must stay in order and runs scalar).
#[inline]
fn dot<T: Elem>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].to_f32();
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y.to_f32()).sum();
    acc.iter().sum::<f32>() + tail
}

/// Shapes of one call: `q` `[tokens, heads, d]`, caches `[_, block_size, kv_heads, d]`.
#[derive(Clone, Copy)]
struct Dims {
    tokens: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    block_size: usize,
}

impl PagedAttention<'_> {
    fn run<T: Elem>(&self, q: &[T], k: &[T], v: &[T], dims: &Dims) -> Result<Vec<T>> {
        let Dims {
            tokens,
            heads,
            kv_heads,
            d,
            block_size,
        } = *dims;
        // token → (sequence, absolute position); `check_spans` vetted every span and
        // table entry at the op's entry, so the parallel part below cannot fail.
        let mut owner = vec![(usize::MAX, 0usize); tokens];
        for (s, span) in self.seqs.iter().enumerate() {
            let (q0, ql, ctx) = (span.q_start as usize, span.q_len as usize, span.ctx_len as usize);
            for i in 0..ql {
                owner[q0 + i] = (s, ctx - ql + i);
            }
        }
        let group = heads / kv_heads;
        let mut out = vec![T::from_f32(0.0); tokens * heads * d];
        // One task per (token, query head): decode steps have one token, so the
        // parallelism has to come from the heads.
        for_each_chunk_mut(&mut out, d, |i, out_h| {
            let (t, h) = (i / heads, i % heads);
            let (s, pos) = owner[t];
            if s == usize::MAX {
                return; // a padding token no sequence owns
            }
            let table = &self.block_table[s * self.max_blocks..(s + 1) * self.max_blocks];
            let n = pos + 1;
            let kvh = h / group;
            let qv: Vec<f32> = q[i * d..(i + 1) * d].iter().map(|x| x.to_f32()).collect();
            let kv_row = |j: usize| {
                let row = table[j / block_size] as usize * block_size + j % block_size;
                (row * kv_heads + kvh) * d
            };
            let mut scores: Vec<f32> = (0..n)
                .map(|j| dot(&qv, &k[kv_row(j)..kv_row(j) + d]) * self.scale)
                .collect();
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let mut acc = vec![0f32; d];
            for (j, sc) in scores.iter().enumerate() {
                let w = sc / sum;
                let off = kv_row(j);
                acc.iter_mut()
                    .zip(&v[off..off + d])
                    .for_each(|(a, b)| *a += w * b.to_f32());
            }
            out_h.iter_mut().zip(&acc).for_each(|(o, a)| *o = T::from_f32(*a));
        });
        Ok(out)
    }
}

impl CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "paged_attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (tokens, heads, d) = ql.shape().dims3()?;
        let (_, block_size, kv_heads, kd) = kl.shape().dims4()?;
        if kd != d || heads % kv_heads != 0 || kl.shape() != vl.shape() {
            candle_core::bail!(
                "paged_attention: q {:?} does not match cache {:?}",
                ql.shape(),
                kl.shape()
            );
        }
        let n = self.name();
        let dims = Dims {
            tokens,
            heads,
            kv_heads,
            d,
            block_size,
        };
        // The same reference for each element type.
        macro_rules! run {
            ($variant:ident, $q:ident, $k:ident, $v:ident) => {
                CpuStorage::$variant(self.run(
                    contiguous($q, ql, n, "q")?,
                    contiguous($k, kl, n, "k cache")?,
                    contiguous($v, vl, n, "v cache")?,
                    &dims,
                )?)
            };
        }
        let out = match (qs, ks, vs) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => run!(F32, q, k, v),
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => run!(F16, q, k, v),
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => run!(BF16, q, k, v),
            _ => candle_core::bail!("paged_attention: q and cache must share one of f32/f16/bf16"),
        };
        Ok((out, ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::paged_attention(
            self.plans,
            self.seqs,
            self.block_table,
            self.max_blocks,
            self.scale,
            qs,
            ql,
            ks,
            kl,
            vs,
            vl,
        )
    }
}

/// Every span fits the batch and every table entry in use is a block of the cache.
/// Checked once at the op's entry for every backend: the CPU loop and the CUDA kernels
/// trust them.
pub(crate) fn check_spans(
    seqs: &[SeqSpan],
    block_table: &[u32],
    max_blocks: usize,
    tokens: usize,
    block_size: usize,
    num_blocks: usize,
) -> Result<()> {
    for (s, span) in seqs.iter().enumerate() {
        let (q0, ql, ctx) = (span.q_start as usize, span.q_len as usize, span.ctx_len as usize);
        if q0 + ql > tokens || ql > ctx {
            candle_core::bail!("paged_attention: sequence {s} span {span:?} does not fit {tokens} tokens");
        }
        if ctx.div_ceil(block_size) > max_blocks {
            candle_core::bail!("paged_attention: sequence {s} needs more blocks than its table has");
        }
        let table = &block_table[s * max_blocks..(s + 1) * max_blocks];
        if let Some(b) = table[..ctx.div_ceil(block_size)]
            .iter()
            .find(|&&b| b as usize >= num_blocks)
        {
            candle_core::bail!(
                "paged_attention: sequence {s}'s block table holds block {b}, past the cache's {num_blocks}"
            );
        }
    }
    Ok(())
}

/// `q`: `[tokens, heads, head_dim]`; caches: `[num_blocks, block_size, kv_heads, head_dim]`;
/// `block_table`: `[seqs.len(), max_blocks]` row-major, the KV slot's tables.
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[SeqSpan],
    block_table: &[u32],
    max_blocks: usize,
    scale: f32,
) -> Result<Tensor> {
    paged_attention_planned(q, k_cache, v_cache, seqs, block_table, max_blocks, scale, None)
}

/// [`paged_attention`] with the step's memo: `plans` and the KV slot `block_table` is of.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_planned(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[SeqSpan],
    block_table: &[u32],
    max_blocks: usize,
    scale: f32,
    plans: Option<(&AttentionPlans, usize)>,
) -> Result<Tensor> {
    if block_table.len() != seqs.len() * max_blocks {
        candle_core::bail!(
            "paged_attention: block table has {} entries, want {} × {max_blocks}",
            block_table.len(),
            seqs.len()
        );
    }
    let (tokens, _, _) = q.dims3()?;
    let (num_blocks, block_size, _, _) = k_cache.dims4()?;
    let checked = plans.is_some_and(|(p, slot)| p.checked.lock().expect("plans").contains(&slot));
    if !checked {
        check_spans(seqs, block_table, max_blocks, tokens, block_size, num_blocks)?;
        if let Some((p, slot)) = plans {
            p.checked.lock().expect("plans").insert(slot);
        }
    }
    let op = PagedAttention {
        plans,
        seqs,
        block_table,
        max_blocks,
        scale,
    };
    q.contiguous()?.apply_op3_no_bwd(k_cache, v_cache, &op)
}
