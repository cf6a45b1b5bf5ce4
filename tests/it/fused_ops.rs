//! The fused ops' CPU paths (`rms_norm`, `add_rms_norm`, `rope`: the references the CUDA
//! kernels must match) against the unfused candle composites they replace in the model:
//! f32 equal to the last bits, f16/bf16 within rounding; both RoPE conventions; odd
//! shapes; bad inputs are errors.

use crate::common::{flat, grads_of, rel_err, Rng};
use candle_core::{DType, Device, Tensor, D};
use crosskv::config::ModelConfig;
use crosskv::model::rope::Rope;
use crosskv::ops::{add_rms_norm, rms_norm, rope};

fn tol(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-6,
        _ => 1e-2,
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Row shapes: the model's hidden sizes, rows that are not a multiple of 8 elements, a
/// 1-element row, 3-D input, and enough rows to split across CPU tasks.
const NORM_SHAPES: [&[usize]; 7] = [
    &[1, 576],
    &[40, 576],
    &[3, 2048],
    &[2, 4096],
    &[5, 7],
    &[1, 1],
    &[2, 3, 100],
];

/// The composite the model used before: candle's f32 rms_norm on the CPU, or its
/// slow reference (f32 statistics) for half dtypes.
fn candle_rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Tensor {
    candle_nn::ops::rms_norm(x, w, eps).unwrap()
}

#[test]
fn rms_norm_matches_the_candle_composite() {
    let mut rng = Rng::new(1);
    for dtype in DTYPES {
        for shape in NORM_SHAPES {
            let hidden = *shape.last().unwrap();
            let x = rng.tensor(shape, 2.0, 0.3).to_dtype(dtype).unwrap();
            let w = rng.tensor(&[hidden], 0.5, 1.0).to_dtype(dtype).unwrap();
            let got = rms_norm(&x, &w, 1e-5).unwrap();
            assert_eq!(got.dtype(), dtype);
            let e = rel_err(&got, &candle_rms_norm(&x, &w, 1e-5));
            assert!(e <= tol(dtype), "{dtype:?} {shape:?}: relative error {e}");
            // The slow composite with its f32 statistics agrees too.
            let slow = candle_nn::ops::rms_norm_slow(&x, &w, 1e-5).unwrap();
            let e = rel_err(&got, &slow);
            assert!(
                e <= tol(dtype).max(1e-5),
                "{dtype:?} {shape:?} vs slow: relative error {e}"
            );
        }
    }
}

#[test]
fn rms_norm_is_bit_exact_with_candle_in_f32() {
    let mut rng = Rng::new(2);
    let x = rng.tensor(&[33, 576], 1.0, 0.0);
    let w = rng.tensor(&[576], 0.2, 1.0);
    let (got, want) = (
        flat(&rms_norm(&x, &w, 1e-6).unwrap()),
        flat(&candle_rms_norm(&x, &w, 1e-6)),
    );
    assert!(got == want, "f32 rms_norm differs from candle's");
}

#[test]
fn add_rms_norm_matches_add_then_norm() {
    let mut rng = Rng::new(3);
    for dtype in DTYPES {
        for shape in NORM_SHAPES {
            let hidden = *shape.last().unwrap();
            let x = rng.tensor(shape, 1.0, 0.0).to_dtype(dtype).unwrap();
            let r = rng.tensor(shape, 3.0, -0.5).to_dtype(dtype).unwrap();
            let w = rng.tensor(&[hidden], 0.5, 1.0).to_dtype(dtype).unwrap();
            let (s, n) = add_rms_norm(&x, &r, &w, 1e-5).unwrap();
            assert_eq!((s.dims(), n.dims()), (x.dims(), x.dims()));
            assert_eq!((s.dtype(), n.dtype()), (dtype, dtype));
            let sum = (&x + &r).unwrap();
            assert!(flat(&s) == flat(&sum), "{dtype:?} {shape:?}: the sum is not x + r");
            // Fusing changes nothing: the norm of the stored sum, bit for bit.
            let alone = rms_norm(&sum, &w, 1e-5).unwrap();
            assert!(flat(&n) == flat(&alone), "{dtype:?} {shape:?}: fused norm differs");
            let e = rel_err(&n, &candle_rms_norm(&sum, &w, 1e-5));
            assert!(e <= tol(dtype), "{dtype:?} {shape:?}: relative error {e}");
        }
    }
}

#[test]
fn norms_accept_strided_and_offset_inputs() {
    let mut rng = Rng::new(4);
    let w = rng.tensor(&[24], 0.5, 1.0);
    // A transposed view and a view starting mid-buffer.
    let xt = rng.tensor(&[24, 5], 1.0, 0.0).t().unwrap();
    let big = rng.tensor(&[5 * 24 + 3], 1.0, 0.0);
    let xo = big.narrow(0, 3, 5 * 24).unwrap().reshape((5, 24)).unwrap();
    for x in [&xt, &xo] {
        let want = rms_norm(&x.contiguous().unwrap(), &w, 1e-5).unwrap();
        assert!(flat(&rms_norm(x, &w, 1e-5).unwrap()) == flat(&want));
        let (s, n) = add_rms_norm(x, &xo, &w, 1e-5).unwrap();
        let (s2, n2) = add_rms_norm(&x.contiguous().unwrap(), &xo.contiguous().unwrap(), &w, 1e-5).unwrap();
        assert!(flat(&s) == flat(&s2) && flat(&n) == flat(&n2));
    }
    // The fused outputs feed the next fused op directly (views into one buffer).
    let (s, n) = add_rms_norm(&xo, &xo, &w, 1e-5).unwrap();
    let (s3, _) = add_rms_norm(&s, &n, &w, 1e-5).unwrap();
    assert!(flat(&s3) == flat(&(&s + &n).unwrap()));
}

/// The fused RMSNorm backward (one op) equals the candle composite it replaced, in f32
/// and bf16, for the rows of a batch and a weight gradient summed over them.
#[test]
fn rms_norm_grads_fused_match_the_composite() {
    use crosskv::ops::rms_norm::{rms_norm_grads, rms_norm_grads_composite};
    let mut rng = Rng::new(77);
    for dtype in [DType::F32, DType::BF16] {
        for (rows, hidden) in [(1usize, 8usize), (37, 96), (256, 576)] {
            let x = rng.tensor(&[rows, hidden], 1.0, 0.0).to_dtype(dtype).unwrap();
            let w = rng.tensor(&[hidden], 0.2, 1.0).to_dtype(dtype).unwrap();
            let g = rng.tensor(&[rows, hidden], 1.0, 0.0).to_dtype(dtype).unwrap();
            let (dx, dw) = rms_norm_grads(&x, &w, &g, 1e-5).unwrap();
            let (rx, rw) = rms_norm_grads_composite(&x, &w, &g, 1e-5).unwrap();
            assert_eq!((dx.dtype(), dw.dtype()), (dtype, dtype));
            let (ex, ew) = (rel_err(&dx, &rx), rel_err(&dw, &rw));
            let bound = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            assert!(ex < bound && ew < bound, "{dtype:?} {rows}x{hidden}: dx {ex}, dw {ew}");
        }
    }
}

/// `swiglu` = candle's `silu(g) · u`, forward and gradients, in f32 and bf16 (against
/// the composite in f32: ours computes in f32 and rounds once, candle's bf16 composite
/// rounds at every step).
#[test]
fn swiglu_matches_the_candle_composite_and_its_gradients() {
    use candle_core::Var;
    let mut rng = Rng::new(78);
    for dtype in [DType::F32, DType::BF16] {
        for shape in [[1usize, 7usize], [37, 300], [64, 1000]] {
            let (g32, u32_, dy32) = (
                rng.tensor(&shape, 3.0, 0.0),
                rng.tensor(&shape, 1.0, 0.0),
                rng.tensor(&shape, 1.0, 0.0),
            );
            let cast = |t: &Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            let (g32, u32_, dy32) = (cast(&g32), cast(&u32_), cast(&dy32));
            let g = Var::from_tensor(&g32.to_dtype(dtype).unwrap()).unwrap();
            let u = Var::from_tensor(&u32_.to_dtype(dtype).unwrap()).unwrap();
            let dy = dy32.to_dtype(dtype).unwrap();
            let (rg, ru) = (Var::from_tensor(&g32).unwrap(), Var::from_tensor(&u32_).unwrap());
            let ours = crosskv::ops::swiglu(g.as_tensor(), u.as_tensor()).unwrap();
            let theirs = (candle_nn::ops::silu(rg.as_tensor()).unwrap() * ru.as_tensor()).unwrap();
            let bound = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            let e = rel_err(&ours.to_dtype(DType::F32).unwrap(), &theirs);
            assert!(e < bound, "{dtype:?} {shape:?}: forward {e}");
            let go = grads_of(&ours, &dy);
            let gt = (&theirs * &dy32).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v, r) in [("gate", &g, &rg), ("up", &u, &ru)] {
                let got = go.get(v.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
                let e = rel_err(&got, gt.get(r.as_tensor()).unwrap());
                assert!(e < bound, "{dtype:?} {shape:?}: d{name} {e}");
            }
        }
    }
}

#[test]
fn norms_reject_bad_inputs_with_errors() {
    let x = Tensor::zeros((2, 8), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::ones(8, DType::F32, &Device::Cpu).unwrap();
    let bad: Vec<(&str, candle_core::Result<Tensor>)> = vec![
        (
            "weight size",
            rms_norm(&x, &Tensor::ones(7, DType::F32, &Device::Cpu).unwrap(), 1e-5),
        ),
        (
            "weight rank",
            rms_norm(&x, &Tensor::ones((1, 8), DType::F32, &Device::Cpu).unwrap(), 1e-5),
        ),
        ("weight dtype", rms_norm(&x, &w.to_dtype(DType::BF16).unwrap(), 1e-5)),
        ("x dtype", rms_norm(&x.to_dtype(DType::U32).unwrap(), &w, 1e-5)),
        (
            "scalar x",
            rms_norm(&Tensor::new(1f32, &Device::Cpu).unwrap(), &w, 1e-5),
        ),
        (
            "empty rows",
            rms_norm(&Tensor::zeros((2, 0), DType::F32, &Device::Cpu).unwrap(), &w, 1e-5),
        ),
        (
            "residual shape",
            add_rms_norm(&x, &Tensor::zeros((3, 8), DType::F32, &Device::Cpu).unwrap(), &w, 1e-5).map(|p| p.0),
        ),
        (
            "residual dtype",
            add_rms_norm(&x, &x.to_dtype(DType::F16).unwrap(), &w, 1e-5).map(|p| p.0),
        ),
    ];
    for (what, r) in bad {
        let err = r.expect_err(what).to_string();
        assert!(err.contains("rms_norm"), "{what}: {err}");
    }
    // No rows is fine.
    let none = Tensor::zeros((0, 8), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(rms_norm(&none, &w, 1e-5).unwrap().dims(), &[0, 8]);
    assert_eq!(add_rms_norm(&none, &none, &w, 1e-5).unwrap().1.dims(), &[0, 8]);
}

/// cos/sin tables `[max_pos, d/2]` of random angles, in `dtype`.
fn tables(rng: &mut Rng, max_pos: usize, half: usize, dtype: DType) -> (Tensor, Tensor) {
    let a = rng.tensor(&[max_pos, half], 3.0, 0.0);
    (
        a.cos().unwrap().to_dtype(dtype).unwrap(),
        a.sin().unwrap().to_dtype(dtype).unwrap(),
    )
}

/// What the model did before: gather the rows, then candle's rope / rope_i per tensor.
fn candle_rope(x: &Tensor, pos: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Tensor {
    let (t, h, d) = x.dims3().unwrap();
    let c = cos.index_select(pos, 0).unwrap().unsqueeze(1).unwrap();
    let s = sin.index_select(pos, 0).unwrap().unsqueeze(1).unwrap();
    let x4 = x.reshape((t, h, 1, d)).unwrap();
    let y = if interleaved {
        candle_nn::rotary_emb::rope_i(&x4, &c, &s).unwrap()
    } else {
        candle_nn::rotary_emb::rope(&x4, &c, &s).unwrap()
    };
    y.reshape((t, h, d)).unwrap()
}

/// The textbook rotation in f64: `x * cos + rotate(x) * sin`.
fn naive_rope(x: &Tensor, pos: &[u32], cos: &Tensor, sin: &Tensor, interleaved: bool) -> Vec<f32> {
    let (_, h, d) = x.dims3().unwrap();
    let xv = flat(x);
    let (c, s) = (flat(cos), flat(sin));
    let half = d / 2;
    let mut out = vec![0f32; xv.len()];
    for (ti, &p) in pos.iter().enumerate() {
        for hi in 0..h {
            let base = (ti * h + hi) * d;
            for j in 0..half {
                let (i1, i2) = if interleaved { (2 * j, 2 * j + 1) } else { (j, j + half) };
                let k = p as usize * half + j;
                let (x1, x2) = (xv[base + i1] as f64, xv[base + i2] as f64);
                let (cj, sj) = (c[k] as f64, s[k] as f64);
                out[base + i1] = (x1 * cj - x2 * sj) as f32;
                out[base + i2] = (x1 * sj + x2 * cj) as f32;
            }
        }
    }
    out
}

#[test]
fn rope_matches_the_candle_composite_in_both_conventions() {
    let mut rng = Rng::new(5);
    // (tokens, heads, kv_heads, head_dim): the default model, GQA 128, MQA, a 2-wide
    // head, a head_dim that is not a multiple of 8, many tokens (parallel CPU tasks).
    let shapes = [
        (1, 9, 3, 64),
        (5, 32, 8, 128),
        (3, 8, 1, 64),
        (4, 3, 1, 2),
        (7, 5, 5, 6),
        (70, 4, 2, 32),
    ];
    let max_pos = 50;
    for dtype in DTYPES {
        for interleaved in [false, true] {
            for &(t, h, kh, d) in &shapes {
                let what = format!("{dtype:?} interleaved={interleaved} t{t} h{h}/{kh} d{d}");
                let q = rng.tensor(&[t, h, d], 1.0, 0.0).to_dtype(dtype).unwrap();
                let k = rng.tensor(&[t, kh, d], 2.0, 0.1).to_dtype(dtype).unwrap();
                let (cos, sin) = tables(&mut rng, max_pos, d / 2, dtype);
                // First and last table rows, repeats, any order.
                let mut pos: Vec<u32> = rng.tokens(t, max_pos);
                pos[0] = (max_pos - 1) as u32;
                if t > 1 {
                    pos[t - 1] = 0;
                }
                let pt = Tensor::new(pos.as_slice(), &Device::Cpu).unwrap();
                let (qr, kr) = rope(&q, Some(&k), &pt, &cos, &sin, interleaved).unwrap();
                let kr = kr.unwrap();
                assert_eq!((qr.dims(), kr.dims(), qr.dtype()), (q.dims(), k.dims(), dtype));
                for (name, got, x) in [("q", &qr, &q), ("k", &kr, &k)] {
                    let want = candle_rope(x, &pt, &cos, &sin, interleaved);
                    if dtype == DType::F32 {
                        assert!(flat(got) == flat(&want), "{what} {name}: differs from candle in f32");
                    }
                    let e = rel_err(got, &want);
                    assert!(e <= tol(dtype), "{what} {name}: relative error {e} vs candle");
                    let naive =
                        Tensor::from_vec(naive_rope(x, &pos, &cos, &sin, interleaved), x.dims(), &Device::Cpu).unwrap();
                    let e = rel_err(got, &naive);
                    assert!(e <= tol(dtype).max(1e-6), "{what} {name}: relative error {e} vs naive");
                }
                // Q alone (a CLA consumer) gives the same Q.
                let (q_only, none) = rope(&q, None, &pt, &cos, &sin, interleaved).unwrap();
                assert!(none.is_none() && flat(&q_only) == flat(&qr), "{what}: Q alone differs");
            }
        }
    }
}

#[test]
fn rope_with_the_model_tables_matches_the_old_rope_path() {
    // llama3 rope scaling and a head_dim independent of hidden_size.
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/llama_headdim_rope3");
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let mut rng = Rng::new(6);
    for interleaved in [false, true] {
        for dtype in [DType::F32, DType::BF16] {
            let rope_t = Rope::new(&cfg, cfg.max_position_embeddings, interleaved, dtype, &Device::Cpu).unwrap();
            assert_eq!(rope_t.interleaved(), interleaved);
            let (cos, sin) = rope_t.tables();
            let (t, d) = (6, cfg.head_dim);
            let q = rng
                .tensor(&[t, cfg.num_attention_heads, d], 1.0, 0.0)
                .to_dtype(dtype)
                .unwrap();
            let k = rng
                .tensor(&[t, cfg.num_key_value_heads, d], 1.0, 0.0)
                .to_dtype(dtype)
                .unwrap();
            let pos = Tensor::new(&[0u32, 1, 17, 63, 127, 2], &Device::Cpu).unwrap();
            let (qr, kr) = rope_t.rotate(&q, Some(&k), &pos).unwrap();
            for (got, x) in [(&qr, &q), (kr.as_ref().unwrap(), &k)] {
                let e = rel_err(got, &candle_rope(x, &pos, cos, sin, interleaved));
                assert!(
                    e <= tol(dtype),
                    "{dtype:?} interleaved={interleaved}: relative error {e}"
                );
            }
            // A rotation keeps each pair's length (checked in f32).
            if dtype == DType::F32 {
                let n = |x: &Tensor| x.sqr().unwrap().sum(D::Minus1).unwrap();
                assert!(rel_err(&n(&qr), &n(&q)) < 1e-5);
            }
        }
    }
}

type Rotated = (Tensor, Option<Tensor>);

#[test]
fn rope_rejects_bad_inputs_with_errors() {
    let dev = Device::Cpu;
    let f = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev).unwrap();
    let (q, k, cos) = (f(&[2, 4, 8]), f(&[2, 2, 8]), f(&[16, 4]));
    let pos = Tensor::new(&[0u32, 3], &dev).unwrap();
    let bad: Vec<(&str, candle_core::Result<Rotated>)> = vec![
        ("q rank", rope(&f(&[2, 32]), None, &pos, &cos, &cos, false)),
        (
            "odd head_dim",
            rope(&f(&[2, 4, 7]), None, &pos, &f(&[16, 3]), &f(&[16, 3]), false),
        ),
        ("k head_dim", rope(&q, Some(&f(&[2, 2, 6])), &pos, &cos, &cos, false)),
        ("k tokens", rope(&q, Some(&f(&[3, 2, 8])), &pos, &cos, &cos, false)),
        (
            "k dtype",
            rope(&q, Some(&k.to_dtype(DType::BF16).unwrap()), &pos, &cos, &cos, false),
        ),
        (
            "q dtype",
            rope(&q.to_dtype(DType::U32).unwrap(), None, &pos, &cos, &cos, false),
        ),
        (
            "positions dtype",
            rope(&q, Some(&k), &pos.to_dtype(DType::F32).unwrap(), &cos, &cos, false),
        ),
        (
            "positions length",
            rope(&q, Some(&k), &Tensor::new(&[0u32], &dev).unwrap(), &cos, &cos, false),
        ),
        (
            "table width",
            rope(&q, Some(&k), &pos, &f(&[16, 8]), &f(&[16, 8]), false),
        ),
        ("table rank", rope(&q, Some(&k), &pos, &f(&[64]), &f(&[64]), false)),
        (
            "table dtype",
            rope(&q, Some(&k), &pos, &cos.to_dtype(DType::F16).unwrap(), &cos, false),
        ),
        ("tables differ", rope(&q, Some(&k), &pos, &cos, &f(&[8, 4]), false)),
        (
            "position past the tables",
            rope(&q, Some(&k), &Tensor::new(&[0u32, 16], &dev).unwrap(), &cos, &cos, true),
        ),
    ];
    for (what, r) in bad {
        let err = r.expect_err(what).to_string();
        assert!(err.contains("rope"), "{what}: {err}");
    }
    // No tokens is fine.
    let (q0, k0) = rope(
        &f(&[0, 4, 8]),
        Some(&f(&[0, 2, 8])),
        &f(&[0]).to_dtype(DType::U32).unwrap(),
        &cos,
        &cos,
        false,
    )
    .unwrap();
    assert_eq!((q0.dims(), k0.unwrap().dims()), (&[0, 4, 8][..], &[0, 2, 8][..]));
}

/// The fused cross-entropy against candle_nn's composite: the loss and its gradient in
/// f32 (to f32 rounding) and from f16/bf16 logits (against the composite on the same
/// values in f32); a wide vocabulary, one column, strongly peaked rows; bad targets fail.
#[test]
fn cross_entropy_matches_candle_nn_with_its_gradient() {
    use candle_core::Var;
    let mut rng = Rng::new(31);
    for (rows, cols, scale) in [(7usize, 1000usize, 3.0f32), (3, 1, 1.0), (5, 50, 40.0)] {
        let targets: Vec<u32> = rng.tokens(rows, cols);
        let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        let base = rng.tensor(&[rows, cols], scale, 0.0);
        for dtype in DTYPES {
            let x = Var::from_tensor(&base.to_dtype(dtype).unwrap()).unwrap();
            let x32 = Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap();
            let ours = crosskv::ops::cross_entropy(x.as_tensor(), &targets).unwrap();
            let want = candle_nn::loss::cross_entropy(x32.as_tensor(), &targets).unwrap();
            let (a, b) = (ours.to_scalar::<f32>().unwrap(), want.to_scalar::<f32>().unwrap());
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{rows}x{cols} {dtype:?}: loss {a} vs {b}"
            );
            let g = ours.backward().unwrap();
            let gw = want.backward().unwrap();
            let (g, gw) = (g.get(x.as_tensor()).unwrap(), gw.get(x32.as_tensor()).unwrap());
            assert_eq!(g.dtype(), dtype);
            let e = rel_err(g, gw);
            assert!(
                e <= tol(dtype).max(1e-5),
                "{rows}x{cols} {dtype:?}: gradient rel err {e}"
            );
        }
    }
    let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let e = crosskv::ops::cross_entropy(&x, &Tensor::new(&[1u32, 4], &Device::Cpu).unwrap()).unwrap_err();
    assert!(e.to_string().contains("target 4"), "{e}");
    let e = crosskv::ops::cross_entropy(&x, &Tensor::new(&[1u32], &Device::Cpu).unwrap()).unwrap_err();
    assert!(e.to_string().contains("u32 [2]"), "{e}");
}

/// The embedding op against `index_select`: the forward equal in every dtype; the table
/// gradient (repeated ids) bit-equal to candle's `index_add` backward in f32, and from
/// f16/bf16 tables equal to that f32 gradient cast down (the op sums in f32); bad ids fail.
#[test]
fn embedding_matches_index_select_with_its_gradient() {
    use candle_core::Var;
    let mut rng = Rng::new(51);
    for (vocab, hidden, n) in [(50usize, 24usize, 200usize), (7, 1, 9), (1, 5, 3), (300, 77, 64)] {
        let mut ids = rng.tokens(n, vocab);
        ids[n - 1] = ids[0]; // at least one repeat
        let ids = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
        let base = rng.tensor(&[vocab, hidden], 1.0, 0.0);
        // A weight per output element, so each row's gradient differs.
        let w = rng.tensor(&[n, hidden], 1.0, 0.0);
        for dtype in DTYPES {
            let t = Var::from_tensor(&base.to_dtype(dtype).unwrap()).unwrap();
            let ours = crosskv::ops::embedding(t.as_tensor(), &ids).unwrap();
            let want = t.as_tensor().index_select(&ids, 0).unwrap();
            assert_eq!((ours.dims(), ours.dtype()), (&[n, hidden][..], dtype));
            assert_eq!(flat(&ours), flat(&want), "{vocab}x{hidden} {dtype:?}: forward");
            // Output gradients representable in `dtype`, so the f32 sums compare exactly.
            let w = w.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            let loss = |x: &Tensor| (x.to_dtype(DType::F32).unwrap() * &w).unwrap().sum_all().unwrap();
            let g = loss(&ours).backward().unwrap();
            let g = g.get(t.as_tensor()).unwrap();
            assert_eq!(g.dtype(), dtype);
            if dtype == DType::F32 {
                let gw = loss(&want).backward().unwrap();
                let gw = gw.get(t.as_tensor()).unwrap();
                assert_eq!(flat(g), flat(gw), "{vocab}x{hidden}: gradient");
            } else {
                // candle's index_add sums in the half dtype; compare with the f32 sums.
                let t32 = Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap();
                let g32 = loss(&t32.as_tensor().index_select(&ids, 0).unwrap())
                    .backward()
                    .unwrap();
                let g32 = g32.get(t32.as_tensor()).unwrap().to_dtype(dtype).unwrap();
                assert_eq!(flat(g), flat(&g32), "{vocab}x{hidden} {dtype:?}: gradient");
            }
        }
    }
    let t = Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(crosskv::ops::embedding(&t, &Tensor::new(&[1u32, 4], &Device::Cpu).unwrap()).is_err());
    let e = crosskv::ops::embedding(&t, &Tensor::new(&[[1u32]], &Device::Cpu).unwrap()).unwrap_err();
    assert!(e.to_string().contains("u32 [n]"), "{e}");
    let e = crosskv::ops::embedding(&t, &Tensor::new(&[1i64], &Device::Cpu).unwrap()).unwrap_err();
    assert!(e.to_string().contains("u32 [n]"), "{e}");
}

/// A decode graph's padding rows (`SKIP_ROW`) are written nowhere; the other rows land
/// where their positions say, and a position past the cache is still an error.
#[test]
fn reshape_and_cache_skips_padding_rows() {
    use crosskv::ops::reshape_and_cache::SKIP_ROW;
    let cache = Tensor::zeros((2, 2, 1, 3), DType::F32, &Device::Cpu).unwrap();
    let new = Tensor::arange(1f32, 10., &Device::Cpu)
        .unwrap()
        .reshape((3, 1, 3))
        .unwrap();
    let pos = Tensor::new(&[2u32, SKIP_ROW, 0], &Device::Cpu).unwrap();
    crosskv::ops::reshape_and_cache(&cache, &new, &pos).unwrap();
    let got: Vec<f32> = cache.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got, [7., 8., 9., 0., 0., 0., 1., 2., 3., 0., 0., 0.]);
    let past = Tensor::new(&[4u32, 0, 1], &Device::Cpu).unwrap();
    assert!(crosskv::ops::reshape_and_cache(&cache, &new, &past).is_err());
}

/// `swiglu_packed` of a stacked gate/up matrix is the unfused `swiglu` of its halves,
/// to the last bit; an odd width is an error.
#[test]
fn swiglu_packed_is_swiglu_of_the_halves() {
    let mut rng = Rng::new(3);
    for (rows, f) in [(4, 6), (1, 1), (3, 17)] {
        let gu = rng.tensor(&[rows, 2 * f], 1.0, 0.0);
        let want = flat(&crosskv::ops::swiglu(&gu.narrow(1, 0, f).unwrap(), &gu.narrow(1, f, f).unwrap()).unwrap());
        assert_eq!(flat(&crosskv::ops::swiglu_packed(&gu).unwrap()), want);
    }
    let odd = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
    assert!(crosskv::ops::swiglu_packed(&odd).is_err());
    // Its gradient is the halves' gradients side by side.
    let gu = candle_core::Var::from_tensor(&rng.tensor(&[3, 8], 1.0, 0.0)).unwrap();
    let w = rng.tensor(&[3, 4], 1.0, 0.0);
    let packed = crosskv::ops::swiglu_packed(gu.as_tensor()).unwrap();
    let got = flat(grads_of(&packed, &w).get(gu.as_tensor()).unwrap());
    let (g, u) = (
        gu.as_tensor().narrow(1, 0, 4).unwrap(),
        gu.as_tensor().narrow(1, 4, 4).unwrap(),
    );
    let halves = crosskv::ops::swiglu(&g, &u).unwrap();
    let want = flat(grads_of(&halves, &w).get(gu.as_tensor()).unwrap());
    assert_eq!(got, want);
}

/// `sum_squares_into` adds each tensor's sum of squares to the accumulator, bf16 and f16
/// gradients widened first (300² overflows neither); integer tensors are an error.
#[test]
fn sum_squares_accumulates() {
    let acc = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    crosskv::ops::sum_squares_into(&acc, &Tensor::new(&[1f32, -2., 3.], &Device::Cpu).unwrap()).unwrap();
    crosskv::ops::sum_squares_into(&acc, &Tensor::new(&[[0.5f32], [4.]], &Device::Cpu).unwrap()).unwrap();
    assert_eq!(flat(&acc), [14.0 + 0.25 + 16.0]);
    let wide = Tensor::new(&[300f32, 0.5], &Device::Cpu).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        crosskv::ops::sum_squares_into(&acc, &wide.to_dtype(dtype).unwrap()).unwrap();
    }
    assert_eq!(flat(&acc), [30.25 + 2.0 * 90_000.25]);
    let ids = Tensor::new(&[1u32], &Device::Cpu).unwrap();
    assert!(crosskv::ops::sum_squares_into(&acc, &ids).is_err());
    // Many at once: the same as one by one.
    let many = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    let parts = [
        Tensor::new(&[1f32, -2.], &Device::Cpu).unwrap(),
        Tensor::new(&[3f32], &Device::Cpu).unwrap(),
    ];
    crosskv::ops::sum_squares_many(&many, &parts.iter().collect::<Vec<_>>()).unwrap();
    assert_eq!(flat(&many), [14.0]);
    assert!(crosskv::ops::sum_squares_many(&many, &[&ids]).is_err());
}

