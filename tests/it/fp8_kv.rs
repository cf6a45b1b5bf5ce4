//! The fp8 (e4m3) KV cache on the CPU: the cache write quantizes every element with its
//! slot's scale; paged attention over fp8 pages equals dense attention over the values
//! they hold; checkpoint k_scale/v_scale are read; a model's log-probs with an fp8
//! cache stay near the f32 cache's (runner, tensor-parallel ranks, and a real HTTP
//! server with prefix caching); `capacity` counts one byte an element.

use crate::common::{crosskv, rows, Rng, Tiny};
use crate::http::{start_model, Setup, MODEL, VOCAB};
use candle_core::{DType, Device, Tensor};
use crosskv::kv::{KvDtype, KvManager, KvScale};
use crosskv::model::{self, LoadOptions, Model};
use crosskv::ops::fp8::{f32_to_e4m3, E4M3_TABLE};
use crosskv::ops::reshape_and_cache::SKIP_ROW;
use crosskv::ops::{paged_attention_scaled, reshape_and_cache_scaled, SeqSpan};
use crosskv::runner::{Runner, SeqStep};
use serde_json::{json, Value};

fn codes(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

#[test]
fn fp8_cache_write_quantizes_each_element_with_the_slot_scale() {
    let (nb, bs, kvh, d) = (4, 4, 2, 8);
    let cache = Tensor::zeros((nb, bs, kvh, d), DType::U8, &Device::Cpu).unwrap();
    let mut rng = Rng::new(3);
    // Magnitudes from subnormal to past the range: with scale 0.5, |x| > 224 saturates.
    let mut new = rng.tensor(&[3, kvh, d], 60.0, 0.0).to_vec3::<f32>().unwrap();
    new[0][0][0] = 1000.0;
    new[0][0][1] = -1000.0;
    new[0][1][0] = 0.0007;
    let new_t = Tensor::new(new.clone(), &Device::Cpu).unwrap();
    let scale = 0.5f32;
    let pos = Tensor::new(&[5u32, SKIP_ROW, 14], &Device::Cpu).unwrap();
    reshape_and_cache_scaled(&cache, &new_t, &pos, scale).unwrap();
    let got = codes(&cache);
    let row = kvh * d;
    for (t, p) in [(0usize, 5usize), (2, 14)] {
        let want: Vec<u8> = new[t]
            .iter()
            .flatten()
            .map(|&x| f32_to_e4m3(x * (1.0 / scale)))
            .collect();
        assert_eq!(&got[p * row..(p + 1) * row], want.as_slice(), "token {t} at row {p}");
    }
    assert_eq!(got[5 * row], 0x7E, "1000 / 0.5 saturates to +448");
    assert_eq!(got[5 * row + 1], 0xFE, "-1000 / 0.5 saturates to -448");
    assert_eq!(
        got[5 * row + d],
        0x01,
        "0.0007 / 0.5 rounds to the smallest subnormal, 2^-9"
    );
    // The skipped token and every other row are untouched.
    let written = [5, 14];
    for r in (0..nb * bs).filter(|r| !written.contains(r)) {
        assert!(
            got[r * row..(r + 1) * row].iter().all(|&c| c == 0),
            "row {r} was written"
        );
    }
    let err = reshape_and_cache_scaled(&cache, &new_t, &pos, 0.0).unwrap_err();
    assert!(err.to_string().contains("scale"), "{err}");
}

/// Dense causal attention of one query row over `n` K/V rows (f32, the textbook way).
fn dense_row(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], n: usize, scale: f32) -> Vec<f32> {
    let s: Vec<f32> = (0..n)
        .map(|j| q.iter().zip(&k[j]).map(|(a, b)| a * b).sum::<f32>() * scale)
        .collect();
    let m = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f32 = e.iter().sum();
    (0..q.len())
        .map(|c| (0..n).map(|j| e[j] / z * v[j][c]).sum::<f32>())
        .collect()
}

