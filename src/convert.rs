//! `crosskv convert`: a plain (or differently shared) checkpoint → a CLA one. Consumers'
//! k_proj/v_proj are dropped, the config gets an explicit `kv_source`, the tokenizer
//! files are copied; `serve`/`generate` load the result like any HF directory.

use crate::config::{KvSharing, ModelConfig};
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

/// How a re-shared producer's K/V projections start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KvInit {
    /// The producer keeps its own projections; its consumers' are dropped.
    #[default]
    First,
    /// The mean of the projections of the layers that will read its cache (as GQA
    /// uptraining mean-pools K/V heads): no layer's keys are favoured.
    Mean,
}

/// A checkpoint's tensors re-shared: `tensors` (every layer's K/V as `old_source`
/// says, by HF name) get `new_source`'s producers' projections (chosen by `init`) and
/// lose every other layer's. A layer without its own K/V stands for its old producer's.
pub fn reshare_tensors(
    tensors: &mut HashMap<String, Tensor>,
    old_source: &[usize],
    new_source: &[usize],
    init: KvInit,
) -> anyhow::Result<()> {
    const KV_PARTS: [&str; 5] = [
        "self_attn.k_proj.weight",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.weight",
        "self_attn.v_proj.bias",
        "self_attn.kv_layernorm.weight",
    ];
    let name = |layer: usize, part: &str| format!("model.layers.{layer}.{part}");
    let old = tensors.clone();
    for layer in 0..new_source.len() {
        for part in KV_PARTS {
            tensors.remove(&name(layer, part));
        }
    }
    for (p, _) in new_source.iter().enumerate().filter(|(i, s)| *i == **s) {
        // The distinct old projections that the layers reading p's cache used.
        let mut sources: Vec<usize> = match init {
            KvInit::First => vec![old_source[p]],
            KvInit::Mean => (0..new_source.len())
                .filter(|&l| new_source[l] == p)
                .map(|l| old_source[l])
                .collect(),
        };
        sources.sort_unstable();
        sources.dedup();
        for part in KV_PARTS {
            let parts: Vec<&Tensor> = sources.iter().filter_map(|&s| old.get(&name(s, part))).collect();
            if parts.is_empty() {
                continue;
            }
            if parts.len() != sources.len() {
                bail!("layer {p}: {part} is present in only some of layers {sources:?}");
            }
            let dtype = parts[0].dtype();
            let sum = parts
                .iter()
                .try_fold(None::<Tensor>, |acc, t| -> candle_core::Result<_> {
                    let t = t.to_dtype(DType::F32)?;
                    Ok(Some(match acc {
                        None => t,
                        Some(a) => (a + t)?,
                    }))
                })?
                .expect("at least one part");
            tensors.insert(name(p, part), (sum / parts.len() as f64)?.to_dtype(dtype)?);
        }
    }
    Ok(())
}

/// The checkpoint of `m` (loaded as it is stored) re-shared by `sharing`: its config and tensors.
pub fn reshared_checkpoint(
    m: &crate::model::Model,
    sharing: Option<&KvSharing>,
    init: KvInit,
) -> anyhow::Result<(ModelConfig, HashMap<String, Tensor>)> {
    let mut cfg = m.config().clone();
    let mut tensors = checkpoint_tensors(m)?;
    if let Some(s) = sharing {
        cfg.reshare(s)?;
        reshare_tensors(&mut tensors, m.layout().kv_source(), &cfg.kv_source, init)?;
    }
    Ok((cfg, tensors))
}

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
