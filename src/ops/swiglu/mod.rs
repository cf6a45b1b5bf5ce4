//! `swiglu(gate, up) = silu(gate) · up`, the gated MLP's activation, as one op with a
//! fused backward: candle's `silu(g) * u` is two kernels forward and about ten
//! elementwise passes backward over `[tokens, ffn]`, the largest activations of a
//! training step (BENCHMARKS.md, "Measurements behind design choices"). Computed in f32,
//! stored in the inputs' dtype. The CPU loops are the reference `kernels/swiglu.cu`
//! must match.

use super::parallel::for_each_chunk_mut;
use super::rms_norm::stacked;
use super::{contiguous, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

const OP: &str = "swiglu";
/// Elements per CPU task.
const TASK_ELEMS: usize = 16 * 1024;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

struct Swiglu;
/// Backward: `(g, u, dy)` → `[2, ..]`: dg, then du.
struct SwigluBwd;

fn cpu_fwd_t<T: Elem + WithDType>(g: &[T], u: &[T]) -> Vec<T> {
    let mut y = vec![T::from_f32(0.0); g.len()];
    for_each_chunk_mut(&mut y, TASK_ELEMS, |i, out| {
        let base = i * TASK_ELEMS;
        for (j, o) in out.iter_mut().enumerate() {
            let gv = g[base + j].to_f32();
            *o = T::from_f32(gv * sigmoid(gv) * u[base + j].to_f32());
        }
    });
    y
}

fn cpu_bwd_t<T: Elem + WithDType>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
    let n = g.len();
    let mut d = vec![T::from_f32(0.0); 2 * n];
    let (dg, du) = d.split_at_mut(n);
    for_each_chunk_mut(dg, TASK_ELEMS, |i, out| {
        let base = i * TASK_ELEMS;
        for (j, o) in out.iter_mut().enumerate() {
            let (gv, uv, dv) = (g[base + j].to_f32(), u[base + j].to_f32(), dy[base + j].to_f32());
            let s = sigmoid(gv);
            *o = T::from_f32(dv * uv * s * (1.0 + gv * (1.0 - s)));
        }
    });
    for_each_chunk_mut(du, TASK_ELEMS, |i, out| {
        let base = i * TASK_ELEMS;
        for (j, o) in out.iter_mut().enumerate() {
            let (gv, dv) = (g[base + j].to_f32(), dy[base + j].to_f32());
            *o = T::from_f32(dv * gv * sigmoid(gv));
        }
    });
    d
}