#[test]
fn paged_attention_on_fp8_pages_equals_dense_attention_on_their_values() {
    let (bs, heads, kvh, d) = (4, 8, 2, 16);
    let group = heads / kvh;
    let kv_scale = KvScale { k: 0.03, v: 0.4 };
    // A prefill of 6 on top of 3 cached tokens, two decodes, a fresh prefill of 5.
    let spans = [(6usize, 9usize), (1, 11), (1, 1), (5, 5)];
    let mut rng = Rng::new(21);
    let max_blocks = 3;
    let num_blocks = 14;
    // Scattered blocks (a random permutation), interleaved between the sequences.
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let mut free = ids.into_iter();
    let mut table = vec![0u32; spans.len() * max_blocks];
    for (s, &(_, ctx)) in spans.iter().enumerate() {
        for b in 0..ctx.div_ceil(bs) {
            table[s * max_blocks + b] = free.next().unwrap();
        }
    }
    let kc = Tensor::zeros((num_blocks, bs, kvh, d), DType::U8, &Device::Cpu).unwrap();
    let vc = kc.zeros_like().unwrap();
    // Every sequence's K/V (some past the e4m3 range at these scales: |k| > 13.4 saturates).
    let mut kv_rows = Vec::new();
    for (s, &(_, ctx)) in spans.iter().enumerate() {
        let k = rng.tensor(&[ctx, kvh, d], 5.0, 0.0);
        let v = rng.tensor(&[ctx, kvh, d], 60.0, 1.0);
        let rows: Vec<u32> = (0..ctx)
            .map(|p| table[s * max_blocks + p / bs] * bs as u32 + (p % bs) as u32)
            .collect();
        let rows_t = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
        reshape_and_cache_scaled(&kc, &k, &rows_t, kv_scale.k).unwrap();
        reshape_and_cache_scaled(&vc, &v, &rows_t, kv_scale.v).unwrap();
        kv_rows.push(rows);
    }
    let (kcodes, vcodes) = (codes(&kc), codes(&vc));
    // What the pages hold, dequantized: [sequence][position][kv head] → row of d.
    let held = |c: &[u8], s: usize, p: usize, h: usize, sc: f32| -> Vec<f32> {
        let off = (kv_rows[s][p] as usize * kvh + h) * d;
        c[off..off + d].iter().map(|&x| E4M3_TABLE[x as usize] * sc).collect()
    };
    let mut seqs = Vec::new();
    let mut tokens = 0;
    for &(ql, ctx) in &spans {
        seqs.push(SeqSpan {
            q_start: tokens as u32,
            q_len: ql as u32,
            ctx_len: ctx as u32,
        });
        tokens += ql;
    }
    let scale = 1.0 / (d as f32).sqrt();
    let q = rng.tensor(&[tokens, heads, d], 1.0, 0.0);
    for q_dtype in [DType::F32, DType::BF16] {
        let qd = q.to_dtype(q_dtype).unwrap();
        let got = paged_attention_scaled(&qd, &kc, &vc, &seqs, &table, max_blocks, scale, kv_scale)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        let qv_in: Vec<Vec<Vec<f32>>> = qd.to_dtype(DType::F32).unwrap().to_vec3().unwrap();
        let mut worst = 0f32;
        for (s, &(ql, ctx)) in spans.iter().enumerate() {
            for i in 0..ql {
                let t = seqs[s].q_start as usize + i;
                let n = ctx - ql + i + 1;
                for h in 0..heads {
                    let kvh_i = h / group;
                    let k: Vec<Vec<f32>> = (0..n).map(|p| held(&kcodes, s, p, kvh_i, kv_scale.k)).collect();
                    let v: Vec<Vec<f32>> = (0..n).map(|p| held(&vcodes, s, p, kvh_i, kv_scale.v)).collect();
                    let want = dense_row(&qv_in[t][h], &k, &v, n, scale);
                    let mag = want.iter().fold(1f32, |m, x| m.max(x.abs()));
                    for (a, b) in got[t][h].iter().zip(&want) {
                        worst = worst.max((a - b).abs() / mag);
                    }
                }
            }
        }
        // f32 out: only summation order differs; bf16 out: one rounding of the result.
        let tol = if q_dtype == DType::F32 { 1e-5 } else { 8e-3 };
        assert!(
            worst <= tol,
            "{q_dtype:?}: paged fp8 attention off dense by {worst} (relative)"
        );
    }
}

/// The log-probability of each next token under `logits` rows.
fn next_token_logprobs(logits: &[Vec<f32>], tokens: &[u32]) -> Vec<f32> {
    logits
        .iter()
        .zip(&tokens[1..])
        .map(|(row, &t)| {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
            row[t as usize] - lse
        })
        .collect()
}

