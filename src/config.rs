//! Model configuration: a Hugging Face `config.json` of the llama, mistral or qwen2
//! family, with every CLA key form normalised to one `kv_source` list and checked once
//! (docs/cla-and-kv.md). After `ModelConfig::from_json` succeeds, the sharing scheme is valid.

use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config key `{key}`{}: {reason}", layer.map(|l| format!(", layer {l}")).unwrap_or_default())]
    Invalid {
        key: String,
        layer: Option<usize>,
        reason: String,
    },
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
}

impl ConfigError {
    pub fn invalid(key: &str, layer: Option<usize>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            layer,
            reason: reason.into(),
        }
    }
}

/// llama3-style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`), or
/// plain linear scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    Linear {
        factor: f64,
    },
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (qwen2, or llama's `attention_bias`).
    pub attention_bias: bool,
    /// o_proj carries a bias (llama's `attention_bias`; qwen2 has none there).
    pub o_proj_bias: bool,
    /// gate/up/down carry a bias (llama's `mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// `kv_source[i]` is the layer whose K/V layer `i` uses; `kv_source[i] == i` for producers.
    pub kv_source: Vec<usize>,
    /// `torch_dtype` as written in the file (the checkpoint's storage dtype).
    pub torch_dtype: Option<String>,
    /// The file's JSON, kept so `convert` can write it back with only the CLA keys changed.
    pub raw: Value,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    bos_token_id: Option<Value>,
    #[serde(default)]
    eos_token_id: Option<Value>,
    #[serde(default)]
    torch_dtype: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}

/// The ways a model's K/V sharing can be overridden at load (`--cla-share-factor`,
/// `--kv-source`), for comparisons and for `convert`.
#[derive(Debug, Clone, PartialEq)]
pub enum KvSharing {
    ShareFactor(usize),
    Explicit(Vec<usize>),
}

impl KvSharing {
    /// Parses `--kv-source 0,0,2,2` (commas or spaces, optional brackets).
    pub fn parse_list(s: &str) -> Result<Vec<usize>, ConfigError> {
        s.trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|p| !p.is_empty())
            .enumerate()
            .map(|(i, p)| {
                p.parse::<usize>()
                    .map_err(|_| ConfigError::invalid("kv_source", Some(i), format!("`{p}` is not a layer index")))
            })
            .collect()
    }

    pub fn kv_source(&self, layers: usize) -> Result<Vec<usize>, ConfigError> {
        let src = match self {
            KvSharing::ShareFactor(f) => share_factor_source(*f, layers, "cla_share_factor")?,
            KvSharing::Explicit(list) => list.clone(),
        };
        validate_kv_source(&src, layers, "kv_source")?;
        Ok(src)
    }
}

fn share_factor_source(f: usize, layers: usize, key: &str) -> Result<Vec<usize>, ConfigError> {
    if f == 0 {
        return Err(ConfigError::invalid(key, None, "the share factor must be at least 1"));
    }
    Ok((0..layers).map(|i| i - i % f).collect())
}

/// Checks a normalised list: right length, every consumer points at an earlier producer.
pub fn validate_kv_source(src: &[usize], layers: usize, key: &str) -> Result<(), ConfigError> {
    if src.len() != layers {
        return Err(ConfigError::invalid(
            key,
            None,
            format!("has {} entries but the model has {layers} layers", src.len()),
        ));
    }
    for (i, &s) in src.iter().enumerate() {
        if s >= layers {
            return Err(ConfigError::invalid(
                key,
                Some(i),
                format!("source {s} is out of range (the model has {layers} layers)"),
            ));
        }
        if s > i {
            return Err(ConfigError::invalid(
                key,
                Some(i),
                format!("source {s} points forward; a consumer must read an earlier producer"),
            ));
        }
        if s != i && src[s] != s {
            return Err(ConfigError::invalid(
                key,
                Some(i),
                format!(
                    "source {s} is itself a consumer (of layer {}); it must be a producer",
                    src[s]
                ),
            ));
        }
    }
    Ok(())
}

fn as_index(v: &Value, key: &str, layer: Option<usize>) -> Result<usize, ConfigError> {
    v.as_u64()
        .map(|x| x as usize)
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
        .ok_or_else(|| ConfigError::invalid(key, layer, format!("`{v}` is not a layer index")))
}

