//! `causal_attention`: fused causal multi-head attention for training, forward and
//! backward (flash-attention-2 style on CUDA: `kernels/flash_attention.cu`, launched by
//! `cuda.rs`). The CPU paths below are the f32-accumulating references the
//! kernels must match.
//!
//! q is `[b, t, heads, d]`, k and v `[b, t, kv_heads, d]` with `heads` a multiple of
//! `kv_heads` (MHA, GQA, MQA: query head `h` reads KV head `h / (heads / kv_heads)`);
//! query row i attends to keys 0..=i. The output is `[b, t, heads, d]` in q's dtype.
//!
//! Backward: the forward saves each row's logsumexp (LSE, f32) as FA2 does, in the op
//! instance that candle's autograd graph keeps for `bwd` (a custom op has one output,
//! and an f32 LSE packed into a bf16 output would not survive; recomputing it would cost
//! another Q·Kᵀ pass). `bwd` gets O back as the op's result and runs a second op whose
//! one output is `[dq | dk | dv]` flat in q's dtype; dK, dV of a KV head are summed over
//! the query heads of its group. On CUDA nothing is O(t²): besides LSE and rowsum(dO·O)
//! per row, only f32 buffers for dK and dV when a GQA/MQA group is split over CTAs
//! (`cuda.rs`).
//!
//! Packed forms for training's fused projection: [`causal_attention_packed`] reads q, k
//! and v as head slices of one `[b, t, heads + 2·kv_heads, d]` tensor, and
//! [`causal_attention_shared_kv`] (a CLA consumer) reads k and v from another layer's;
//! the kernels take each operand's row stride, and the backward writes the gradient in
//! the inputs' own layouts (one packed gradient, no padded slices to sum).
//!
//! Which path runs: the op on the CPU (f32/f16/bf16) and on CUDA for f16/bf16 with
//! head_dim 64 or 128. Anything else on CUDA (f32 inputs, other head dims) and other
//! devices take [`causal_attention_composite`]: candle ops in f32 (expand the KV heads,
//! Q·Kᵀ, masked softmax, ·V), differentiable by candle's autograd, with O(t²) memory.
//!
//! Over 600 lines on purpose: the forward and backward CPU references and the custom ops
//! around them share one layout vocabulary (`Rows`, `GradLayout`, the packed forms); the
//! kernels' launches are in `cuda.rs`.

use super::parallel::for_each_chunk_mut;
use super::{contiguous, Elem};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor, Var, WithDType,
};
use std::sync::Mutex;

#[cfg(feature = "cuda")]
mod cuda;

const OP: &str = "causal_attention";

/// The shapes of one call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
}

impl Dims {
    fn of(q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
        let (b, t, heads, d) = q.shape().dims4()?;
        let kv_heads = k.dims().get(2).copied().unwrap_or(0);
        if k.dims() != [b, t, kv_heads, d] || v.dims() != k.dims() || kv_heads == 0 || heads % kv_heads != 0 {
            candle_core::bail!(
                "{OP}: q {:?}, k {:?}, v {:?}; [b, t, heads, d] and [b, t, kv_heads, d] with heads a multiple of kv_heads expected",
                q.shape(),
                k.shape(),
                v.shape()
            );
        }
        Ok(Dims {
            b,
            t,
            heads,
            kv_heads,
            d,
        })
    }
    pub(crate) fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    pub(crate) fn q_len(&self) -> usize {
        self.b * self.t * self.heads * self.d
    }
    pub(crate) fn kv_len(&self) -> usize {
        self.b * self.t * self.kv_heads * self.d
    }
}

/// Causal attention of `q` (`[b, t, heads, d]`) over `k`, `v` (`[b, t, kv_heads, d]`),
/// scores scaled by `scale` (usually `1/sqrt(d)`); differentiable in q, k and v. See the
/// module docs for which path runs where.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    if !fused(q, k, v)? {
        return causal_attention_composite(q, k, v, scale);
    }
    if q.elem_count() == 0 {
        return q.zeros_like();
    }
    let op = FlashAttn {
        scale,
        lse: Mutex::new(None),
    };
    aligned(q)?.apply_op3(&aligned(k)?, &aligned(v)?, op)
}

/// The forward and the gradients for a given `dout` (dL/d out, q's shape and dtype) in
/// one call, without candle's autograd: `(out, dq, dk, dv)`. The same ops as
/// [`causal_attention`] and its backward; the benchmark times the kernels with it.
pub fn causal_attention_with_grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    if dout.shape() != q.shape() || dout.dtype() != q.dtype() {
        candle_core::bail!("{OP}: dout {:?} {:?} does not match q", dout.shape(), dout.dtype());
    }
    if !fused(q, k, v)? || q.elem_count() == 0 {
        let [q, k, v] = [q, k, v].map(|x| Var::from_tensor(&x.detach()));
        let (q, k, v) = (q?, k?, v?);
        let out = causal_attention_composite(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale)?;
        let grads = (out.to_dtype(DType::F32)? * dout.to_dtype(DType::F32)?)?
            .sum_all()?
            .backward()?;
        let g = |x: &Var| match grads.get(x.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => x.as_tensor().zeros_like(),
        };
        return Ok((out, g(&q)?, g(&k)?, g(&v)?));
    }
    let op = FlashAttn {
        scale,
        lse: Mutex::new(None),
    };
    let (q, k, v) = (aligned(q)?, aligned(k)?, aligned(v)?);
    let out = q.apply_op3_no_bwd(&k, &v, &op)?;
    let (dq, dk, dv) = op.grads(&q, &k, &v, &out, dout)?;
    Ok((out, dq, dk, dv))
}

