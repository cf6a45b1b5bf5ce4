//! `causal_attention`'s CPU paths (the references the CUDA flash-attention kernels must
//! match) against the composite the model used before (expand the KV heads, Q·Kᵀ,
//! masked softmax, ·V in candle ops): the forward and, under candle's autograd, the
//! gradients of q, k and v (the backward op, K/V gradients summed over each group),
//! for MHA, GQA and MQA and lengths that are not a multiple of anything.

use crate::common::{flat, rel_err, Rng};
use candle_core::{DType, Device, Tensor, Var, D};
use crosskv::ops::{causal_attention, causal_attention_composite, causal_attention_with_grads};

/// The formulation `Model::forward_dense` had: per batch row, [t, heads, d] in f32.
fn composite(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Tensor {
    let (b, t, heads, _) = q.dims4().unwrap();
    let kv_heads = k.dim(2).unwrap();
    let group = heads / kv_heads;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
    let rows: Vec<Tensor> = (0..b)
        .map(|i| {
            let (q, k, v) = (q.get(i).unwrap(), k.get(i).unwrap(), v.get(i).unwrap());
            let expand = |m: &Tensor| {
                let m = m
                    .to_dtype(DType::F32)
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .contiguous()
                    .unwrap();
                let (kvh, tt, dd) = m.dims3().unwrap();
                m.unsqueeze(1)
                    .unwrap()
                    .expand((kvh, group, tt, dd))
                    .unwrap()
                    .reshape((kvh * group, tt, dd))
                    .unwrap()
            };
            let (k, v) = (expand(&k), expand(&v));
            let q = q
                .to_dtype(DType::F32)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap();
            let scores = (q.matmul(&k.transpose(1, 2).unwrap().contiguous().unwrap()).unwrap() * scale as f64).unwrap();
            let p = candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
            p.matmul(&v).unwrap().transpose(0, 1).unwrap()
        })
        .collect();
    Tensor::stack(&rows, 0).unwrap()
}

/// (b, t, heads, kv_heads, d): MHA, GQA, MQA; t of 1, odd, around 64.
const SHAPES: [(usize, usize, usize, usize, usize); 7] = [
    (1, 1, 4, 4, 8),
    (2, 17, 4, 1, 16),
    (2, 33, 6, 2, 8),
    (1, 64, 2, 2, 32),
    (3, 65, 8, 2, 64),
    (1, 100, 16, 1, 8),
    (2, 7, 3, 3, 128),
];

/// Forward and q/k/v gradients of `f` on a loss Σ out∘w.
fn run(f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor, q: &Tensor, k: &Tensor, v: &Tensor, w: &Tensor) -> [Tensor; 4] {
    let (q, k, v) = (
        Var::from_tensor(q).unwrap(),
        Var::from_tensor(k).unwrap(),
        Var::from_tensor(v).unwrap(),
    );
    let out = f(q.as_tensor(), k.as_tensor(), v.as_tensor());
    let grads = (&out * w).unwrap().sum_all().unwrap().backward().unwrap();
    let g = |x: &Var| grads.get(x.as_tensor()).expect("a gradient").clone();
    [out, g(&q), g(&k), g(&v)]
}

#[test]
fn causal_attention_and_its_gradients_match_the_composite() {
    for (i, &(b, t, h, kvh, d)) in SHAPES.iter().enumerate() {
        let mut rng = Rng::new(40 + i as u64);
        let q = rng.tensor(&[b, t, h, d], 1.0, 0.0);
        let k = rng.tensor(&[b, t, kvh, d], 1.0, 0.0);
        let v = rng.tensor(&[b, t, kvh, d], 1.0, 0.0);
        let w = rng.tensor(&[b, t, h, d], 1.0, 0.0);
        let scale = 1.0 / (d as f32).sqrt();
        let want = run(|q, k, v| composite(q, k, v, scale), &q, &k, &v, &w);
        let got = run(|q, k, v| causal_attention(q, k, v, scale).unwrap(), &q, &k, &v, &w);
        let lib = run(
            |q, k, v| causal_attention_composite(q, k, v, scale).unwrap(),
            &q,
            &k,
            &v,
            &w,
        );
        // The same op and backward without autograd: the same numbers.
        let (o, dq, dk, dv) = causal_attention_with_grads(&q, &k, &v, &w, scale).unwrap();
        for (x, y) in [o, dq, dk, dv].iter().zip(&got) {
            assert_eq!(flat(x), flat(y), "causal_attention_with_grads b{b} t{t}");
        }
        for (j, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
            let e = rel_err(&got[j], &want[j]);
            assert!(e <= 1e-4, "b{b} t{t} heads {h}/{kvh} d{d}: {name} relative error {e}");
            let e2 = rel_err(&lib[j], &want[j]);
            assert!(
                e2 <= 1e-4,
                "composite b{b} t{t} heads {h}/{kvh} d{d}: {name} relative error {e2}"
            );
            eprintln!("b{b} t{t:3} heads {h:2}/{kvh} d{d:3} {name}: rel err {e:.1e}");
        }
    }
}

/// f16/bf16 inputs: computed in f32, stored in the input dtype; forward and gradients
/// within rounding of the f32 results on the same (rounded) values.
#[test]
fn half_precision_inputs_match_f32_within_rounding() {
    let (b, t, h, kvh, d) = (2, 37, 4, 2, 64);
    for dtype in [DType::F16, DType::BF16] {
        let mut rng = Rng::new(7);
        let mk = |rng: &mut Rng, s: &[usize]| rng.tensor(s, 1.0, 0.0).to_dtype(dtype).unwrap();
        let (q, k, v, w) = (
            mk(&mut rng, &[b, t, h, d]),
            mk(&mut rng, &[b, t, kvh, d]),
            mk(&mut rng, &[b, t, kvh, d]),
            mk(&mut rng, &[b, t, h, d]),
        );
        let f32s = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let want = run(
            |q, k, v| causal_attention(q, k, v, 0.125).unwrap(),
            &f32s(&q),
            &f32s(&k),
            &f32s(&v),
            &f32s(&w),
        );
        let got = run(|q, k, v| causal_attention(q, k, v, 0.125).unwrap(), &q, &k, &v, &w);
        for (j, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
            assert_eq!(got[j].dtype(), dtype);
            let e = rel_err(&got[j], &want[j]);
            assert!(e <= 1e-2, "{dtype:?} {name}: relative error {e}");
        }
    }
}

#[test]
fn causal_attention_rejects_bad_shapes() {
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    let msg = |r: candle_core::Result<Tensor>| r.unwrap_err().to_string();
    // heads not a multiple of kv_heads
    assert!(msg(causal_attention(
        &z(&[1, 4, 3, 8]),
        &z(&[1, 4, 2, 8]),
        &z(&[1, 4, 2, 8]),
        1.0
    ))
    .contains("multiple"));
    // k and v differ
    assert!(msg(causal_attention(
        &z(&[1, 4, 2, 8]),
        &z(&[1, 4, 2, 8]),
        &z(&[1, 4, 1, 8]),
        1.0
    ))
    .contains("k [1, 4, 2, 8]"));
    // 3-D q
    assert!(causal_attention(&z(&[4, 2, 8]), &z(&[4, 2, 8]), &z(&[4, 2, 8]), 1.0).is_err());
    // mixed dtypes
    let qh = z(&[1, 4, 2, 8]).to_dtype(DType::BF16).unwrap();
    assert!(msg(causal_attention(&qh, &z(&[1, 4, 2, 8]), &z(&[1, 4, 2, 8]), 1.0)).contains("f32, f16, bf16"));
}

/// The packed forms read q, k, v as heads of one or two tensors and hand the gradient
/// back in those tensors' layout: the same numbers as `causal_attention` of the slices
/// (the same reference code runs underneath), zeros for heads that are none of q, k, v.
#[test]
fn packed_and_shared_kv_forms_match_the_three_input_op() {
    for (i, &(b, t, h, kvh, d)) in SHAPES.iter().enumerate() {
        let mut rng = Rng::new(70 + i as u64);
        let scale = 1.0 / (d as f32).sqrt();
        let w = rng.tensor(&[b, t, h, d], 1.0, 0.0);
        let slice = |x: &Tensor, at: usize, n: usize| x.narrow(2, at, n).unwrap().contiguous().unwrap();
        let grad_of = |f: &dyn Fn(&[&Tensor]) -> Tensor, xs: &[&Tensor]| -> (Tensor, Vec<Tensor>) {
            let vars: Vec<Var> = xs.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
            let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            let out = f(&ts);
            let grads = (&out * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = vars
                .iter()
                .map(|v| grads.get(v.as_tensor()).expect("a gradient").clone())
                .collect();
            (out, gs)
        };

        // One packed tensor: Q's heads, K's, V's.
        let x = rng.tensor(&[b, t, h + 2 * kvh, d], 1.0, 0.0);
        let (q, k, v) = (slice(&x, 0, h), slice(&x, h, kvh), slice(&x, h + kvh, kvh));
        let want = run(|q, k, v| causal_attention(q, k, v, scale).unwrap(), &q, &k, &v, &w);
        let (out, gx) = grad_of(
            &|xs| crosskv::ops::causal_attention_packed(xs[0], h, kvh, scale).unwrap(),
            &[&x],
        );
        assert_eq!(gx[0].dims(), x.dims());
        assert_eq!(flat(&out), flat(&want[0]), "packed b{b} t{t}: out");
        for (name, at, n, j) in [("dq", 0, h, 1), ("dk", h, kvh, 2), ("dv", h + kvh, kvh, 3)] {
            assert_eq!(flat(&slice(&gx[0], at, n)), flat(&want[j]), "packed b{b} t{t}: {name}");
        }

        // q apart, K and V at heads 2.. of a wider tensor (a CLA consumer of a packed
        // producer with two query heads, plus one head past V).
        let src = rng.tensor(&[b, t, 2 + 2 * kvh + 1, d], 1.0, 0.0);
        let (k, v) = (slice(&src, 2, kvh), slice(&src, 2 + kvh, kvh));
        let want = run(|q, k, v| causal_attention(q, k, v, scale).unwrap(), &q, &k, &v, &w);
        let (out, gs) = grad_of(
            &|xs| crosskv::ops::causal_attention_shared_kv(xs[0], xs[1], 2, kvh, scale).unwrap(),
            &[&q, &src],
        );
        assert_eq!(flat(&out), flat(&want[0]), "shared b{b} t{t}: out");
        assert_eq!(flat(&gs[0]), flat(&want[1]), "shared b{b} t{t}: dq");
        assert_eq!(flat(&slice(&gs[1], 2, kvh)), flat(&want[2]), "shared b{b} t{t}: dk");
        assert_eq!(
            flat(&slice(&gs[1], 2 + kvh, kvh)),
            flat(&want[3]),
            "shared b{b} t{t}: dv"
        );
        for (at, n) in [(0, 2), (2 + 2 * kvh, 1)] {
            assert!(
                flat(&slice(&gs[1], at, n)).iter().all(|&g| g == 0.0),
                "shared b{b} t{t}: other heads"
            );
        }
    }
}

#[test]
fn packed_forms_reject_heads_that_do_not_fit() {
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    // 4 heads cannot be 2 + 2·2 (Q, K, V of 2, 1).
    let e = crosskv::ops::causal_attention_packed(&z(&[1, 4, 4, 8]), 2, 2, 1.0).unwrap_err();
    assert!(e.to_string().contains("does not hold"), "{e}");
    // K and V at head 3 of 4 overrun the source.
    let e = crosskv::ops::causal_attention_shared_kv(&z(&[1, 4, 2, 8]), &z(&[1, 4, 4, 8]), 3, 1, 1.0).unwrap_err();
    assert!(e.to_string().contains("does not hold"), "{e}");
}