/// `rope_packed` (training's packed Q/K/V): the first heads rotated exactly as `rope`
/// rotates Q and K, the rest (V) copied bit for bit, and its gradient in one tensor of
/// the packed shape: the output gradient rotated back (the rotation by the negated
/// angles) on Q and K's heads, passed through on V's.
#[test]
fn rope_packed_rotates_q_and_k_and_copies_v() {
    use candle_core::Var;
    use crosskv::ops::rope_packed;
    let mut rng = Rng::new(17);
    let slice = |x: &Tensor, at: usize, n: usize| x.narrow(1, at, n).unwrap().contiguous().unwrap();
    for dtype in DTYPES {
        for interleaved in [false, true] {
            for (t, h, kh, d) in [(5, 4, 2, 8), (3, 2, 1, 64), (9, 3, 3, 6), (40, 12, 12, 64)] {
                let what = format!("{dtype:?} interleaved={interleaved} t{t} h{h}/{kh} d{d}");
                let x = rng.tensor(&[t, h + 2 * kh, d], 1.0, 0.0).to_dtype(dtype).unwrap();
                let dy = rng.tensor(&[t, h + 2 * kh, d], 1.0, 0.0).to_dtype(dtype).unwrap();
                let (cos, sin) = tables(&mut rng, 64, d / 2, dtype);
                let pt = Tensor::new(rng.tokens(t, 64).as_slice(), &Device::Cpu).unwrap();
                let xv = Var::from_tensor(&x).unwrap();
                let y = rope_packed(xv.as_tensor(), &pt, &cos, &sin, interleaved, h + kh).unwrap();
                assert_eq!(y.dims(), x.dims(), "{what}");
                let (qr, kr) = rope(&slice(&x, 0, h), Some(&slice(&x, h, kh)), &pt, &cos, &sin, interleaved).unwrap();
                assert_eq!(flat(&slice(&y, 0, h)), flat(&qr), "{what}: q");
                assert_eq!(flat(&slice(&y, h, kh)), flat(&kr.unwrap()), "{what}: k");
                assert_eq!(flat(&slice(&y, h + kh, kh)), flat(&slice(&x, h + kh, kh)), "{what}: v");

                let gx = grads_of(&y, &dy).get(xv.as_tensor()).expect("a gradient").clone();
                assert_eq!(gx.dims(), x.dims(), "{what}: gradient shape");
                let neg = sin.neg().unwrap();
                let (gq, gk) = rope(
                    &slice(&dy, 0, h),
                    Some(&slice(&dy, h, kh)),
                    &pt,
                    &cos,
                    &neg,
                    interleaved,
                )
                .unwrap();
                assert_eq!(flat(&slice(&gx, 0, h)), flat(&gq), "{what}: dq");
                assert_eq!(flat(&slice(&gx, h, kh)), flat(&gk.unwrap()), "{what}: dk");
                assert_eq!(
                    flat(&slice(&gx, h + kh, kh)),
                    flat(&slice(&dy, h + kh, kh)),
                    "{what}: dv"
                );
            }
        }
    }
    // More heads to rotate than there are is an error.
    let x = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let (cos, sin) = tables(&mut rng, 4, 2, DType::F32);
    let pt = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
    assert!(rope_packed(&x, &pt, &cos, &sin, false, 4).is_err());
}

