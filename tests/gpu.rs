//! GPU tests (`--features cuda`, run on a GPU machine by scripts/gpu-test.sh): every CUDA
//! kernel against its CPU reference on the same random inputs, and a tiny random CLA
//! model's logits on CUDA against the CPU. Kernel outputs are poisoned (NaN) before
//! each launch so an element a kernel fails to write shows up.

#![cfg(feature = "cuda")]

#[path = "it/common.rs"]
mod common;

use candle_core::{DType, Device, Tensor};
use common::{flat, grads_of, Rng, Tiny};
use crosskv::kv::KvManager;
use crosskv::model::LoadOptions;
use crosskv::ops::{add_rms_norm, paged_attention, reshape_and_cache, rms_norm, rope, SeqSpan};
use crosskv::runner::{Runner, SeqStep};
use serde_json::json;

fn gpu() -> Device {
    crosskv::ops::cuda::set_poison_outputs(true);
    crosskv::device::cuda(0).expect("a CUDA device")
}

fn tol(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        _ => 1e-2,
    }
}

/// max |got - want| / max |want|; infinite when `got` has a NaN/inf (an unwritten element).
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    if got.iter().any(|x| !x.is_finite()) {
        return f32::INFINITY;
    }
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale
}

/// A random tensor on the CPU in `dtype`, and the same values on the GPU.
fn pair(rng: &mut Rng, shape: &[usize], dtype: DType, dev: &Device) -> (Tensor, Tensor) {
    let c = rng.tensor(shape, 1.0, 0.0).to_dtype(dtype).unwrap();
    let g = c.to_device(dev).unwrap();
    (c, g)
}

/// A permutation of 0..n, so block tables are scattered and interleaved.
fn shuffled(rng: &mut Rng, n: usize) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        v.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    v
}

#[test]
fn reshape_and_cache_matches_cpu_bit_for_bit() {
    let dev = gpu();
    for (dtype, kvh, d) in [
        (DType::F32, 2, 64),
        (DType::F16, 1, 128),
        (DType::BF16, 4, 128),
        (DType::BF16, 8, 64),
        (DType::F32, 3, 20), // a row that is not a multiple of 16 bytes: the scalar path
    ] {
        let mut rng = Rng::new(11 + d as u64 + kvh as u64);
        let (nb, bs) = (9, 16);
        let (cache_c, cache_g) = pair(&mut rng, &[nb, bs, kvh, d], dtype, &dev);
        // Block boundaries (15/16), the very first and last rows, two padding rows that
        // write nothing, the rest scattered.
        let skip = crosskv::ops::reshape_and_cache::SKIP_ROW;
        let mut pos: Vec<u32> = vec![0, 15, skip, 16, 17, 31, 32, skip, (nb * bs - 1) as u32];
        let fixed = pos.clone();
        pos.extend(
            shuffled(&mut rng, nb * bs)
                .into_iter()
                .filter(|p| !fixed.contains(p))
                .take(20),
        );
        let t = pos.len();
        let (new_c, new_g) = pair(&mut rng, &[t, kvh, d], dtype, &dev);
        let pos_c = Tensor::new(pos.as_slice(), &Device::Cpu).unwrap();
        let pos_g = pos_c.to_device(&dev).unwrap();
        reshape_and_cache(&cache_c, &new_c, &pos_c).unwrap();
        reshape_and_cache(&cache_g, &new_g, &pos_g).unwrap();
        let (got, want) = (flat(&cache_g), flat(&cache_c));
        assert!(got == want, "{dtype:?} kvh {kvh} d {d}: GPU cache differs from CPU");
        eprintln!("reshape_and_cache {dtype:?} kv_heads {kvh} d {d}: {t} rows, exact");
    }
}

