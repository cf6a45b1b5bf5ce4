//! The training kernels (flash attention forward and backward, AdamW, cross-entropy, embedding and norm gradients) and training steps, against the CPU.

use super::*;

/// One `causal_attention` case on CUDA against the CPU reference in f32 on the same
/// (rounded) inputs: the output and, through candle's autograd with a random dO, dq, dk
/// and dv. The errors of (out, dq, dk, dv); with t = 1 a row's only key is itself, dq and
/// dk are zero but for rounding, so there they are measured against dv's scale.
#[allow(clippy::too_many_arguments)]
fn flash_case(
    dev: &Device,
    dtype: DType,
    b: usize,
    t: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    seed: u64,
) -> [f32; 4] {
    use candle_core::Var;
    // Output and q/k/v gradients of causal_attention under the loss Σ out∘dO.
    let run = |q: &Tensor, k: &Tensor, v: &Tensor, w: &Tensor, scale: f32| -> Vec<Vec<f32>> {
        let (q, k, v) = (
            Var::from_tensor(q).unwrap(),
            Var::from_tensor(k).unwrap(),
            Var::from_tensor(v).unwrap(),
        );
        let out = crosskv::ops::causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale).unwrap();
        let grads = (&out * w).unwrap().sum_all().unwrap().backward().unwrap();
        let g = |x: &Var| flat(grads.get(x.as_tensor()).expect("a gradient"));
        vec![flat(&out), g(&q), g(&k), g(&v)]
    };
    let mut rng = Rng::new(seed);
    let (q_c, q_g) = pair(&mut rng, &[b, t, heads, d], dtype, dev);
    let (k_c, k_g) = pair(&mut rng, &[b, t, kv_heads, d], dtype, dev);
    let (v_c, v_g) = pair(&mut rng, &[b, t, kv_heads, d], dtype, dev);
    let (w_c, w_g) = pair(&mut rng, &[b, t, heads, d], dtype, dev);
    let scale = 1.0 / (d as f32).sqrt();
    let f32s = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
    let want = run(&f32s(&q_c), &f32s(&k_c), &f32s(&v_c), &f32s(&w_c), scale);
    let got = run(&q_g, &k_g, &v_g, &w_g, scale);
    let dv_scale = want[3].iter().fold(0f32, |m, x| m.max(x.abs()));
    let mut errs = [0f32; 4];
    for (i, e) in errs.iter_mut().enumerate() {
        *e = if t == 1 && (i == 1 || i == 2) {
            got[i]
                .iter()
                .fold(0f32, |m, x| if x.is_finite() { m.max(x.abs()) } else { f32::INFINITY })
                / dv_scale
        } else {
            rel_err(&got[i], &want[i])
        };
    }
    errs
}

/// `causal_attention` on CUDA (the flash-attention kernels, f16/bf16, head_dim 64/128)
/// against the CPU f32 reference, forward and backward (dk/dv summed over each group):
/// b = 2, MHA, GQA 4 and MQA (16 query heads on one KV head), lengths around the 64-row
/// tiles; then a long sequence whose group the dK/dV kernel splits over several CTAs
/// (on the H100, 8 CTAs of 2 query heads each), summing them with atomics.
#[test]
fn flash_attention_matches_cpu() {
    let dev = gpu();
    let mut worst: std::collections::BTreeMap<String, f32> = Default::default();
    let names = ["out", "dq", "dk", "dv"];
    for dtype in [DType::BF16, DType::F16] {
        for d in [64, 128] {
            for (heads, kv_heads) in [(4, 4), (8, 2), (16, 1)] {
                for t in [1, 17, 64, 65, 200] {
                    let seed = 900 + t as u64 * 31 + heads as u64 * 7 + d as u64;
                    let errs = flash_case(&dev, dtype, 2, t, heads, kv_heads, d, seed);
                    let what = format!("flash {dtype:?} d{d} heads {heads}/{kv_heads} b2 t{t}");
                    for (name, e) in names.iter().zip(errs) {
                        eprintln!("{what} {name}: max rel err {e:.2e}");
                        assert!(e <= tol(dtype), "{what}: {name} relative error {e}");
                        let w = worst
                            .entry(format!("{dtype:?} d{d} {heads}/{kv_heads} {name}"))
                            .or_insert(0.0);
                        *w = w.max(e);
                    }
                }
            }
        }
    }
    for (k, e) in worst {
        eprintln!("flash worst over t: {k}: {e:.2e}");
    }
    let errs = flash_case(&dev, DType::BF16, 2, 1100, 32, 2, 64, 7);
    for (name, e) in names.iter().zip(errs) {
        eprintln!("flash BF16 d64 heads 32/2 b2 t1100 {name}: max rel err {e:.2e}");
        assert!(e <= tol(DType::BF16), "t1100 heads 32/2: {name} relative error {e}");
    }
}

