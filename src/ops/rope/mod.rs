//! `rope`: rotary position embeddings for Q and K in one op, the cos/sin rows gathered
//! by position inside it. Computed in f32, stored in q's dtype. The CPU path below is
//! the reference `kernels/rope.cu` must match.
//!
//! The output is a new buffer holding the rotated Q and then the rotated K (returned as
//! two contiguous views of it). Not in place: candle's in-place ops mutate one tensor,
//! and Q and K are two; a fresh output also keeps the op pure, so the GPU test can
//! poison it and compare with the CPU reference.

use super::parallel::for_each_chunk_mut;
use super::{contiguous, u32_slice, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType};

#[cfg(feature = "cuda")]
mod cuda;

const OP: &str = "rope";

/// Tokens are grouped into CPU tasks of about this many elements (decode runs inline).
const TASK_ELEMS: usize = 16 * 1024;

/// The op: its inputs are q (and k) and the positions; the model's tables ride along.
#[derive(Clone)]
pub(crate) struct RopeOp {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) interleaved: bool,
    /// Rotate by the opposite angles (the backward).
    pub(crate) inverse: bool,
    /// Heads (of q, then k) past this many are copied unrotated (`rope_packed`'s V);
    /// `usize::MAX`: all rotated.
    pub(crate) rot_heads: usize,
}

/// The element pairs `(i1, i2)` rotated together by angle `j` of a `d`-wide head.
fn pair(j: usize, half: usize, interleaved: bool) -> (usize, usize) {
    if interleaved {
        (2 * j, 2 * j + 1)
    } else {
        (j, j + half)
    }
}

/// How [`rotate`] turns each token's heads.
#[derive(Clone, Copy)]
struct Turn {
    half: usize,
    interleaved: bool,
    /// -1 for the inverse rotation.
    sign: f32,
    /// Heads of a token past this many are copied.
    rot_heads: usize,
}

/// Rotates `x` (`[tokens, heads, d]`) into `out`, in parallel over groups of tokens.
fn rotate<T: Elem>(x: &[T], pos: &[u32], cos: &[T], sin: &[T], turn: Turn, out: &mut [T]) {
    let Turn {
        half,
        interleaved,
        sign,
        rot_heads,
    } = turn;
    let d = 2 * half;
    if pos.is_empty() || out.is_empty() {
        return;
    }
    let per_token = out.len() / pos.len();
    let chunk = (TASK_ELEMS / per_token).max(1) * per_token;
    for_each_chunk_mut(out, chunk, |i, o| {
        let x = &x[i * chunk..i * chunk + o.len()];
        let first = i * chunk / per_token;
        for (t, (xt, ot)) in x.chunks(per_token).zip(o.chunks_mut(per_token)).enumerate() {
            let row = pos[first + t] as usize * half;
            let (c, s) = (&cos[row..row + half], &sin[row..row + half]);
            for (h, (xh, oh)) in xt.chunks(d).zip(ot.chunks_mut(d)).enumerate() {
                if h >= rot_heads {
                    oh.copy_from_slice(xh);
                    continue;
                }
                for j in 0..half {
                    let (i1, i2) = pair(j, half, interleaved);
                    let (x1, x2) = (xh[i1].to_f32(), xh[i2].to_f32());
                    let (c, s) = (c[j].to_f32(), sign * s[j].to_f32());
                    oh[i1] = T::from_f32(x1 * c - x2 * s);
                    oh[i2] = T::from_f32(x1 * s + x2 * c);
                }
            }
        }
    });
}

fn table<'a, T: WithDType>(s: &'a Storage, l: &Layout, what: &str) -> Result<&'a [T]> {
    match s {
        Storage::Cpu(c) => contiguous(c.as_slice::<T>()?, l, OP, what),
        _ => candle_core::bail!("{OP}: the {what} table is not on the CPU"),
    }
}