/// Checks the inputs; whether the fused op runs (else the composite).
fn fused(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<bool> {
    Dims::of(q.layout(), k.layout(), v.layout())?;
    let dtype = q.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) || k.dtype() != dtype || v.dtype() != dtype {
        candle_core::bail!(
            "{OP}: q, k, v are {:?}, {:?}, {:?}; one of f32, f16, bf16 expected",
            dtype,
            k.dtype(),
            v.dtype()
        );
    }
    if !k.device().same_device(q.device()) || !v.device().same_device(q.device()) {
        candle_core::bail!("{OP}: q, k and v must be on one device");
    }
    Ok(match q.device() {
        Device::Cpu => true,
        Device::Cuda(_) => dtype != DType::F32 && matches!(q.dim(3)?, 64 | 128),
        _ => false,
    })
}

/// The same attention from candle ops in f32 (O(t²) memory): the fallback where the
/// fused op has no kernel, and the formulation the op replaced in the model.
pub fn causal_attention_composite(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    let d = Dims::of(q.layout(), k.layout(), v.layout())?;
    // [b, t, kv_heads, d] → [b, heads, t, d], each KV head serving `group` query heads.
    let expand = |m: &Tensor| -> Result<Tensor> {
        m.to_dtype(DType::F32)?
            .transpose(1, 2)?
            .contiguous()?
            .unsqueeze(2)?
            .expand((d.b, d.kv_heads, d.group(), d.t, d.d))?
            .reshape((d.b, d.heads, d.t, d.d))
    };
    let (k32, v32) = (expand(k)?, expand(v)?);
    let q32 = q.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous()?;
    let mask: Vec<f32> = (0..d.t)
        .flat_map(|i| (0..d.t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (d.t, d.t), q.device())?;
    let scores = (q32.matmul(&k32.transpose(2, 3)?.contiguous()?)? * scale as f64)?;
    // candle_nn's softmax is differentiable (its fused softmax_last_dim has no backward).
    let p = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, candle_core::D::Minus1)?;
    p.matmul(&v32)?.transpose(1, 2)?.to_dtype(q.dtype())?.contiguous()
}

/// Contiguous and 16-byte aligned (what the kernels' vector loads need); a copy if not.
fn aligned(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() && (t.layout().start_offset() * t.dtype().size_in_bytes()).is_multiple_of(16) {
        Ok(t.clone())
    } else {
        t.force_contiguous()
    }
}

/// The forward op; `lse` is what it saves for the backward: f32 `[b, t, heads]` on the
/// CPU, `[b, heads, t rounded up to 64]` on CUDA.
struct FlashAttn {
    scale: f32,
    lse: Mutex<Option<Tensor>>,
}

