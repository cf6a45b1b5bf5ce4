//! A loaded model as a HF checkpoint's tensors, and re-sharing them: a plain (or
//! differently shared) checkpoint becomes a CLA one, its consumers' K/V projections
//! dropped and each producer's chosen by [`KvInit`]. `convert` writes the result;
//! `train`'s `finetune` starts from it.

use super::Model;
use crate::config::{ConfigError, KvSharing, ModelConfig};
use candle_core::{DType, Tensor};
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum ReshareError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// A producer's K/V part exists in some of the layers it is made from, not all.
    #[error("layer {layer}: {part} is present in only some of layers {sources:?}")]
    PartialKv {
        layer: usize,
        part: &'static str,
        sources: Vec<usize>,
    },
}

/// The tokenizer files a HF checkpoint directory may hold beside its weights (copied
/// along when a checkpoint is rewritten).
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Every tensor a HF checkpoint of `m` holds, by name (a tied lm_head is not repeated):
/// what `convert` writes, and what training starts from.
pub fn checkpoint_tensors(m: &Model) -> Result<HashMap<String, Tensor>, ReshareError> {
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
) -> Result<(), ReshareError> {
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
                return Err(ReshareError::PartialKv {
                    layer: p,
                    part,
                    sources,
                });
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
    m: &Model,
    sharing: Option<&KvSharing>,
    init: KvInit,
) -> Result<(ModelConfig, HashMap<String, Tensor>), ReshareError> {
    let mut cfg = m.config().clone();
    let mut tensors = checkpoint_tensors(m)?;
    if let Some(s) = sharing {
        cfg.reshare(s)?;
        reshare_tensors(&mut tensors, m.layout().kv_source(), &cfg.kv_source, init)?;
    }
    Ok((cfg, tensors))
}
