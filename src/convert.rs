//! `crosskv convert`: a plain (or differently shared) checkpoint → a CLA one. Consumers'
//! k_proj/v_proj are dropped, the config gets an explicit `kv_source`, the tokenizer
//! files are copied; `serve`/`generate` load the result like any HF directory.

use crate::config::{KvSharing, ModelConfig};
use crate::model::reshare::{reshared_checkpoint, KvInit, TOKENIZER_FILES};
use crate::model::{self, LoadOptions, ModelSource};
use anyhow::Context;
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Returns (tensors written, layers, kv_layers).
///
/// A safetensors directory needs `sharing` (re-sharing is what converting it means). A
/// GGUF file is exported to a HF directory, re-shared when `sharing` is given:
/// quantized tensors dequantized to f32, Q/K un-permuted back to the Hugging Face
/// rotate-half RoPE layout, and the tokenizer, chat template and special tokens its
/// metadata carries written as `tokenizer.json` / `tokenizer_config.json`. That is how
/// a GGUF-only model (the embedded default) becomes something `finetune` can train.
pub fn convert(
    source: ModelSource,
    sharing: Option<&KvSharing>,
    init: KvInit,
    out: &Path,
) -> anyhow::Result<(usize, usize, usize)> {
    match &source {
        ModelSource::Dir(dir) => {
            let sharing = sharing.context("convert needs --cla-share-factor F or --kv-source LIST")?;
            convert_dir(dir, sharing, init, out)
        }
        ModelSource::Gguf(_) => export_gguf(source, sharing, init, out),
    }
}

fn convert_dir(dir: &Path, sharing: &KvSharing, init: KvInit, out: &Path) -> anyhow::Result<(usize, usize, usize)> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    // Keep the checkpoint's own precision.
    let dtype = match cfg.torch_dtype.as_deref() {
        Some("float16") => DType::F16,
        Some("bfloat16") => DType::BF16,
        _ => DType::F32,
    };
    let opts = LoadOptions {
        dtype: Some(dtype),
        ..Default::default()
    };
    // The model only: a checkpoint without tokenizer files converts too (they are copied when present).
    let m = &model::load_model_dir(dir, &opts)?;
    let (cfg, tensors) = reshared_checkpoint(m, Some(sharing), init)?;
    write_checkpoint(&cfg, &tensors, out)?;
    for f in TOKENIZER_FILES {
        let src = dir.join(f);
        if src.exists() {
            std::fs::copy(&src, out.join(f)).with_context(|| format!("copying {f}"))?;
        }
    }
    Ok((tensors.len(), cfg.num_hidden_layers, cfg.kv_layers()))
}

fn export_gguf(
    source: ModelSource,
    sharing: Option<&KvSharing>,
    init: KvInit,
    out: &Path,
) -> anyhow::Result<(usize, usize, usize)> {
    let opts = LoadOptions {
        dtype: Some(DType::F32),
        dequantize: true,
        ..Default::default()
    };
    let loaded = model::load(source, &opts)?;
    let m = &loaded.model;
    let (cfg, mut tensors) = reshared_checkpoint(m, sharing, init)?;
    if m.rope_interleaved() {
        for (name, t) in tensors.iter_mut() {
            let heads = if name.contains(".self_attn.q_proj.") {
                cfg.num_attention_heads
            } else if name.contains(".self_attn.k_proj.") {
                cfg.num_key_value_heads
            } else {
                continue;
            };
            *t = unpermute_rope_rows(t, heads)?;
        }
    }
    write_checkpoint(&cfg, &tensors, out)?;
    let tok = &loaded.tokenizer;
    tok.inner()
        .save(out.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("writing tokenizer.json: {e}"))?;
    let mut tc = serde_json::Map::new();
    for (key, value) in [
        ("bos_token", &tok.bos_token),
        ("eos_token", &tok.eos_token),
        ("chat_template", &tok.chat_template),
    ] {
        if let Some(v) = value {
            tc.insert(key.into(), serde_json::Value::String(v.clone()));
        }
    }
    std::fs::write(out.join("tokenizer_config.json"), serde_json::to_string_pretty(&tc)?)
        .context("writing tokenizer_config.json")?;
    let mut eos: Vec<u32> = tok.eos_ids.iter().copied().collect();
    eos.sort_unstable();
    std::fs::write(
        out.join("generation_config.json"),
        serde_json::to_string_pretty(&serde_json::json!({ "eos_token_id": eos }))?,
    )
    .context("writing generation_config.json")?;
    Ok((tensors.len(), cfg.num_hidden_layers, cfg.kv_layers()))
}

/// llama.cpp's converter reorders each head's Q/K rows from HF's rotate-half pairs
/// (i, i + d/2) to adjacent pairs (2i, 2i + 1); this is its inverse, for a weight
/// `[heads·d, in]` or a bias `[heads·d]`.
pub fn unpermute_rope_rows(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let half = rows / heads / 2;
    let rest: usize = dims[1..].iter().product();
    t.reshape((heads, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// `model.safetensors` and `config.json` (explicit `kv_source`) into `out`.
fn write_checkpoint(cfg: &ModelConfig, tensors: &HashMap<String, Tensor>, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    candle_core::safetensors::save(tensors, out.join("model.safetensors")).context("writing model.safetensors")?;
    let config = cfg.to_json_with_kv_source();
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    Ok(())
}