impl FlashAttn {
    fn save(&self, lse: Tensor) {
        *self.lse.lock().expect("causal_attention lse") = Some(lse);
    }
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(ql, kl, vl)?;
        fn run<T: Elem + WithDType>(
            d: Dims,
            scale: f32,
            x: [(&CpuStorage, &Layout); 3],
        ) -> Result<(CpuStorage, Vec<f32>)> {
            let [q, k, v] = x.map(|(s, l)| to_f32::<T>(s, l));
            let (o, lse) = cpu_forward(&q?, &k?, &v?, d, scale);
            Ok((T::to_cpu_storage_owned(o.into_iter().map(T::from_f32).collect()), lse))
        }
        let x = [(q, ql), (k, kl), (v, vl)];
        let (out, lse) = match q.dtype() {
            DType::F32 => run::<f32>(d, self.scale, x)?,
            DType::F16 => run::<half::f16>(d, self.scale, x)?,
            DType::BF16 => run::<half::bf16>(d, self.scale, x)?,
            dt => candle_core::bail!("{OP}: {dt:?} is not supported (f32/f16/bf16)"),
        };
        self.save(Tensor::from_vec(lse, (d.b, d.t, d.heads), &Device::Cpu)?);
        Ok((out, ql.shape().clone()))
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
        let d = Dims::of(ql, kl, vl)?;
        let (q, k, v) = (
            Rows::contiguous(q, ql, d.heads * d.d, "q")?,
            Rows::contiguous(k, kl, d.kv_heads * d.d, "k")?,
            Rows::contiguous(v, vl, d.kv_heads * d.d, "v")?,
        );
        let (out, lse, lse_shape) = cuda::forward(d, self.scale, q, k, v)?;
        self.save(Tensor::from_storage(
            Storage::Cuda(lse),
            lse_shape,
            candle_core::op::BackpropOp::none(),
            false,
        ));
        Ok((out, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = self.grads(q, k, v, res, g)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl FlashAttn {
    /// dq, dk, dv from the forward's inputs, its output `o` and dL/dO `g`.
    fn grads(&self, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let saved = self.lse.lock().expect("causal_attention lse").clone();
        let lse = match saved {
            Some(lse) => lse,
            None => {
                // Not expected (the forward saves it); recompute rather than fail.
                let f = FlashAttn {
                    scale: self.scale,
                    lse: Mutex::new(None),
                };
                q.apply_op3_no_bwd(k, v, &f)?;
                let lse = f.lse.lock().expect("causal_attention lse").take();
                lse.ok_or_else(|| candle_core::Error::Msg(format!("{OP}: no LSE saved")))?
            }
        };
        let op = FlashAttnBwd {
            scale: self.scale,
            o: aligned(&o.detach())?,
            g: aligned(&g.detach())?,
            lse,
        };
        let d = Dims::of(q.layout(), k.layout(), v.layout())?;
        let flat = q.apply_op3_no_bwd(k, v, &op)?;
        let (nq, nk) = (d.q_len(), d.kv_len());
        Ok((
            flat.narrow(0, 0, nq)?.reshape(q.shape())?,
            flat.narrow(0, nq, nk)?.reshape(k.shape())?,
            flat.narrow(0, nq + nk, nk)?.reshape(v.shape())?,
        ))
    }
}

/// The backward op: inputs q, k, v; O, dO and the forward's LSE ride along. Output
/// `[dq | dk | dv]` flat, in q's dtype.
struct FlashAttnBwd {
    scale: f32,
    o: Tensor,
    g: Tensor,
    lse: Tensor,
}

impl CustomOp3 for FlashAttnBwd {
    fn name(&self) -> &'static str {
        "causal_attention_bwd"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(ql, kl, vl)?;
        let (os, ol) = self.o.storage_and_layout();
        let (gs, gl) = self.g.storage_and_layout();
        let (ls, ll) = self.lse.storage_and_layout();
        let (Storage::Cpu(os), Storage::Cpu(gs), Storage::Cpu(ls)) = (&*os, &*gs, &*ls) else {
            candle_core::bail!("{OP}: the saved O, dO and LSE must be on the CPU");
        };
        if ol.shape() != ql.shape() || gl.shape() != ql.shape() || ll.dims() != [d.b, d.t, d.heads] {
            candle_core::bail!("{OP}: O {:?} / dO {:?} / LSE {:?} do not fit q {:?}", ol, gl, ll, ql);
        }
        let lse = contiguous(ls.as_slice::<f32>()?, ll, OP, "lse")?;
        fn run<T: Elem + WithDType>(
            d: Dims,
            scale: f32,
            x: [(&CpuStorage, &Layout); 5],
            lse: &[f32],
        ) -> Result<CpuStorage> {
            let [q, k, v, o, g] = x.map(|(s, l)| to_f32::<T>(s, l));
            let out = cpu_backward(&q?, &k?, &v?, &o?, &g?, lse, d, scale);
            Ok(T::to_cpu_storage_owned(out.into_iter().map(T::from_f32).collect()))
        }
        let x = [(q, ql), (k, kl), (v, vl), (os, ol), (gs, gl)];
        let out = match q.dtype() {
            DType::F32 => run::<f32>(d, self.scale, x, lse)?,
            DType::F16 => run::<half::f16>(d, self.scale, x, lse)?,
            DType::BF16 => run::<half::bf16>(d, self.scale, x, lse)?,
            dt => candle_core::bail!("{OP}: {dt:?} is not supported (f32/f16/bf16)"),
        };
        Ok((out, Shape::from(d.q_len() + 2 * d.kv_len())))
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
        let d = Dims::of(ql, kl, vl)?;
        let rows = [
            Rows::contiguous(q, ql, d.heads * d.d, "q")?,
            Rows::contiguous(k, kl, d.kv_heads * d.d, "k")?,
            Rows::contiguous(v, vl, d.kv_heads * d.d, "v")?,
        ];
        saved_backward(d, self.scale, rows, &self.o, &self.g, &self.lse, GradLayout::flat(d))
    }
}

// ------------------------------------------------------------ the kernels' operands (CUDA)

/// One input of the kernels: row `r` of the `[b·t, heads·d]` rows of q (or k, v) starts
/// at element `offset + r·stride` of `s` (checked against the storage by the launch).
#[cfg(feature = "cuda")]
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    pub s: &'a candle_core::CudaStorage,
    pub offset: usize,
    pub stride: usize,
}

#[cfg(feature = "cuda")]
impl Rows<'_> {
    /// The whole of a contiguous tensor of rows `width` wide.
    pub(crate) fn contiguous<'a>(
        s: &'a candle_core::CudaStorage,
        l: &Layout,
        width: usize,
        what: &str,
    ) -> Result<Rows<'a>> {
        let (offset, _) = crate::ops::cuda::contiguous(l, OP, what)?;
        Ok(Rows {
            s,
            offset,
            stride: width,
        })
    }
}

