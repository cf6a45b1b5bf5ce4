//! The llama-family model with CLA, and the loaders: a HF safetensors directory,
//! a GGUF file, or a Hugging Face repo id (through hf-hub and its cache).

pub mod gguf_config;
pub mod llama;
pub mod reshare;
pub mod rope;
pub mod source;
pub mod tokenizer;
pub mod weights;

pub use llama::{Model, StepInput};
pub use source::{default_model, resolve_source, ModelSource};
pub use tokenizer::{ChatMessage, StreamDecoder, Tok};

use crate::config::{ConfigError, KvSharing, ModelConfig};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error("{0}")]
    Source(String),
}

/// How to load: dtype, device, and an optional re-sharing of K/V at load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: Option<DType>,
    pub device: Device,
    pub sharing: Option<KvSharing>,
    /// GGUF: dequantize quantized linears to dense weights at load.
    pub dequantize: bool,
    /// Tensor parallelism (`crate::tp`): ranks over `device`, `device + 1`, … (GPUs),
    /// or threads of this process on the CPU. 1: off.
    pub tensor_parallel_size: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: None,
            device: Device::Cpu,
            sharing: None,
            dequantize: false,
            tensor_parallel_size: 1,
        }
    }
}

pub struct LoadedModel {
    /// Rank 0 (the whole model without tensor parallelism).
    pub model: Model,
    /// Tensor parallelism: ranks 1.., their all-reduce connected to rank 0's.
    pub peers: Vec<Model>,
    pub tokenizer: Tok,
    pub source: ModelSource,
}

fn safetensor_files(dir: &std::path::Path) -> Result<Vec<PathBuf>, LoadError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text =
            std::fs::read_to_string(&index).map_err(|e| LoadError::Source(format!("{}: {e}", index.display())))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::Source(format!("{}: not valid JSON: {e}", index.display())))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| LoadError::Source(format!("{}: no `weight_map`", index.display())))?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| LoadError::Source(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(LoadError::Source(format!("{}: no *.safetensors files", dir.display())));
    }
    Ok(files)
}

fn dtype_from_torch(s: Option<&str>) -> DType {
    match s {
        Some("float16") => DType::F16,
        Some("bfloat16") => DType::BF16,
        _ => DType::F32,
    }
}

/// Loads only the model (config + weights) of a HF safetensors directory: no tokenizer
/// needed, which is what tests of tiny random checkpoints want.
pub fn load_model_dir(dir: &std::path::Path, opts: &LoadOptions) -> Result<Model, LoadError> {
    let mut cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    if let Some(s) = &opts.sharing {
        cfg.reshare(s)?;
    }
    let dtype = opts.dtype.unwrap_or(DType::F32);
    let w = weights::Weights::safetensors(&safetensor_files(dir)?, dtype, &opts.device)?;
    Ok(Model::load(&cfg, &w, false)?)
}

/// [`load_model_dir`] for tensor parallelism: every rank of
/// `opts.tensor_parallel_size` (rank order), their all-reduce connected.
pub fn load_model_dir_ranks(dir: &std::path::Path, opts: &LoadOptions) -> Result<Vec<Model>, LoadError> {
    let mut cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    if let Some(s) = &opts.sharing {
        cfg.reshare(s)?;
    }
    load_ranks(&cfg, &safetensor_files(dir)?, opts.dtype.unwrap_or(DType::F32), opts)
}

/// Each rank's share of a safetensors checkpoint on its device, connected.
fn load_ranks(cfg: &ModelConfig, files: &[PathBuf], dtype: DType, opts: &LoadOptions) -> Result<Vec<Model>, LoadError> {
    let world = opts.tensor_parallel_size.max(1);
    let mut ranks = Vec::with_capacity(world);
    for rank in 0..world {
        let device = crate::tp::rank_device(&opts.device, rank).map_err(tp_err)?;
        let w = weights::Weights::safetensors(files, dtype, &device)?;
        ranks.push(Model::load_shard(cfg, &w, false, crate::tp::Shard { rank, world })?);
    }
    connect_ranks(&mut ranks).map_err(tp_err)?;
    Ok(ranks)
}

/// Connects the all-reduce of a tensor-parallel model's ranks (rank order; see
/// `tp::connect`). One rank needs none.
pub fn connect_ranks(ranks: &mut [Model]) -> candle_core::Result<()> {
    let devices: Vec<Device> = ranks.iter().map(|m| m.device().clone()).collect();
    for (m, comm) in ranks.iter_mut().zip(crate::tp::connect(&devices)?) {
        m.set_all_reduce(comm);
    }
    Ok(())
}