/// Every position's logits through the paged path: a prefill of the first half (all
/// logits), then one decode step per token.
fn paged_logits(model: &Model, tokens: &[u32]) -> Vec<Vec<f32>> {
    let block = 4;
    let layout = model.layout().clone();
    let n = tokens.len().div_ceil(block) * layout.kv_layers();
    let runner = Runner::new(model.clone(), n, block).unwrap();
    let mut mgr = KvManager::new(layout, n, block);
    let half = tokens.len() / 2;
    mgr.allocate(0, half).unwrap();
    let step = |start: usize, toks: &[u32], all: bool| SeqStep {
        seq: 0,
        tokens: toks.to_vec(),
        start_pos: start,
        all_logits: all,
    };
    let mut out = rows(&runner.step(&mgr, &[step(0, &tokens[..half], true)]).unwrap());
    for p in half..tokens.len() - 1 {
        mgr.allocate(0, p + 1).unwrap();
        out.extend(rows(&runner.step(&mgr, &[step(p, &tokens[p..p + 1], false)]).unwrap()));
    }
    out
}

fn with_kv(ck: &crate::common::Checkpoint, kv: KvDtype) -> Model {
    let mut m = ck.load();
    m.set_kv_cache_dtype(kv);
    m
}

/// Mean and max |Δ log-prob| of the fp8 cache against the f32 one, prefill and decode.
fn fp8_deltas(ck: &crate::common::Checkpoint, tokens: &[u32]) -> (f32, f32) {
    kv_deltas(ck, tokens, KvDtype::Fp8E4m3)
}

/// Mean and max |Δ log-prob| of a `kv` cache against the f32 one, prefill and decode.
fn kv_deltas(ck: &crate::common::Checkpoint, tokens: &[u32], kv: KvDtype) -> (f32, f32) {
    let want = next_token_logprobs(&paged_logits(&with_kv(ck, KvDtype::F32), tokens), tokens);
    let m = with_kv(ck, kv);
    assert_eq!(m.layout().dtype_bytes, kv.bytes());
    let got = next_token_logprobs(&paged_logits(&m, tokens), tokens);
    let d: Vec<f32> = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
    (
        d.iter().sum::<f32>() / d.len() as f32,
        d.iter().fold(0f32, |a, &b| a.max(b)),
    )
}

#[test]
fn fp8_cache_log_probs_stay_near_the_f32_cache() {
    // MHA, GQA with CLA2, MQA with a non-uniform kv_source.
    let cases = [
        ("mha", Tiny::new(3, 4, 4, 16, 64, 97).seed(31)),
        (
            "gqa-cla2",
            Tiny::new(4, 4, 2, 16, 64, 97)
                .cla("cla_share_factor", json!(2))
                .seed(32),
        ),
        (
            "mqa-0,0,2,2,2",
            Tiny::new(5, 4, 1, 16, 64, 97)
                .cla("kv_source", json!([0, 0, 2, 2, 2]))
                .seed(33),
        ),
    ];
    for (name, tiny) in cases {
        let ck = tiny.write();
        let tokens = Rng::new(8).tokens(40, 97);
        let (mean, max) = fp8_deltas(&ck, &tokens);
        let (mean16, max16) = kv_deltas(&ck, &tokens, KvDtype::BF16);
        eprintln!("{name}: |Δ log-prob| against an f32 cache: fp8 mean {mean:.2e} max {max:.2e}; bf16 mean {mean16:.2e} max {max16:.2e}");
        // e4m3 keeps 3 mantissa bits, bf16 7: its rounding error is 16 times bf16's, and so
        // (to first order) is the log-probs' move. These random models are sensitive
        // (bf16 alone moves them by about 1e-2), so the bound is relative: at most 32×.
        assert!(
            mean <= 32.0 * mean16 && max <= 32.0 * max16,
            "{name}: mean {mean} max {max}"
        );
        assert!(
            mean > 2.0 * mean16,
            "{name}: an fp8 cache that changes so little was not used"
        );
    }
}

