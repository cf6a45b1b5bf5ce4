//! `adamw_update`: one AdamW step of an f32 variable in place, in two ops (one kernel
//! each on CUDA, `kernels/adamw.cu`) instead of the ~15 candle ops the same math takes:
//! the moments `mv` (`[2, …]`: m then v) from the gradient, then the variable from them.
//! Both read and write each element once, with no temporaries.
//!
//! The CPU path below is the reference: the same f32 operations in the order candle's
//! ops take them (scalars rounded from f64 to f32 as `affine` does), so it equals
//! `candle_nn::AdamW` bit for bit (`train::adamw`'s test) and the kernel equals it.
//! Candle's `x * c` is `affine(c, 0)`, `x·c + 0`: the `+ 0` only turns a −0 into +0,
//! which no comparison or later step tells apart, so it is left out here.

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor};

/// The step's scalars in f32. kernels/adamw.cuh: `struct Scalars`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Scalars {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    /// The bias corrections `1 / (1 − βᵗ)`.
    scale_m: f32,
    scale_v: f32,
    eps: f32,
    /// Decoupled weight decay's factor `1 − lr·wd`.
    decay: f32,
    lr: f32,
    /// Gradient clipping's factor, applied as the gradient is read (1 when not clipping).
    grad_scale: f32,
}

#[cfg(feature = "cuda")]
// SAFETY: plain `#[repr(C)]` f32 fields, the kernel's struct layout.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for Scalars {}
const _: () = assert!(std::mem::size_of::<Scalars>() == 40);

impl Scalars {
    /// Update number `step` (1-based, the bias correction's t) with these settings; each
    /// scalar computed in f64 and rounded once, as candle's ops round theirs.
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, step: usize) -> Self {
        let t = step as i32;
        Scalars {
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            scale_m: (1.0 / (1.0 - beta1.powi(t))) as f32,
            scale_v: (1.0 / (1.0 - beta2.powi(t))) as f32,
            eps: eps as f32,
            decay: (1.0 - lr * weight_decay) as f32,
            lr: lr as f32,
            grad_scale: 1.0,
        }
    }

    /// The gradient read as `g · scale` (rounded to f32 as candle's `g * scale` rounds
    /// it): clipping folded into the update instead of a scaled copy of every gradient.
    pub fn with_grad_scale(self, scale: f64) -> Self {
        Scalars {
            grad_scale: scale as f32,
            ..self
        }
    }

    fn moments(&self, m: &mut [f32], v: &mut [f32], g: &[f32]) {
        for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
            let g = g * self.grad_scale;
            *m = *m * self.beta1 + g * self.one_minus_beta1;
            *v = *v * self.beta2 + (g * g) * self.one_minus_beta2;
        }
    }

    fn params(&self, theta: &mut [f32], m: &[f32], v: &[f32]) {
        for ((x, &m), &v) in theta.iter_mut().zip(m).zip(v) {
            let (m_hat, v_hat) = (m * self.scale_m, v * self.scale_v);
            let step = m_hat / (v_hat.sqrt() + self.eps);
            *x = *x * self.decay - step * self.lr;
        }
    }
}

/// The moments: dst `mv` (`[2·n]`), src the gradient (`[n]`).
struct Moments(Scalars);
/// The variable: dst θ (`[n]`), src the updated `mv`.
struct Params(Scalars);

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str, what: &str) -> Result<&'a [f32]> {
    super::contiguous(s.as_slice::<f32>()?, l, op, what)
}

fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str, what: &str) -> Result<&'a mut [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} must be contiguous")))?;
    match s {
        CpuStorage::F32(d) => Ok(&mut d[a..b]),
        _ => candle_core::bail!("{op}: {what} must be f32"),
    }
}

impl InplaceOp2 for Moments {
    fn name(&self) -> &'static str {
        "adamw_moments"
    }
    fn cpu_fwd(&self, mv: &mut CpuStorage, ml: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let g = f32_slice(g, gl, self.name(), "the gradient")?;
        let (m, v) = f32_slice_mut(mv, ml, self.name(), "the moments")?.split_at_mut(g.len());
        self.0.moments(m, v, g);
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        mv: &mut candle_core::CudaStorage,
        ml: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        cuda::launch("adamw_moments", mv, ml, g, gl, self.0)
    }
}

