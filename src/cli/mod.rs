//! The command line (docs/serving.md, docs/cla-and-kv.md): one file per command family
//! (`serve`, `generate`, `capacity`, `convert`, `bench`, `eval`, `training`) with its
//! flags and its body; here, the command enum and the flags several commands share.

use crate::config::KvSharing;
use crate::device::{parse_device, DtypeArg, KvCacheDtypeArg};
use crate::kv::KvManager;
use crate::model::{self, LoadOptions};
use crate::runner::Runner;
use anyhow::bail;
use candle_core::Device;
use clap::{Parser, Subcommand};

mod bench;
mod capacity;
mod capacity_plot;
mod convert;
mod eval;
mod generate;
mod serve;
mod training;

pub use bench::{bench, BenchArgs};
pub use capacity::{capacity, capacity_report, capacity_table, CapacityArgs};
pub use capacity_plot::{capacity_series, capacity_svg, plot_lengths, CapacityPoint, DtypeSeries};
pub use convert::{convert, ConvertArgs};
pub use eval::{eval, EvalArgs};
pub use generate::{generate, GenerateArgs};
pub use serve::{serve, ServeArgs};
pub use training::{finetune, train, FinetuneArgs, TrainArgs, TrainFlags};

#[derive(Parser, Debug)]
#[command(
    name = "crosskv",
    version,
    about = "LLM inference built around Cross-Layer Attention (shared KV cache across layers)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the OpenAI-compatible HTTP API (and gRPC with --grpc-port).
    Serve(ServeArgs),
    /// Generate text from a prompt, streamed to stdout as it is produced.
    Generate(GenerateArgs),
    /// Print the model's KV layout and capacity with and without sharing, side by side.
    Capacity(CapacityArgs),
    /// Turn a checkpoint into a CLA one (consumers' k_proj/v_proj dropped, config written).
    Convert(ConvertArgs),
    /// Measure prompt and decode speed of a model on this machine.
    Bench(BenchArgs),
    /// Perplexity of a model on text files (next-token, packed windows).
    Eval(EvalArgs),
    /// Train a model from scratch (random init of --config) on text files.
    Train(TrainArgs),
    /// Fine-tune a checkpoint on text files; with --cla-share-factor / --kv-source it is
    /// re-shared (made CLA) first and fine-tuned to recover.
    Finetune(FinetuneArgs),
}

/// `--cla-share-factor F | --kv-source LIST`: re-share a model at load.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SharingArgs {
    /// Re-share K/V at load: layer i uses layer i - i % F (F=1: no sharing).
    #[arg(long, conflicts_with = "kv_source")]
    pub cla_share_factor: Option<usize>,
    /// Re-share K/V at load with an explicit list, e.g. 0,0,2,2 (kv_source[i] = producer of layer i).
    #[arg(long)]
    pub kv_source: Option<String>,
}

impl SharingArgs {
    pub fn sharing(&self) -> anyhow::Result<Option<KvSharing>> {
        Ok(match (&self.cla_share_factor, &self.kv_source) {
            (Some(f), _) => Some(KvSharing::ShareFactor(*f)),
            (None, Some(list)) => Some(KvSharing::Explicit(KvSharing::parse_list(list)?)),
            (None, None) => None,
        })
    }
}

/// Model source and how to load it.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A HF model directory, a .gguf file, or a Hugging Face repo id (default: SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model: Option<String>,
    /// Device: cpu, or cuda[:N] (needs the `cuda` build feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype (default: f32 on CPU; on CUDA the checkpoint's f16, else bf16).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// What the KV cache stores: `auto` (the compute dtype), bf16, f16, f32, or fp8
    /// (e4m3, alias fp8_e4m3: one byte an element, with the checkpoint's per-layer
    /// k_scale/v_scale, else 1.0).
    #[arg(long, value_enum, default_value = "auto")]
    pub kv_cache_dtype: KvCacheDtypeArg,
    #[command(flatten)]
    pub sharing: SharingArgs,
    /// GGUF: dequantize weights to dense f32 at load (exact f32 arithmetic; more memory).
    #[arg(long)]
    pub dequantize: bool,
    /// Tensor parallelism: spread the model over N GPUs (--device cuda:K uses K..K+N-1,
    /// NCCL between them; build with --features nccl), or N threads on the CPU.
    #[arg(long, alias = "tp", default_value_t = 1)]
    pub tensor_parallel_size: usize,
    /// CUDA: run every decode step eagerly, op by op, instead of as a CUDA graph
    /// captured per batch size (vLLM's flag).
    #[arg(long)]
    pub enforce_eager: bool,
    /// Bitwise the same tokens and log-probs for a request whatever else runs beside
    /// it. Always so on the CPU; on CUDA it swaps cuBLAS and the split-KV attention for
    /// kernels that compute every row alike (slower, and no CUDA graphs). One GPU only.
    #[arg(long)]
    pub batch_invariant: bool,
    /// `dummy`: random weights for the config of the `--model` directory (its weight
    /// files need not exist), made on the device, as vLLM's `--load-format dummy`: the
    /// serving path measured with a model's shapes. The tokenizer is the directory's,
    /// else the default model's.
    #[arg(long, value_enum, default_value = "auto")]
    pub load_format: LoadFormat,
}