/// The golden fixtures (HF transformers checkpoints with initializer_range 0.02, so
/// small K/V: mostly in e4m3's normal range at scale 1.0, some subnormal).
#[test]
fn fp8_cache_log_probs_on_the_golden_fixtures() {
    for name in ["llama_gqa", "llama_headdim_rope3", "qwen2_bias"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/golden")
            .join(name);
        let load = |kv: KvDtype| {
            let mut m = model::load_model_dir(&dir, &LoadOptions::default()).unwrap();
            m.set_kv_cache_dtype(kv);
            m
        };
        let vocab = load(KvDtype::F32).config().vocab_size;
        let tokens = Rng::new(12).tokens(48, vocab);
        let want = next_token_logprobs(&paged_logits(&load(KvDtype::F32), &tokens), &tokens);
        let deltas = |kv: KvDtype| {
            let got = next_token_logprobs(&paged_logits(&load(kv), &tokens), &tokens);
            let d: Vec<f32> = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
            (
                d.iter().sum::<f32>() / d.len() as f32,
                d.iter().fold(0f32, |a, &b| a.max(b)),
            )
        };
        let (mean, max) = deltas(KvDtype::Fp8E4m3);
        let (mean16, max16) = deltas(KvDtype::BF16);
        eprintln!(
            "golden {name}: |Δ log-prob| against an f32 cache over {} tokens: fp8 mean {mean:.2e} max {max:.2e}; bf16 mean {mean16:.2e} max {max16:.2e}",
            want.len()
        );
        assert!(
            mean <= 32.0 * mean16 && max <= 32.0 * max16,
            "{name}: mean {mean} max {max}"
        );
    }
}

#[test]
fn tensor_parallel_ranks_with_an_fp8_cache_give_the_logits_of_one() {
    let tiny = Tiny::new(4, 4, 2, 8, 32, 61).cla("cla_share_factor", json!(2)).seed(4);
    let ck = tiny.write();
    let tokens = Rng::new(2).tokens(14, 61);
    let one = paged_logits(&with_kv(&ck, KvDtype::Fp8E4m3), &tokens);
    let mut ranks = model::load_model_dir_ranks(
        ck.path(),
        &LoadOptions {
            tensor_parallel_size: 2,
            ..Default::default()
        },
    )
    .unwrap();
    for r in ranks.iter_mut() {
        r.set_kv_cache_dtype(KvDtype::Fp8E4m3);
    }
    let layout = ranks[0].layout().clone();
    let block = 4;
    let n = tokens.len().div_ceil(block) * layout.kv_layers();
    let runner = Runner::tensor_parallel(ranks, n, block).unwrap();
    assert!(runner
        .rank_caches()
        .all(|c| c.dtype() == KvDtype::Fp8E4m3 && c.k().dtype() == DType::U8));
    let mut mgr = KvManager::new(layout, n, block);
    mgr.allocate(0, 7).unwrap();
    let mk = |start: usize, toks: &[u32], all: bool| SeqStep {
        seq: 0,
        tokens: toks.to_vec(),
        start_pos: start,
        all_logits: all,
    };
    let mut got = rows(&runner.step(&mgr, &[mk(0, &tokens[..7], true)]).unwrap());
    for p in 7..tokens.len() - 1 {
        mgr.allocate(0, p + 1).unwrap();
        got.extend(rows(&runner.step(&mgr, &[mk(p, &tokens[p..p + 1], false)]).unwrap()));
    }
    // The ranks' K/V differ from the whole model's by rounding only, which can move an
    // element to the neighbouring fp8 code: held to the fp8 cache's own effect.
    let (_, fp8_effect) = fp8_deltas(&ck, &tokens);
    let d = next_token_logprobs(&got, &tokens)
        .iter()
        .zip(next_token_logprobs(&one, &tokens))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        d <= fp8_effect.max(1e-4),
        "2 ranks off one by {d} (fp8 alone: {fp8_effect})"
    );
}

#[test]
fn checkpoint_kv_scales_are_read_per_producer_layer() {
    let mut ck = Tiny::new(4, 4, 2, 8, 32, 61)
        .cla("cla_share_factor", json!(2))
        .seed(9)
        .write();
    let scalar = |v: f32| Tensor::new(v, &Device::Cpu).unwrap();
    // vLLM's names: layer 0 per tensor, layer 2 one kv_scale for both; layer 1 is a
    // consumer, whose scale (were there one) nothing reads.
    ck.tensors
        .insert("model.layers.0.self_attn.k_scale".into(), scalar(0.25));
    ck.tensors.insert(
        "model.layers.0.self_attn.v_scale".into(),
        Tensor::new(&[0.5f32], &Device::Cpu).unwrap(),
    );
    ck.tensors
        .insert("model.layers.2.self_attn.kv_scale".into(), scalar(2.0));
    ck.save();
    let mut m = ck.load();
    assert_eq!(m.kv_scales(), &[KvScale::default(); 2], "a float cache uses no scale");
    let defaulted = m.set_kv_cache_dtype(KvDtype::Fp8E4m3);
    assert!(defaulted.is_empty(), "{defaulted:?}");
    assert_eq!(
        m.kv_scales(),
        &[KvScale { k: 0.25, v: 0.5 }, KvScale { k: 2.0, v: 2.0 }]
    );
    // The scales are used: the logits differ from those at scale 1.0, and stay close to
    // the f32 cache's.
    let tokens = Rng::new(1).tokens(12, 61);
    let scaled = paged_logits(&m, &tokens);
    ck.tensors.retain(|k, _| !k.ends_with("scale"));
    ck.save();
    let mut plain = ck.load();
    assert_eq!(
        plain.set_kv_cache_dtype(KvDtype::Fp8E4m3),
        vec![0, 1],
        "no scales: both slots at 1.0"
    );
    assert_ne!(scaled, paged_logits(&plain, &tokens));
    // A scale that is not positive is refused at load, naming it.
    ck.tensors
        .insert("model.layers.2.self_attn.k_scale".into(), scalar(-1.0));
    ck.save();
    let err = model::load_model_dir(ck.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.2.self_attn") && err.contains("positive"),
        "{err}"
    );
}