impl RopeOp {
    fn cpu<T: Elem + WithDType>(
        &self,
        q: (&CpuStorage, &Layout),
        k: Option<(&CpuStorage, &Layout)>,
        pos: (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let pos = u32_slice(pos.0, pos.1, OP, "positions")?;
        let (cs, cl) = self.cos.storage_and_layout();
        let (ss, sl) = self.sin.storage_and_layout();
        let (cos, sin) = (table::<T>(&cs, cl, "cos")?, table::<T>(&ss, sl, "sin")?);
        let half = cl.dims()[1];
        let rows = cos.len() / half.max(1);
        if let Some(&p) = pos.iter().find(|&&p| p as usize >= rows) {
            candle_core::bail!("{OP}: position {p} is outside the tables ({rows} positions)");
        }
        let qx = contiguous(q.0.as_slice::<T>()?, q.1, OP, "q")?;
        let kx = match k {
            Some((s, l)) => contiguous(s.as_slice::<T>()?, l, OP, "k")?,
            None => &[],
        };
        let mut out = vec![T::from_f32(0.0); qx.len() + kx.len()];
        let (oq, ok) = out.split_at_mut(qx.len());
        let heads = qx.len() / pos.len().max(1) / (2 * half).max(1);
        let turn = Turn {
            half,
            interleaved: self.interleaved,
            sign: if self.inverse { -1.0 } else { 1.0 },
            rot_heads: self.rot_heads,
        };
        rotate(qx, pos, cos, sin, turn, oq);
        // K's heads follow Q's in the count of rotated heads.
        let k_turn = Turn {
            rot_heads: self.rot_heads.saturating_sub(heads),
            ..turn
        };
        rotate(kx, pos, cos, sin, k_turn, ok);
        let n = out.len();
        Ok((T::to_cpu_storage_owned(out), Shape::from(n)))
    }

    fn cpu_any(
        &self,
        q: (&CpuStorage, &Layout),
        k: Option<(&CpuStorage, &Layout)>,
        pos: (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        match q.0.dtype() {
            DType::F32 => self.cpu::<f32>(q, k, pos),
            DType::F16 => self.cpu::<half::f16>(q, k, pos),
            DType::BF16 => self.cpu::<half::bf16>(q, k, pos),
            d => candle_core::bail!("{OP}: {d:?} is not supported (f32/f16/bf16)"),
        }
    }
}

/// Q only (a CLA consumer's layer has no K).
impl CustomOp2 for RopeOp {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, q: &CpuStorage, ql: &Layout, pos: &CpuStorage, pl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_any((q, ql), None, (pos, pl))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        pos: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::rope(self, (q, ql), None, (pos, pl), None)
    }

    fn bwd(&self, q: &Tensor, pos: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gq = g.reshape(q.shape())?.contiguous()?;
        Ok((
            Some(gq.apply_op2_no_bwd(pos, &self.inverse()?)?.reshape(q.shape())?),
            None,
        ))
    }
}

/// Q and K in one launch (inference; training rotates them one op each, see `rope`).
impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        pos: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_any((q, ql), Some((k, kl)), (pos, pl))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        pos: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::rope(self, (q, ql), Some((k, kl)), (pos, pl), None)
    }
}

impl RopeOp {
    /// The rotation is orthogonal: its gradient is the rotation by the opposite angles.
    fn inverse(&self) -> Result<RopeOp> {
        Ok(RopeOp {
            inverse: !self.inverse,
            ..self.clone()
        })
    }
}

/// Rotates `q` (`[tokens, heads, d]`) and `k` (`[tokens, kv_heads, d]`, if any) by the
/// angles of `positions` (u32 `[tokens]`) in the tables `cos`/`sin` (`[max_positions,
/// d/2]`, q's dtype and device). `interleaved`: pairs `(2j, 2j+1)` (GGUF llama) instead
/// of the halves `(j, j + d/2)` (Hugging Face). A position past the tables is an error
/// on the CPU and NaN rows on CUDA (device positions are not read back).
pub fn rope(
    q: &Tensor,
    k: Option<&Tensor>,
    positions: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let op = checked_op(q, k, positions, cos, sin, interleaved)?;
    let (t, heads, d) = q.dims3()?;
    let kv_heads = k.map_or(Ok(0), |k| k.dim(1))?;
    let q = rows(q)?;
    let positions = positions.contiguous()?;
    // Training: Q and K rotated by one op each. One op's output packs both, and the
    // gradients of the two views cut from it would each be zero-padded back to the
    // packed length and then added (a memset, a copy and an add per view).
    if k.is_some_and(|k| q.track_op() || k.track_op()) {
        let one = |x: &Tensor| x.apply_op2(&positions, op.clone())?.reshape(x.shape());
        return Ok((one(&q)?, k.map(|k| one(&rows(k)?)).transpose()?));
    }
    let out = match k {
        // Inputs carrying gradient took the path above: this packed op has no backward.
        Some(k) => q.apply_op3_no_bwd(&rows(k)?, &positions, &op)?,
        None => q.apply_op2(&positions, op)?,
    };
    let nq = t * heads * d;
    let qr = out.narrow(0, 0, nq)?.reshape((t, heads, d))?;
    let kr = match k {
        Some(_) => Some(out.narrow(0, nq, t * kv_heads * d)?.reshape((t, kv_heads, d))?),
        None => None,
    };
    Ok((qr, kr))
}

