//! GGUF checkpoints: the same tiny llama written as a Hugging Face safetensors
//! directory and as GGUF files in each supported tensor type (Q/K permuted the way
//! llama.cpp's converter does), loaded through the GGUF path and compared with the
//! safetensors model. Exercises the name mapping, the interleaved RoPE of GGUF llama
//! checkpoints, our Q4_1/Q8_0 kernels and candle's quantized/dense fallbacks.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use crosskv::model::{gguf_config::config_from_gguf, load_model_dir, weights::Weights, LoadOptions, Model};
use std::collections::HashMap;

pub(crate) const VOCAB: usize = 64;
const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const LAYERS: usize = 2;
const FFN: usize = 128;

/// Deterministic pseudo-random values (an LCG), scaled.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

pub(crate) fn tiny_weights() -> Vec<(String, Tensor)> {
    let dev = Device::Cpu;
    let mut seed = 0;
    let mut t = |shape: &[usize], scale: f32, offset: f32| {
        seed += 1;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = values(n, seed, scale).into_iter().map(|x| x + offset).collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let mut w = vec![
        ("model.embed_tokens.weight".to_string(), t(&[VOCAB, HIDDEN], 0.5, 0.0)),
        ("model.norm.weight".to_string(), t(&[HIDDEN], 0.1, 1.0)),
    ];
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        w.push((format!("{p}.input_layernorm.weight"), t(&[HIDDEN], 0.1, 1.0)));
        w.push((format!("{p}.post_attention_layernorm.weight"), t(&[HIDDEN], 0.1, 1.0)));
        w.push((
            format!("{p}.self_attn.q_proj.weight"),
            t(&[HEADS * HEAD_DIM, HIDDEN], 0.3, 0.0),
        ));
        w.push((
            format!("{p}.self_attn.k_proj.weight"),
            t(&[KV_HEADS * HEAD_DIM, HIDDEN], 0.3, 0.0),
        ));
        w.push((
            format!("{p}.self_attn.v_proj.weight"),
            t(&[KV_HEADS * HEAD_DIM, HIDDEN], 0.3, 0.0),
        ));
        w.push((
            format!("{p}.self_attn.o_proj.weight"),
            t(&[HIDDEN, HEADS * HEAD_DIM], 0.3, 0.0),
        ));
        w.push((format!("{p}.mlp.gate_proj.weight"), t(&[FFN, HIDDEN], 0.3, 0.0)));
        w.push((format!("{p}.mlp.up_proj.weight"), t(&[FFN, HIDDEN], 0.3, 0.0)));
        w.push((format!("{p}.mlp.down_proj.weight"), t(&[HIDDEN, FFN], 0.3, 0.0)));
    }
    w
}

fn write_safetensors(dir: &std::path::Path, weights: &[(String, Tensor)]) {
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
        "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let map: HashMap<String, Tensor> = weights.iter().cloned().collect();
    candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
}