/// One paged-attention scenario: sequences `(q_len, ctx_len)` with an optional padding
/// token no sequence owns after each `pad_after` sequence; two KV slots whose blocks
/// interleave in one pool; layers 0 and 1 alias slot 0, layer 2 reads slot 1.
struct Scenario {
    spans: Vec<(usize, usize)>,
    pad_after: Vec<usize>,
}

fn scenarios() -> Vec<(&'static str, Scenario)> {
    vec![
        (
            // every context ≤ 512: one pass, no split
            "short",
            Scenario {
                spans: vec![
                    (1, 1),
                    (1, 15),
                    (1, 16),
                    (1, 17),
                    (5, 5),
                    (17, 40),
                    (1, 33),
                    (16, 16),
                    (1, 512),
                ],
                pad_after: vec![3],
            },
        ),
        (
            // contexts past 512: split into partitions of 512 and reduced
            "long",
            Scenario {
                spans: vec![(1, 513), (1, 1100), (3, 1030), (1, 2), (20, 600), (1, 1024)],
                pad_after: vec![1],
            },
        ),
        (
            // prefill chunks of more than one tensor-core work item (64 query rows),
            // fresh and on top of a cached prefix, some past a partition boundary
            "chunks",
            Scenario {
                spans: vec![(100, 100), (70, 600), (130, 1150), (1, 64), (64, 64), (65, 65)],
                pad_after: vec![0],
            },
        ),
    ]
}

#[allow(clippy::too_many_arguments)]
fn run_scenario(
    dev: &Device,
    name: &str,
    sc: &Scenario,
    dtype: DType,
    heads: usize,
    kv_heads: usize,
    d: usize,
    seed: u64,
) -> f32 {
    let bs = 16;
    let mut rng = Rng::new(seed);
    // Flat query layout with the padding tokens.
    let mut seqs = Vec::new();
    let mut tokens = 0usize;
    for (i, &(ql, ctx)) in sc.spans.iter().enumerate() {
        seqs.push(SeqSpan {
            q_start: tokens as u32,
            q_len: ql as u32,
            ctx_len: ctx as u32,
        });
        tokens += ql;
        if sc.pad_after.contains(&i) {
            tokens += 1;
        }
    }
    let need: Vec<usize> = sc.spans.iter().map(|&(_, c)| c.div_ceil(bs)).collect();
    let max_blocks = need.iter().max().unwrap() + 2;
    let num_blocks = 2 * need.iter().sum::<usize>() + 5;
    let mut free = shuffled(&mut rng, num_blocks).into_iter();
    // tables[slot]: unused entries are u32::MAX, which no kernel may read.
    let mut tables = vec![vec![u32::MAX; seqs.len() * max_blocks]; 2];
    for (s, &n) in need.iter().enumerate() {
        for j in 0..n {
            for t in tables.iter_mut() {
                t[s * max_blocks + j] = free.next().unwrap();
            }
        }
    }
    let (kc_c, kc_g) = pair(&mut rng, &[num_blocks, bs, kv_heads, d], dtype, dev);
    let (vc_c, vc_g) = pair(&mut rng, &[num_blocks, bs, kv_heads, d], dtype, dev);
    // The step's own K/V: written into both slots first, as producers do.
    for table in &tables {
        let mut rows = Vec::with_capacity(tokens);
        for (s, &(ql, ctx)) in sc.spans.iter().enumerate() {
            for p in ctx - ql..ctx {
                rows.push(table[s * max_blocks + p / bs] * bs as u32 + (p % bs) as u32);
            }
        }
        let n = rows.len();
        let rows_c = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
        let rows_g = rows_c.to_device(dev).unwrap();
        let (k_c, k_g) = pair(&mut rng, &[n, kv_heads, d], dtype, dev);
        let (v_c, v_g) = pair(&mut rng, &[n, kv_heads, d], dtype, dev);
        reshape_and_cache(&kc_c, &k_c, &rows_c).unwrap();
        reshape_and_cache(&kc_g, &k_g, &rows_g).unwrap();
        reshape_and_cache(&vc_c, &v_c, &rows_c).unwrap();
        reshape_and_cache(&vc_g, &v_g, &rows_g).unwrap();
    }
    let scale = 1.0 / (d as f32).sqrt();
    let mut worst = 0f32;
    for (layer, slot) in [(0, 0), (1, 0), (2, 1)] {
        let (q_c, q_g) = pair(&mut rng, &[tokens, heads, d], dtype, dev);
        let t = &tables[slot];
        let want = paged_attention(&q_c, &kc_c, &vc_c, &seqs, t, max_blocks, scale).unwrap();
        let got = paged_attention(&q_g, &kc_g, &vc_g, &seqs, t, max_blocks, scale).unwrap();
        assert_eq!(got.dims(), want.dims());
        let e = rel_err(&flat(&got), &flat(&want));
        assert!(
            e <= tol(dtype),
            "{name} {dtype:?} heads {heads}/{kv_heads} d {d} layer {layer} (slot {slot}): relative error {e}"
        );
        worst = worst.max(e);
    }
    worst
}