fn check(a: &Layout, b: &Layout, what: &str) -> Result<()> {
    if a.shape() != b.shape() {
        candle_core::bail!("{OP}: {what} {:?} does not match gate {:?}", b.shape(), a.shape());
    }
    Ok(())
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, g: &CpuStorage, gl: &Layout, u: &CpuStorage, ul: &Layout) -> Result<(CpuStorage, Shape)> {
        check(gl, ul, "up")?;
        fn go<T: Elem + WithDType>(g: &CpuStorage, gl: &Layout, u: &CpuStorage, ul: &Layout) -> Result<CpuStorage> {
            let y = cpu_fwd_t(
                contiguous(g.as_slice::<T>()?, gl, OP, "gate")?,
                contiguous(u.as_slice::<T>()?, ul, OP, "up")?,
            );
            Ok(T::to_cpu_storage_owned(y))
        }
        let out = match (g.dtype(), u.dtype()) {
            (DType::F32, DType::F32) => go::<f32>(g, gl, u, ul)?,
            (DType::F16, DType::F16) => go::<half::f16>(g, gl, u, ul)?,
            (DType::BF16, DType::BF16) => go::<half::bf16>(g, gl, u, ul)?,
            d => candle_core::bail!("{OP}: {d:?}: gate and up of one of f32/f16/bf16 expected"),
        };
        Ok((out, gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        check(gl, ul, "up")?;
        Ok((cuda::run(&[(g, gl), (u, ul)], 1)?, gl.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = g.apply_op3_no_bwd(u, &dy.contiguous()?, &SwigluBwd)?;
        Ok((Some(d.get(0)?), Some(d.get(1)?)))
    }
}

impl CustomOp3 for SwigluBwd {
    fn name(&self) -> &'static str {
        "swiglu_bwd"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
        dy: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check(gl, ul, "up")?;
        check(gl, dl, "dy")?;
        fn go<T: Elem + WithDType>(
            g: &CpuStorage,
            gl: &Layout,
            u: &CpuStorage,
            ul: &Layout,
            dy: &CpuStorage,
            dl: &Layout,
        ) -> Result<CpuStorage> {
            let d = cpu_bwd_t(
                contiguous(g.as_slice::<T>()?, gl, OP, "gate")?,
                contiguous(u.as_slice::<T>()?, ul, OP, "up")?,
                contiguous(dy.as_slice::<T>()?, dl, OP, "dy")?,
            );
            Ok(T::to_cpu_storage_owned(d))
        }
        let out = match (g.dtype(), u.dtype(), dy.dtype()) {
            (DType::F32, DType::F32, DType::F32) => go::<f32>(g, gl, u, ul, dy, dl)?,
            (DType::F16, DType::F16, DType::F16) => go::<half::f16>(g, gl, u, ul, dy, dl)?,
            (DType::BF16, DType::BF16, DType::BF16) => go::<half::bf16>(g, gl, u, ul, dy, dl)?,
            d => candle_core::bail!("{OP}: {d:?}: gate, up and dy of one of f32/f16/bf16 expected"),
        };
        Ok((out, stacked(gl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
        dy: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        check(gl, ul, "up")?;
        check(gl, dl, "dy")?;
        Ok((cuda::run(&[(g, gl), (u, ul), (dy, dl)], 2)?, stacked(gl)))
    }
}

/// `silu(gate) · up`, differentiable (fused backward).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

/// `silu(gu[:, :f]) · gu[:, f:]` of one fused gate/up projection `gu` `[rows, 2f]` (the
/// MLP's: one matmul for gate and up, in serving and training). Differentiable (the
/// halves' gradients side by side).
pub fn swiglu_packed(gu: &Tensor) -> Result<Tensor> {
    let (_, two_f) = gu.dims2()?;
    if two_f % 2 != 0 {
        candle_core::bail!("{OP}: a fused gate/up projection has an even width, not {two_f}");
    }
    gu.contiguous()?.apply_op1(SwigluPacked)
}

struct SwigluPacked;

impl candle_core::CustomOp1 for SwigluPacked {
    fn name(&self) -> &'static str {
        "swiglu_packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, two_f) = l.shape().dims2()?;
        let f = two_f / 2;
        // The reference: gate and up split out, then the unfused forward.
        fn go<T: Elem + WithDType>(s: &CpuStorage, l: &Layout, f: usize) -> Result<CpuStorage> {
            let gu = contiguous(s.as_slice::<T>()?, l, OP, "gu")?;
            let (g, u): (Vec<T>, Vec<T>) = gu
                .chunks_exact(2 * f.max(1))
                .flat_map(|row| row[..f].iter().copied().zip(row[f..].iter().copied()))
                .unzip();
            Ok(T::to_cpu_storage_owned(cpu_fwd_t(&g, &u)))
        }
        let out = match s.dtype() {
            DType::F32 => go::<f32>(s, l, f)?,
            DType::F16 => go::<half::f16>(s, l, f)?,
            DType::BF16 => go::<half::bf16>(s, l, f)?,
            d => candle_core::bail!("{OP}: {d:?}: gu of one of f32/f16/bf16 expected"),
        };
        Ok((out, Shape::from((rows, f))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, two_f) = l.shape().dims2()?;
        Ok((cuda::packed(s, l, rows, two_f / 2)?, Shape::from((rows, two_f / 2))))
    }

    /// The gradient packed as `gu` is (dgate columns, then dup), in one pass: no copies
    /// of the halves in or out (four `[rows, f]` copies per layer when split and
    /// concatenated).
    fn bwd(&self, gu: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gu.apply_op2_no_bwd(&dy.contiguous()?, &SwigluPackedBwd)?))
    }
}

/// `(gu [rows, 2f], dy [rows, f])` → `[rows, 2f]`: dgate then dup in each row.
struct SwigluPackedBwd;

impl CustomOp2 for SwigluPackedBwd {
    fn name(&self) -> &'static str {
        "swiglu_packed_bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, dy: &CpuStorage, dl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, two_f) = l.shape().dims2()?;
        let f = two_f / 2;
        if dl.shape().dims2()? != (rows, f) {
            candle_core::bail!("{OP}: dy {:?} does not fit gu {:?}", dl.shape(), l.shape());
        }
        // The reference: the halves split out, the unfused backward, the rows put back.
        fn go<T: Elem + WithDType>(
            s: &CpuStorage,
            l: &Layout,
            dy: &CpuStorage,
            dl: &Layout,
            f: usize,
        ) -> Result<CpuStorage> {
            let gu = contiguous(s.as_slice::<T>()?, l, OP, "gu")?;
            let (g, u): (Vec<T>, Vec<T>) = gu
                .chunks_exact(2 * f.max(1))
                .flat_map(|row| row[..f].iter().copied().zip(row[f..].iter().copied()))
                .unzip();
            let d = cpu_bwd_t(&g, &u, contiguous(dy.as_slice::<T>()?, dl, OP, "dy")?);
            let (dg, du) = d.split_at(g.len());
            let packed = dg
                .chunks(f.max(1))
                .zip(du.chunks(f.max(1)))
                .flat_map(|(a, b)| a.iter().chain(b).copied())
                .collect();
            Ok(T::to_cpu_storage_owned(packed))
        }
        let out = match (s.dtype(), dy.dtype()) {
            (DType::F32, DType::F32) => go::<f32>(s, l, dy, dl, f)?,
            (DType::F16, DType::F16) => go::<half::f16>(s, l, dy, dl, f)?,
            (DType::BF16, DType::BF16) => go::<half::bf16>(s, l, dy, dl, f)?,
            d => candle_core::bail!("{OP}: {d:?}: gu and dy of one of f32/f16/bf16 expected"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        dy: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, two_f) = l.shape().dims2()?;
        if dl.shape().dims2()? != (rows, two_f / 2) || dy.dtype() != s.dtype() {
            candle_core::bail!("{OP}: dy {:?} does not fit gu {:?}", dl.shape(), l.shape());
        }
        Ok((cuda::packed_bwd(s, l, dy, dl, rows, two_f / 2)?, l.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda;