/// Where the backward writes: one buffer of `len` elements holding dq, dk and dv at
/// (offset, row stride) each. `zeroed`: the buffer starts as zeros, for elements no
/// kernel writes (a packed input's other heads).
#[cfg(feature = "cuda")]
#[derive(Clone, Copy, Debug)]
pub(crate) struct GradLayout {
    pub len: usize,
    pub dq: (usize, usize),
    pub dk: (usize, usize),
    pub dv: (usize, usize),
    pub zeroed: bool,
}

#[cfg(feature = "cuda")]
impl GradLayout {
    /// `[dq | dk | dv]` one after the other, each contiguous.
    pub(crate) fn flat(d: Dims) -> GradLayout {
        let (nq, nk) = (d.q_len(), d.kv_len());
        GradLayout {
            len: nq + 2 * nk,
            dq: (0, d.heads * d.d),
            dk: (nq, d.kv_heads * d.d),
            dv: (nq + nk, d.kv_heads * d.d),
            zeroed: false,
        }
    }
}

/// The CUDA backward with the saved O, dO and LSE (a backward op's `cuda_fwd`).
#[cfg(feature = "cuda")]
fn saved_backward(
    d: Dims,
    scale: f32,
    rows: [Rows; 3],
    o: &Tensor,
    g: &Tensor,
    lse: &Tensor,
    grads: GradLayout,
) -> Result<(candle_core::CudaStorage, Shape)> {
    let (os, ol) = o.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (ls, ll) = lse.storage_and_layout();
    match (&*os, &*gs, &*ls) {
        (Storage::Cuda(o), Storage::Cuda(g), Storage::Cuda(lse)) => {
            cuda::backward(d, scale, rows, (o, ol), (g, gl), (lse, ll), grads)
        }
        _ => candle_core::bail!("{OP}: the saved O, dO and LSE must be on CUDA"),
    }
}

// ------------------------------------------------------------ packed Q/K/V

/// Where one of q, k, v sits among a packed op's inputs (`[b, t, row_heads, d]` each):
/// input `input`, heads `head..head + n`.
#[derive(Clone, Copy, Debug)]
struct Slot {
    input: usize,
    head: usize,
}

/// The inputs of a packed attention op: their heads per row, and where q, k, v sit.
#[derive(Clone, Debug)]
struct Packing {
    row_heads: Vec<usize>,
    q: Slot,
    k: Slot,
    v: Slot,
}

impl Packing {
    /// The op's dims from its inputs' layouts (`[b, t, row_heads, d]` each, one b, t, d).
    fn dims(&self, heads: usize, kv_heads: usize, ls: &[&Layout]) -> Result<Dims> {
        let (b, t, _, d) = ls[0].shape().dims4()?;
        for (l, &rh) in ls.iter().zip(&self.row_heads) {
            if l.dims() != [b, t, rh, d] {
                candle_core::bail!("{OP}: packed input {:?}; [{b}, {t}, {rh}, {d}] expected", l.shape());
            }
        }
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            candle_core::bail!("{OP}: {heads} query heads over {kv_heads} KV heads");
        }
        for (slot, n, what) in [(self.q, heads, "q"), (self.k, kv_heads, "k"), (self.v, kv_heads, "v")] {
            if slot.head + n > self.row_heads[slot.input] {
                candle_core::bail!(
                    "{OP}: {what}'s heads {}..{} are past the input's {}",
                    slot.head,
                    slot.head + n,
                    self.row_heads[slot.input]
                );
            }
        }
        Ok(Dims {
            b,
            t,
            heads,
            kv_heads,
            d,
        })
    }

    /// Element offset of each input's gradient in the backward's one output.
    fn grad_bases(&self, d: Dims) -> Vec<usize> {
        let mut at = 0;
        self.row_heads
            .iter()
            .map(|rh| {
                let base = at;
                at += d.b * d.t * rh * d.d;
                base
            })
            .collect()
    }

    /// The backward's output: each input's gradient in its input's layout, one after
    /// the other; zeros where no head of q, k or v lies.
    #[cfg(feature = "cuda")]
    fn grad_layout(&self, d: Dims) -> GradLayout {
        let bases = self.grad_bases(d);
        let at = |s: Slot| (bases[s.input] + s.head * d.d, self.row_heads[s.input] * d.d);
        let covered: usize = d.heads + 2 * d.kv_heads;
        GradLayout {
            len: self.row_heads.iter().map(|rh| d.b * d.t * rh * d.d).sum(),
            dq: at(self.q),
            dk: at(self.k),
            dv: at(self.v),
            zeroed: covered != self.row_heads.iter().sum::<usize>(),
        }
    }

    /// Heads `slot.head..+n` of contiguous input `x` as f32 `[b, t, n, d]`.
    fn gather(x: &[f32], d: Dims, row_heads: usize, head: usize, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(d.b * d.t * n * d.d);
        for row in x.chunks(row_heads * d.d) {
            out.extend_from_slice(&row[head * d.d..(head + n) * d.d]);
        }
        out
    }

    /// The CPU's q, k, v in f32 from the inputs.
    fn cpu_qkv<T: Elem + WithDType>(&self, d: Dims, xs: &[(&CpuStorage, &Layout)]) -> Result<[Vec<f32>; 3]> {
        let xs: Vec<Vec<f32>> = xs.iter().map(|(s, l)| to_f32::<T>(s, l)).collect::<Result<_>>()?;
        let get = |s: Slot, n: usize| Self::gather(&xs[s.input], d, self.row_heads[s.input], s.head, n);
        Ok([get(self.q, d.heads), get(self.k, d.kv_heads), get(self.v, d.kv_heads)])
    }

    /// The CPU's `[dq | dk | dv]` (the reference backward's layout) into the packed
    /// gradient layout.
    fn scatter(&self, d: Dims, flat: &[f32]) -> Vec<f32> {
        let bases = self.grad_bases(d);
        let mut out = vec![0f32; self.row_heads.iter().map(|rh| d.b * d.t * rh * d.d).sum()];
        let (nq, nk) = (d.q_len(), d.kv_len());
        for (src, slot, n) in [
            (&flat[..nq], self.q, d.heads),
            (&flat[nq..nq + nk], self.k, d.kv_heads),
            (&flat[nq + nk..], self.v, d.kv_heads),
        ] {
            let row = self.row_heads[slot.input] * d.d;
            for (r, part) in src.chunks(n * d.d).enumerate() {
                let at = bases[slot.input] + r * row + slot.head * d.d;
                out[at..at + n * d.d].copy_from_slice(part);
            }
        }
        out
    }
}