#[test]
fn paged_attention_matches_cpu() {
    let dev = gpu();
    let ratios = [(8, 8), (8, 4), (8, 2), (16, 2), (16, 1), (32, 1)];
    let mut seed = 1000;
    let mut summary = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for d in [64, 128] {
            for &(heads, kv_heads) in &ratios {
                for (name, sc) in scenarios() {
                    seed += 1;
                    let e = run_scenario(&dev, name, &sc, dtype, heads, kv_heads, d, seed);
                    summary.push(format!(
                        "paged_attention {name:5} {:4} d{d:<3} heads {heads:2}/{kv_heads}: max rel err {e:.2e}",
                        format!("{dtype:?}")
                    ));
                }
            }
        }
    }
    // head_dim 256 (a smaller tile), GQA 2 and MQA.
    for dtype in [DType::F32, DType::BF16] {
        for &(heads, kv_heads) in &[(8, 4), (8, 1)] {
            for (name, sc) in scenarios() {
                seed += 1;
                let e = run_scenario(&dev, name, &sc, dtype, heads, kv_heads, 256, seed);
                summary.push(format!(
                    "paged_attention {name:5} {:4} d256 heads {heads:2}/{kv_heads}: max rel err {e:.2e}",
                    format!("{dtype:?}")
                ));
            }
        }
    }
    for s in summary {
        eprintln!("{s}");
    }
}

#[test]
fn paged_attention_rejects_unsupported_head_dim_on_cuda() {
    let dev = gpu();
    let q = Tensor::zeros((1, 2, 48), DType::F32, &dev).unwrap();
    let kc = Tensor::zeros((2, 16, 2, 48), DType::F32, &dev).unwrap();
    let seqs = [SeqSpan {
        q_start: 0,
        q_len: 1,
        ctx_len: 1,
    }];
    let err = paged_attention(&q, &kc, &kc, &seqs, &[0], 1, 1.0).unwrap_err();
    assert!(err.to_string().contains("head_dim 48"), "{err}");
}

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

/// A tiny random CLA model (4 layers, share factor 2, GQA 4/2, head_dim 64) runs a
/// mixed prefill + decode schedule on CUDA (f32) and gives the CPU's logits.
#[test]
fn tiny_cla_model_logits_match_cpu() {
    let dev = gpu();
    let tiny = Tiny::new(4, 4, 2, 64, 128, 97)
        .cla("cla_share_factor", json!(2))
        .seed(42);
    let ck = tiny.write();
    let cpu = ck.load();
    // f32 runs the CUDA-core attention kernel, bf16 the tensor-core ones (and the step's
    // shared attention plans across the layers of a slot); both against CPU f32. bf16
    // alone moves this tiny model's logits by 2-8 % (the same model in bf16 on the CPU:
    // its error is the yardstick), so bf16 on CUDA may be off by at most twice that.
    let cpu_bf16 = ck.load_with(&LoadOptions {
        dtype: Some(DType::BF16),
        device: Device::Cpu,
        ..LoadOptions::default()
    });
    let bf16_alone = tiny_model_schedule(&cpu, &cpu_bf16, &tiny, DType::BF16, f32::INFINITY);
    for (dtype, tol) in [(DType::F32, 1e-3f32), (DType::BF16, 2.0 * bf16_alone)] {
        let cuda = ck.load_with(&LoadOptions {
            dtype: Some(dtype),
            device: dev.clone(),
            ..LoadOptions::default()
        });
        assert!(cuda.device().is_cuda());
        tiny_model_schedule(&cpu, &cuda, &tiny, dtype, tol);
    }
}