/// `rope_packed` on CUDA against the CPU: the first heads rotated, the rest copied, and
/// its gradient (the inverse rotation on those heads, V passed through) in one tensor;
/// training's shape (8192 tokens, 12 + 12 heads rotated, 12 copied) and odd ones.
#[test]
fn rope_packed_matches_cpu() {
    use candle_core::Var;
    let dev = gpu();
    let mut rng = Rng::new(77);
    for dtype in [DType::F32, DType::BF16] {
        for interleaved in [false, true] {
            for (t, h, kh, d) in [
                (8192usize, 12usize, 12usize, 64usize),
                (5, 4, 2, 8),
                (33, 3, 1, 6),
                (7, 16, 1, 128),
            ] {
                let (x_c, x_g) = pair(&mut rng, &[t, h + 2 * kh, d], dtype, &dev);
                let (dy_c, dy_g) = pair(&mut rng, &[t, h + 2 * kh, d], dtype, &dev);
                let a = rng.tensor(&[64, d / 2], 3.0, 0.0);
                let (cos, sin) = (
                    a.cos().unwrap().to_dtype(dtype).unwrap(),
                    a.sin().unwrap().to_dtype(dtype).unwrap(),
                );
                let pos = Tensor::new(rng.tokens(t, 64).as_slice(), &Device::Cpu).unwrap();
                let run = |x: &Tensor, dy: &Tensor, dev: &Device| {
                    let xv = Var::from_tensor(x).unwrap();
                    let (c, s, p) = (
                        cos.to_device(dev).unwrap(),
                        sin.to_device(dev).unwrap(),
                        pos.to_device(dev).unwrap(),
                    );
                    let y = crosskv::ops::rope_packed(xv.as_tensor(), &p, &c, &s, interleaved, h + kh).unwrap();
                    let g = grads_of(&y, dy).get(xv.as_tensor()).expect("a gradient").clone();
                    (flat(&y), flat(&g))
                };
                let (want_y, want_g) = run(&x_c, &dy_c, &Device::Cpu);
                let (got_y, got_g) = run(&x_g, &dy_g, &dev);
                let what = format!("rope_packed {dtype:?} interleaved={interleaved} t{t} {h}+{kh}+{kh} d{d}");
                let (ey, eg) = (rel_err(&got_y, &want_y), rel_err(&got_g, &want_g));
                eprintln!("{what}: y {ey:.2e}, grad {eg:.2e}");
                assert!(ey <= tol(dtype) && eg <= tol(dtype), "{what}: y {ey}, grad {eg}");
            }
        }
    }
}

