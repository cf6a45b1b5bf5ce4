//! `rms_norm` and `add_rms_norm`: RMSNorm over the last dimension, alone and fused with
//! the residual add before it (`x = x + attn_out; h = norm(x)`). Computed in f32, stored
//! in x's dtype. The CPU paths below are the reference `kernels/rms_norm.cu` must match.

use super::parallel::for_each_chunk_mut;
use super::{contiguous, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

#[cfg(feature = "cuda")]
mod cuda;

/// Rows are grouped into CPU tasks of about this many elements (decode runs inline).
const TASK_ELEMS: usize = 16 * 1024;

/// `out = s / sqrt(mean(s^2) + eps) * w` for one row.
fn norm_row<T: Elem>(s: &[T], w: &[T], eps: f32, out: &mut [T]) {
    let ss: f32 = s
        .iter()
        .map(|v| {
            let v = v.to_f32();
            v * v
        })
        .sum();
    let m = (ss / s.len() as f32 + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(s).zip(w) {
        *o = T::from_f32(v.to_f32() / m * g.to_f32());
    }
}

/// Normed rows of `s` (rows of `w.len()`) into `out`, in parallel over groups of rows.
fn norm_rows<T: Elem>(s: &[T], w: &[T], eps: f32, out: &mut [T]) {
    let hidden = w.len();
    let chunk = (TASK_ELEMS / hidden).max(1) * hidden;
    for_each_chunk_mut(out, chunk, |i, o| {
        let s = &s[i * chunk..i * chunk + o.len()];
        for (sr, or) in s.chunks(hidden).zip(o.chunks_mut(hidden)) {
            norm_row(sr, w, eps, or);
        }
    });
}

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    contiguous(s.as_slice::<T>()?, l, "rms_norm", what)
}

fn cpu_rms_norm<T: Elem + WithDType>(
    x: &CpuStorage,
    xl: &Layout,
    w: &CpuStorage,
    wl: &Layout,
    eps: f32,
) -> Result<CpuStorage> {
    let (x, w) = (slice::<T>(x, xl, "x")?, slice::<T>(w, wl, "weight")?);
    let mut out = vec![T::from_f32(0.0); x.len()];
    norm_rows(x, w, eps, &mut out);
    Ok(T::to_cpu_storage_owned(out))
}

#[allow(clippy::too_many_arguments)]
fn cpu_add_rms_norm<T: Elem + WithDType>(
    x: &CpuStorage,
    xl: &Layout,
    r: &CpuStorage,
    rl: &Layout,
    w: &CpuStorage,
    wl: &Layout,
    eps: f32,
) -> Result<CpuStorage> {
    let (x, r, w) = (
        slice::<T>(x, xl, "x")?,
        slice::<T>(r, rl, "residual")?,
        slice::<T>(w, wl, "weight")?,
    );
    let n = x.len();
    let mut out = vec![T::from_f32(0.0); 2 * n];
    let (sum, normed) = out.split_at_mut(n);
    for_each_chunk_mut(sum, TASK_ELEMS, |i, s| {
        let start = i * TASK_ELEMS;
        for ((o, a), b) in s.iter_mut().zip(&x[start..]).zip(&r[start..]) {
            *o = T::from_f32(a.to_f32() + b.to_f32());
        }
    });
    norm_rows(sum, w, eps, normed);
    Ok(T::to_cpu_storage_owned(out))
}

/// The checks every backend relies on: `x` `[.., hidden]` in f32/f16/bf16, `w`
/// `[hidden]` and `residual` (same shape as `x`) in the same dtype.
fn check(x: &Tensor, residual: Option<&Tensor>, w: &Tensor) -> Result<()> {
    let op = if residual.is_some() { "add_rms_norm" } else { "rms_norm" };
    let hidden = match x.dims().last() {
        Some(&h) if h > 0 => h,
        _ => candle_core::bail!("{op}: x {:?} needs a non-empty last dimension", x.shape()),
    };
    if !matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        candle_core::bail!("{op}: x is {:?}; f32, f16 or bf16 expected", x.dtype());
    }
    if w.dims() != [hidden] {
        candle_core::bail!("{op}: weight {:?} does not match x {:?}", w.shape(), x.shape());
    }
    if w.dtype() != x.dtype() {
        candle_core::bail!("{op}: weight is {:?}, x is {:?}", w.dtype(), x.dtype());
    }
    if let Some(r) = residual {
        if r.shape() != x.shape() || r.dtype() != x.dtype() {
            candle_core::bail!(
                "{op}: residual {:?} {:?} does not match x {:?} {:?}",
                r.shape(),
                r.dtype(),
                x.shape(),
                x.dtype()
            );
        }
    }
    Ok(())
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms_norm"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, w: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match x.dtype() {
            DType::F32 => cpu_rms_norm::<f32>(x, xl, w, wl, self.eps)?,
            DType::F16 => cpu_rms_norm::<half::f16>(x, xl, w, wl, self.eps)?,
            DType::BF16 => cpu_rms_norm::<half::bf16>(x, xl, w, wl, self.eps)?,
            d => candle_core::bail!("rms_norm: {d:?} is not supported (f32/f16/bf16)"),
        };
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::rms_norm(x, xl, None, w, wl, self.eps)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = rms_norm_grads(x, w, g, self.eps)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Widest row the fused backward takes (its CTA keeps a row of dw in shared memory).
pub(crate) const BWD_MAX_HIDDEN: usize = 12 * 1024;

