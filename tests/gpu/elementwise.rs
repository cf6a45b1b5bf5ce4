//! The per-row kernels (RMSNorm, RoPE, SwiGLU, argmax, widening, the fused projections) against the CPU.

use super::*;

/// Row sizes for the norm kernels: the models' hidden sizes (one warp per row up to
/// 1024, one CTA above), and sizes that are not a multiple of 8 elements (the scalar
/// path for f16/bf16; 100 is still vectorised in f32), on both sides of 1024.
const NORM_HIDDEN: [usize; 9] = [576, 2048, 4096, 8192, 1024, 7, 100, 1030, 4100];

#[test]
fn rms_norm_matches_cpu() {
    let dev = gpu();
    let mut summary = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (i, &hidden) in NORM_HIDDEN.iter().enumerate() {
            for rows in [1, 3, 37] {
                let mut rng = Rng::new(100 + i as u64 * 7 + rows as u64);
                let (x_c, x_g) = pair(&mut rng, &[rows, hidden], dtype, &dev);
                let w_c = rng.tensor(&[hidden], 0.5, 1.0).to_dtype(dtype).unwrap();
                let w_g = w_c.to_device(&dev).unwrap();
                let want = rms_norm(&x_c, &w_c, 1e-5).unwrap();
                let got = rms_norm(&x_g, &w_g, 1e-5).unwrap();
                assert_eq!((got.dims(), got.dtype()), (want.dims(), dtype));
                let e = rel_err(&flat(&got), &flat(&want));
                assert!(
                    e <= tol(dtype),
                    "rms_norm {dtype:?} rows {rows} hidden {hidden}: relative error {e}"
                );
                summary.push(format!(
                    "rms_norm {dtype:?} rows {rows:2} hidden {hidden:4}: max rel err {e:.2e}"
                ));
            }
        }
    }
    for s in summary {
        eprintln!("{s}");
    }
}

#[test]
fn add_rms_norm_matches_cpu() {
    let dev = gpu();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (i, &hidden) in NORM_HIDDEN.iter().enumerate() {
            for rows in [1, 5, 37] {
                let mut rng = Rng::new(300 + i as u64 * 7 + rows as u64);
                let (x_c, x_g) = pair(&mut rng, &[rows, hidden], dtype, &dev);
                let (r_c, r_g) = pair(&mut rng, &[rows, hidden], dtype, &dev);
                let w_c = rng.tensor(&[hidden], 0.5, 1.0).to_dtype(dtype).unwrap();
                let w_g = w_c.to_device(&dev).unwrap();
                let (s_want, n_want) = add_rms_norm(&x_c, &r_c, &w_c, 1e-6).unwrap();
                let (s_got, n_got) = add_rms_norm(&x_g, &r_g, &w_g, 1e-6).unwrap();
                let what = format!("add_rms_norm {dtype:?} rows {rows} hidden {hidden}");
                // The sum is one add rounded to nearest even on both sides: exact.
                let (sg, sw) = (flat(&s_got), flat(&s_want));
                assert!(sg == sw, "{what}: the residual sum differs from the CPU's");
                let e = rel_err(&flat(&n_got), &flat(&n_want));
                assert!(e <= tol(dtype), "{what}: relative error {e}");
                eprintln!("{what}: sum exact, normed max rel err {e:.2e}");
            }
        }
    }
}

