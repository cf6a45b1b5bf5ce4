//! Every malformed CLA config is refused at load with a message naming the key and the
//! layer; every accepted key form normalises to one `kv_source` list; truncated weight
//! files and missing producer tensors are errors that name the file or tensor.

use crate::common::Tiny;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use crosskv::config::{KvSharing, ModelConfig};
use crosskv::model::{self, gguf_config, weights::Weights, LoadOptions, ModelSource};
use serde_json::{json, Value};
use std::path::Path;

/// A 4-layer config with `extra` merged in.
fn config(extra: Value) -> Value {
    let mut c = Tiny::new(4, 4, 2, 8, 32, 61).config_json();
    for (k, v) in extra.as_object().unwrap() {
        c[k.as_str()] = v.clone();
    }
    c
}

fn err(extra: Value) -> String {
    match ModelConfig::from_json(config(extra.clone())) {
        Ok(c) => panic!("{extra} was accepted as kv_source {:?}", c.kv_source),
        Err(e) => e.to_string(),
    }
}

fn kv_source(extra: Value) -> Vec<usize> {
    ModelConfig::from_json(config(extra.clone()))
        .unwrap_or_else(|e| panic!("{extra}: {e}"))
        .kv_source
}

#[track_caller]
fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error `{msg}` does not mention `{p}`");
    }
}

#[test]
fn consumer_pointing_forward_is_refused_naming_key_and_layer() {
    let m = err(json!({"kv_source": [0, 0, 3, 3]}));
    assert_names(&m, &["`kv_source`", "layer 2", "forward"]);
    let m = err(json!({"layer_types": "0_2_2_2"}));
    assert_names(&m, &["`layer_types`", "layer 1", "forward"]);
    let m = err(json!({"kv_sharing_map": {"1": 3}}));
    assert_names(&m, &["`kv_sharing_map`", "layer 1", "forward"]);
}

#[test]
fn consumer_pointing_at_another_consumer_is_refused() {
    let m = err(json!({"kv_source": [0, 0, 1, 2]}));
    assert_names(&m, &["`kv_source`", "layer 2", "consumer"]);
    let m = err(json!({"kv_sharing_map": {"1": 0, "2": 1}}));
    assert_names(&m, &["`kv_sharing_map`", "layer 2", "consumer"]);
}

#[test]
fn source_index_out_of_range_is_refused() {
    let m = err(json!({"kv_source": [0, 0, 2, 7]}));
    assert_names(&m, &["`kv_source`", "layer 3", "out of range"]);
    let m = err(json!({"kv_sharing_map": {"5": 0}}));
    assert_names(&m, &["`kv_sharing_map`", "layer 5", "out of range"]);
}

#[test]
fn share_factor_zero_is_refused() {
    let m = err(json!({"cla_share_factor": 0}));
    assert_names(&m, &["`cla_share_factor`", "at least 1"]);
    for bad in [json!(-2), json!(1.5), json!("2")] {
        let m = err(json!({ "cla_share_factor": bad }));
        assert_names(&m, &["`cla_share_factor`", &bad.to_string()]);
    }
    let e = KvSharing::ShareFactor(0).kv_source(4).unwrap_err().to_string();
    assert_names(&e, &["`cla_share_factor`", "at least 1"]);
}

#[test]
fn kv_source_of_the_wrong_length_is_refused() {
    let m = err(json!({"kv_source": [0, 0, 2]}));
    assert_names(&m, &["`kv_source`", "3 entries", "4 layers"]);
    let m = err(json!({"kv_source": [0, 0, 2, 2, 4]}));
    assert_names(&m, &["`kv_source`", "5 entries", "4 layers"]);
    let m = err(json!({"layer_types": "0_0_2"}));
    assert_names(&m, &["`layer_types`", "3 entries"]);
    let e = KvSharing::Explicit(vec![0, 0]).kv_source(4).unwrap_err().to_string();
    assert_names(&e, &["`kv_source`", "2 entries"]);
}

