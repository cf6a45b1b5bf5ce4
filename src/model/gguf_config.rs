//! A `ModelConfig` from GGUF metadata (`general.architecture` = llama, mistral or qwen2).
//! K/V sharing: a `crosskv.kv_source` array if present, else inferred from which
//! blocks carry `attn_k` (a block without one reads the nearest earlier producer).

use crate::config::{ConfigError, ModelConfig};
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::json;

fn get<'a>(ct: &'a Content, key: &str) -> Option<&'a Value> {
    ct.metadata.get(key)
}

fn num(ct: &Content, key: &str) -> Result<u64, ConfigError> {
    let v = get(ct, key).ok_or_else(|| ConfigError::invalid(key, None, "missing from the GGUF metadata"))?;
    v.to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .or_else(|_| v.to_i32().map(|x| x as u64))
        .or_else(|_| v.to_i64().map(|x| x as u64))
        .map_err(|_| ConfigError::invalid(key, None, format!("{v:?} is not an integer")))
}

fn float(ct: &Content, key: &str) -> Option<f64> {
    get(ct, key).and_then(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok())
}

/// The config, and whether RoPE is interleaved (llama.cpp permutes llama Q/K).
pub fn config_from_gguf(ct: &Content) -> Result<(ModelConfig, bool), ConfigError> {
    let arch = get(ct, "general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| ConfigError::invalid("general.architecture", None, "missing from the GGUF metadata"))?;
    if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
        return Err(ConfigError::invalid(
            "general.architecture",
            None,
            format!("`{arch}` is not supported (llama, mistral, qwen2)"),
        ));
    }
    let k = |s: &str| format!("{arch}.{s}");
    let layers = num(ct, &k("block_count"))? as usize;
    let hidden = num(ct, &k("embedding_length"))?;
    let heads = num(ct, &k("attention.head_count"))?;
    let kv_heads = num(ct, &k("attention.head_count_kv")).unwrap_or(heads);
    let head_dim = num(ct, &k("attention.key_length")).unwrap_or(hidden / heads.max(1));
    let vocab = match num(ct, &k("vocab_size")) {
        Ok(v) => v,
        Err(_) => get(ct, "tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.len() as u64)
            .ok_or_else(|| ConfigError::invalid("vocab_size", None, "missing from the GGUF metadata"))?,
    };
    let kv_source: Vec<usize> = match get(ct, "crosskv.kv_source").and_then(|v| v.to_vec().ok()) {
        Some(list) => list
            .iter()
            .map(|v| v.to_u32().map(|x| x as usize).unwrap_or(usize::MAX))
            .collect(),
        None => {
            let mut last = 0;
            (0..layers)
                .map(|i| {
                    if ct.tensor_infos.contains_key(&format!("blk.{i}.attn_k.weight")) {
                        last = i;
                    }
                    last
                })
                .collect()
        }
    };
    let mut raw = json!({
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": num(ct, &k("feed_forward_length"))?,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(ct, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        "rope_theta": float(ct, &k("rope.freq_base")).unwrap_or(10000.0),
        "max_position_embeddings": num(ct, &k("context_length")).unwrap_or(2048),
        "tie_word_embeddings": !ct.tensor_infos.contains_key("output.weight"),
        "attention_bias": ct.tensor_infos.contains_key("blk.0.attn_q.bias"),
        "kv_source": kv_source,
    });
    if let Ok(eos) = num(ct, "tokenizer.ggml.eos_token_id") {
        raw["eos_token_id"] = json!(eos);
    }
    if let Ok(bos) = num(ct, "tokenizer.ggml.bos_token_id") {
        raw["bos_token_id"] = json!(bos);
    }
    let cfg = ModelConfig::from_json(raw)?;
    Ok((cfg, arch != "qwen2"))
}