/// Inputs that start mid-buffer (not 16-byte aligned) fall back to element loads.
#[test]
fn norms_handle_unaligned_views_on_cuda() {
    let dev = gpu();
    for dtype in [DType::F32, DType::BF16] {
        for hidden in [576, 2048] {
            let rows = 3;
            let mut rng = Rng::new(500 + hidden as u64);
            let n = rows * hidden;
            let (big_c, big_g) = pair(&mut rng, &[n + 1], dtype, &dev);
            let view = |t: &Tensor| t.narrow(0, 1, n).unwrap().reshape((rows, hidden)).unwrap();
            let (x_c, x_g) = (view(&big_c), view(&big_g));
            let (r_c, r_g) = pair(&mut rng, &[rows, hidden], dtype, &dev);
            let w_c = rng.tensor(&[hidden], 0.5, 1.0).to_dtype(dtype).unwrap();
            let w_g = w_c.to_device(&dev).unwrap();
            let e = rel_err(
                &flat(&rms_norm(&x_g, &w_g, 1e-5).unwrap()),
                &flat(&rms_norm(&x_c, &w_c, 1e-5).unwrap()),
            );
            assert!(e <= tol(dtype), "rms_norm unaligned {dtype:?} hidden {hidden}: {e}");
            // The residual unaligned, x aligned; then the fused outputs (views) fed back in.
            let (s_c, n_c) = add_rms_norm(&r_c, &x_c, &w_c, 1e-5).unwrap();
            let (s_g, n_g) = add_rms_norm(&r_g, &x_g, &w_g, 1e-5).unwrap();
            assert!(
                flat(&s_g) == flat(&s_c),
                "add_rms_norm unaligned {dtype:?} hidden {hidden}: sum"
            );
            assert!(rel_err(&flat(&n_g), &flat(&n_c)) <= tol(dtype));
            // The same inputs on both sides: the GPU's normed output (within tolerance of
            // the CPU's, not equal) is copied over, so the sums must match exactly.
            let n_gc = n_g.to_device(&Device::Cpu).unwrap();
            let (s2_c, n2_c) = add_rms_norm(&s_c, &n_gc, &w_c, 1e-5).unwrap();
            let (s2_g, n2_g) = add_rms_norm(&s_g, &n_g, &w_g, 1e-5).unwrap();
            assert!(flat(&s2_g) == flat(&s2_c));
            assert!(rel_err(&flat(&n2_g), &flat(&n2_c)) <= tol(dtype));
        }
    }
}

#[test]
fn rope_matches_cpu() {
    let dev = gpu();
    // (tokens, heads, kv_heads, head_dim): SmolLM2 (9/3, 64), llama 8B (32/8, 128), MQA,
    // a consumer (no K), odd small heads, a prefill-sized batch.
    let shapes = [
        (1, 9, 3, 64),
        (7, 32, 8, 128),
        (3, 8, 1, 64),
        (5, 9, 0, 64),
        (4, 3, 1, 6),
        (300, 9, 3, 64),
    ];
    let max_pos = 600;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for interleaved in [false, true] {
            for (i, &(t, h, kh, d)) in shapes.iter().enumerate() {
                let mut rng = Rng::new(700 + i as u64);
                let (q_c, q_g) = pair(&mut rng, &[t, h, d], dtype, &dev);
                // (No zero-sized tensor for a consumer: k is made but not passed.)
                let (k_c, k_g) = pair(&mut rng, &[t, kh.max(1), d], dtype, &dev);
                let angles = rng.tensor(&[max_pos, d / 2], 3.0, 0.0);
                let cos_c = angles.cos().unwrap().to_dtype(dtype).unwrap();
                let sin_c = angles.sin().unwrap().to_dtype(dtype).unwrap();
                let (cos_g, sin_g) = (cos_c.to_device(&dev).unwrap(), sin_c.to_device(&dev).unwrap());
                let mut pos = rng.tokens(t, max_pos);
                pos[0] = (max_pos - 1) as u32;
                let pos_c = Tensor::new(pos.as_slice(), &Device::Cpu).unwrap();
                let pos_g = pos_c.to_device(&dev).unwrap();
                let what = format!("rope {dtype:?} interleaved={interleaved} t{t} heads {h}/{kh} d{d}");
                let with_k = kh > 0;
                let (qw, kw) = rope(&q_c, with_k.then_some(&k_c), &pos_c, &cos_c, &sin_c, interleaved).unwrap();
                let (qg, kg) = rope(&q_g, with_k.then_some(&k_g), &pos_g, &cos_g, &sin_g, interleaved).unwrap();
                let e = rel_err(&flat(&qg), &flat(&qw));
                assert!(e <= tol(dtype), "{what}: q relative error {e}");
                if with_k {
                    let e = rel_err(&flat(&kg.unwrap()), &flat(&kw.unwrap()));
                    assert!(e <= tol(dtype), "{what}: k relative error {e}");
                }
                eprintln!("{what}: max rel err {e:.2e}");
            }
        }
    }
}

#[test]
fn rope_writes_nan_for_a_position_past_the_tables_on_cuda() {
    let dev = gpu();
    let q = Tensor::ones((2, 2, 8), DType::F32, &dev).unwrap();
    let tab = Tensor::ones((4, 4), DType::F32, &dev).unwrap();
    let pos = Tensor::new(&[1u32, 4], &dev).unwrap();
    let (qr, _) = rope(&q, None, &pos, &tab, &tab, false).unwrap();
    let v = flat(&qr);
    assert!(
        v[..16].iter().all(|x| x.is_finite()) && v[16..].iter().all(|x| x.is_nan()),
        "{v:?}"
    );
}