#[test]
fn non_integer_entries_are_refused_naming_the_layer() {
    for (bad, layer) in [
        (json!([0, "a", 2, 2]), 1),
        (json!([0, 0, 0.5, 2]), 2),
        (json!([0, 0, 2, -1]), 3),
        (json!([0, null, 2, 2]), 1),
    ] {
        let m = err(json!({ "kv_source": bad }));
        assert_names(&m, &["`kv_source`", &format!("layer {layer}"), "not a layer index"]);
    }
    let m = err(json!({"kv_source": "0,0,2,2"}));
    assert_names(&m, &["`kv_source`", "list"]);
    let m = err(json!({"layer_types": "0_0_x_2"}));
    assert_names(&m, &["`layer_types`", "layer 2", "`x`"]);
    let m = err(json!({"kv_sharing_map": {"1": "zero"}}));
    assert_names(&m, &["`kv_sharing_map`", "layer 1", "zero"]);
    let e = KvSharing::parse_list("0,0,two,2").unwrap_err().to_string();
    assert_names(&e, &["`kv_source`", "layer 2", "`two`"]);
}

#[test]
fn two_sharing_keys_at_once_are_refused() {
    let m = err(json!({"cla_share_factor": 2, "kv_source": [0, 0, 2, 2]}));
    assert_names(&m, &["`cla_share_factor`", "`kv_source`", "one sharing scheme"]);
    let m = err(json!({"layer_types": "0_0_2_2", "kv_sharing_map": {"1": 0}}));
    assert_names(&m, &["`layer_types`", "`kv_sharing_map`"]);
}

#[test]
fn kv_sharing_map_with_a_bad_key_is_refused() {
    let m = err(json!({"kv_sharing_map": {"x": 0}}));
    assert_names(&m, &["`kv_sharing_map`", "key `x`"]);
    let m = err(json!({"kv_sharing_map": {"-1": 0}}));
    assert_names(&m, &["`kv_sharing_map`", "key `-1`"]);
    let m = err(json!({"kv_sharing_map": [[1, 0]]}));
    assert_names(&m, &["`kv_sharing_map`", "object"]);
}

#[test]
fn use_cla_false_turns_the_share_factor_off() {
    assert_eq!(
        kv_source(json!({"cla_share_factor": 2, "use_cla": false})),
        [0, 1, 2, 3]
    );
    assert_eq!(kv_source(json!({"cla_share_factor": 2, "use_cla": true})), [0, 0, 2, 2]);
    let m = err(json!({"cla_share_factor": 2, "use_cla": "yes"}));
    assert_names(&m, &["`use_cla`", "boolean"]);
}

#[test]
fn every_accepted_key_form_normalises_to_one_kv_source() {
    assert_eq!(kv_source(json!({})), [0, 1, 2, 3]);
    assert_eq!(kv_source(json!({"cla_share_factor": 1})), [0, 1, 2, 3]);
    assert_eq!(kv_source(json!({"cla_share_factor": 2})), [0, 0, 2, 2]);
    assert_eq!(kv_source(json!({"cla_share_factor": 3})), [0, 0, 0, 3]);
    assert_eq!(kv_source(json!({"cla_share_factor": 9})), [0, 0, 0, 0]);
    assert_eq!(kv_source(json!({"kv_source": [0, 0, 2, 2]})), [0, 0, 2, 2]);
    assert_eq!(kv_source(json!({"kv_source": [0, 1, 1, 0]})), [0, 1, 1, 0]);
    assert_eq!(kv_source(json!({"layer_types": "0_0_2_2"})), [0, 0, 2, 2]);
    assert_eq!(kv_source(json!({"kv_sharing_map": {"1": 0, "3": 2}})), [0, 0, 2, 2]);
    assert_eq!(kv_source(json!({"kv_sharing_map": {}})), [0, 1, 2, 3]);
    // A null key is absent; a list of attention kinds is not a sharing scheme.
    assert_eq!(
        kv_source(json!({"kv_source": null, "cla_share_factor": 2})),
        [0, 0, 2, 2]
    );
    assert_eq!(
        kv_source(json!({"layer_types": vec!["full_attention"; 4], "cla_share_factor": 2})),
        [0, 0, 2, 2]
    );
    let c = ModelConfig::from_json(config(json!({"cla_share_factor": 3}))).unwrap();
    assert_eq!(c.kv_layers(), 2);
    // The converted form writes an explicit list back and nothing else.
    let out = c.to_json_with_kv_source();
    assert_eq!(out["kv_source"], json!([0, 0, 0, 3]));
    assert!(out.get("cla_share_factor").is_none());
    assert_eq!(KvSharing::parse_list("[0, 0, 2, 2]").unwrap(), [0, 0, 2, 2]);
    assert_eq!(KvSharing::parse_list("0,0 2,2").unwrap(), [0, 0, 2, 2]);
    let seven = KvSharing::ShareFactor(3).kv_source(7).unwrap();
    assert_eq!(seven, [0, 0, 0, 3, 3, 3, 6]);
}