impl InplaceOp2 for Params {
    fn name(&self) -> &'static str {
        "adamw_params"
    }
    fn cpu_fwd(&self, theta: &mut CpuStorage, tl: &Layout, mv: &CpuStorage, ml: &Layout) -> Result<()> {
        let theta = f32_slice_mut(theta, tl, self.name(), "the variable")?;
        let (m, v) = f32_slice(mv, ml, self.name(), "the moments")?.split_at(theta.len());
        self.0.params(theta, m, v);
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        theta: &mut candle_core::CudaStorage,
        tl: &Layout,
        mv: &candle_core::CudaStorage,
        ml: &Layout,
    ) -> Result<()> {
        cuda::launch("adamw_params", theta, tl, mv, ml, self.0)
    }
}

/// One AdamW update in place: `moments` (f32 `[2, …theta's dims]`, m then v) from `grad`,
/// then `theta` (f32) from them. Not differentiable (an optimizer step).
pub fn adamw_update(theta: &Tensor, moments: &Tensor, grad: &Tensor, s: &Scalars) -> Result<()> {
    const OP: &str = "adamw_update";
    let n = theta.elem_count();
    if grad.elem_count() != n || moments.elem_count() != 2 * n {
        candle_core::bail!(
            "{OP}: variable {:?}, gradient {:?} and moments {:?} do not match",
            theta.dims(),
            grad.dims(),
            moments.dims()
        );
    }
    if n == 0 {
        return Ok(()); // nothing to update (and candle's in-place ops refuse empty layouts)
    }
    for (t, what) in [(theta, "variable"), (moments, "moments"), (grad, "gradient")] {
        if t.dtype() != DType::F32 {
            candle_core::bail!("{OP}: the {what} is {:?} (f32 only)", t.dtype());
        }
        if !t.device().same_device(theta.device()) {
            candle_core::bail!("{OP}: variable, moments and gradient must be on one device");
        }
    }
    if !theta.is_contiguous() || !moments.is_contiguous() {
        candle_core::bail!("{OP}: the variable and its moments must be contiguous");
    }
    moments.inplace_op2(&grad.contiguous()?, &Moments(*s))?;
    theta.inplace_op2(moments, &Params(*s))
}

/// [`adamw_update`] for mixed precision: `theta` is the f32 master, `copy` the compute
/// copy (bf16/f16, same shape) the model reads and `grad` is in (the copy's dtype). The
/// gradient is read as f32 (exact), the master and moments updated exactly as
/// [`adamw_update`] updates them, then `copy` becomes the new master rounded to its
/// dtype. On CUDA all of it is one kernel, one pass over the five tensors; on the CPU it
/// is the reference: the f32 update, then a cast.
pub fn adamw_update_mixed(theta: &Tensor, moments: &Tensor, copy: &Tensor, grad: &Tensor, s: &Scalars) -> Result<()> {
    check_mixed(theta, copy, grad)?;
    if theta.elem_count() == 0 {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if theta.device().is_cuda() {
        return cuda::mixed(theta, moments, copy, &grad.contiguous()?, s);
    }
    adamw_update(theta, moments, &grad.to_dtype(DType::F32)?, s)?;
    copy.inplace_op2(theta, &CastInto)
}

/// One variable of [`adamw_update_mixed_many`]: master, moments, compute copy, gradient.
pub type MixedUpdate<'a> = (&'a Tensor, &'a Tensor, &'a Tensor, &'a Tensor);

/// [`adamw_update_mixed`] of many variables: on CUDA one launch for all of them whose
/// copies share a dtype (`adamw_mixed_many_*`; a training step updates every variable,
/// and one launch each spent most of the small ones' time in launch and tail), with the
/// same results bit for bit; elsewhere one by one.
pub fn adamw_update_mixed_many(items: &[MixedUpdate], s: &Scalars) -> Result<()> {
    for &(theta, _, copy, grad) in items {
        check_mixed(theta, copy, grad)?;
    }
    #[cfg(feature = "cuda")]
    if let Some(&(first, _, copy, _)) = items.first() {
        if items
            .iter()
            .all(|(t, _, c, _)| t.device().is_cuda() && c.dtype() == copy.dtype())
            && first.device().is_cuda()
        {
            return cuda::mixed_many(items, s);
        }
    }
    for &(theta, moments, copy, grad) in items {
        adamw_update_mixed(theta, moments, copy, grad, s)?;
    }
    Ok(())
}

fn check_mixed(theta: &Tensor, copy: &Tensor, grad: &Tensor) -> Result<()> {
    const OP: &str = "adamw_update_mixed";
    if copy.dims() != theta.dims() || grad.elem_count() != theta.elem_count() {
        candle_core::bail!(
            "{OP}: variable {:?}, compute copy {:?} and gradient {:?} do not match",
            theta.dims(),
            copy.dims(),
            grad.dims()
        );
    }
    if !matches!(copy.dtype(), DType::BF16 | DType::F16) || grad.dtype() != copy.dtype() {
        candle_core::bail!(
            "{OP}: a bf16/f16 compute copy and a gradient of its dtype expected, got {:?} and {:?}",
            copy.dtype(),
            grad.dtype()
        );
    }
    if !copy.is_contiguous() {
        candle_core::bail!("{OP}: the compute copy must be contiguous");
    }
    Ok(())
}

/// `dst ← src` rounded to dst's dtype, in place (the CPU path of the compute copy's
/// refresh; the CUDA kernel writes it as it updates the master).
struct CastInto;

impl InplaceOp2 for CastInto {
    fn name(&self) -> &'static str {
        "cast_into"
    }
    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, src: &CpuStorage, sl: &Layout) -> Result<()> {
        let src = f32_slice(src, sl, self.name(), "the variable")?;
        let (a, b) = dl
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("cast_into: the copy must be contiguous".into()))?;
        match dst {
            CpuStorage::BF16(d) => d[a..b]
                .iter_mut()
                .zip(src)
                .for_each(|(d, &x)| *d = half::bf16::from_f32(x)),
            CpuStorage::F16(d) => d[a..b]
                .iter_mut()
                .zip(src)
                .for_each(|(d, &x)| *d = half::f16::from_f32(x)),
            _ => candle_core::bail!("cast_into: a bf16/f16 copy expected"),
        }
        Ok(())
    }
}