/// A fused projection's `[tokens, heads, d]` output with its first `rot_heads` heads
/// rotated as [`rope`] rotates Q and K, the rest (V) copied: one new contiguous tensor
/// of `x`'s shape, differentiable (the backward is the same op rotating the other way,
/// so the packed gradient comes back in one piece). Training's packed Q/K/V.
pub fn rope_packed(
    x: &Tensor,
    positions: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
    rot_heads: usize,
) -> Result<Tensor> {
    let mut op = checked_op(x, None, positions, cos, sin, interleaved)?;
    if rot_heads > x.dim(1)? {
        candle_core::bail!("{OP}: {rot_heads} heads to rotate of {:?}", x.shape());
    }
    op.rot_heads = rot_heads;
    let x = rows(x)?;
    x.apply_op2(&positions.contiguous()?, op)?.reshape(x.shape())
}

/// A decode step's producer layer in one launch on CUDA: the packed `[tokens, q_heads +
/// 2 kv_heads, d]` projection's Q rotated (returned, `[tokens, q_heads, d]`), its K
/// rotated and its V written straight to `cache_rows` of the K and V caches, as
/// [`rope_packed`] followed by two [`reshape_and_cache`](super::reshape_and_cache) calls
/// would (which is what the CPU path does: the reference). Saves a decode step two
/// launches a producer layer.
#[allow(clippy::too_many_arguments)]
pub fn rope_and_cache(
    qkv: &Tensor,
    positions: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
    q_heads: usize,
    k_cache: &Tensor,
    v_cache: &Tensor,
    cache_rows: &Tensor,
) -> Result<Tensor> {
    let heads = qkv.dims3()?.1;
    let kv_heads = heads.saturating_sub(q_heads) / 2;
    if heads != q_heads + 2 * kv_heads || kv_heads == 0 {
        candle_core::bail!("rope_and_cache: {heads} packed heads are not {q_heads} + 2 × kv_heads");
    }
    #[cfg(feature = "cuda")]
    if qkv.device().is_cuda() {
        let (t, _, d) = qkv.dims3()?;
        let mut op = checked_op(qkv, None, positions, cos, sin, interleaved)?;
        op.rot_heads = q_heads + kv_heads;
        let cache_op = RopeCacheOp {
            rope: op,
            q_heads,
            kv_heads,
            k_cache: k_cache.clone(),
            v_cache: v_cache.clone(),
        };
        return rows(qkv)?
            .apply_op3_no_bwd(&positions.contiguous()?, &cache_rows.contiguous()?, &cache_op)?
            .reshape((t, q_heads, d));
    }
    let y = rope_packed(qkv, positions, cos, sin, interleaved, q_heads + kv_heads)?;
    super::reshape_and_cache(k_cache, &y.narrow(1, q_heads, kv_heads)?, cache_rows)?;
    super::reshape_and_cache(v_cache, &y.narrow(1, q_heads + kv_heads, kv_heads)?, cache_rows)?;
    y.narrow(1, 0, q_heads)?.contiguous()
}

/// [`rope_and_cache`]'s CUDA op: its inputs are the packed projection, the positions and
/// the cache rows; the caches it writes ride along (as addresses: candle's ops mutate
/// at most one tensor).
#[cfg(feature = "cuda")]
struct RopeCacheOp {
    rope: RopeOp,
    q_heads: usize,
    kv_heads: usize,
    k_cache: Tensor,
    v_cache: Tensor,
}