/// Normalises every accepted CLA key form (docs/cla-and-kv.md) to one `kv_source` list.
pub fn kv_source_from_json(raw: &Value, layers: usize) -> Result<Vec<usize>, ConfigError> {
    let present: Vec<&str> = ["kv_source", "cla_share_factor", "layer_types", "kv_sharing_map"]
        .into_iter()
        .filter(|k| raw.get(*k).is_some_and(|v| !v.is_null()))
        .collect();
    // `layer_types` is also a list of attention kinds in newer transformers configs
    // ("full_attention", ...): only the LCKV string form is a sharing scheme.
    let present: Vec<&str> = present
        .into_iter()
        .filter(|k| *k != "layer_types" || raw[*k].is_string())
        .collect();
    if present.len() > 1 {
        return Err(ConfigError::invalid(
            present[1],
            None,
            format!("conflicts with `{}`: give one sharing scheme", present[0]),
        ));
    }
    let src = match present.first().copied() {
        None => (0..layers).collect(),
        Some("cla_share_factor") => {
            let v = &raw["cla_share_factor"];
            let f = v.as_u64().ok_or_else(|| {
                ConfigError::invalid("cla_share_factor", None, format!("`{v}` is not a positive integer"))
            })? as usize;
            let use_cla = match raw.get("use_cla") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(ConfigError::invalid(
                        "use_cla",
                        None,
                        format!("`{other}` is not a boolean"),
                    ))
                }
            };
            let src = share_factor_source(f, layers, "cla_share_factor")?;
            if use_cla {
                src
            } else {
                (0..layers).collect()
            }
        }
        Some("kv_source") => {
            let arr = raw["kv_source"]
                .as_array()
                .ok_or_else(|| ConfigError::invalid("kv_source", None, "must be a list of layer indices"))?;
            arr.iter()
                .enumerate()
                .map(|(i, v)| as_index(v, "kv_source", Some(i)))
                .collect::<Result<_, _>>()?
        }
        Some("layer_types") => {
            let s = raw["layer_types"].as_str().unwrap_or_default();
            s.split('_')
                .enumerate()
                .map(|(i, p)| {
                    p.trim().parse::<usize>().map_err(|_| {
                        ConfigError::invalid("layer_types", Some(i), format!("`{p}` is not a layer index"))
                    })
                })
                .collect::<Result<_, _>>()?
        }
        Some("kv_sharing_map") => {
            let map = raw["kv_sharing_map"].as_object().ok_or_else(|| {
                ConfigError::invalid("kv_sharing_map", None, "must be an object {consumer: producer}")
            })?;
            let mut src: Vec<usize> = (0..layers).collect();
            for (k, v) in map {
                let consumer: usize = k.trim().parse().map_err(|_| {
                    ConfigError::invalid("kv_sharing_map", None, format!("key `{k}` is not a layer index"))
                })?;
                if consumer >= layers {
                    return Err(ConfigError::invalid(
                        "kv_sharing_map",
                        Some(consumer),
                        format!("consumer {consumer} is out of range (the model has {layers} layers)"),
                    ));
                }
                src[consumer] = as_index(v, "kv_sharing_map", Some(consumer))?;
            }
            src
        }
        Some(_) => unreachable!("only the keys listed above are collected"),
    };
    validate_kv_source(&src, layers, present.first().copied().unwrap_or("kv_source"))?;
    Ok(src)
}

fn token_ids(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => vec![],
    }
}

/// transformers 5 writes RoPE settings as one `rope_parameters` object (`rope_theta`,
/// `rope_type` and the scaling keys) in place of 4.x's `rope_theta` + `rope_scaling`.
fn rope_parameters(raw: &Value) -> Option<&Value> {
    raw.get("rope_parameters").filter(|v| v.is_object())
}

fn parse_rope_theta(rc: &RawConfig, raw: &Value) -> f64 {
    rc.rope_theta
        .or_else(|| {
            rope_parameters(raw)
                .and_then(|p| p.get("rope_theta"))
                .and_then(|v| v.as_f64())
        })
        .unwrap_or_else(default_theta)
}