/// The packed forms on CUDA (q, k, v as heads of one tensor; a consumer's q apart with
/// K and V inside a wider tensor) against the same ops on the CPU in f32 from the same
/// rounded inputs: the output and each input's whole gradient (the kernels write dq,
/// dk, dv into their columns with row strides; heads that are none of them must stay
/// zero). MHA, GQA, MQA, both head dims; t = 1100 with 32/2 heads splits each group's
/// dK/dV over CTAs (f32 atomics, then the strided cast).
#[test]
fn packed_flash_attention_matches_cpu() {
    use candle_core::Var;
    let dev = gpu();
    // Output and each input's gradient under the loss Σ out∘w.
    let run = |f: &dyn Fn(&[&Tensor]) -> Tensor, xs: &[&Tensor], w: &Tensor| -> Vec<Vec<f32>> {
        let vars: Vec<Var> = xs.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
        let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let out = f(&ts);
        let grads = (&out * w).unwrap().sum_all().unwrap().backward().unwrap();
        let mut r = vec![flat(&out)];
        r.extend(vars.iter().map(|v| flat(grads.get(v.as_tensor()).expect("a gradient"))));
        r
    };
    let f32s = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
    let mut cases = vec![];
    for d in [64, 128] {
        for (heads, kv_heads) in [(4, 4), (8, 2), (16, 1)] {
            for t in [17, 65, 200] {
                cases.push((2, t, heads, kv_heads, d));
            }
        }
    }
    cases.push((2, 1100, 32, 2, 64));
    for (i, &(b, t, h, kvh, d)) in cases.iter().enumerate() {
        let mut rng = Rng::new(3000 + i as u64);
        let scale = 1.0 / (d as f32).sqrt();
        let (w_c, w_g) = pair(&mut rng, &[b, t, h, d], DType::BF16, &dev);
        let (x_c, x_g) = pair(&mut rng, &[b, t, h + 2 * kvh, d], DType::BF16, &dev);
        let packed = |xs: &[&Tensor]| crosskv::ops::causal_attention_packed(xs[0], h, kvh, scale).unwrap();
        let want = run(&packed, &[&f32s(&x_c)], &f32s(&w_c));
        let got = run(&packed, &[&x_g], &w_g);
        for (name, (g, w)) in ["out", "dqkv"].iter().zip(got.iter().zip(&want)) {
            let e = rel_err(g, w);
            eprintln!("packed BF16 d{d} heads {h}/{kvh} b{b} t{t} {name}: max rel err {e:.2e}");
            assert!(
                e <= tol(DType::BF16),
                "packed d{d} {h}/{kvh} t{t}: {name} relative error {e}"
            );
        }
        let (q_c, q_g) = pair(&mut rng, &[b, t, h, d], DType::BF16, &dev);
        let (s_c, s_g) = pair(&mut rng, &[b, t, 2 + 2 * kvh + 1, d], DType::BF16, &dev);
        let shared = |xs: &[&Tensor]| crosskv::ops::causal_attention_shared_kv(xs[0], xs[1], 2, kvh, scale).unwrap();
        let want = run(&shared, &[&f32s(&q_c), &f32s(&s_c)], &f32s(&w_c));
        let got = run(&shared, &[&q_g, &s_g], &w_g);
        for (name, (g, w)) in ["out", "dq", "dsrc"].iter().zip(got.iter().zip(&want)) {
            let e = rel_err(g, w);
            eprintln!("shared-kv BF16 d{d} heads {h}/{kvh} b{b} t{t} {name}: max rel err {e:.2e}");
            assert!(
                e <= tol(DType::BF16),
                "shared d{d} {h}/{kvh} t{t}: {name} relative error {e}"
            );
        }
        // The source's heads that are neither K nor V get exactly zero.
        let g = &got[2];
        let row = (2 + 2 * kvh + 1) * d;
        for r in g.chunks(row) {
            assert!(
                r[..2 * d].iter().chain(&r[row - d..]).all(|&x| x == 0.0),
                "shared t{t}: other heads not zero"
            );
        }
    }
}

/// A tiny CLA2 model (160 positions, seeded) loaded three ways: f32 on the CPU (the
/// reference), bf16 on the CPU (what bf16 alone costs) and bf16 on CUDA.
fn tiny_cla_three_ways(
    seed: u64,
) -> (
    Tiny,
    crosskv::model::Model,
    crosskv::model::Model,
    crosskv::model::Model,
) {
    let tiny = Tiny::new(4, 4, 2, 64, 128, 97)
        .cla("cla_share_factor", json!(2))
        .seed(seed);
    let mut ck = tiny.write();
    ck.config["max_position_embeddings"] = json!(160);
    ck.save();
    let opts = |dtype, device: Device| LoadOptions {
        dtype: Some(dtype),
        device,
        ..LoadOptions::default()
    };
    let cpu = ck.load();
    let cpu_bf16 = ck.load_with(&opts(DType::BF16, Device::Cpu));
    let cuda = ck.load_with(&opts(DType::BF16, gpu()));
    (tiny, cpu, cpu_bf16, cuda)
}