#[cfg(feature = "cuda")]
impl RopeCacheOp {
    /// A cache's address and rows, after checking it is a contiguous `[.., kv_heads, d]`
    /// cache of `dtype`.
    fn cache(&self, c: &Tensor, d: usize, dtype: DType, what: &str) -> Result<(u64, usize)> {
        let (s, l) = c.storage_and_layout();
        let s = crate::ops::cuda::cuda_of(&s, "rope_and_cache", what)?;
        let dims = l.dims();
        if s.dtype() != dtype || dims.len() < 2 || dims[dims.len() - 2..] != [self.kv_heads, d] {
            candle_core::bail!(
                "rope_and_cache: {what} {:?} {:?} does not take [_, {}, {d}] {dtype:?} rows",
                l.shape(),
                s.dtype(),
                self.kv_heads
            );
        }
        let (c0, c1) = crate::ops::cuda::contiguous(l, "rope_and_cache", what)?;
        let addr = crate::ops::cuda::raw_range(s, c0..c1, "rope_and_cache", what)?;
        Ok((addr, (c1 - c0) / (self.kv_heads * d)))
    }
}

#[cfg(feature = "cuda")]
impl CustomOp3 for RopeCacheOp {
    fn name(&self) -> &'static str {
        "rope_and_cache"
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
        candle_core::bail!("rope_and_cache: the CPU path composes rope_packed and reshape_and_cache")
    }

    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        pos: &candle_core::CudaStorage,
        pl: &Layout,
        rows: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = ql.dims().last().copied().unwrap_or(0);
        let (k, k_rows) = self.cache(&self.k_cache, d, q.dtype(), "the k cache")?;
        let (v, v_rows) = self.cache(&self.v_cache, d, q.dtype(), "the v cache")?;
        let cache = cuda::RopeCache {
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            k,
            v,
            cache_rows: k_rows.min(v_rows),
            rows: (rows, rl),
        };
        cuda::rope(&self.rope, (q, ql), None, (pos, pl), Some(cache))
    }
}

/// An input as the op reads it: CUDA reads rows any stride apart (slices of a fused QKV
/// projection); the CPU reference wants them contiguous.
fn rows(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && crate::ops::cuda::is_row_strided(x.layout()) {
        return Ok(x.clone());
    }
    x.contiguous()
}

/// Checks q (and k), the positions and the tables; the forward op.
fn checked_op(
    q: &Tensor,
    k: Option<&Tensor>,
    positions: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
) -> Result<RopeOp> {
    let dims3 = |x: &Tensor, what: &str| {
        x.dims3().map_err(|_| {
            candle_core::Error::Msg(format!(
                "{OP}: {what} is {:?}; [tokens, heads, head_dim] expected",
                x.shape()
            ))
        })
    };
    let (t, _, d) = dims3(q, "q")?;
    if d == 0 || d % 2 != 0 {
        candle_core::bail!("{OP}: head_dim {d} must be even and non-zero");
    }
    if !matches!(q.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        candle_core::bail!("{OP}: q is {:?}; f32, f16 or bf16 expected", q.dtype());
    }
    if let Some(k) = k {
        let (kt, _, kd) = dims3(k, "k")?;
        if (kt, kd) != (t, d) || k.dtype() != q.dtype() {
            candle_core::bail!(
                "{OP}: k {:?} {:?} does not match q {:?} {:?}",
                k.shape(),
                k.dtype(),
                q.shape(),
                q.dtype()
            );
        }
    }
    if positions.dims() != [t] || positions.dtype() != DType::U32 {
        candle_core::bail!(
            "{OP}: positions {:?} {:?}; u32 [{t}] expected",
            positions.shape(),
            positions.dtype()
        );
    }
    for (name, tab) in [("cos", cos), ("sin", sin)] {
        let th = match tab.dims() {
            [_, th] => *th,
            _ => usize::MAX,
        };
        if th != d / 2 || tab.dtype() != q.dtype() || !tab.device().same_device(q.device()) {
            candle_core::bail!(
                "{OP}: {name} table {:?} {:?} does not fit q {:?} {:?} (want [_, {}] of q's dtype and device)",
                tab.shape(),
                tab.dtype(),
                q.shape(),
                q.dtype(),
                d / 2
            );
        }
    }
    if cos.shape() != sin.shape() {
        candle_core::bail!("{OP}: cos {:?} and sin {:?} differ", cos.shape(), sin.shape());
    }
    Ok(RopeOp {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        interleaved,
        inverse: false,
        rot_heads: usize::MAX,
    })
}