/// `acc[0] += Σ g²` (`acc` f32 `[1]`, `g` f32/bf16/f16, widened as it is read): one
/// variable's share of gradient clipping's global norm, accumulated on the device (one
/// launch on CUDA, where candle's `sqr` + `sum_all` reduce a whole gradient in a single
/// block). The CPU sums in f64.
pub fn sum_squares_into(acc: &Tensor, g: &Tensor) -> Result<()> {
    sum_squares_many(acc, &[g])
}

/// [`sum_squares_into`] over many tensors: on CUDA one launch per dtype among them
/// (gradient clipping over ~110 gradients took as many launches, 3 % of a training
/// step). The sum's order differs from the one-by-one sums' only by f32 rounding.
pub fn sum_squares_many(acc: &Tensor, gs: &[&Tensor]) -> Result<()> {
    const OP: &str = "sum_squares_into";
    if acc.dtype() != DType::F32
        || acc.elem_count() != 1
        || gs
            .iter()
            .any(|g| !matches!(g.dtype(), DType::F32 | DType::BF16 | DType::F16))
    {
        candle_core::bail!("{OP}: an f32 [1] accumulator and f32/bf16/f16 gradients expected");
    }
    #[cfg(feature = "cuda")]
    if acc.device().is_cuda() {
        if gs.iter().any(|g| !g.device().same_device(acc.device())) {
            candle_core::bail!("{OP}: the accumulator and the gradients must be on one device");
        }
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let of_dtype = gs
                .iter()
                .filter(|g| g.dtype() == dtype)
                .map(|g| g.contiguous())
                .collect::<Result<Vec<_>>>()?;
            if !of_dtype.is_empty() {
                cuda::sum_squares_many(acc, &of_dtype)?;
            }
        }
        return Ok(());
    }
    for g in gs {
        acc.inplace_op2(&g.contiguous()?, &SumSquares)?;
    }
    Ok(())
}

struct SumSquares;

impl InplaceOp2 for SumSquares {
    fn name(&self) -> &'static str {
        "sum_squares_into"
    }
    fn cpu_fwd(&self, acc: &mut CpuStorage, al: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let sum: f64 = match g {
            CpuStorage::BF16(d) => squares(super::contiguous(d, gl, self.name(), "gradient")?, |v| v.to_f64()),
            CpuStorage::F16(d) => squares(super::contiguous(d, gl, self.name(), "gradient")?, |v| v.to_f64()),
            _ => squares(f32_slice(g, gl, self.name(), "gradient")?, |&v| v as f64),
        };
        let acc = f32_slice_mut(acc, al, self.name(), "accumulator")?;
        acc[0] += sum as f32;
        Ok(())
    }
}

fn squares<T>(g: &[T], f: impl Fn(&T) -> f64) -> f64 {
    g.iter().map(|v| f(v) * f(v)).sum()
}

#[cfg(feature = "cuda")]
mod cuda;