/// The model's dense (training) forward runs the flash kernels on CUDA in bf16: its
/// logits over 150 tokens (three query tiles) match the CPU f32 model within twice what
/// bf16 alone costs on the CPU.
#[test]
fn flash_attention_forward_dense_matches_cpu() {
    let (tiny, cpu, cpu_bf16, cuda) = tiny_cla_three_ways(42);
    let tokens = Rng::new(5).tokens(150, tiny.vocab);
    let want = flat(&cpu.forward_dense(&tokens).unwrap());
    let yardstick = rel_err(&flat(&cpu_bf16.forward_dense(&tokens).unwrap()), &want);
    let e = rel_err(&flat(&cuda.forward_dense(&tokens).unwrap()), &want);
    eprintln!("forward_dense bf16: CUDA rel err {e:.2e}, CPU bf16 {yardstick:.2e}");
    assert!(e <= 2.0 * yardstick.max(1e-2), "forward_dense bf16 on CUDA: {e}");
}

/// The training step's batched forward on CUDA in bf16 (the flash kernels with b = 3):
/// its logits match the CPU f32 model's within twice what bf16 alone costs on the CPU.
#[test]
fn forward_dense_batch_matches_cpu() {
    let (tiny, cpu, cpu_bf16, cuda) = tiny_cla_three_ways(43);
    let mut rng = Rng::new(6);
    let windows: Vec<Vec<u32>> = (0..3).map(|_| rng.tokens(150, tiny.vocab)).collect();
    let seqs: Vec<&[u32]> = windows.iter().map(|w| w.as_slice()).collect();
    let want = flat(&cpu.forward_dense_batch(&seqs).unwrap());
    let yardstick = rel_err(&flat(&cpu_bf16.forward_dense_batch(&seqs).unwrap()), &want);
    let e = rel_err(&flat(&cuda.forward_dense_batch(&seqs).unwrap()), &want);
    eprintln!("forward_dense_batch bf16 (b = 3): CUDA rel err {e:.2e}, CPU bf16 {yardstick:.2e}");
    assert!(e <= 2.0 * yardstick.max(1e-2), "forward_dense_batch bf16 on CUDA: {e}");
}

/// The fused AdamW kernels against their CPU reference over five steps: the same IEEE
/// operations in the same order, so the variable and both moments agree bit for bit.
#[test]
fn adamw_update_matches_cpu_bit_for_bit() {
    use crosskv::ops::adamw::Scalars;
    use crosskv::ops::adamw_update;
    let dev = gpu();
    let mut rng = Rng::new(21);
    // Odd sizes: the grid-stride loop's tail; 300k: several elements per thread.
    for n in [1usize, 1023, 300_001] {
        let theta = rng.tensor(&[n], 1.0, 0.0);
        let mv = Tensor::cat(
            &[rng.tensor(&[n], 0.01, 0.0), rng.tensor(&[n], 1e-4, 0.0).sqr().unwrap()],
            0,
        )
        .unwrap()
        .reshape((2, n))
        .unwrap();
        let (theta_c, mv_c) = (theta.copy().unwrap(), mv.copy().unwrap());
        let (theta_g, mv_g) = (theta.to_device(&dev).unwrap(), mv.to_device(&dev).unwrap());
        for step in 1..=5 {
            let g = rng.tensor(&[n], 0.1, 0.0);
            // Clipping's factor on every other step.
            let scale = if step % 2 == 0 { 0.37 } else { 1.0 };
            let s = Scalars::new(3e-4 * step as f64, 0.9, 0.95, 1e-8, 0.1, step).with_grad_scale(scale);
            adamw_update(&theta_c, &mv_c, &g, &s).unwrap();
            adamw_update(&theta_g, &mv_g, &g.to_device(&dev).unwrap(), &s).unwrap();
        }
        for (what, c, g) in [("theta", &theta_c, &theta_g), ("moments", &mv_c, &mv_g)] {
            let (c, g) = (flat(c), flat(g));
            let diff = c.iter().zip(&g).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            eprintln!(
                "adamw n = {n}: {what} differs in {diff} elements, rel err {:.2e}",
                rel_err(&g, &c)
            );
            assert_eq!(diff, 0, "adamw n = {n}: {what}");
        }
    }
}