/// `cpu_fwd` and `cuda_fwd` of the packed ops (one or two inputs), which hand their
/// inputs as a slice to the type's own `cpu` and `cuda`.
macro_rules! fwd_by_inputs {
    (1) => {
        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
            self.cpu(&[(s, l)])
        }
        #[cfg(feature = "cuda")]
        fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
            self.cuda(&[(s, l)])
        }
    };
    (2) => {
        fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
            self.cpu(&[(s1, l1), (s2, l2)])
        }
        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            s1: &candle_core::CudaStorage,
            l1: &Layout,
            s2: &candle_core::CudaStorage,
            l2: &Layout,
        ) -> Result<(candle_core::CudaStorage, Shape)> {
            self.cuda(&[(s1, l1), (s2, l2)])
        }
    };
}

/// The forward of the packed ops: q, k, v as heads of one or two inputs.
struct FlashAttnPacked {
    scale: f32,
    heads: usize,
    kv_heads: usize,
    packing: Packing,
    lse: Mutex<Option<Tensor>>,
}

impl FlashAttnPacked {
    fn cpu(&self, xs: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
        let ls: Vec<&Layout> = xs.iter().map(|x| x.1).collect();
        let d = self.packing.dims(self.heads, self.kv_heads, &ls)?;
        fn run<T: Elem + WithDType>(
            op: &FlashAttnPacked,
            d: Dims,
            xs: &[(&CpuStorage, &Layout)],
        ) -> Result<(CpuStorage, Vec<f32>)> {
            let [q, k, v] = op.packing.cpu_qkv::<T>(d, xs)?;
            let (o, lse) = cpu_forward(&q, &k, &v, d, op.scale);
            Ok((T::to_cpu_storage_owned(o.into_iter().map(T::from_f32).collect()), lse))
        }
        let (out, lse) = match xs[0].0.dtype() {
            DType::F32 => run::<f32>(self, d, xs)?,
            DType::F16 => run::<half::f16>(self, d, xs)?,
            DType::BF16 => run::<half::bf16>(self, d, xs)?,
            dt => candle_core::bail!("{OP}: {dt:?} is not supported (f32/f16/bf16)"),
        };
        *self.lse.lock().expect("causal_attention lse") =
            Some(Tensor::from_vec(lse, (d.b, d.t, d.heads), &Device::Cpu)?);
        Ok((out, Shape::from((d.b, d.t, d.heads, d.d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, xs: &[(&candle_core::CudaStorage, &Layout)]) -> Result<(candle_core::CudaStorage, Shape)> {
        let ls: Vec<&Layout> = xs.iter().map(|x| x.1).collect();
        let d = self.packing.dims(self.heads, self.kv_heads, &ls)?;
        let [q, k, v] = self.rows(d, xs)?;
        let (out, lse, lse_shape) = cuda::forward(d, self.scale, q, k, v)?;
        *self.lse.lock().expect("causal_attention lse") = Some(Tensor::from_storage(
            Storage::Cuda(lse),
            lse_shape,
            candle_core::op::BackpropOp::none(),
            false,
        ));
        Ok((out, Shape::from((d.b, d.t, d.heads, d.d))))
    }

    /// q, k, v as the kernels' row views of the (contiguous) inputs.
    #[cfg(feature = "cuda")]
    fn rows<'a>(&self, d: Dims, xs: &[(&'a candle_core::CudaStorage, &Layout)]) -> Result<[Rows<'a>; 3]> {
        let p = &self.packing;
        let at = |s: Slot, what: &str| -> Result<Rows<'a>> {
            let (x, l) = xs[s.input];
            let (start, _) = crate::ops::cuda::contiguous(l, OP, what)?;
            Ok(Rows {
                s: x,
                offset: start + s.head * d.d,
                stride: p.row_heads[s.input] * d.d,
            })
        };
        Ok([at(p.q, "q")?, at(p.k, "k")?, at(p.v, "v")?])
    }

