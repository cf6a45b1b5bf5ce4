//! CUDA launches of the fused elementwise kernels (feature `cuda`): `kernels/rms_norm.cu`
//! (`rms_norm`, `add_rms_norm`) and `kernels/rope.cu`. The ops' CPU paths
//! (`rms_norm.rs`, `rope.rs`) are the references; these are their `cuda_fwd`.

use super::cuda::{contiguous, cuda_of, poison, ptx, row_strided, suffix, POISON};
use super::rope::RopeOp;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape};
use std::sync::atomic::Ordering;

/// Rows up to this many elements get one warp each (4 rows per CTA); longer ones a CTA.
const WARP_ROW_MAX: usize = 1024;

/// An output of `n` elements (at least one allocated), NaN-filled when tests ask.
pub(crate) fn output<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    let mut out = unsafe { dev.alloc::<T>(n.max(1))? };
    if POISON.load(Ordering::Relaxed) {
        poison(dev, &mut out)?;
    }
    Ok(out)
}

/// The launch shape for `rows` rows of `hidden` elements of `esize` bytes:
/// `(config, warp_mode)`.
fn norm_launch(rows: usize, hidden: usize, esize: usize) -> (LaunchConfig, u32) {
    if hidden <= WARP_ROW_MAX {
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(4) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        return (cfg, 1);
    }
    // One thread per 16-byte vector, a whole number of warps, at most 1024.
    let vecs = hidden.div_ceil(16 / esize);
    let threads = vecs.div_ceil(32).clamp(1, 32) * 32;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    (cfg, 0)
}