/// Our argmax on the device picks what the CPU sampler picks: the first maximum, never
/// NaN, 0 for a row with nothing above -inf.
#[test]
fn argmax_rows_matches_cpu() {
    let dev = gpu();
    let mut rng = Rng::new(77);
    // 1002 columns: rows alternately 16-byte aligned (float4 loads) or not, and a tail.
    for (rows, cols) in [(1, 1), (3, 7), (256, 50304), (5, 1000), (4, 1002)] {
        let mut v: Vec<f32> = rng.tensor(&[rows * cols], -4.0, 4.0).to_vec1().unwrap();
        if cols >= 7 {
            v[0] = f32::NAN; // row 0 starts with NaN
            v[cols + 3] = 100.0; // row 1: a tie at 3 and 5
            v[cols + 5] = 100.0;
        }
        if rows >= 3 {
            v[2 * cols..3 * cols].fill(f32::NEG_INFINITY);
        }
        let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap();
        let want = crosskv::ops::argmax_rows(&t).unwrap().to_vec1::<u32>().unwrap();
        let got = crosskv::ops::argmax_rows(&t.to_device(&dev).unwrap())
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(got, want, "{rows}x{cols}");
        if cols >= 7 {
            assert_eq!(want[1], 3);
        }
        eprintln!("argmax_rows {rows}x{cols}: equal");
    }
}

/// The fused SwiGLU kernels (forward; backward: both gradients) against the CPU op,
/// f32 and bf16, the training shape and odd sizes.
#[test]
fn swiglu_matches_cpu() {
    use candle_core::Var;
    let dev = gpu();
    let mut rng = Rng::new(42);
    for dtype in [DType::F32, DType::BF16] {
        for shape in [[8192usize, 2048usize], [3, 5], [1, 5472]] {
            let (gc, gg) = pair(&mut rng, &shape, dtype, &dev);
            let (uc, ug) = pair(&mut rng, &shape, dtype, &dev);
            let (dc, dg) = pair(&mut rng, &shape, dtype, &dev);
            let run = |g: Tensor, u: Tensor, dy: &Tensor| {
                let (g, u) = (Var::from_tensor(&g).unwrap(), Var::from_tensor(&u).unwrap());
                let y = crosskv::ops::swiglu(g.as_tensor(), u.as_tensor()).unwrap();
                let grads = grads_of(&y, dy);
                let (a, b) = (
                    grads.get(g.as_tensor()).unwrap().clone(),
                    grads.get(u.as_tensor()).unwrap().clone(),
                );
                (flat(&y), flat(&a), flat(&b))
            };
            let (yc, ac, bc) = run(gc, uc, &dc);
            let (yg, ag, bg) = run(gg, ug, &dg);
            let errs = [rel_err(&yg, &yc), rel_err(&ag, &ac), rel_err(&bg, &bc)];
            eprintln!(
                "swiglu {shape:?} {dtype:?}: y {:.2e}, dgate {:.2e}, dup {:.2e}",
                errs[0], errs[1], errs[2]
            );
            assert!(errs.iter().all(|e| *e < tol(dtype)), "{dtype:?} {shape:?}: {errs:?}");
        }
    }
}