/// Runs the mixed prefill/decode schedule on both models; the worst relative error of
/// `got`'s logits against `want`'s, each step within `tol`.
fn tiny_model_schedule(
    want_model: &crosskv::model::Model,
    got_model: &crosskv::model::Model,
    tiny: &Tiny,
    dtype: DType,
    tol: f32,
) -> f32 {
    tiny_model_schedule_ranks(want_model, std::slice::from_ref(got_model), tiny, dtype, tol)
}

/// [`tiny_model_schedule`] with `got` run over tensor-parallel ranks.
fn tiny_model_schedule_ranks(
    want_model: &crosskv::model::Model,
    got_ranks: &[crosskv::model::Model],
    tiny: &Tiny,
    dtype: DType,
    tol: f32,
) -> f32 {
    let got_model = &got_ranks[0];
    let block = 16;
    let n = 8 * want_model.layout().kv_layers();
    let mk = |ms: &[crosskv::model::Model]| {
        (
            Runner::tensor_parallel(ms.to_vec(), n, block).unwrap(),
            KvManager::new(ms[0].layout().clone(), n, block),
        )
    };
    let (rc, mut mc) = mk(std::slice::from_ref(want_model));
    let (rg, mut mg) = mk(got_ranks);
    let toks = Rng::new(5).tokens(60, tiny.vocab);
    let (a, b) = (&toks[..30], &toks[30..]);
    // (seq, tokens, start): A prefills 20 and B a first chunk of 7; then A decodes while B
    // prefills its next chunk; then both decode.
    let schedule: Vec<Vec<(u64, &[u32], usize)>> = vec![
        vec![(0, &a[..20], 0), (1, &b[..7], 0)],
        vec![(0, &a[20..21], 20), (1, &b[7..17], 7)],
        vec![(1, &b[17..18], 17), (0, &a[21..22], 21)],
        vec![(0, &a[22..23], 22), (1, &b[18..19], 18)],
    ];
    let mut worst = 0f32;
    for (i, step) in schedule.iter().enumerate() {
        let steps: Vec<SeqStep> = step
            .iter()
            .map(|(seq, t, start)| SeqStep {
                seq: *seq,
                tokens: t.to_vec(),
                start_pos: *start,
                all_logits: false,
            })
            .collect();
        for (seq, t, start) in step {
            mc.allocate(*seq, start + t.len()).unwrap();
            mg.allocate(*seq, start + t.len()).unwrap();
        }
        let want = flat(&rc.step(&mc, &steps).unwrap());
        let got = flat(&rg.step(&mg, &steps).unwrap());
        let e = rel_err(&got, &want);
        eprintln!("tiny CLA model {dtype:?} step {i}: logits max rel err {e:.2e}");
        assert!(
            e <= tol,
            "{dtype:?} step {i}: CUDA logits differ from CPU f32 by {e} (relative)"
        );
        worst = worst.max(e);
    }
    eprintln!(
        "tiny CLA model (4 layers, cla 2, {}/{} heads, d64, {dtype:?} on {:?}, {} rank(s)): worst logits rel err {worst:.2e}",
        tiny.heads,
        tiny.kv_heads,
        got_model.device(),
        got_ranks.len()
    );
    worst
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

#[test]
fn forward_memory_profile_sees_weights_and_activations() {
    let dev = gpu();
    let tiny = Tiny::new(4, 4, 2, 64, 128, 97)
        .cla("cla_share_factor", json!(2))
        .seed(42);
    let ck = tiny.write();
    let cuda = ck.load_with(&LoadOptions {
        dtype: Some(DType::BF16),
        device: dev.clone(),
        ..LoadOptions::default()
    });
    let small = crosskv::runner::memory::profile_forward_peak(&cuda, 16, 16).unwrap();
    let big = crosskv::runner::memory::profile_forward_peak(&cuda, 16, cuda.max_positions()).unwrap();
    println!(
        "forward memory profile: 16 tokens {small:?}; {} tokens {big:?}",
        cuda.max_positions()
    );
    assert!(small.total > small.in_use_after_load && small.in_use_after_load > 0);
    assert!(big.activation_peak > 0 && big.activation_peak >= small.activation_peak);
}

/// Tensor parallelism over the GPUs this machine has (2 or more): a tiny CLA
/// model's logits over N ranks joined by NCCL equal one GPU's, in f32 (tight) and bf16
/// (within twice the error bf16 itself makes), for GQA (KV heads split) and MQA (the KV
/// head replicated). On a machine with one GPU it says so and checks nothing.
#[cfg(feature = "nccl")]
#[test]
fn tensor_parallel_over_gpus_matches_one_gpu() {
    let dev = gpu();
    let gpus = candle_core::cuda_backend::cudarc::driver::CudaContext::device_count().unwrap() as usize;
    if gpus < 2 {
        eprintln!("tensor parallelism: SKIPPED, {gpus} GPU on this machine (needs 2 or more)");
        return;
    }
    for world in [2usize, 4, 8].into_iter().filter(|w| *w <= gpus) {
        for kv_heads in [2usize, 1] {
            let tiny = Tiny::new(4, 8, kv_heads, 64, 128, 97)
                .cla("cla_share_factor", json!(2))
                .seed(43);
            let ck = tiny.write();
            let cpu = ck.load();
            let cpu_bf16 = ck.load_with(&LoadOptions {
                dtype: Some(DType::BF16),
                ..LoadOptions::default()
            });
            let bf16_alone = tiny_model_schedule(&cpu, &cpu_bf16, &tiny, DType::BF16, f32::INFINITY);
            for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 2.0 * bf16_alone)] {
                let opts = |tp| LoadOptions {
                    dtype: Some(dtype),
                    device: dev.clone(),
                    tensor_parallel_size: tp,
                    ..LoadOptions::default()
                };
                let one = ck.load_with(&opts(1));
                let ranks = crosskv::model::load_model_dir_ranks(ck.path(), &opts(world)).unwrap();
                for (r, m) in ranks.iter().enumerate() {
                    assert_eq!(m.device().location(), candle_core::DeviceLocation::Cuda { gpu_id: r });
                }
                eprintln!("tensor parallelism: {world} GPUs, {kv_heads} KV heads, {dtype:?}, against one GPU:");
                tiny_model_schedule_ranks(&one, &ranks, &tiny, dtype, tol);
            }
        }
    }
}