/// Gradients of `y = x / sqrt(mean(x²) + eps) * w` given dL/dy = `g`, in f32, returned
/// in x's and w's dtypes: dx = r·(g∘w) − x·r³·mean((g∘w)∘x), dw = Σ_rows g∘x·r, with
/// r = 1/sqrt(mean(x²) + eps). One fused op ([`RmsNormBwd`]: a kernel on CUDA) instead
/// of a dozen f32 candle passes and a strided column sum per norm, which dominated
/// training steps; [`rms_norm_grads_composite`] is its reference.
pub fn rms_norm_grads(x: &Tensor, w: &Tensor, g: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let hidden = w.elem_count();
    if hidden > BWD_MAX_HIDDEN || g.dtype() != x.dtype() || w.dtype() != x.dtype() {
        return rms_norm_grads_composite(x, w, g, eps);
    }
    let x2 = x.reshape(((), hidden))?.contiguous()?;
    let g2 = g.reshape(((), hidden))?.contiguous()?;
    let rows = x2.dim(0)?;
    let packed = x2.apply_op3_no_bwd(&w.flatten_all()?.contiguous()?, &g2, &RmsNormBwd { eps })?;
    Ok((
        packed.narrow(0, 0, rows)?.reshape(x.shape())?,
        packed.narrow(0, rows, 1)?.reshape(w.shape())?,
    ))
}

/// [`rms_norm_grads`] with candle ops (any device, any dtypes): the reference.
pub fn rms_norm_grads_composite(x: &Tensor, w: &Tensor, g: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    use candle_core::D;
    let hidden = w.elem_count();
    let x32 = x.to_dtype(DType::F32)?.reshape(((), hidden))?;
    let g32 = g.to_dtype(DType::F32)?.reshape(((), hidden))?;
    let w32 = w.to_dtype(DType::F32)?;
    let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?.sqrt()?.recip()?;
    let gw = g32.broadcast_mul(&w32)?;
    let dot = (&gw * &x32)?.mean_keepdim(D::Minus1)?;
    let dx = (gw.broadcast_mul(&r)? - x32.broadcast_mul(&(r.powf(3.0)? * dot)?)?)?;
    let dw = (g32 * x32.broadcast_mul(&r)?)?.sum(0)?;
    Ok((
        dx.reshape(x.shape())?.to_dtype(x.dtype())?,
        dw.reshape(w.shape())?.to_dtype(w.dtype())?,
    ))
}

/// `(rows, hidden)` of the backward's inputs, checked to fit together (both backends).
pub(crate) fn bwd_dims(xl: &Layout, wl: &Layout, gl: &Layout) -> Result<(usize, usize)> {
    let (rows, hidden) = xl.shape().dims2()?;
    if wl.shape().elem_count() != hidden || gl.shape() != xl.shape() {
        candle_core::bail!(
            "rms_norm_bwd: x {:?}, w {:?}, g {:?} do not match",
            xl.shape(),
            wl.shape(),
            gl.shape()
        );
    }
    Ok((rows, hidden))
}

/// The RMSNorm backward as one op on `(x [rows, hidden], w [hidden], g [rows, hidden])`,
/// one dtype: `[rows + 1, hidden]` in that dtype, the rows of dx then dw (computed in
/// f32, rounded once).
struct RmsNormBwd {
    eps: f32,
}