    /// The inputs' gradients, each in its input's layout, from O and dO.
    fn grads(&self, xs: &[&Tensor], o: &Tensor, g: &Tensor) -> Result<Vec<Tensor>> {
        let lse = self
            .lse
            .lock()
            .expect("causal_attention lse")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg(format!("{OP}: no LSE saved")))?;
        let op = FlashAttnPackedBwd {
            fwd: FlashAttnPacked {
                scale: self.scale,
                heads: self.heads,
                kv_heads: self.kv_heads,
                packing: self.packing.clone(),
                lse: Mutex::new(None),
            },
            o: aligned(&o.detach())?,
            g: aligned(&g.detach())?,
            lse,
        };
        let flat = match xs {
            [x] => x.apply_op1_no_bwd(&op)?,
            [x, y] => x.apply_op2_no_bwd(y, &op)?,
            _ => candle_core::bail!("{OP}: one or two packed inputs"),
        };
        let mut at = 0;
        xs.iter()
            .map(|x| {
                let n = x.elem_count();
                let part = flat.narrow(0, at, n)?.reshape(x.shape());
                at += n;
                part
            })
            .collect()
    }
}

impl CustomOp1 for FlashAttnPacked {
    fn name(&self) -> &'static str {
        "causal_attention_packed"
    }
    fwd_by_inputs!(1);
    fn bwd(&self, x: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.grads(&[x], res, g)?.pop())
    }
}

impl CustomOp2 for FlashAttnPacked {
    fn name(&self) -> &'static str {
        "causal_attention_shared_kv"
    }
    fwd_by_inputs!(2);
    fn bwd(&self, x: &Tensor, y: &Tensor, res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut gs = self.grads(&[x, y], res, g)?.into_iter();
        Ok((gs.next(), gs.next()))
    }
}

/// The packed ops' backward: the inputs' gradients flat, one input's after the other.
struct FlashAttnPackedBwd {
    fwd: FlashAttnPacked,
    o: Tensor,
    g: Tensor,
    lse: Tensor,
}

impl FlashAttnPackedBwd {
    fn cpu(&self, xs: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
        let f = &self.fwd;
        let ls: Vec<&Layout> = xs.iter().map(|x| x.1).collect();
        let d = f.packing.dims(f.heads, f.kv_heads, &ls)?;
        let (os, ol) = self.o.storage_and_layout();
        let (gs, gl) = self.g.storage_and_layout();
        let (lss, ll) = self.lse.storage_and_layout();
        let (Storage::Cpu(os), Storage::Cpu(gs), Storage::Cpu(lss)) = (&*os, &*gs, &*lss) else {
            candle_core::bail!("{OP}: the saved O, dO and LSE must be on the CPU");
        };
        let lse = contiguous(lss.as_slice::<f32>()?, ll, OP, "lse")?;
        fn run<T: Elem + WithDType>(
            b: &FlashAttnPackedBwd,
            d: Dims,
            xs: &[(&CpuStorage, &Layout)],
            og: [(&CpuStorage, &Layout); 2],
            lse: &[f32],
        ) -> Result<CpuStorage> {
            let [q, k, v] = b.fwd.packing.cpu_qkv::<T>(d, xs)?;
            let [o, g] = og.map(|(s, l)| to_f32::<T>(s, l));
            let flat = cpu_backward(&q, &k, &v, &o?, &g?, lse, d, b.fwd.scale);
            let out = b.fwd.packing.scatter(d, &flat);
            Ok(T::to_cpu_storage_owned(out.into_iter().map(T::from_f32).collect()))
        }
        let og = [(os, ol), (gs, gl)];
        let out = match xs[0].0.dtype() {
            DType::F32 => run::<f32>(self, d, xs, og, lse)?,
            DType::F16 => run::<half::f16>(self, d, xs, og, lse)?,
            DType::BF16 => run::<half::bf16>(self, d, xs, og, lse)?,
            dt => candle_core::bail!("{OP}: {dt:?} is not supported (f32/f16/bf16)"),
        };
        let n = ls.iter().map(|l| l.shape().elem_count()).sum::<usize>();
        Ok((out, Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, xs: &[(&candle_core::CudaStorage, &Layout)]) -> Result<(candle_core::CudaStorage, Shape)> {
        let f = &self.fwd;
        let ls: Vec<&Layout> = xs.iter().map(|x| x.1).collect();
        let d = f.packing.dims(f.heads, f.kv_heads, &ls)?;
        let rows = f.rows(d, xs)?;
        saved_backward(d, f.scale, rows, &self.o, &self.g, &self.lse, f.packing.grad_layout(d))
    }
}

impl CustomOp1 for FlashAttnPackedBwd {
    fn name(&self) -> &'static str {
        "causal_attention_packed_bwd"
    }
    fwd_by_inputs!(1);
}

impl CustomOp2 for FlashAttnPackedBwd {
    fn name(&self) -> &'static str {
        "causal_attention_shared_kv_bwd"
    }
    fwd_by_inputs!(2);
}