/// `--load-format`: where the weights come from.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum LoadFormat {
    /// The checkpoint's own weights.
    Auto,
    /// Random weights (seed 0) for the checkpoint's config.
    Dummy,
}

impl ModelArgs {
    pub fn device(&self) -> anyhow::Result<Device> {
        parse_device(&self.device)
    }
    pub fn load(&self) -> anyhow::Result<model::LoadedModel> {
        let source = model::resolve_source(self.model.as_deref())?;
        if self.tensor_parallel_size == 0 {
            bail!("--tensor-parallel-size 0: expected at least 1");
        }
        let opts = LoadOptions {
            dtype: self.dtype.map(DtypeArg::dtype),
            device: self.device()?,
            sharing: self.sharing.sharing()?,
            dequantize: self.dequantize,
            tensor_parallel_size: self.tensor_parallel_size,
        };
        if self.batch_invariant && self.tensor_parallel_size > 1 && !opts.device.is_cpu() {
            // NCCL picks its all-reduce algorithm by message size, so by batch.
            bail!("--batch-invariant works on one GPU: drop --tensor-parallel-size or use one rank");
        }
        let mut loaded = match (self.load_format, source) {
            (LoadFormat::Auto, source) => model::load(source, &opts)?,
            (LoadFormat::Dummy, model::ModelSource::Dir(dir)) => model::load_dummy(&dir, &opts, 0)?,
            (LoadFormat::Dummy, other) => bail!(
                "--load-format dummy needs --model to be a directory with config.json, not {}",
                other.path().display()
            ),
        };
        loaded.model.set_batch_invariant(self.batch_invariant);
        let kv = self.kv_cache_dtype.resolve(loaded.model.dtype());
        let defaulted = loaded.model.set_kv_cache_dtype(kv);
        for peer in &mut loaded.peers {
            peer.set_kv_cache_dtype(kv);
        }
        if !defaulted.is_empty() {
            tracing::warn!(
                "fp8 KV cache: the checkpoint has no k_scale/v_scale for {} of {} KV layers; they use scale 1.0 (e4m3 holds ±448, well past typical K/V magnitudes; see docs/cla-and-kv.md)",
                defaulted.len(),
                loaded.model.layout().kv_layers()
            );
        }
        Ok(loaded)
    }
}

pub(super) fn check_block_size(bs: usize) -> anyhow::Result<()> {
    if bs == 0 || bs > 1024 {
        bail!("--block-size {bs}: expected 1..=1024");
    }
    Ok(())
}

/// A runner and manager with exactly enough blocks for `tokens` tokens of one sequence.
pub(super) fn runner_for(
    loaded: model::LoadedModel,
    tokens: usize,
    block_size: usize,
    cuda_graphs: bool,
) -> anyhow::Result<(Runner, KvManager, model::Tok)> {
    let layout = loaded.model.layout().clone();
    let num_blocks = tokens.div_ceil(block_size) * layout.kv_layers();
    let ranks = std::iter::once(loaded.model).chain(loaded.peers).collect();
    let mut runner = Runner::tensor_parallel(ranks, num_blocks, block_size)?;
    runner.set_cuda_graphs(cuda_graphs);
    Ok((runner, KvManager::new(layout, num_blocks, block_size), loaded.tokenizer))
}