/// The single-GPU path through NCCL (N = 1): a communicator of one rank, all-reducing
/// every layer's output with itself, leaves the logits exactly as they were.
#[cfg(feature = "nccl")]
#[test]
fn nccl_with_one_rank_leaves_the_logits_unchanged() {
    let dev = gpu();
    let tiny = Tiny::new(4, 4, 2, 64, 128, 97)
        .cla("cla_share_factor", json!(2))
        .seed(44);
    let ck = tiny.write();
    for dtype in [DType::F32, DType::BF16] {
        let m = ck.load_with(&LoadOptions {
            dtype: Some(dtype),
            device: dev.clone(),
            ..LoadOptions::default()
        });
        let mut through_nccl = m.clone();
        let comm = crosskv::tp::nccl::NcclComm::group(std::slice::from_ref(&dev))
            .unwrap()
            .remove(0);
        through_nccl.set_all_reduce(std::sync::Arc::new(comm));
        let e = tiny_model_schedule(&m, &through_nccl, &tiny, dtype, 0.0);
        eprintln!("NCCL with one rank, {dtype:?}: logits differ by {e:.2e} (relative)");
    }
}

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

/// Decode steps as CUDA graphs give the eager steps' logits and leave the same cache:
/// a tiny CLA model (GQA 4/2, share factor 2) decodes ragged sequences at batch sizes
/// that need padding (5 → a graph of 8, 3 → 4) so graphs are captured, reused with new
/// contexts and tables, and padded. Short contexts in blocks of 4 cross a block-table
/// width (8 → 16 blocks); long ones (600-1000 keys in blocks of 16) split each
/// sequence's keys over several partitions, evenly per sequence.
#[test]
fn decode_graphs_match_eager() {
    let dev = gpu();
    let tiny = Tiny::new(4, 4, 2, 64, 128, 97)
        .cla("cla_share_factor", json!(2))
        .max_positions(1024)
        .seed(7);
    let ck = tiny.write();
    let cpu = ck.load();
    for dtype in [DType::F32, DType::BF16] {
        let model = ck.load_with(&LoadOptions {
            dtype: Some(dtype),
            device: dev.clone(),
            ..LoadOptions::default()
        });
        // (block size, prompt of sequence s = first + s * stride, blocks per slot, graphs
        // wanted: at least that many captured, or with Some(limit) exactly the limit kept)
        for (block, first, stride, blocks, graphs) in [
            (4, 25, 1, 64, (4, None)),
            (4, 25, 1, 64, (2, Some(2))),
            (16, 600, 97, 400, (3, None)),
        ] {
            decode_graph_case(&model, &cpu, &tiny, dtype, block, (first, stride), blocks, graphs);
        }
    }
}