/// Causal attention over a packed `[b, t, heads + 2·kv_heads, d]` tensor: Q's heads,
/// then K's, then V's, as one fused projection lays them out. The same attention as
/// [`causal_attention`] of the three slices; its gradient comes back as one tensor of
/// the packed shape (the kernels write dq, dk, dv into their columns), so the fused
/// projection's backward needs no sum of three padded slices.
pub fn causal_attention_packed(qkv: &Tensor, heads: usize, kv_heads: usize, scale: f32) -> Result<Tensor> {
    let (b, t, s, d) = qkv.dims4()?;
    if kv_heads == 0 || s != heads + 2 * kv_heads {
        candle_core::bail!(
            "{OP}: packed {:?} does not hold {heads} + 2·{kv_heads} heads",
            qkv.shape()
        );
    }
    let q = qkv.narrow(2, 0, heads)?;
    let k = qkv.narrow(2, heads, kv_heads)?;
    let v = qkv.narrow(2, heads + kv_heads, kv_heads)?;
    if !fused(&q, &k, &v)? {
        return causal_attention_composite(&q.contiguous()?, &k.contiguous()?, &v.contiguous()?, scale);
    }
    if b * t * d == 0 {
        return Tensor::zeros((b, t, heads, d), qkv.dtype(), qkv.device());
    }
    let op = FlashAttnPacked {
        scale,
        heads,
        kv_heads,
        packing: Packing {
            row_heads: vec![s],
            q: Slot { input: 0, head: 0 },
            k: Slot { input: 0, head: heads },
            v: Slot {
                input: 0,
                head: heads + kv_heads,
            },
        },
        lse: Mutex::new(None),
    };
    aligned(qkv)?.apply_op1(op)
}

/// Causal attention of `q` (`[b, t, heads, d]`) over the K and V heads of another
/// tensor, `src` (`[b, t, _, d]`: K at heads `kv_head..kv_head + kv_heads`, V right
/// after): a CLA consumer reading its producer's packed Q/K/V. Differentiable in both;
/// `src`'s gradient is zero outside the K and V heads.
pub fn causal_attention_shared_kv(
    q: &Tensor,
    src: &Tensor,
    kv_head: usize,
    kv_heads: usize,
    scale: f32,
) -> Result<Tensor> {
    let (b, t, heads, d) = q.dims4()?;
    let s = src.dim(2)?;
    if kv_heads == 0 || kv_head + 2 * kv_heads > s || src.dims4()? != (b, t, s, d) {
        candle_core::bail!(
            "{OP}: src {:?} does not hold K and V's {kv_heads} heads at {kv_head} for q {:?}",
            src.shape(),
            q.shape()
        );
    }
    let k = src.narrow(2, kv_head, kv_heads)?;
    let v = src.narrow(2, kv_head + kv_heads, kv_heads)?;
    if !fused(q, &k, &v)? {
        return causal_attention_composite(q, &k.contiguous()?, &v.contiguous()?, scale);
    }
    if b * t * d == 0 {
        return q.zeros_like();
    }
    let op = FlashAttnPacked {
        scale,
        heads,
        kv_heads,
        packing: Packing {
            row_heads: vec![heads, s],
            q: Slot { input: 0, head: 0 },
            k: Slot {
                input: 1,
                head: kv_head,
            },
            v: Slot {
                input: 1,
                head: kv_head + kv_heads,
            },
        },
        lse: Mutex::new(None),
    };
    aligned(q)?.apply_op2(&aligned(src)?, op)
}