fn cpu_rms_norm_bwd<T: Elem>(x: &[T], w: &[T], g: &[T], eps: f32) -> Vec<T> {
    let hidden = w.len();
    let rows = x.len() / hidden;
    let mut out = vec![0f32; (rows + 1) * hidden];
    let (dx, dw) = out.split_at_mut(rows * hidden);
    for ((xr, gr), dr) in x.chunks(hidden).zip(g.chunks(hidden)).zip(dx.chunks_mut(hidden)) {
        let ss: f32 = xr.iter().map(|v| v.to_f32() * v.to_f32()).sum();
        let dot: f32 = xr
            .iter()
            .zip(gr)
            .zip(w)
            .map(|((xv, gv), wv)| gv.to_f32() * wv.to_f32() * xv.to_f32())
            .sum();
        let inv = 1.0 / (ss / hidden as f32 + eps).sqrt();
        let c = inv * inv * inv * (dot / hidden as f32);
        for j in 0..hidden {
            let (xv, gv) = (xr[j].to_f32(), gr[j].to_f32());
            dr[j] = inv * gv * w[j].to_f32() - xv * c;
            dw[j] += gv * xv * inv;
        }
    }
    out.into_iter().map(T::from_f32).collect()
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms_norm_bwd"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        const OP: &str = "rms_norm_bwd";
        let (rows, hidden) = bwd_dims(xl, wl, gl)?;
        fn go<T: Elem + WithDType>(
            x: &CpuStorage,
            xl: &Layout,
            w: &CpuStorage,
            wl: &Layout,
            g: &CpuStorage,
            gl: &Layout,
            eps: f32,
        ) -> Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(cpu_rms_norm_bwd(
                contiguous(x.as_slice::<T>()?, xl, OP, "x")?,
                contiguous(w.as_slice::<T>()?, wl, OP, "w")?,
                contiguous(g.as_slice::<T>()?, gl, OP, "g")?,
                eps,
            )))
        }
        let out = match (x.dtype(), w.dtype(), g.dtype()) {
            (DType::F32, DType::F32, DType::F32) => go::<f32>(x, xl, w, wl, g, gl, self.eps)?,
            (DType::F16, DType::F16, DType::F16) => go::<half::f16>(x, xl, w, wl, g, gl, self.eps)?,
            (DType::BF16, DType::BF16, DType::BF16) => go::<half::bf16>(x, xl, w, wl, g, gl, self.eps)?,
            d => candle_core::bail!("{OP}: dtypes {d:?}: one of f32/f16/bf16 expected"),
        };
        Ok((out, Shape::from((rows + 1, hidden))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::rms_norm_bwd(x, xl, w, wl, g, gl, self.eps)
    }
}

struct AddRmsNorm {
    eps: f32,
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add_rms_norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        r: &CpuStorage,
        rl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match x.dtype() {
            DType::F32 => cpu_add_rms_norm::<f32>(x, xl, r, rl, w, wl, self.eps)?,
            DType::F16 => cpu_add_rms_norm::<half::f16>(x, xl, r, rl, w, wl, self.eps)?,
            DType::BF16 => cpu_add_rms_norm::<half::bf16>(x, xl, r, rl, w, wl, self.eps)?,
            d => candle_core::bail!("add_rms_norm: {d:?} is not supported (f32/f16/bf16)"),
        };
        Ok((out, stacked(xl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        r: &candle_core::CudaStorage,
        rl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::rms_norm(x, xl, Some((r, rl)), w, wl, self.eps)
    }
}

/// `[2, ..x]`: the shape of an op's two results stacked in one output (`add_rms_norm`'s
/// sum then normed rows; SwiGLU's two gradients).
pub(crate) fn stacked(xl: &Layout) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(xl.dims());
    Shape::from(dims)
}

/// RMSNorm of `x` (`[.., hidden]`) with weight `w` (`[hidden]`, x's dtype).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    check(x, None, w)?;
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

/// `(s, rms_norm(s, w, eps))` with `s = x + residual` (in x's dtype). Inference: one
/// pass, both views of one `[2, ..x]` buffer. Training (any input carries gradient): the
/// add, then [`rms_norm`] with its fused backward; two separate tensors, so the backward
/// neither zero-pads each view's gradient back to the stacked shape (a memset, a copy
/// and a full add per view, twice per layer) nor recomputes the sum.
pub fn add_rms_norm(x: &Tensor, residual: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    check(x, Some(residual), w)?;
    if x.track_op() || residual.track_op() || w.track_op() {
        let s = (x + residual)?;
        let n = rms_norm(&s, w, eps)?;
        return Ok((s, n));
    }
    let out = x
        .contiguous()?
        .apply_op3_no_bwd(&residual.contiguous()?, &w.contiguous()?, &AddRmsNorm { eps })?;
    Ok((out.get(0)?, out.get(1)?))
}