/// One schedule of [`decode_graphs_match_eager`]. In f32 the graph's logits must equal
/// the eager ones within rounding. In bf16 a graph may split a context over other
/// partitions than the eager step (bf16 then rounds other partial sums: this tiny
/// model's logits move by up to 5-8 %), so both are held to the CPU's f32 logits: the
/// graph's error at most twice the eager one's, plus 1e-2.
#[allow(clippy::too_many_arguments)]
fn decode_graph_case(
    model: &crosskv::model::Model,
    cpu: &crosskv::model::Model,
    tiny: &Tiny,
    dtype: DType,
    block: usize,
    (first, stride): (usize, usize),
    blocks: usize,
    (want_graphs, limit): (usize, Option<usize>),
) {
    let n = blocks * model.layout().kv_layers();
    let eager = Runner::new(model.clone(), n, block).unwrap();
    let mut graph = Runner::new(model.clone(), n, block).unwrap();
    let reference = Runner::new(cpu.clone(), n, block).unwrap();
    assert!(graph.set_cuda_graphs(true), "graphs are on for one CUDA rank");
    if let Some(limit) = limit {
        // Fewer graphs kept than the schedule needs: older ones are dropped and
        // captured again, and the logits must not notice.
        graph.set_cuda_graphs_limit(limit);
    }
    let mut managers = [
        KvManager::new(model.layout().clone(), n, block),
        KvManager::new(model.layout().clone(), n, block),
        KvManager::new(model.layout().clone(), n, block),
    ];
    let mut rng = Rng::new(11);
    // Five sequences, prefilled eagerly by both runners.
    let mut next: Vec<u32> = Vec::new();
    let mut pos: Vec<usize> = Vec::new();
    for seq in 0..5u64 {
        let len = first + seq as usize * stride;
        let prompt = rng.tokens(len, tiny.vocab);
        let step = [SeqStep {
            seq,
            tokens: prompt,
            start_pos: 0,
            all_logits: false,
        }];
        for (r, m) in [&eager, &graph, &reference].into_iter().zip(&mut managers) {
            m.allocate(seq, len).unwrap();
            r.step(m, &step).unwrap();
        }
        next.push(rng.tokens(1, tiny.vocab)[0]);
        pos.push(len);
    }
    let mut worst = 0f32;
    // 12 decode steps: 5 sequences, then 3 (1 and 3 finished), then only sequence 4.
    for i in 0..12 {
        let live: Vec<u64> = match i {
            0..=5 => vec![0, 1, 2, 3, 4],
            6..=9 => vec![4, 0, 2],
            _ => vec![4],
        };
        let steps: Vec<SeqStep> = live
            .iter()
            .map(|&s| SeqStep {
                seq: s,
                tokens: vec![next[s as usize]],
                start_pos: pos[s as usize],
                all_logits: false,
            })
            .collect();
        for m in managers.iter_mut() {
            for s in &steps {
                m.allocate(s.seq, s.start_pos + 1).unwrap();
            }
        }
        let want = flat(&eager.step(&managers[0], &steps).unwrap());
        let got = flat(&graph.step(&managers[1], &steps).unwrap());
        let exact = flat(&reference.step(&managers[2], &steps).unwrap());
        let e = rel_err(&got, &want);
        let (e_graph, e_eager) = (rel_err(&got, &exact), rel_err(&want, &exact));
        eprintln!(
            "decode graph {dtype:?} block {block} step {i} (batch {}): logits max rel err {e:.2e} to eager; to CPU f32 graph {e_graph:.2e}, eager {e_eager:.2e}",
            live.len()
        );
        if dtype == DType::F32 {
            assert!(
                e <= tol(dtype),
                "{dtype:?} step {i}: graph logits differ from eager by {e}"
            );
        } else {
            assert!(
                e_graph <= 2.0 * e_eager + 1e-2,
                "{dtype:?} step {i}: graph logits differ from CPU f32 by {e_graph}, eager ones by {e_eager}"
            );
        }
        worst = worst.max(e);
        for s in &steps {
            pos[s.seq as usize] += 1;
            next[s.seq as usize] = rng.tokens(1, tiny.vocab)[0];
        }
    }
    // Batches 5, 3 and 1 in graphs of 8, 4 and 1 (and with blocks of 4, tables of 8
    // blocks, then 16: the longest sequence passes 32 tokens).
    let captured = graph.cuda_graphs_captured();
    match limit {
        None => assert!(
            captured >= want_graphs,
            "{captured} graphs captured, want at least {want_graphs}"
        ),
        Some(l) => assert_eq!(captured, l, "graphs held under a limit of {l}"),
    }
    // The padding wrote nothing: both caches hold the same K/V everywhere (in f32, where
    // the graph's hidden states, hence every later layer's K/V, equal the eager ones).
    if dtype == DType::F32 {
        for (g, e) in [
            (graph.cache().k(), eager.cache().k()),
            (graph.cache().v(), eager.cache().v()),
        ] {
            let err = rel_err(&flat(g), &flat(e));
            assert!(
                err <= tol(dtype),
                "{dtype:?}: the graph runner's cache differs by {err}"
            );
        }
    }
    eprintln!("decode graphs {dtype:?} block {block}: {captured} graphs, worst logits rel err {worst:.2e}");
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

/// The batch-invariant matmul: close to the CPU's, and every row's bits the same whatever
/// rows share the launch (one row, a partial tile, several tiles).
#[test]
fn fixed_matmul_matches_cpu_and_a_row_does_not_depend_on_the_others() {
    use crosskv::ops::fixed_matmul;
    let dev = gpu();
    let mut rng = Rng::new(11);
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        // k: three 64-wide tiles and a partial one; n: a partial last tile.
        let (m, n, k) = (77, 45, 200);
        let (xc, xg) = pair(&mut rng, &[m, k], dtype, &dev);
        let (wc, wg) = pair(&mut rng, &[n, k], dtype, &dev);
        let want = flat(&fixed_matmul(&xc.to_dtype(DType::F32).unwrap(), &wc.to_dtype(DType::F32).unwrap()).unwrap());
        let all = flat(&fixed_matmul(&xg, &wg).unwrap());
        let e = rel_err(&all, &want);
        assert!(e <= tol(dtype), "{dtype:?}: rel err {e}");
        for rows in [1, 5, 32, 33, 64] {
            for start in [0, 3, m - rows] {
                let part = flat(&fixed_matmul(&xg.narrow(0, start, rows).unwrap(), &wg).unwrap());
                assert_eq!(
                    part,
                    all[start * n..(start + rows) * n],
                    "{dtype:?}: rows {start}..+{rows}"
                );
            }
        }
    }
}