fn json_of(o: &std::process::Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn capacity_counts_one_byte_an_element_for_fp8() {
    let shapes = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/shapes");
    let cfg = |name: &str| format!("{shapes}/{name}/config.json");
    let run = |name: &str, kv: &str| {
        json_of(&crosskv(&[
            "capacity",
            "--config",
            &cfg(name),
            "--json",
            "--kv-cache-memory",
            "4GiB",
            "--seq-len",
            "2048",
            "--kv-cache-dtype",
            kv,
        ]))
    };
    // 20 layers, 1 KV head × 128, bf16: 512 bytes a layer a token.
    let mqa = run("h128-mqa", "auto");
    assert_eq!(mqa["kv_cache_dtype"], "bf16");
    assert_eq!(mqa["kv_bytes_per_token"], 10_240);
    assert_eq!(mqa["compared_kv_dtype"]["kv_cache_dtype"], "fp8_e4m3");
    assert_eq!(mqa["compared_kv_dtype"]["kv_bytes_per_token"], 5_120);
    let cla2_fp8 = run("h128-mqa-cla2", "fp8");
    assert_eq!(cla2_fp8["kv_cache_dtype"], "fp8_e4m3");
    assert_eq!(cla2_fp8["dtype_bytes"], 1);
    assert_eq!(cla2_fp8["kv_bytes_per_token"], 2_560);
    assert_eq!(cla2_fp8["non_cla_kv_bytes_per_token"], 5_120);
    assert_eq!(cla2_fp8["compared_kv_dtype"]["kv_cache_dtype"], "bf16");
    assert_eq!(cla2_fp8["compared_kv_dtype"]["kv_bytes_per_token"], 5_120);
    // Blocks of 16 tokens: 8192 bytes in bf16, 4096 in fp8, so twice the blocks.
    let cla2_bf16 = run("h128-mqa-cla2", "bf16");
    assert_eq!(cla2_bf16["block_bytes"], 8_192);
    assert_eq!(cla2_fp8["block_bytes"], 4_096);
    assert_eq!(
        cla2_fp8["num_blocks"],
        json!(2 * cla2_bf16["num_blocks"].as_u64().unwrap())
    );
    // 4 GiB / 4096-byte blocks = 1 048 576 blocks; 10 slots × 128 blocks a sequence:
    // 819 sequences of 2048 tokens, against 204 for MQA in bf16 (20 slots, 8192-byte blocks).
    assert_eq!(cla2_fp8["num_blocks"], 1_048_576);
    assert_eq!(cla2_fp8["max_concurrency"], 819);
    assert_eq!(mqa["max_concurrency"], 204);
    // The alias, and the table's side-by-side rows.
    assert_eq!(run("h128-mqa-cla2", "fp8_e4m3")["kv_bytes_per_token"], 2_560);
    let o = crosskv(&["capacity", "--config", &cfg("h128-mqa-cla2"), "--kv-cache-dtype", "fp8"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let row = |label: &str| crate::common::table_row(&out, label);
    assert_eq!(row("KV cache dtype"), ["fp8_e4m3", "fp8_e4m3"]);
    assert_eq!(row("KV bytes per token"), ["2560", "5120"]);
    assert!(out.contains("as bf16 (2 bytes an element):"), "{out}");
    assert_eq!(row("  KV bytes per token"), ["5120", "10240"]);
    let bad = crosskv(&["capacity", "--config", &cfg("h128-mqa"), "--kv-cache-dtype", "fp4"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--kv-cache-dtype"));
}

/// Echo log-probs of one prompt (the lm-evaluation-harness request).
async fn echo_logprobs(s: &crate::http::Server, prompt: &[u32]) -> Vec<f32> {
    let (st, r) = s
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": [prompt], "echo": true, "logprobs": 0,
                "max_tokens": 0, "temperature": 0}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    r["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap()[1..]
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fp8_server_echo_log_probs_are_within_tolerance_of_the_f32_server() {
    // One checkpoint (the same seed each time) behind three servers: f32, bf16 and fp8 KV.
    let server = |kv: KvDtype| async move {
        let ck = crate::http::tiny_checkpoint(VOCAB);
        let mut m = ck.load();
        m.set_kv_cache_dtype(kv);
        start_model(Setup::default(), ck, m).await
    };
    let f32_server = server(KvDtype::F32).await;
    let bf16_server = server(KvDtype::BF16).await;
    let fp8_server = server(KvDtype::Fp8E4m3).await;
    let prompt = Rng::new(5).tokens(70, VOCAB);
    let want = echo_logprobs(&f32_server, &prompt).await;
    let deltas = |got: &[f32]| {
        let d: Vec<f32> = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
        (
            d.iter().sum::<f32>() / d.len() as f32,
            d.iter().fold(0f32, |a, &b| a.max(b)),
        )
    };
    let got = echo_logprobs(&fp8_server, &prompt).await;
    let (mean, max) = deltas(&got);
    let (mean16, max16) = deltas(&echo_logprobs(&bf16_server, &prompt).await);
    eprintln!(
        "echo |Δ log-prob| against the f32 cache over {} tokens: fp8 mean {mean:.2e} max {max:.2e}; bf16 mean {mean16:.2e} max {max16:.2e}",
        want.len()
    );
    // The tolerance: 32 times bf16's own move (e4m3 rounds 16 times coarser), and never
    // more than 0.1 nats on average.
    assert!(
        mean <= (32.0 * mean16).min(0.1) && max <= 32.0 * max16,
        "fp8 echo log-probs off f32: mean {mean} max {max}"
    );
    assert!(mean > 0.0);
    // The same prompt again hits the prefix cache (its fp8 blocks are shared as they
    // are): the same log-probs.
    assert_eq!(echo_logprobs(&fp8_server, &prompt).await, got);
    // Accounting: /v1/kv and the metrics name the KV dtype; one byte an element.
    let kv = fp8_server.get_json("/v1/kv").await;
    let kv32 = f32_server.get_json("/v1/kv").await;
    assert_eq!(kv["kv_cache_dtype"], "fp8_e4m3");
    assert_eq!(kv["dtype_bytes"], 1);
    assert_eq!(kv32["kv_cache_dtype"], "f32");
    assert_eq!(
        kv32["kv_bytes_per_token"].as_u64().unwrap(),
        4 * kv["kv_bytes_per_token"].as_u64().unwrap()
    );
    assert_eq!(
        kv["block_bytes"].as_u64().unwrap() * 4,
        kv32["block_bytes"].as_u64().unwrap()
    );
    let (_, metrics) = fp8_server.get("/metrics").await;
    assert!(
        metrics.lines().any(|l| l.starts_with("crosskv_kv_cache_info{")
            && l.contains("dtype=\"fp8_e4m3\"")
            && l.contains(&format!("kv_bytes_per_token=\"{}\"", kv["kv_bytes_per_token"]))),
        "{metrics}"
    );
}

#[test]
fn generate_and_bench_take_the_flag_and_eval_refuses_it() {
    let ck = crate::common::tiny_with_default_tokenizer();
    let dir = ck.path().to_str().unwrap();
    let o = crosskv(&[
        "generate",
        "--model",
        dir,
        "--kv-cache-dtype",
        "fp8_e4m3",
        "--prompt",
        "Hello",
        "--max-tokens",
        "3",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    // This checkpoint has no scales: the warning names what was assumed.
    assert!(err.contains("k_scale/v_scale") && err.contains("scale 1.0"), "{err}");
    let o = crosskv(&[
        "bench",
        "--model",
        dir,
        "--kv-cache-dtype",
        "fp8",
        "--prompt-tokens",
        "8",
        "--decode-tokens",
        "4",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("text.txt");
    std::fs::write(&text, "one two three four five six seven eight nine ten").unwrap();
    let o = crosskv(&[
        "eval",
        "--model",
        dir,
        "--kv-cache-dtype",
        "fp8",
        "--data",
        text.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--kv-cache-dtype"));
}