/// `rms_norm(x, w)`, or with `residual` the fused `add_rms_norm`, whose output is
/// `[2, ..x]` (the sum, then the normed rows).
pub(crate) fn rms_norm(
    x: &CudaStorage,
    xl: &Layout,
    residual: Option<(&CudaStorage, &Layout)>,
    w: &CudaStorage,
    wl: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let op = if residual.is_some() { "add_rms_norm" } else { "rms_norm" };
    let sfx = suffix(x.dtype(), op)?;
    let hidden = xl.dims().last().copied().unwrap_or(0);
    let n = xl.shape().elem_count();
    if hidden == 0 || wl.shape().elem_count() != hidden || hidden > i32::MAX as usize {
        candle_core::bail!("{op}: weight {:?} does not match x {:?}", wl.shape(), xl.shape());
    }
    let rows = n / hidden;
    if rows > i32::MAX as usize {
        candle_core::bail!("{op}: {rows} rows is too many for one launch");
    }
    let (x0, x1) = contiguous(xl, op, "x")?;
    let (w0, w1) = contiguous(wl, op, "weight")?;
    let r_range = match residual {
        Some((r, rl)) => {
            if r.dtype() != x.dtype() || rl.shape() != xl.shape() {
                candle_core::bail!("{op}: residual {:?} does not match x {:?}", rl.shape(), xl.shape());
            }
            Some(contiguous(rl, op, "residual")?)
        }
        None => None,
    };
    if w.dtype() != x.dtype() {
        candle_core::bail!("{op}: weight is {:?}, x is {:?}", w.dtype(), x.dtype());
    }
    let shape = match residual {
        Some(_) => super::rms_norm::stacked(xl),
        None => xl.shape().clone(),
    };
    let dev = x.device.clone();
    let (cfg, warp) = norm_launch(rows, hidden, x.dtype().size_in_bytes());
    let (rows32, hidden32) = (rows as u32, hidden as u32);
    macro_rules! go {
        ($t:ty) => {{
            let total = if residual.is_some() { 2 * n } else { n };
            let mut out = output::<$t>(&dev, total)?;
            if rows > 0 {
                let xs = x.as_cuda_slice::<$t>()?.slice(x0..x1);
                let ws = w.as_cuda_slice::<$t>()?.slice(w0..w1);
                match (residual, r_range) {
                    (Some((r, _)), Some((r0, r1))) => {
                        let rs = r.as_cuda_slice::<$t>()?.slice(r0..r1);
                        let f = dev.get_or_load_custom_func(
                            &format!("add_rms_norm_{sfx}"),
                            "crosskv_rms_norm",
                            ptx::RMS_NORM,
                        )?;
                        let mut b = f.builder();
                        b.arg(&mut out)
                            .arg(&xs)
                            .arg(&rs)
                            .arg(&ws)
                            .arg(&rows32)
                            .arg(&hidden32)
                            .arg(&eps)
                            .arg(&warp);
                        unsafe { b.launch(cfg) }.w()?;
                    }
                    _ => {
                        let f =
                            dev.get_or_load_custom_func(&format!("rms_norm_{sfx}"), "crosskv_rms_norm", ptx::RMS_NORM)?;
                        let mut b = f.builder();
                        b.arg(&mut out)
                            .arg(&xs)
                            .arg(&ws)
                            .arg(&rows32)
                            .arg(&hidden32)
                            .arg(&eps)
                            .arg(&warp);
                        unsafe { b.launch(cfg) }.w()?;
                    }
                }
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match x.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    };
    Ok((out, shape))
}

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

// ---------------------------------------------------------------- argmax_rows

/// f32 `[rows, cols]` → u32 `[rows]`, one CTA of 256 threads per row (kernels/argmax.cu).
pub(crate) fn argmax_rows(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "argmax_rows";
    let (rows, cols) = l.shape().dims2()?;
    if s.dtype() != DType::F32 {
        candle_core::bail!("{OP}: logits must be f32");
    }
    let (o0, o1) = contiguous(l, OP, "logits")?;
    let dev = s.device.clone();
    let mut out = output::<u32>(&dev, rows)?;
    if rows > 0 {
        let x = s.as_cuda_slice::<f32>()?.slice(o0..o1);
        let f = dev.get_or_load_custom_func("argmax_rows_f32", "crosskv_argmax", ptx::ARGMAX)?;
        let cols32 = cols as u32;
        let mut b = f.builder();
        b.arg(&x).arg(&mut out).arg(&cols32);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1), // NT in kernels/argmax.cu
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(rows)))
}

/// Threads per CTA of the RMSNorm backward kernels: 8 warps, a row each at a time.
const NORM_BWD_THREADS: usize = 256;
/// Rows of dw partial sums (`DW_SLICES` in kernels/rms_norm.cu).
const DW_SLICES: usize = 32;

/// The RMSNorm backward (`rms_norm_grads` on CUDA): x, w, g of one dtype, contiguous;
/// returns `[rows + 1, hidden]` in that dtype: dx rows, then dw (summed in f32).
pub(crate) fn rms_norm_bwd(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "rms_norm_bwd";
    let sfx = suffix(x.dtype(), OP)?;
    let (rows, hidden) = super::rms_norm::bwd_dims(xl, wl, gl)?;
    if w.dtype() != x.dtype() || g.dtype() != x.dtype() {
        candle_core::bail!("{OP}: x, w and g must share one dtype");
    }
    if hidden == 0 || hidden > super::rms_norm::BWD_MAX_HIDDEN || rows >= u32::MAX as usize {
        candle_core::bail!("{OP}: {rows} rows of {hidden} is out of range");
    }
    let (x0, x1) = contiguous(xl, OP, "x")?;
    let (w0, w1) = contiguous(wl, OP, "w")?;
    let (g0, g1) = contiguous(gl, OP, "g")?;
    let dev = x.device.clone();
    // dw is summed in f32 here (zeros: the CTAs add into it), then rounded into the last row.
    // DW_SLICES rows of partial sums, one per group of CTAs.
    let mut dw_acc = dev.alloc_zeros::<f32>(DW_SLICES * hidden)?;
    // 16-byte vectors where every row allows them (hidden a multiple of the vector, each
    // input's start aligned): the kernel for the fewest vectors per lane that hold a row.
    let vec = 16 / x.dtype().size_in_bytes();
    let aligned = [x0, w0, g0]
        .iter()
        .all(|o| (o * x.dtype().size_in_bytes()).is_multiple_of(16));
    let per_lane = [1, 2, 3, 4, 8]
        .into_iter()
        .find(|v| hidden <= 32 * v * vec)
        .filter(|_| aligned && hidden.is_multiple_of(vec));
    let name = match per_lane {
        Some(v) => format!("rms_norm_bwd_v{v}_{sfx}"),
        None => format!("rms_norm_bwd_{sfx}"),
    };
    let bwd = dev.get_or_load_custom_func(&name, "crosskv_rms_norm", ptx::RMS_NORM)?;
    // Shared memory: the scalar kernel sums dw in one row of `hidden` f32; the vector
    // kernels keep a row per warp, up to 64 KiB (bf16 rows of 2048), past the 48 KiB a
    // launch gets without asking.
    let smem = hidden * 4 * if per_lane.is_some() { NORM_BWD_THREADS / 32 } else { 1 };
    if smem > 48 * 1024 {
        bwd.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
    }
    let finish =
        dev.get_or_load_custom_func(&format!("rms_norm_bwd_finish_{sfx}"), "crosskv_rms_norm", ptx::RMS_NORM)?;
    // A warp per row, 8 per CTA, two rows per warp or more: enough CTAs to fill the GPU
    // (the step is memory-bound), few enough that dw's per-CTA atomics stay cheap.
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(16).clamp(1, 1024) as u32, 1, 1),
        block_dim: (NORM_BWD_THREADS as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let fin = LaunchConfig {
        grid_dim: (hidden.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows32, hidden32) = (rows as u32, hidden as u32);
    macro_rules! go {
        ($t:ty) => {{
            let mut out = unsafe { dev.alloc::<$t>((rows + 1) * hidden)? };
            let xs = x.as_cuda_slice::<$t>()?.slice(x0..x1);
            let ws = w.as_cuda_slice::<$t>()?.slice(w0..w1);
            let gs = g.as_cuda_slice::<$t>()?.slice(g0..g1);
            if rows > 0 {
                let mut b = bwd.builder();
                b.arg(&mut out)
                    .arg(&mut dw_acc)
                    .arg(&xs)
                    .arg(&ws)
                    .arg(&gs)
                    .arg(&rows32)
                    .arg(&hidden32)
                    .arg(&eps);
                unsafe { b.launch(cfg) }.w()?;
            }
            let mut dw = out.slice_mut(rows * hidden..);
            let mut b = finish.builder();
            b.arg(&mut dw).arg(&dw_acc).arg(&hidden32);
            unsafe { b.launch(fin) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev)
        }};
    }
    let out = match x.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    };
    Ok((out, Shape::from((rows + 1, hidden))))
}

// ---------------------------------------------------------------- widen_f32

/// f16/bf16 → f32, contiguous (kernels/widen.cu): four elements a thread.
pub(crate) fn widen_f32(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "widen_f32";
    const THREADS: u32 = 256;
    let sfx = suffix(s.dtype(), OP)?;
    let (o0, o1) = contiguous(l, OP, "x")?;
    let n = o1 - o0;
    let dev = s.device.clone();
    let mut y = output::<f32>(&dev, n)?;
    if n > 0 {
        let f = dev.get_or_load_custom_func(&format!("widen_f32_{sfx}"), "crosskv_widen", ptx::WIDEN)?;
        let n64 = n as u64;
        let cfg = LaunchConfig {
            grid_dim: ((n.div_ceil(4 * THREADS as usize)).min(8192) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! run {
            ($t:ty) => {{
                let x = s.as_cuda_slice::<$t>()?.slice(o0..o1);
                let mut b = f.builder();
                b.arg(&x).arg(&mut y).arg(&n64);
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match s.dtype() {
            DType::BF16 => run!(half::bf16),
            DType::F16 => run!(half::f16),
            d => candle_core::bail!("{OP}: {d:?} is not f16/bf16"),
        }
    }
    Ok((CudaStorage::wrap_cuda_slice(y, dev), l.shape().clone()))
}