/// The mixed-precision AdamW kernel (bf16 gradient and compute copy, f32 master and
/// moments, one pass) against the CPU reference (the f32 update, then a cast): master,
/// moments and copy agree bit for bit over five steps, in bf16 and f16.
#[test]
fn adamw_update_mixed_matches_cpu_bit_for_bit() {
    use crosskv::ops::adamw::Scalars;
    use crosskv::ops::{adamw_update_mixed, adamw_update_mixed_many};
    let dev = gpu();
    let mut rng = Rng::new(22);
    // Tensors of 1, 1023, 0, 300 001 and 65 536 (the kernel's 4-wide path) elements,
    // updated five steps: one by one on the CPU, in one launch (adamw_mixed_many) on
    // CUDA, and the 300 001 also alone on CUDA.
    let sizes = [1usize, 1023, 0, 300_001, 65_536];
    for dtype in [DType::BF16, DType::F16] {
        let mut cpu = vec![];
        let mut gpu_many = vec![];
        for &n in &sizes {
            let theta = rng.tensor(&[n], 1.0, 0.0);
            let mv = Tensor::zeros((2, n), DType::F32, &Device::Cpu).unwrap();
            let copy = theta.to_dtype(dtype).unwrap();
            cpu.push([&theta, &mv, &copy].map(|t| t.copy().unwrap()));
            gpu_many.push([&theta, &mv, &copy].map(|t| t.to_device(&dev).unwrap()));
        }
        let alone = cpu[3].clone().map(|t| t.to_device(&dev).unwrap());
        let start = flat(&cpu[3][0]);
        for step in 1..=5 {
            let gs: Vec<Tensor> = sizes
                .iter()
                .map(|&n| rng.tensor(&[n], 0.1, 0.0).to_dtype(dtype).unwrap())
                .collect();
            let gs_g: Vec<Tensor> = gs.iter().map(|g| g.to_device(&dev).unwrap()).collect();
            let scale = if step % 2 == 0 { 0.37 } else { 1.0 };
            let s = Scalars::new(3e-4 * step as f64, 0.9, 0.95, 1e-8, 0.1, step).with_grad_scale(scale);
            for ([t, m, c], g) in cpu.iter().zip(&gs) {
                adamw_update_mixed(t, m, c, g, &s).unwrap();
            }
            let items: Vec<_> = gpu_many.iter().zip(&gs_g).map(|([t, m, c], g)| (t, m, c, g)).collect();
            adamw_update_mixed_many(&items, &s).unwrap();
            adamw_update_mixed(&alone[0], &alone[1], &alone[2], &gs_g[3], &s).unwrap();
        }
        let runs = cpu
            .iter()
            .zip(&gpu_many)
            .zip(&sizes)
            .chain(std::iter::once(((&cpu[3], &alone), &300_001)));
        for (i, ((c, g), n)) in runs.enumerate() {
            let how = if i == sizes.len() { "alone" } else { "many" };
            for (what, c, g) in [
                ("theta", &c[0], &g[0]),
                ("moments", &c[1], &g[1]),
                ("copy", &c[2], &g[2]),
            ] {
                let (c, g) = (flat(c), flat(g));
                let diff = c.iter().zip(&g).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                eprintln!("adamw mixed {dtype:?} n = {n} ({how}): {what} differs in {diff} elements");
                assert_eq!(diff, 0, "adamw mixed {dtype:?} n = {n} ({how}): {what}");
            }
        }
        assert_ne!(flat(&gpu_many[3][0]), start, "the update moved nothing");
    }
}