/// The batch-invariant paged attention: close to the CPU reference, and a token's output
/// the same bits whether it is prefilled with its sequence's other tokens, in a shorter
/// chunk, decoded alone, or beside another sequence.
#[test]
fn fixed_paged_attention_matches_cpu_and_a_token_does_not_depend_on_the_step() {
    use crosskv::ops::fixed_paged_attention;
    let dev = gpu();
    let mut rng = Rng::new(12);
    let (heads, kv_heads, block, blocks, max_blocks) = (4, 2, 16, 32, 8);
    for d in [64, 128, 256] {
        for dtype in [DType::BF16, DType::F32] {
            let (kc, kg) = pair(&mut rng, &[blocks, block, kv_heads, d], dtype, &dev);
            let (vc, vg) = pair(&mut rng, &[blocks, block, kv_heads, d], dtype, &dev);
            let table = shuffled(&mut rng, blocks)[..2 * max_blocks].to_vec();
            let (qc, qg) = pair(&mut rng, &[41, heads, d], dtype, &dev);
            let span = |q_start, q_len, ctx_len| SeqSpan {
                q_start,
                q_len,
                ctx_len,
            };
            // A prefills 40 tokens, B (ctx 70) decodes one.
            let both = [span(0, 40, 40), span(40, 1, 70)];
            let scale = 1.0 / (d as f32).sqrt();
            let run = |q: &Tensor, k: &Tensor, v: &Tensor, seqs: &[SeqSpan], table: &[u32]| {
                flat(&fixed_paged_attention(q, k, v, seqs, table, max_blocks, scale).unwrap())
            };
            let all = run(&qg, &kg, &vg, &both, &table);
            let want = flat(&paged_attention(&qc, &kc, &vc, &both, &table, max_blocks, scale).unwrap());
            let e = rel_err(&all, &want);
            assert!(e <= tol(dtype), "d{d} {dtype:?}: rel err {e}");
            let row = heads * d;
            // A's last ten tokens as a chunk.
            let chunk = run(
                &qg.narrow(0, 30, 10).unwrap(),
                &kg,
                &vg,
                &[span(0, 10, 40)],
                &table[..max_blocks],
            );
            assert_eq!(chunk, all[30 * row..40 * row], "d{d} {dtype:?}: chunk");
            // A's last token decoded alone, and B alone.
            let a = run(
                &qg.narrow(0, 39, 1).unwrap(),
                &kg,
                &vg,
                &[span(0, 1, 40)],
                &table[..max_blocks],
            );
            assert_eq!(a, all[39 * row..40 * row], "d{d} {dtype:?}: A alone");
            let b = run(
                &qg.narrow(0, 40, 1).unwrap(),
                &kg,
                &vg,
                &[span(0, 1, 70)],
                &table[max_blocks..],
            );
            assert_eq!(b, all[40 * row..], "d{d} {dtype:?}: B alone");
        }
    }
}