/// A producer's packed Q/K/V in one call: Q comes back rotated, K (rotated) and V land in
/// the caches' rows of their tokens (the textbook rotation as the reference), a padding
/// row (SKIP_ROW) writes nothing, and a head count that is not q + 2 kv is refused.
#[test]
fn rope_and_cache_rotates_q_and_writes_k_v_to_their_rows() {
    use crosskv::ops::reshape_and_cache::SKIP_ROW;
    let dev = Device::Cpu;
    let mut rng = Rng::new(12);
    for (interleaved, kv) in [(false, 1usize), (true, 2)] {
        let (t, h, d) = (4usize, 4usize, 8usize);
        let x = rng.tensor(&[t, h + 2 * kv, d], 1.0, 0.0);
        let (cos, sin) = tables(&mut rng, 32, d / 2, DType::F32);
        let pos_v = vec![5u32, 0, 31, 7];
        let pos = Tensor::new(pos_v.as_slice(), &dev).unwrap();
        let rows_v = vec![3u32, SKIP_ROW, 9, 0];
        let rows = Tensor::new(rows_v.as_slice(), &dev).unwrap();
        let kc = Tensor::zeros((2, 8, kv, d), DType::F32, &dev).unwrap();
        let vc = Tensor::zeros((2, 8, kv, d), DType::F32, &dev).unwrap();
        let q = crosskv::ops::rope_and_cache(&x, &pos, &cos, &sin, interleaved, h, &kc, &vc, &rows).unwrap();
        assert_eq!(q.dims(), [t, h, d]);
        let want_q = naive_rope(&x.narrow(1, 0, h).unwrap(), &pos_v, &cos, &sin, interleaved);
        assert!(max_diff(&flat(&q), &want_q) < 1e-5);
        let want_k = naive_rope(
            &x.narrow(1, h, kv).unwrap().contiguous().unwrap(),
            &pos_v,
            &cos,
            &sin,
            interleaved,
        );
        let want_v = flat(&x.narrow(1, h + kv, kv).unwrap());
        let (kc, vc) = (flat(&kc), flat(&vc));
        let row = kv * d;
        let mut written = [false; 16];
        for (ti, &r) in rows_v.iter().enumerate() {
            if r == SKIP_ROW {
                continue;
            }
            let r = r as usize;
            written[r] = true;
            let (got_k, got_v) = (&kc[r * row..(r + 1) * row], &vc[r * row..(r + 1) * row]);
            assert!(max_diff(got_k, &want_k[ti * row..(ti + 1) * row]) < 1e-5, "k row {r}");
            assert_eq!(got_v, &want_v[ti * row..(ti + 1) * row], "v row {r}");
        }
        for r in (0..16).filter(|&r| !written[r]) {
            assert!(kc[r * row..(r + 1) * row]
                .iter()
                .chain(&vc[r * row..(r + 1) * row])
                .all(|&v| v == 0.0));
        }
    }
    let x = Tensor::zeros((2, 7, 8), DType::F32, &dev).unwrap();
    let (cos, sin) = tables(&mut rng, 4, 4, DType::F32);
    let (pos, rows) = (
        Tensor::new(&[0u32, 1], &dev).unwrap(),
        Tensor::new(&[0u32, 1], &dev).unwrap(),
    );
    let c = Tensor::zeros((1, 4, 1, 8), DType::F32, &dev).unwrap();
    let err = crosskv::ops::rope_and_cache(&x, &pos, &cos, &sin, false, 4, &c, &c, &rows).unwrap_err();
    assert!(err.to_string().contains("packed heads"), "{err}");
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