#[test]
fn loading_a_checkpoint_with_a_bad_cla_key_names_key_and_layer() {
    let ck = Tiny::new(4, 4, 2, 8, 32, 61)
        .cla("kv_source", json!([0, 2, 2, 2]))
        .write();
    let e = model::load_model_dir(ck.path(), &LoadOptions::default()).expect_err("a forward source");
    assert_names(&e.to_string(), &["`kv_source`", "layer 1", "forward"]);
    // A bad re-sharing at load is refused the same way.
    let ok = Tiny::new(4, 4, 2, 8, 32, 61).write();
    let opts = LoadOptions {
        sharing: Some(KvSharing::Explicit(vec![0, 0, 1, 1])),
        ..Default::default()
    };
    let e = model::load_model_dir(ok.path(), &opts).expect_err("a consumer of a consumer");
    assert_names(&e.to_string(), &["`kv_source`", "layer 2", "consumer"]);
}

#[test]
fn a_missing_producer_k_proj_names_the_tensor_and_layer() {
    let mut ck = Tiny::new(4, 4, 2, 8, 32, 61).cla("cla_share_factor", json!(2)).write();
    assert!(!ck.tensors.contains_key("model.layers.1.self_attn.k_proj.weight"));
    ck.load(); // consumers need no k_proj
    ck.tensors.remove("model.layers.2.self_attn.k_proj.weight");
    ck.save();
    let e = model::load_model_dir(ck.path(), &LoadOptions::default())
        .expect_err("k_proj of producer 2 is missing")
        .to_string();
    assert_names(&e, &["model.layers.2.self_attn.k_proj.weight", "missing", "layer 2"]);
    // Re-sharing a CLA checkpoint so that a weightless consumer becomes a producer fails the same way.
    ck.tensors.insert(
        "model.layers.2.self_attn.k_proj.weight".into(),
        Tensor::zeros((16, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    ck.save();
    let opts = LoadOptions {
        sharing: Some(KvSharing::ShareFactor(1)),
        ..Default::default()
    };
    let e = model::load_model_dir(ck.path(), &opts)
        .expect_err("layer 1 has no k_proj")
        .to_string();
    assert_names(&e, &["model.layers.1.self_attn.k_proj.weight", "layer 1"]);
}

#[test]
fn a_truncated_safetensors_file_is_an_error_naming_the_file() {
    let ck = Tiny::new(2, 4, 2, 8, 32, 61).write();
    let path = ck.weights_path();
    let full = std::fs::read(&path).unwrap();
    for len in [full.len() - 1, full.len() / 2, 100, 9, 3, 0] {
        std::fs::write(&path, &full[..len]).unwrap();
        let e = model::load_model_dir(ck.path(), &LoadOptions::default())
            .err()
            .unwrap_or_else(|| panic!("{len} of {} bytes loaded", full.len()))
            .to_string();
        assert_names(
            &e,
            &[&path.display().to_string(), "truncated", "not a valid safetensors"],
        );
    }
    std::fs::write(&path, &full).unwrap();
    ck.load();
}

/// A 2-layer llama GGUF, Q8_0 linears and F32 norms; block 1 has no attn_k/attn_v (CLA).
fn write_tiny_gguf(path: &Path) {
    let mut rng = crate::common::Rng::new(77);
    let (h, kv, ff, vocab) = (32, 16, 64, 32);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |name: &str, shape: &[usize], q: GgmlDType, offset: f32| {
        let t = rng.tensor(shape, 0.2, offset);
        tensors.push((name.to_string(), QTensor::quantize(&t, q).unwrap()));
    };
    add("token_embd.weight", &[vocab, h], GgmlDType::F32, 0.0);
    add("output_norm.weight", &[h], GgmlDType::F32, 1.0);
    add("output.weight", &[vocab, h], GgmlDType::Q8_0, 0.0);
    for b in 0..2 {
        add(&format!("blk.{b}.attn_norm.weight"), &[h], GgmlDType::F32, 1.0);
        add(&format!("blk.{b}.ffn_norm.weight"), &[h], GgmlDType::F32, 1.0);
        add(&format!("blk.{b}.attn_q.weight"), &[h, h], GgmlDType::Q8_0, 0.0);
        if b == 0 {
            add(&format!("blk.{b}.attn_k.weight"), &[kv, h], GgmlDType::Q8_0, 0.0);
            add(&format!("blk.{b}.attn_v.weight"), &[kv, h], GgmlDType::Q8_0, 0.0);
        }
        add(&format!("blk.{b}.attn_output.weight"), &[h, h], GgmlDType::Q8_0, 0.0);
        add(&format!("blk.{b}.ffn_gate.weight"), &[ff, h], GgmlDType::Q8_0, 0.0);
        add(&format!("blk.{b}.ffn_up.weight"), &[ff, h], GgmlDType::Q8_0, 0.0);
        add(&format!("blk.{b}.ffn_down.weight"), &[h, ff], GgmlDType::Q8_0, 0.0);
    }
    use gguf_file::Value as V;
    let meta: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("llama.block_count", V::U32(2)),
        ("llama.embedding_length", V::U32(h as u32)),
        ("llama.feed_forward_length", V::U32(ff as u32)),
        ("llama.attention.head_count", V::U32(4)),
        ("llama.attention.head_count_kv", V::U32(2)),
        ("llama.context_length", V::U32(64)),
        ("llama.vocab_size", V::U32(vocab as u32)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("llama.rope.freq_base", V::F32(10000.0)),
    ];
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

#[test]
fn a_truncated_gguf_file_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path);
    // The whole file is a valid CLA model: block 1 reads block 0's K/V.
    let w = Weights::gguf(&path, candle_core::DType::F32, &Device::Cpu).unwrap();
    let (cfg, _) = gguf_config::config_from_gguf(w.gguf_content().unwrap()).unwrap();
    assert_eq!(cfg.kv_source, [0, 0]);
    let m = model::Model::load(&cfg, &w, true).unwrap();
    assert_eq!(m.forward_dense(&[1, 2, 3]).unwrap().dims(), &[3, 32]);
    let data_start = w.gguf_content().unwrap().tensor_data_offset as usize;
    drop(w);

    let full = std::fs::read(&path).unwrap();
    assert!(data_start > 64 && data_start < full.len());
    let cuts = [
        0,
        3,
        8,
        24,
        data_start / 3,
        data_start / 2,
        data_start - 1,
        data_start + 10,
        (data_start + full.len()) / 2,
        full.len() - 40,
    ];
    for len in cuts {
        std::fs::write(&path, &full[..len]).unwrap();
        let e = match model::load(ModelSource::Gguf(path.clone()), &LoadOptions::default()) {
            Ok(_) => panic!("{len} of {} bytes loaded", full.len()),
            Err(e) => e.to_string(),
        };
        assert_names(&e, &[&path.display().to_string(), "truncated"]);
        // `capacity --model x.gguf` reads only the header, and must not panic either.
        let e = Weights::gguf(&path, candle_core::DType::F32, &Device::Cpu)
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("truncated")), "{len} bytes");
    }
}