fn parse_rope_scaling(raw: &Value) -> Result<Option<RopeScaling>, ConfigError> {
    let (key, rs) = match raw.get("rope_scaling") {
        Some(v) if !v.is_null() => ("rope_scaling", v),
        _ => match rope_parameters(raw) {
            Some(v) => ("rope_parameters", v),
            None => return Ok(None),
        },
    };
    let kind = rs
        .get("rope_type")
        .or_else(|| rs.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64, ConfigError> {
        rs.get(k)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| ConfigError::invalid(key, None, format!("`{k}` is missing or not a number")))
    };
    match kind {
        "default" => Ok(None),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        })),
        "linear" => Ok(Some(RopeScaling::Linear { factor: num("factor")? })),
        other => Err(ConfigError::invalid(
            key,
            None,
            format!("rope_type `{other}` is not supported (llama3, linear)"),
        )),
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: format!("not valid JSON: {e}"),
        })?;
        Self::from_json(raw)
    }

    pub fn from_json(raw: Value) -> Result<Self, ConfigError> {
        let rc: RawConfig = serde_json::from_value(raw.clone())
            .map_err(|e| ConfigError::invalid("config.json", None, e.to_string()))?;
        let model_type = rc.model_type.clone().unwrap_or_else(|| "llama".into());
        if !matches!(
            model_type.as_str(),
            "llama" | "mistral" | "qwen2" | "hunyuan" | "crosskv"
        ) {
            return Err(ConfigError::invalid(
                "model_type",
                None,
                format!("`{model_type}` is not supported (llama, mistral, qwen2, hunyuan, crosskv)"),
            ));
        }
        let pos = |k: &str, v: usize| {
            if v == 0 {
                Err(ConfigError::invalid(k, None, "must be at least 1"))
            } else {
                Ok(v)
            }
        };
        let layers = pos("num_hidden_layers", rc.num_hidden_layers)?;
        let heads = pos("num_attention_heads", rc.num_attention_heads)?;
        let kv_heads = pos("num_key_value_heads", rc.num_key_value_heads.unwrap_or(heads))?;
        if heads % kv_heads != 0 {
            return Err(ConfigError::invalid(
                "num_key_value_heads",
                None,
                format!("{kv_heads} does not divide num_attention_heads {heads}"),
            ));
        }
        let head_dim = match rc.head_dim {
            Some(d) => pos("head_dim", d)?,
            None => {
                if !rc.hidden_size.is_multiple_of(heads) {
                    return Err(ConfigError::invalid(
                        "head_dim",
                        None,
                        "missing, and hidden_size is not a multiple of num_attention_heads",
                    ));
                }
                rc.hidden_size / heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(ConfigError::invalid("head_dim", None, "must be even for RoPE"));
        }
        let kv_source = kv_source_from_json(&raw, layers)?;
        Ok(ModelConfig {
            attention_bias: rc.attention_bias.unwrap_or(model_type == "qwen2"),
            o_proj_bias: model_type != "qwen2" && rc.attention_bias.unwrap_or(false),
            mlp_bias: rc.mlp_bias,
            model_type,
            vocab_size: pos("vocab_size", rc.vocab_size)?,
            hidden_size: pos("hidden_size", rc.hidden_size)?,
            intermediate_size: pos("intermediate_size", rc.intermediate_size)?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: rc.rms_norm_eps,
            rope_theta: parse_rope_theta(&rc, &raw),
            rope_scaling: parse_rope_scaling(&raw)?,
            max_position_embeddings: rc.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: rc.tie_word_embeddings,
            bos_token_id: token_ids(&rc.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&rc.eos_token_id),
            kv_source,
            torch_dtype: rc.torch_dtype,
            raw,
        })
    }

    /// Re-shares the model (`--cla-share-factor` / `--kv-source` at load).
    pub fn reshare(&mut self, sharing: &KvSharing) -> Result<(), ConfigError> {
        self.kv_source = sharing.kv_source(self.num_hidden_layers)?;
        Ok(())
    }

    pub fn kv_layers(&self) -> usize {
        self.kv_source.iter().enumerate().filter(|(i, s)| *i == **s).count()
    }

    /// The config as JSON with the sharing written as an explicit `kv_source` list
    /// (other CLA key forms removed), for `convert`.
    pub fn to_json_with_kv_source(&self) -> Value {
        let mut raw = self.raw.clone();
        if let Some(obj) = raw.as_object_mut() {
            for k in ["cla_share_factor", "use_cla", "kv_sharing_map"] {
                obj.remove(k);
            }
            if obj.get("layer_types").is_some_and(|v| v.is_string()) {
                obj.remove("layer_types");
            }
            obj.insert("kv_source".into(), serde_json::json!(self.kv_source));
            obj.insert("head_dim".into(), serde_json::json!(self.head_dim));
        }
        raw
    }
}
