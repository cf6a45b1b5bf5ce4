//! The CUDA launch of `rope`, `rope_packed` and `rope_and_cache` (feature `cuda`):
//! `kernels/rope.cu`. The CPU path in `mod.rs` is the reference; this is its `cuda_fwd`.

use super::RopeOp;
use crate::ops::cuda::{contiguous, cuda_of, output, ptx, row_strided, suffix};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape};

/// Threads per CTA of the rope kernel; one thread per rotated pair.
const ROPE_THREADS: usize = 128;

/// Where `rope_and_cache` writes a producer's rotated K and its V: the caches' addresses
/// (`[cache_rows, kv_heads, head_dim]` each), and each token's cache row.
pub(crate) struct RopeCache<'a> {
    pub(crate) q_heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) k: u64,
    pub(crate) v: u64,
    pub(crate) cache_rows: usize,
    pub(crate) rows: (&'a CudaStorage, &'a Layout),
}

/// Rotates q (and k) into one new buffer: q's rows, then k's. With `cache`, q is a
/// packed `[tokens, q_heads + 2 kv_heads, d]` projection whose K and V go to the caches,
/// and the buffer holds Q only.
pub(crate) fn rope(
    op: &RopeOp,
    q: (&CudaStorage, &Layout),
    k: Option<(&CudaStorage, &Layout)>,
    pos: (&CudaStorage, &Layout),
    cache: Option<RopeCache<'_>>,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "rope";
    let (q, ql) = q;
    let sfx = suffix(q.dtype(), OP)?;
    let (tokens, heads, d) = ql.shape().dims3()?;
    if let Some(c) = &cache {
        if k.is_some() || heads != c.q_heads + 2 * c.kv_heads {
            candle_core::bail!(
                "rope_and_cache: {heads} packed heads are not {} + 2 × {}",
                c.q_heads,
                c.kv_heads
            );
        }
    }
    let kv_heads = match k {
        Some((ks, kl)) => {
            let (kt, kh, kd) = kl.shape().dims3()?;
            if (kt, kd) != (tokens, d) || ks.dtype() != q.dtype() {
                candle_core::bail!("{OP}: k {:?} does not match q {:?}", kl.shape(), ql.shape());
            }
            kh
        }
        None => 0,
    };
    let half = d / 2;
    if d == 0 || d % 2 != 0 {
        candle_core::bail!("{OP}: head_dim {d} must be even and non-zero");
    }
    let pairs = (heads + kv_heads) * half;
    // A thread per 4 pairs of the half rotation when the half allows (as the kernel's
    // pairs_per_thread decides), else per pair.
    let per = if !op.interleaved && half.is_multiple_of(4) {
        4
    } else {
        1
    };
    let chunks = (pairs / per).div_ceil(ROPE_THREADS);
    if chunks > 65535 || tokens > i32::MAX as usize {
        candle_core::bail!("{OP}: {tokens} tokens × {pairs} pairs is too large for one launch");
    }
    let (q0, q_stride, _) = row_strided(ql, OP, "q")?;
    let q1 = q0 + tokens.saturating_sub(1) * q_stride + heads * d;
    let (p0, p1) = contiguous(pos.1, OP, "positions")?;
    if p1 - p0 != tokens {
        candle_core::bail!("{OP}: {} positions for {tokens} tokens", p1 - p0);
    }
    let (cs, cl) = op.cos.storage_and_layout();
    let (ss, sl) = op.sin.storage_and_layout();
    let (cos, sin) = (cuda_of(&cs, OP, "the cos table")?, cuda_of(&ss, OP, "the sin table")?);
    let ((c0, c1), (s0, s1)) = (contiguous(cl, OP, "cos")?, contiguous(sl, OP, "sin")?);
    if cos.dtype() != q.dtype() || sin.dtype() != q.dtype() || c1 - c0 != s1 - s0 || half == 0 {
        candle_core::bail!("{OP}: the cos/sin tables must share q's dtype and shape [_, {half}]");
    }
    let max_pos = (c1 - c0) / half;
    // With the caches, only Q comes out.
    let (nq, nk) = match &cache {
        Some(c) => (tokens * c.q_heads * d, 0),
        None => (tokens * heads * d, tokens * kv_heads * d),
    };
    let dev = q.device.clone();
    let cfg = LaunchConfig {
        grid_dim: (tokens as u32, chunks as u32, 1),
        block_dim: (ROPE_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let args: [u32; 6] = [
        tokens as u32,
        heads as u32,
        kv_heads as u32,
        half as u32,
        max_pos.min(u32::MAX as usize) as u32,
        op.interleaved as u32,
    ];
    let ps = pos.0.as_cuda_slice::<u32>()?.slice(p0..p1);
    macro_rules! go {
        ($t:ty) => {{
            let mut out = output::<$t>(&dev, nq + nk)?;
            if nq + nk > 0 {
                let qs = q.as_cuda_slice::<$t>()?.slice(q0..q1);
                // Q only: the kernel never reads k (kv_heads is 0); q stands in for it.
                let (ks, k_stride) = match k {
                    Some((ks, kl)) => {
                        let (k0, k_stride, _) = row_strided(kl, OP, "k")?;
                        let k1 = k0 + tokens.saturating_sub(1) * k_stride + kv_heads * d;
                        (ks.as_cuda_slice::<$t>()?.slice(k0..k1), k_stride as u64)
                    }
                    None => (q.as_cuda_slice::<$t>()?.slice(q0..q1), 0),
                };
                let q_stride = q_stride as u64;
                let cv = cos.as_cuda_slice::<$t>()?.slice(c0..c1);
                let sv = sin.as_cuda_slice::<$t>()?.slice(s0..s1);
                let kernel = if cache.is_some() { "rope_cache" } else { "rope" };
                let f = dev.get_or_load_custom_func(&format!("{kernel}_{sfx}"), "crosskv_rope", ptx::ROPE)?;
                let mut b = f.builder();
                b.arg(&mut out).arg(&qs).arg(&ks).arg(&cv).arg(&sv).arg(&ps);
                for a in &args {
                    b.arg(a);
                }
                let rot_heads = op.rot_heads.min(u32::MAX as usize) as u32;
                let inverse = op.inverse as u32;
                b.arg(&q_stride).arg(&k_stride).arg(&rot_heads).arg(&inverse);
                let cache_args;
                let rows;
                if let Some(c) = &cache {
                    let (r0, r1) = contiguous(c.rows.1, OP, "cache rows")?;
                    if r1 - r0 != tokens {
                        candle_core::bail!("rope_and_cache: {} cache rows for {tokens} tokens", r1 - r0);
                    }
                    rows = c.rows.0.as_cuda_slice::<u32>()?.slice(r0..r1);
                    cache_args = (c.cache_rows as u64, c.q_heads as u32, c.kv_heads as u32);
                    b.arg(&c.k)
                        .arg(&c.v)
                        .arg(&rows)
                        .arg(&cache_args.0)
                        .arg(&cache_args.1)
                        .arg(&cache_args.2);
                }
                unsafe { b.launch(cfg) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match q.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    };
    Ok((out, Shape::from(nq + nk)))
}