/// A few f32 training steps (batched forward, autograd, clipping on the device, fused
/// AdamW) of a tiny CLA model on CUDA follow the CPU's losses and grad norms.
#[test]
fn training_steps_on_cuda_match_cpu() {
    use crosskv::train::{TrainOptions, Trainable, Trainer};
    let dev = gpu();
    let tiny = Tiny::new(4, 4, 2, 64, 128, 97)
        .cla("cla_share_factor", json!(2))
        .seed(44);
    let ck = tiny.write();
    let mut rng = Rng::new(7);
    let windows: Vec<Vec<u32>> = (0..8).map(|_| rng.tokens(33, tiny.vocab)).collect();
    let opts = TrainOptions {
        steps: 4,
        batch_size: 4,
        lr: 1e-2,
        warmup: 1,
        weight_decay: 0.1,
        grad_clip: 1.0,
        seed: 3,
        dtype: DType::F32,
    };
    let run_in = |device: &Device, dtype: DType| {
        let t = Trainable::from_dir(ck.path(), None, crosskv::model::reshare::KvInit::First, device).unwrap();
        let mut tr = Trainer::new(&t, windows.len(), TrainOptions { dtype, ..opts.clone() }).unwrap();
        (0..4)
            .map(|_| {
                let l = tr.step(&t, &windows).unwrap();
                (l.loss, l.grad_norm)
            })
            .collect::<Vec<_>>()
    };
    let run = |device: &Device| run_in(device, DType::F32);
    let (cpu, cuda) = (run(&Device::Cpu), run(&dev));
    // bf16 compute on CUDA (f32 masters): the first step's loss and gradient norm within
    // bf16's rounding of the f32 ones; a gradient lost on the way (a weight whose op has
    // no backward) shrinks the norm by far more.
    let bf16 = run_in(&dev, DType::BF16);
    eprintln!("training steps on CUDA in bf16 (loss, grad norm): {bf16:?}");
    let ((l32, n32), (l16, n16)) = (cpu[0], bf16[0]);
    assert!((l32 - l16).abs() <= 2e-2 * l32, "bf16 loss {l16} vs f32 {l32}");
    assert!((n32 - n16).abs() <= 5e-2 * n32, "bf16 grad norm {n16} vs f32 {n32}");
    eprintln!("training steps (loss, grad norm): CPU {cpu:?}, CUDA {cuda:?}");
    // f32 rounding differs between the devices (cuBLAS's summation order), and the
    // large early updates amplify it: the gradient norms agree to 1e-4 on the first
    // two steps and drift by ~1 % by the fourth (seen on an H200), while the losses
    // stay within 1e-3 throughout. A wrong kernel moves either by far more.
    for (i, ((lc, nc), (lg, ng))) in cpu.iter().zip(&cuda).enumerate() {
        assert!(
            (lc - lg).abs() <= 1e-3 * lc.abs(),
            "step {i}: loss CPU {lc} vs CUDA {lg}"
        );
        let tol = if i < 2 { 1e-3 } else { 5e-2 };
        assert!(
            (nc - ng).abs() <= tol * nc.abs(),
            "step {i}: grad norm CPU {nc} vs CUDA {ng}"
        );
    }
}