/// llama.cpp's converter permutes Q/K rows so its interleaved RoPE equals HF's halves.
fn permute_for_gguf(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

pub(crate) fn write_gguf(path: &std::path::Path, weights: &[(String, Tensor)], dtype: GgmlDType) {
    use gguf_file::Value as V;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in weights {
        let t = if name.ends_with("q_proj.weight") {
            permute_for_gguf(t, HEADS)
        } else if name.ends_with("k_proj.weight") {
            permute_for_gguf(t, KV_HEADS)
        } else {
            t.clone()
        };
        // Norms stay f32, as in real GGUF files.
        let ty = if t.rank() == 1 { GgmlDType::F32 } else { dtype };
        tensors.push((
            crosskv::model::weights::gguf_name(name),
            QTensor::quantize(&t, ty).unwrap(),
        ));
    }
    let meta: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("llama.block_count", V::U32(LAYERS as u32)),
        ("llama.embedding_length", V::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", V::U32(FFN as u32)),
        ("llama.attention.head_count", V::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", V::U32(KV_HEADS as u32)),
        ("llama.attention.key_length", V::U32(HEAD_DIM as u32)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("llama.rope.freq_base", V::F32(10000.0)),
        ("llama.context_length", V::U32(64)),
        ("llama.vocab_size", V::U32(VOCAB as u32)),
    ];
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

pub(crate) fn load_gguf(path: &std::path::Path) -> Model {
    load_gguf_with(path, false)
}

fn load_gguf_with(path: &std::path::Path, dequantize: bool) -> Model {
    let mut w = Weights::gguf(path, DType::F32, &Device::Cpu).unwrap();
    if dequantize {
        w = w.dequantized();
    }
    let (cfg, interleaved) = config_from_gguf(w.gguf_content().unwrap()).unwrap();
    assert!(interleaved, "GGUF llama checkpoints use interleaved RoPE");
    Model::load(&cfg, &w, interleaved).unwrap()
}

fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
    let diff = (got - want)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let norm = want.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    (diff / norm).sqrt()
}

#[test]
fn gguf_checkpoints_in_every_supported_type_match_the_safetensors_model() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = tiny_weights();
    write_safetensors(tmp.path(), &weights);
    let reference = load_model_dir(tmp.path(), &LoadOptions::default()).unwrap();
    let tokens: Vec<u32> = vec![3, 17, 42, 5, 63, 0, 29, 11, 8, 50];
    let want = reference.forward_dense(&tokens).unwrap();
    // Against the safetensors model: bounded by each format's weight rounding (a wrong
    // permutation or name gives ~1). Against the same file dequantized: bounded by
    // the kernels' activation quantization alone.
    for (dtype, bound, kernel_bound) in [
        (GgmlDType::F32, 1e-5, 1e-6),
        (GgmlDType::F16, 5e-3, 1e-6),
        (GgmlDType::Q8_0, 0.05, 0.03),
        (GgmlDType::Q4_1, 0.5, 0.03),
        (GgmlDType::Q4_0, 0.5, 0.03),
    ] {
        let path = tmp.path().join(format!("tiny-{dtype:?}.gguf"));
        write_gguf(&path, &weights, dtype);
        let model = load_gguf(&path);
        assert_eq!(model.layout().kv_layers(), LAYERS);
        let got = model.forward_dense(&tokens).unwrap();
        let err = relative_error(&got, &want);
        assert!(
            err < bound,
            "{dtype:?}: relative logits error {err} ≥ {bound} against safetensors"
        );
        let exact = load_gguf_with(&path, true).forward_dense(&tokens).unwrap();
        let kerr = relative_error(&got, &exact);
        assert!(
            kerr < kernel_bound,
            "{dtype:?}: relative error {kerr} ≥ {kernel_bound} against dequantized weights"
        );
    }
}

#[test]
fn gguf_without_k_projections_in_a_block_is_read_as_cla() {
    let tmp = tempfile::tempdir().unwrap();
    // Layer 1 drops its K/V: it must read layer 0's cache.
    let weights: Vec<(String, Tensor)> = tiny_weights()
        .into_iter()
        .filter(|(n, _)| {
            !n.starts_with("model.layers.1.self_attn.k_proj") && !n.starts_with("model.layers.1.self_attn.v_proj")
        })
        .collect();
    let path = tmp.path().join("cla.gguf");
    write_gguf(&path, &weights, GgmlDType::F32);
    let model = load_gguf(&path);
    assert_eq!(model.layout().kv_source(), &[0, 0]);
    assert_eq!(model.layout().kv_layers(), 1);
    // Same model as the safetensors one re-shared with factor 2.
    write_safetensors(tmp.path(), &tiny_weights());
    let opts = LoadOptions {
        sharing: Some(crosskv::config::KvSharing::ShareFactor(2)),
        ..Default::default()
    };
    let reference = load_model_dir(tmp.path(), &opts).unwrap();
    let tokens: Vec<u32> = vec![1, 2, 3, 4, 5, 6];
    let err = relative_error(
        &model.forward_dense(&tokens).unwrap(),
        &reference.forward_dense(&tokens).unwrap(),
    );
    assert!(err < 1e-5, "relative error {err}");
}
