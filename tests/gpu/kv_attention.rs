//! Writing K/V into the paged cache and paged attention, against the CPU.

use super::*;

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
    run_scenario_kv(dev, name, sc, dtype, None, (heads, kv_heads, d), seed)
}

/// A cache of `[num_blocks, bs, kv_heads, d]` on the CPU and the same on the GPU: random
/// values of `dtype`, or with `fp8` Some(scale) the e4m3 codes of random values written
/// with that scale (some past the range, so saturated).
fn cache_pair(rng: &mut Rng, shape: &[usize], dtype: DType, fp8: Option<f32>, dev: &Device) -> (Tensor, Tensor) {
    let Some(scale) = fp8 else {
        return pair(rng, shape, dtype, dev);
    };
    let rows = shape[0] * shape[1];
    let c = Tensor::zeros(shape, DType::U8, &Device::Cpu).unwrap();
    let values = rng.tensor(&[rows, shape[2], shape[3]], 150.0 * scale, 0.0);
    let all: Vec<u32> = (0..rows as u32).collect();
    reshape_and_cache_scaled(&c, &values, &Tensor::new(all.as_slice(), &Device::Cpu).unwrap(), scale).unwrap();
    let g = c.to_device(dev).unwrap();
    (c, g)
}

/// [`run_scenario`] over float caches of `dtype` (`fp8` None) or fp8 ones written with
/// the scales `fp8`.
fn run_scenario_kv(
    dev: &Device,
    name: &str,
    sc: &Scenario,
    dtype: DType,
    fp8: Option<KvScale>,
    (heads, kv_heads, d): (usize, usize, usize),
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
    let (kc_c, kc_g) = cache_pair(&mut rng, &[num_blocks, bs, kv_heads, d], dtype, fp8.map(|s| s.k), dev);
    let (vc_c, vc_g) = cache_pair(&mut rng, &[num_blocks, bs, kv_heads, d], dtype, fp8.map(|s| s.v), dev);
    let kv_scale = fp8.unwrap_or_default();
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
        reshape_and_cache_scaled(&kc_c, &k_c, &rows_c, kv_scale.k).unwrap();
        reshape_and_cache_scaled(&kc_g, &k_g, &rows_g, kv_scale.k).unwrap();
        reshape_and_cache_scaled(&vc_c, &v_c, &rows_c, kv_scale.v).unwrap();
        reshape_and_cache_scaled(&vc_g, &v_g, &rows_g, kv_scale.v).unwrap();
    }
    if fp8.is_some() {
        // The GPU wrote the step's rows as the CPU did: the same codes everywhere.
        assert!(
            flat(&kc_g) == flat(&kc_c) && flat(&vc_g) == flat(&vc_c),
            "{name}: fp8 cache writes differ"
        );
    }
    let scale = 1.0 / (d as f32).sqrt();
    let mut worst = 0f32;
    for (layer, slot) in [(0, 0), (1, 0), (2, 1)] {
        let (q_c, q_g) = pair(&mut rng, &[tokens, heads, d], dtype, dev);
        let t = &tables[slot];
        let want = paged_attention_scaled(&q_c, &kc_c, &vc_c, &seqs, t, max_blocks, scale, kv_scale).unwrap();
        let got = paged_attention_scaled(&q_g, &kc_g, &vc_g, &seqs, t, max_blocks, scale, kv_scale).unwrap();
        assert_eq!(got.dims(), want.dims());
        let e = rel_err(&flat(&got), &flat(&want));
        assert!(
            e <= tol(dtype),
            "{name} {dtype:?} fp8 {fp8:?} heads {heads}/{kv_heads} d {d} layer {layer} (slot {slot}): relative error {e}"
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

#[test]
fn fp8_reshape_and_cache_matches_cpu_bit_for_bit() {
    let dev = gpu();
    for (dtype, kvh, d, scale) in [
        (DType::F32, 2, 64, 1.0f32),
        (DType::F16, 1, 128, 0.05),
        (DType::BF16, 4, 128, 0.5),
        (DType::BF16, 8, 64, 2.0),
        (DType::F32, 1, 256, 0.013),
        (DType::F32, 3, 20, 0.3), // a row that is not a multiple of 16 bytes
    ] {
        let mut rng = Rng::new(17 + d as u64 + kvh as u64);
        let (nb, bs) = (9, 16);
        let cache_c = Tensor::zeros((nb, bs, kvh, d), DType::U8, &Device::Cpu).unwrap();
        let cache_g = cache_c.to_device(&dev).unwrap();
        let skip = crosskv::ops::reshape_and_cache::SKIP_ROW;
        let mut pos: Vec<u32> = vec![0, 15, skip, 16, (nb * bs - 1) as u32];
        let fixed = pos.clone();
        pos.extend(
            shuffled(&mut rng, nb * bs)
                .into_iter()
                .filter(|p| !fixed.contains(p))
                .take(30),
        );
        let t = pos.len();
        // From subnormal to saturated at this scale (|x| > 448 × scale).
        let mut vals = rng
            .tensor(&[t, kvh, d], 200.0 * scale, 0.0)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (i, v) in vals.iter_mut().enumerate().step_by(7) {
            *v *= [1e-4f32, 1e-2, 10.0][i % 3];
        }
        let new_c = Tensor::from_vec(vals, (t, kvh, d), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let new_g = new_c.to_device(&dev).unwrap();
        let pos_c = Tensor::new(pos.as_slice(), &Device::Cpu).unwrap();
        let pos_g = pos_c.to_device(&dev).unwrap();
        reshape_and_cache_scaled(&cache_c, &new_c, &pos_c, scale).unwrap();
        reshape_and_cache_scaled(&cache_g, &new_g, &pos_g, scale).unwrap();
        let got = cache_g
            .to_device(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        let want = cache_c.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ, 0,
            "{dtype:?} kvh {kvh} d {d} scale {scale}: {differ} fp8 codes differ from CPU"
        );
        assert!(
            want.iter().any(|&c| c & 0x7F == 0x7E),
            "{dtype:?} d {d}: no saturated element was tested"
        );
        eprintln!("fp8 reshape_and_cache {dtype:?} kv_heads {kvh} d {d} scale {scale}: {t} rows, exact");
    }
}

#[test]
fn fp8_paged_attention_matches_cpu() {
    let dev = gpu();
    let ratios = [(8, 8), (8, 2), (16, 1), (32, 1), (12, 4)];
    let scales = KvScale { k: 0.02, v: 0.3 };
    let mut seed = 5000;
    let mut summary = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for d in [64, 128, 256] {
            for &(heads, kv_heads) in &ratios {
                for (name, sc) in scenarios() {
                    seed += 1;
                    let e = run_scenario_kv(&dev, name, &sc, dtype, Some(scales), (heads, kv_heads, d), seed);
                    summary.push(format!(
                        "fp8 paged_attention {name:6} q {:4} d{d:<3} heads {heads:2}/{kv_heads}: max rel err {e:.2e}",
                        format!("{dtype:?}")
                    ));
                }
            }
        }
    }
    for s in summary {
        eprintln!("{s}");
    }
}