/// The cross-entropy kernels (forward: each row's loss and log-sum-exp; backward: the
/// logits' gradient) against the CPU reference, f32 and bf16 logits, the training
/// vocabulary (32000) and odd widths.
#[test]
fn cross_entropy_matches_cpu() {
    use candle_core::Var;
    let dev = gpu();
    let mut rng = Rng::new(33);
    for (rows, cols) in [(64usize, 32000usize), (5, 1), (9, 777)] {
        let targets = Tensor::new(rng.tokens(rows, cols).as_slice(), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let (xc, xg) = pair(&mut rng, &[rows, cols], dtype, &dev);
            let (xc, xg) = (Var::from_tensor(&xc).unwrap(), Var::from_tensor(&xg).unwrap());
            let lc = crosskv::ops::cross_entropy(xc.as_tensor(), &targets).unwrap();
            let lg = crosskv::ops::cross_entropy(xg.as_tensor(), &targets.to_device(&dev).unwrap()).unwrap();
            let (a, b) = (flat(&lg)[0], flat(&lc)[0]);
            eprintln!("cross_entropy {rows}x{cols} {dtype:?}: loss CUDA {a} CPU {b}");
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "loss {a} vs {b}");
            let (gc, gg) = (lc.backward().unwrap(), lg.backward().unwrap());
            let (gc, gg) = (gc.get(xc.as_tensor()).unwrap(), gg.get(xg.as_tensor()).unwrap());
            let e = rel_err(&flat(gg), &flat(gc));
            eprintln!("cross_entropy {rows}x{cols} {dtype:?}: gradient rel err {e:.2e}");
            assert!(e <= tol(dtype), "gradient rel err {e}");
        }
    }
}

/// The embedding op on CUDA (forward: candle's index_select; backward: the atomic
/// scatter of kernels/embedding.cu) against the CPU op, f32 and bf16 tables at the
/// training shape (32000 × 768, 8192 ids, many repeated) and an odd one. The atomics
/// reorder each row's sum, so gradients match to f32 rounding (bf16: after the cast).
#[test]
fn embedding_matches_cpu() {
    use candle_core::Var;
    let dev = gpu();
    let mut rng = Rng::new(43);
    for (vocab, hidden, n) in [(32000usize, 768usize, 8192usize), (5, 3, 37)] {
        // Ids from a small range too, so rows repeat many times.
        let mut ids = rng.tokens(n / 2, vocab);
        ids.extend(rng.tokens(n - n / 2, vocab.min(64)));
        let idc = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
        let idg = idc.to_device(&dev).unwrap();
        let (wc, wg) = pair(&mut rng, &[n, hidden], DType::F32, &dev);
        for dtype in [DType::F32, DType::BF16] {
            let (tc, tg) = pair(&mut rng, &[vocab, hidden], dtype, &dev);
            let (tc, tg) = (Var::from_tensor(&tc).unwrap(), Var::from_tensor(&tg).unwrap());
            let oc = crosskv::ops::embedding(tc.as_tensor(), &idc).unwrap();
            let og = crosskv::ops::embedding(tg.as_tensor(), &idg).unwrap();
            assert_eq!(flat(&og), flat(&oc), "embedding {vocab}x{hidden} {dtype:?}: forward");
            let lc = (oc.to_dtype(DType::F32).unwrap() * &wc).unwrap().sum_all().unwrap();
            let lg = (og.to_dtype(DType::F32).unwrap() * &wg).unwrap().sum_all().unwrap();
            let (gc, gg) = (lc.backward().unwrap(), lg.backward().unwrap());
            let (gc, gg) = (gc.get(tc.as_tensor()).unwrap(), gg.get(tg.as_tensor()).unwrap());
            assert_eq!(gg.dtype(), dtype);
            let e = rel_err(&flat(gg), &flat(gc));
            eprintln!("embedding {vocab}x{hidden} {dtype:?}: gradient rel err {e:.2e}");
            let bound = if dtype == DType::F32 { 1e-5 } else { tol(dtype) };
            assert!(e <= bound, "{dtype:?}: gradient rel err {e}");
        }
    }
}