fn tp_err(e: candle_core::Error) -> LoadError {
    LoadError::Source(format!("tensor parallelism: {e}"))
}

/// The dtype a checkpoint directory loads in: `opts.dtype`, else f32 on the CPU (candle's
/// CPU f16/bf16 matmuls are slower than f32), else the checkpoint's f16, else bf16 (f32
/// checkpoints too).
fn dir_dtype(cfg: &ModelConfig, opts: &LoadOptions) -> DType {
    opts.dtype.unwrap_or(if opts.device.is_cpu() {
        DType::F32
    } else {
        match dtype_from_torch(cfg.torch_dtype.as_deref()) {
            DType::F16 => DType::F16,
            _ => DType::BF16,
        }
    })
}

/// The model of `dir/config.json` with random weights made on the device (as vLLM's
/// `--load-format dummy`): the serving path measured with a model's shapes without its
/// checkpoint. The tokenizer is the directory's (`tokenizer.json`), else the default
/// model's; ids it does not know decode to nothing. One rank.
pub fn load_dummy(dir: &Path, opts: &LoadOptions, seed: u64) -> Result<LoadedModel, LoadError> {
    if opts.tensor_parallel_size > 1 {
        return Err(LoadError::Source(
            "--load-format dummy makes one rank: drop --tensor-parallel-size".into(),
        ));
    }
    let mut cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    if let Some(s) = &opts.sharing {
        cfg.reshare(s)?;
    }
    let tokenizer = if dir.join("tokenizer.json").is_file() {
        Tok::from_dir(dir, &cfg.eos_token_ids)?
    } else {
        match default_model()? {
            ModelSource::Dir(d) => Tok::from_dir(&d, &cfg.eos_token_ids)?,
            ModelSource::Gguf(p) => {
                let mut f = std::fs::File::open(&p).map_err(|e| LoadError::Source(format!("{}: {e}", p.display())))?;
                let content = candle_core::quantized::gguf_file::Content::read(&mut f)
                    .map_err(|e| LoadError::Source(format!("{}: {e}", p.display())))?;
                Tok::from_gguf(&content)?
            }
        }
    };
    let w = weights::Weights::random(&cfg, dir_dtype(&cfg, opts), &opts.device, seed)
        .map_err(|e| LoadError::Source(format!("random weights: {e}")))?;
    Ok(LoadedModel {
        model: Model::load(&cfg, &w, false)?,
        peers: Vec::new(),
        tokenizer,
        source: ModelSource::Dir(dir.to_path_buf()),
    })
}

/// Loads config, weights and tokenizer from a resolved source.
pub fn load(source: ModelSource, opts: &LoadOptions) -> Result<LoadedModel, LoadError> {
    let (model, tokenizer) = match &source {
        ModelSource::Dir(dir) => {
            let mut cfg = ModelConfig::from_file(&dir.join("config.json"))?;
            if let Some(s) = &opts.sharing {
                cfg.reshare(s)?;
            }
            let dtype = dir_dtype(&cfg, opts);
            let tok = Tok::from_dir(dir, &cfg.eos_token_ids)?;
            let mut ranks = load_ranks(&cfg, &safetensor_files(dir)?, dtype, opts)?;
            let model = ranks.remove(0);
            return Ok(LoadedModel {
                model,
                peers: ranks,
                tokenizer: tok,
                source,
            });
        }
        ModelSource::Gguf(path) => {
            if opts.tensor_parallel_size > 1 {
                return Err(LoadError::Source(format!(
                    "{}: tensor parallelism needs a safetensors checkpoint directory, not GGUF",
                    path.display()
                )));
            }
            let dtype = opts.dtype.unwrap_or(DType::F32);
            let mut w = weights::Weights::gguf(path, dtype, &opts.device)?;
            if opts.dequantize {
                w = w.dequantized();
            }
            let content = w.gguf_content().expect("a GGUF source");
            let (mut cfg, interleaved) = gguf_config::config_from_gguf(content)?;
            if let Some(s) = &opts.sharing {
                cfg.reshare(s)?;
            }
            let tok = Tok::from_gguf(content)?;
            (Model::load(&cfg, &w, interleaved)?, tok)
        }
    };
    Ok(LoadedModel {
        model,
        peers: Vec::new(),
        tokenizer,
        source,
    })
}
