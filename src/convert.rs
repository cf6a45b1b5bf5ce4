//! `crosskv convert`: a plain (or differently shared) checkpoint → a CLA one. Consumers'
//! k_proj/v_proj are dropped, the config gets an explicit `kv_source`, the tokenizer
//! files are copied; `serve`/`generate` load the result like any HF directory.

use crate::config::KvSharing;
use crate::model::{self, LoadOptions, ModelSource};
use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Every tensor a HF checkpoint of `m` holds, by name (a tied lm_head is not repeated):
/// what `convert` writes, and what training starts from.
pub fn checkpoint_tensors(m: &crate::model::Model) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in m.named_tensors() {
        tensors.insert(name, t.clone());
    }
    let tied = m.config().tie_word_embeddings;
    for (name, lin) in m.named_linears() {
        if name == "lm_head" && tied {
            continue;
        }
        tensors.insert(format!("{name}.weight"), lin.dense_weight()?);
        if let Some(b) = lin.bias() {
            tensors.insert(format!("{name}.bias"), b.clone());
        }
    }
    Ok(tensors)
}

/// Returns (tensors written, layers, kv_layers).
pub fn convert(source: ModelSource, sharing: &KvSharing, out: &Path) -> anyhow::Result<(usize, usize, usize)> {
    let ModelSource::Dir(dir) = &source else {
        bail!(
            "convert reads a Hugging Face safetensors directory; {} is a GGUF file",
            source.path().display()
        );
    };
    let cfg = crate::config::ModelConfig::from_file(&dir.join("config.json"))?;
    // Keep the checkpoint's own precision.
    let dtype = match cfg.torch_dtype.as_deref() {
        Some("float16") => DType::F16,
        Some("bfloat16") => DType::BF16,
        _ => DType::F32,
    };
    let opts = LoadOptions {
        dtype: Some(dtype),
        sharing: Some(sharing.clone()),
        ..Default::default()
    };
    // The model only: a checkpoint without tokenizer files converts too (they are copied when present).
    let m = &model::load_model_dir(dir, &opts)?;
    let tensors = checkpoint_tensors(m)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    candle_core::safetensors::save(&tensors, out.join("model.safetensors")).context("writing model.safetensors")?;
    let config = m.config().to_json_with_kv_source();
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    for f in TOKENIZER_FILES {
        let src = dir.join(f);
        if src.exists() {
            std::fs::copy(&src, out.join(f)).with_context(|| format!("copying {f}"))?;
        }
    }
    Ok((tensors.len(), m.layout().layers(), m.layout().kv_layers()))
}