/// The fused RMSNorm backward kernel (dx per row, dw accumulated over rows with one
/// atomic per column and CTA) against the CPU composite, f32 and bf16, the training
/// shape (8192 rows of 768) and odd ones.
#[test]
fn rms_norm_grads_match_cpu() {
    use crosskv::ops::rms_norm::{rms_norm_grads, rms_norm_grads_composite};
    let dev = gpu();
    let mut rng = Rng::new(41);
    for dtype in [DType::F32, DType::BF16] {
        // 8192×768 and 65×576: the vectorised kernel with 3 vectors a lane (bf16; the
        // second leaves lanes idle), 33×2048 its 8-vector form (bf16), 100×1000 4 (bf16)
        // and 8 (f32); 3×5 and 1×4096 (f32) the scalar kernel.
        for (rows, hidden) in [
            (8192usize, 768usize),
            (3, 5),
            (33, 2048),
            (1, 4096),
            (65, 576),
            (100, 1000),
        ] {
            let (xc, xg) = pair(&mut rng, &[rows, hidden], dtype, &dev);
            let (gc, gg) = pair(&mut rng, &[rows, hidden], dtype, &dev);
            let wc = (rng.tensor(&[hidden], 0.2, 1.0)).to_dtype(dtype).unwrap();
            let wg = wc.to_device(&dev).unwrap();
            let (rx, rw) = rms_norm_grads_composite(&xc, &wc, &gc, 1e-5).unwrap();
            let (dx, dw) = rms_norm_grads(&xg, &wg, &gg, 1e-5).unwrap();
            let (ex, ew) = (rel_err(&flat(&dx), &flat(&rx)), rel_err(&flat(&dw), &flat(&rw)));
            eprintln!("rms_norm_grads {rows}x{hidden} {dtype:?}: dx {ex:.2e}, dw {ew:.2e}");
            assert!(
                ex < tol(dtype) && ew < tol(dtype),
                "{dtype:?} {rows}x{hidden}: dx {ex}, dw {ew}"
            );
        }
    }
}

/// Gradient clipping's sum of squares on CUDA (one atomicAdd per block into one f32)
/// against the CPU's f64 sum, accumulated over several tensors into one scalar.
#[test]
fn sum_squares_matches_cpu() {
    let dev = gpu();
    let mut rng = Rng::new(13);
    let shapes: [&[usize]; 4] = [&[1], &[3, 7], &[1000], &[32000, 768]];
    let acc_c = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    let acc_g = Tensor::zeros(1, DType::F32, &dev).unwrap();
    // Mixed precision's gradients are bf16/f16: the kernel widens them as it reads.
    let dtypes = [DType::F32, DType::BF16, DType::F16, DType::F32];
    for (shape, dtype) in shapes.into_iter().zip(dtypes) {
        let (c, g) = pair(&mut rng, shape, dtype, &dev);
        crosskv::ops::sum_squares_into(&acc_c, &c).unwrap();
        crosskv::ops::sum_squares_into(&acc_g, &g).unwrap();
    }
    let (want, got) = (flat(&acc_c)[0], flat(&acc_g)[0]);
    let e = ((got - want) / want).abs();
    eprintln!(
        "sum_squares over 4 tensors ({} elements): CUDA {got}, CPU {want}, rel err {e:.2e}",
        1 + 21 + 1000 + 32000 * 768
    );
    assert!(e < 1e-5, "sum of squares: CUDA {got}, CPU {want}");
    // Many tensors in one launch (gradient clipping), bf16 like training's gradients:
    // against the one-by-one CPU sums.
    let shapes: [&[usize]; 5] = [&[768], &[2304, 768], &[1], &[0], &[32000, 768]];
    let (cs, gs): (Vec<Tensor>, Vec<Tensor>) = shapes.iter().map(|s| pair(&mut rng, s, DType::BF16, &dev)).unzip();
    let acc_c = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    let acc_g = Tensor::zeros(1, DType::F32, &dev).unwrap();
    crosskv::ops::sum_squares_many(&acc_c, &cs.iter().collect::<Vec<_>>()).unwrap();
    crosskv::ops::sum_squares_many(&acc_g, &gs.iter().collect::<Vec<_>>()).unwrap();
    let (want, got) = (flat(&acc_c)[0], flat(&acc_g)[0]);
    let e = ((got - want) / want).abs();
    eprintln!("sum_squares_many over 5 bf16 tensors: CUDA {got}, CPU {want}, rel err {e:.2e}");
    assert!(e < 1e-5, "sum of squares of many: CUDA {got}, CPU {want}");
}