/// The serving path's fused projections on CUDA: `swiglu_packed` of a stacked gate/up
/// matrix, RoPE of Q and K read as column slices of one QKV matrix, and the cache write
/// of V read the same way, each against the CPU on the same (contiguous) inputs.
#[test]
fn fused_projection_ops_match_cpu() {
    let dev = gpu();
    let mut rng = Rng::new(9);
    for dtype in [DType::F32, DType::BF16] {
        // swiglu_packed: [rows, 2f].
        for (rows, f) in [(64, 5472), (3, 5), (1, 48)] {
            let (c, g) = pair(&mut rng, &[rows, 2 * f], dtype, &dev);
            let want = flat(&crosskv::ops::swiglu_packed(&c).unwrap());
            let unfused =
                flat(&crosskv::ops::swiglu(&c.narrow(1, 0, f).unwrap(), &c.narrow(1, f, f).unwrap()).unwrap());
            assert_eq!(want, unfused, "the CPU reference is the unfused swiglu");
            let got = flat(&crosskv::ops::swiglu_packed(&g).unwrap());
            let e = rel_err(&got, &want);
            eprintln!("swiglu_packed [{rows}, 2x{f}] {dtype:?}: {e:.2e}");
            assert!(e < tol(dtype), "{dtype:?} swiglu_packed [{rows}, {f}]: {e}");
            // Its backward (training's MLP): the packed gradient of a weighted sum.
            let (wc, wg) = pair(&mut rng, &[rows, f], dtype, &dev);
            let grad = |x: &Tensor, w: &Tensor| {
                let v = candle_core::Var::from_tensor(x).unwrap();
                let y = crosskv::ops::swiglu_packed(v.as_tensor()).unwrap();
                let loss = (y.to_dtype(DType::F32).unwrap() * w.to_dtype(DType::F32).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap();
                flat(loss.backward().unwrap().get(v.as_tensor()).unwrap())
            };
            let e = rel_err(&grad(&g, &wg), &grad(&c, &wc));
            eprintln!("swiglu_packed backward [{rows}, 2x{f}] {dtype:?}: {e:.2e}");
            assert!(e < tol(dtype), "{dtype:?} swiglu_packed backward [{rows}, {f}]: {e}");
        }
        // RoPE and the cache write on slices of a [t, heads + 2 kv_heads, d] projection.
        let (t, heads, kvh, d, max_pos) = (7, 8, 2, 64, 32);
        let (qkv_c, qkv_g) = pair(&mut rng, &[t, heads + 2 * kvh, d], dtype, &dev);
        let (cos_c, cos_g) = pair(&mut rng, &[max_pos, d / 2], dtype, &dev);
        let (sin_c, sin_g) = pair(&mut rng, &[max_pos, d / 2], dtype, &dev);
        let pos_c = Tensor::new(&[3u32, 0, 31, 7, 7, 12, 1], &Device::Cpu).unwrap();
        let pos_g = pos_c.to_device(&dev).unwrap();
        let slices = |x: &Tensor| {
            (
                x.narrow(1, 0, heads).unwrap(),
                x.narrow(1, heads, kvh).unwrap(),
                x.narrow(1, heads + kvh, kvh).unwrap(),
            )
        };
        let (qc, kc, vc) = slices(&qkv_c);
        let (qg, kg, vg) = slices(&qkv_g);
        assert!(!qg.is_contiguous() && !vg.is_contiguous());
        let (rq_c, rk_c) = rope(
            &qc.contiguous().unwrap(),
            Some(&kc.contiguous().unwrap()),
            &pos_c,
            &cos_c,
            &sin_c,
            false,
        )
        .unwrap();
        let (rq_g, rk_g) = rope(&qg, Some(&kg), &pos_g, &cos_g, &sin_g, false).unwrap();
        let eq = rel_err(&flat(&rq_g), &flat(&rq_c));
        let ek = rel_err(&flat(&rk_g.unwrap()), &flat(&rk_c.unwrap()));
        assert!(
            eq < tol(dtype) && ek < tol(dtype),
            "{dtype:?} rope on slices: q {eq}, k {ek}"
        );
        let (cache_c, cache_g) = pair(&mut rng, &[4, 4, kvh, d], dtype, &dev);
        let rows_c = Tensor::new(
            &[5u32, 0, 15, 9, crosskv::ops::reshape_and_cache::SKIP_ROW, 2, 11],
            &Device::Cpu,
        )
        .unwrap();
        let rows_g = rows_c.to_device(&dev).unwrap();
        reshape_and_cache(&cache_c, &vc.contiguous().unwrap(), &rows_c).unwrap();
        reshape_and_cache(&cache_g, &vg, &rows_g).unwrap();
        assert!(
            flat(&cache_g) == flat(&cache_c),
            "{dtype:?}: the cache write of a V slice differs"
        );
        eprintln!("rope / reshape_and_cache on QKV slices {dtype:?}: q {eq:.2e}, k {ek:.2e}, cache exact");
    }
}

/// The logits' widening to f32 equals candle's CPU cast bit for bit: odd lengths (the
/// scalar tail), a view starting mid-vector (the unaligned path) and a decode step's
/// logits.
#[test]
fn widen_f32_matches_cpu_bit_for_bit() {
    let dev = gpu();
    let mut rng = Rng::new(5);
    for dtype in [DType::BF16, DType::F16] {
        for shape in [vec![1], vec![3, 7], vec![64, 50304]] {
            let (c, g) = pair(&mut rng, &shape, dtype, &dev);
            let want = flat(&c.to_dtype(DType::F32).unwrap());
            assert_eq!(flat(&crosskv::ops::widen_f32(&g).unwrap()), want, "{dtype:?} {shape:?}");
            let n = want.len();
            if n > 2 {
                let view = g.flatten_all().unwrap().narrow(0, 1, n - 2).unwrap();
                assert_eq!(
                    flat(&crosskv::ops::widen_f32(&view).unwrap()),
                    want[1..n - 1],
                    "{dtype:?} {shape:?} view"
                );
            }
        }
    }
}

/// A decode step's producer in one launch: Q rotated, K rotated and V written to the
/// caches' rows, against the CPU reference (rope_packed, then reshape_and_cache twice) on
/// random caches: scattered rows, a padding row (SKIP_ROW) that writes nowhere, MQA and
/// GQA, half and interleaved rotation, and a packed input whose rows are strided (a view).
#[test]
fn rope_and_cache_matches_cpu() {
    let dev = gpu();
    let mut rng = Rng::new(31);
    for dtype in [DType::F32, DType::BF16] {
        for interleaved in [false, true] {
            for (t, h, kh, d, view) in [
                (6usize, 16usize, 1usize, 128usize, false),
                (5, 4, 2, 64, true),
                (1, 2, 1, 8, false),
            ] {
                let (cache_rows, heads) = (40usize, h + 2 * kh);
                let width = if view { heads + 1 } else { heads };
                let (x_c, x_g) = pair(&mut rng, &[t, width, d], dtype, &dev);
                let (x_c, x_g) = (x_c.narrow(1, 0, heads).unwrap(), x_g.narrow(1, 0, heads).unwrap());
                let (kc_c, kc_g) = pair(&mut rng, &[cache_rows / 8, 8, kh, d], dtype, &dev);
                let (vc_c, vc_g) = pair(&mut rng, &[cache_rows / 8, 8, kh, d], dtype, &dev);
                let a = rng.tensor(&[64, d / 2], 3.0, 0.0);
                let (cos, sin) = (
                    a.cos().unwrap().to_dtype(dtype).unwrap(),
                    a.sin().unwrap().to_dtype(dtype).unwrap(),
                );
                let pos = Tensor::new(rng.tokens(t, 64).as_slice(), &Device::Cpu).unwrap();
                let mut rows: Vec<u32> = shuffled(&mut rng, cache_rows)[..t].to_vec();
                if t > 1 {
                    rows[1] = crosskv::ops::reshape_and_cache::SKIP_ROW;
                }
                let rows = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
                let run = |x: &Tensor, kc: &Tensor, vc: &Tensor, dev: &Device| {
                    let q = crosskv::ops::rope_and_cache(
                        x,
                        &pos.to_device(dev).unwrap(),
                        &cos.to_device(dev).unwrap(),
                        &sin.to_device(dev).unwrap(),
                        interleaved,
                        h,
                        kc,
                        vc,
                        &rows.to_device(dev).unwrap(),
                    )
                    .unwrap();
                    assert_eq!(q.dims(), [t, h, d]);
                    (flat(&q), flat(kc), flat(vc))
                };
                let want = run(&x_c, &kc_c, &vc_c, &Device::Cpu);
                let got = run(&x_g, &kc_g, &vc_g, &dev);
                let what =
                    format!("rope_and_cache {dtype:?} interleaved={interleaved} t{t} {h}+{kh}+{kh} d{d} view={view}");
                let e = [
                    rel_err(&got.0, &want.0),
                    rel_err(&got.1, &want.1),
                    rel_err(&got.2, &want.2),
                ];
                eprintln!("{what}: q {:.2e}, k cache {:.2e}, v cache {:.2e}", e[0], e[1], e[2]);
                assert!(e.iter().all(|&e| e <= tol(dtype)), "{what}: {e:?}");
                // V is copied, not computed: its cache rows equal the CPU's bit for bit.
                assert_eq!(got.2, want.2, "{what}: v cache");
            }
        }
    }
}