/// A contiguous input as f32 (a copy; the reference computes in f32).
fn to_f32<T: Elem + WithDType>(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    Ok(contiguous(s.as_slice::<T>()?, l, OP, "an input")?
        .iter()
        .map(|x| x.to_f32())
        .collect())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums: the loop vectorises (a single running sum would not).
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Row `i` of head `h` of a `[b, t, heads, d]` buffer.
fn row(x: &[f32], d: Dims, heads: usize, bb: usize, i: usize, h: usize) -> &[f32] {
    let off = ((bb * d.t + i) * heads + h) * d.d;
    &x[off..off + d.d]
}

/// The reference forward: O (`[b, t, heads, d]`) and LSE (`[b, t, heads]`), in parallel
/// over tokens.
fn cpu_forward(q: &[f32], k: &[f32], v: &[f32], d: Dims, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let per_tok = d.heads * d.d + d.heads; // a token's O rows, then its LSEs
    let mut buf = vec![0f32; d.b * d.t * per_tok];
    for_each_chunk_mut(&mut buf, per_tok, |tok, out| {
        let (bb, i) = (tok / d.t, tok % d.t);
        let (o, lse) = out.split_at_mut(d.heads * d.d);
        let mut p = vec![0f32; i + 1];
        for h in 0..d.heads {
            let kvh = h / d.group();
            let qi = row(q, d, d.heads, bb, i, h);
            for (j, pj) in p.iter_mut().enumerate() {
                *pj = scale * dot(qi, row(k, d, d.kv_heads, bb, j, kvh));
            }
            let m = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut l = 0f32;
            for pj in p.iter_mut() {
                *pj = (*pj - m).exp();
                l += *pj;
            }
            let oh = &mut o[h * d.d..(h + 1) * d.d];
            for (j, &pj) in p.iter().enumerate() {
                axpy(oh, pj / l, row(v, d, d.kv_heads, bb, j, kvh));
            }
            lse[h] = m + l.ln();
        }
    });
    let mut o = Vec::with_capacity(d.q_len());
    let mut lse = Vec::with_capacity(d.b * d.t * d.heads);
    for tok in buf.chunks(per_tok) {
        o.extend_from_slice(&tok[..d.heads * d.d]);
        lse.extend_from_slice(&tok[d.heads * d.d..]);
    }
    (o, lse)
}

/// The reference backward, `[dq | dk | dv]`: with P = exp(scale·q·kᵀ − LSE), dP = dO·vᵀ
/// and Dsum = rowsum(dO∘O): dS = P∘(dP − Dsum), dq = scale·dS·k, dk = scale·dSᵀ·q and
/// dv = Pᵀ·dO, dk and dv summed over each KV head's query heads. Two passes (over query
/// rows for dq, over key rows for dk and dv) that recompute P, so each task owns its
/// output rows.
#[allow(clippy::too_many_arguments)]
fn cpu_backward(q: &[f32], k: &[f32], v: &[f32], o: &[f32], g: &[f32], lse: &[f32], d: Dims, scale: f32) -> Vec<f32> {
    let dsum: Vec<f32> = o.chunks(d.d).zip(g.chunks(d.d)).map(|(o, g)| dot(o, g)).collect();
    let at = |bb: usize, i: usize, h: usize| (bb * d.t + i) * d.heads + h; // LSE, Dsum index
    let mut dq = vec![0f32; d.q_len()];
    for_each_chunk_mut(&mut dq, d.heads * d.d, |tok, out| {
        let (bb, i) = (tok / d.t, tok % d.t);
        for h in 0..d.heads {
            let kvh = h / d.group();
            let (qi, gi) = (row(q, d, d.heads, bb, i, h), row(g, d, d.heads, bb, i, h));
            let (l, ds_i) = (lse[at(bb, i, h)], dsum[at(bb, i, h)]);
            let dqh = &mut out[h * d.d..(h + 1) * d.d];
            for j in 0..=i {
                let kj = row(k, d, d.kv_heads, bb, j, kvh);
                let p = (scale * dot(qi, kj) - l).exp();
                let ds = p * (dot(gi, row(v, d, d.kv_heads, bb, j, kvh)) - ds_i);
                axpy(dqh, scale * ds, kj);
            }
        }
    });
    let per_tok = 2 * d.kv_heads * d.d; // a token's dK rows, then its dV rows
    let mut dkv = vec![0f32; d.b * d.t * per_tok];
    for_each_chunk_mut(&mut dkv, per_tok, |tok, out| {
        let (bb, j) = (tok / d.t, tok % d.t);
        let (dk, dv) = out.split_at_mut(d.kv_heads * d.d);
        for kvh in 0..d.kv_heads {
            let (kj, vj) = (row(k, d, d.kv_heads, bb, j, kvh), row(v, d, d.kv_heads, bb, j, kvh));
            let dkh = &mut dk[kvh * d.d..(kvh + 1) * d.d];
            let dvh = &mut dv[kvh * d.d..(kvh + 1) * d.d];
            for h in kvh * d.group()..(kvh + 1) * d.group() {
                for i in j..d.t {
                    let (qi, gi) = (row(q, d, d.heads, bb, i, h), row(g, d, d.heads, bb, i, h));
                    let p = (scale * dot(qi, kj) - lse[at(bb, i, h)]).exp();
                    axpy(dvh, p, gi);
                    let ds = p * (dot(gi, vj) - dsum[at(bb, i, h)]);
                    axpy(dkh, scale * ds, qi);
                }
            }
        }
    });
    let mut out = dq;
    out.reserve(2 * d.kv_len());
    for half in 0..2 {
        for tok in dkv.chunks(per_tok) {
            out.extend_from_slice(&tok[half * d.kv_heads * d.d..(half + 1) * d.kv_heads * d.d]);
        }
    }
    out
}
