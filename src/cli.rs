//! The command line (docs/serving.md, docs/cla-and-kv.md): flag definitions and the commands that need no server.

use crate::config::{KvSharing, ModelConfig};
use crate::device::{parse_device, DtypeArg};
use crate::kv::{CapacityReport, KvLayout, KvManager};
use crate::model::{self, ChatMessage, LoadOptions, ModelSource};
use crate::runner::{self, GenerateOptions, Runner, SamplingParams};
use crate::units::{format_bytes, parse_size};
use anyhow::{bail, Context};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;

mod training;
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
#[derive(Args, Debug, Clone, Default)]
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
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A HF model directory, a .gguf file, or a Hugging Face repo id (default: SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model: Option<String>,
    /// Device: cpu, or cuda[:N] (needs the `cuda` build feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute and KV dtype (default: f32 on CPU; on CUDA the checkpoint's f16, else bf16).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
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
        Ok(model::load(source, &opts)?)
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = no top-k cut.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Print prompt/decode speed to stderr at the end.
    #[arg(long)]
    pub stats: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Also serve the gRPC API on this port (off when absent).
    #[arg(long)]
    pub grpc_port: Option<u16>,
    /// KV cache budget, e.g. 4GiB (CPU default: 1GiB).
    #[arg(long, value_parser = parse_size, conflicts_with_all = ["kv_cache_tokens", "gpu_memory_utilization"])]
    pub kv_cache_memory: Option<u64>,
    /// KV cache budget as enough blocks for N tokens in every KV slot.
    #[arg(long, conflicts_with = "gpu_memory_utilization")]
    pub kv_cache_tokens: Option<usize>,
    /// GPU only: the fraction of the device's total memory this process may use; the KV
    /// cache gets it less the weights and a profiled forward's peak (GPU default 0.9).
    #[arg(long)]
    pub gpu_memory_utilization: Option<f64>,
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Longest prompt + completion (default: the model's max_position_embeddings).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Requests admitted (running + waiting) before new ones get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queued_requests: usize,
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Require `Authorization: Bearer KEY` (not on /health and /metrics).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The model name clients use (default: the --model value, else the default model's repo id).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Largest accepted request body, e.g. 32MiB.
    #[arg(long, default_value = "32MiB", value_parser = parse_size)]
    pub max_request_body: u64,
    /// Seconds a request may take before its response starts (a stream then runs on).
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Longest prompt text accepted (a chat request: its messages together), e.g. 1MiB;
    /// longer is refused with 400 before tokenizing (default: max-model-len × 64 bytes).
    #[arg(long, value_parser = parse_size)]
    pub max_prompt_bytes: Option<u64>,
    /// Open HTTP connections at once; one more is answered 503 and closed.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a request's headers may take to arrive, from their first byte.
    #[arg(long, default_value_t = 10)]
    pub header_read_timeout: u64,
    /// Seconds an HTTP connection may sit idle (no request in flight) before it is closed.
    #[arg(long, default_value_t = 60)]
    pub keep_alive_timeout: u64,
    /// Seconds in-flight requests get to finish after SIGTERM / Ctrl-C before they are aborted.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
}

#[derive(Args, Debug)]
pub struct CapacityArgs {
    /// A HF model directory, a .gguf file, or a Hugging Face repo id.
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    pub model: Option<String>,
    /// A config.json (no weights needed).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// KV cache budget, e.g. 4GiB.
    #[arg(long, default_value = "4GiB", value_parser = parse_size)]
    pub kv_cache_memory: u64,
    /// Per GPU of N tensor-parallel ranks: each holds its share of the KV heads (an MQA
    /// head is replicated), so the same budget per GPU holds more tokens.
    #[arg(long, alias = "tp", default_value_t = 1)]
    pub tensor_parallel_size: usize,
    /// Sequence length for max concurrency (default: the model's context length).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// KV dtype (default: the checkpoint's torch_dtype, else f16).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    #[command(flatten)]
    pub sharing: SharingArgs,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// A HF safetensors directory or repo id, or a GGUF file (exported to a HF
    /// directory: dequantized to f32, re-shared only when asked); absent: the embedded
    /// default model (GGUF).
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub sharing: SharingArgs,
    /// How each re-shared producer's K/V projections start: its own (`first`), or the
    /// mean of those of the layers that will read its cache (`mean`).
    #[arg(long, value_enum, default_value = "first")]
    pub kv_init: crate::model::reshare::KvInit,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 256)]
    pub prompt_tokens: usize,
    /// Tokens to decode (greedy, EOS ignored).
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Rounds; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text files or directories of them (read recursively), tokenized and joined with EOS.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Tokens per window; every token after the first is predicted once (default: 512,
    /// or the model's context length if shorter).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Evaluate only the first N windows.
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// Print one JSON line: {"perplexity": .., "tokens": ..}.
    #[arg(long)]
    pub json: bool,
}

fn check_block_size(bs: usize) -> anyhow::Result<()> {
    if bs == 0 || bs > 1024 {
        bail!("--block-size {bs}: expected 1..=1024");
    }
    Ok(())
}

/// A runner and manager with exactly enough blocks for `tokens` tokens of one sequence.
fn runner_for(
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

pub fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    check_block_size(args.block_size)?;
    let temperature_ok = args.temperature.is_finite() && args.temperature >= 0.0;
    if !temperature_ok || args.top_p.is_nan() || args.top_p <= 0.0 || args.top_p > 1.0 {
        bail!("--temperature must be ≥ 0 and --top-p in (0, 1]");
    }
    let loaded = args.model.load()?;
    let tok = &loaded.tokenizer;
    let text = if args.chat {
        tok.apply_chat_template(
            &[ChatMessage {
                role: "user".into(),
                content: args.prompt.clone(),
            }],
            true,
        )?
    } else {
        args.prompt.clone()
    };
    let prompt = tok.encode(&text, !args.chat)?;
    if prompt.is_empty() {
        bail!("--prompt is empty after tokenization");
    }
    let max_pos = loaded.model.max_positions();
    let total = (prompt.len() + args.max_tokens).min(max_pos);
    let (runner, mut mgr, tok) = runner_for(loaded, total, args.block_size, !args.model.enforce_eager)?;
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
        },
        stop_at_eos: true,
    };
    let mut stdout = std::io::stdout().lock();
    let (_, stats) = runner::generate(&runner, &mut mgr, &tok, &prompt, &opts, |piece| {
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    })?;
    let _ = writeln!(stdout);
    if args.stats {
        eprintln!(
            "prompt {} tokens, {:.1} tok/s; generated {} tokens, {:.1} tok/s",
            stats.prompt_tokens,
            stats.prompt_tok_per_s(),
            stats.generated_tokens,
            stats.decode_tok_per_s()
        );
    }
    Ok(())
}

/// The config of a source without loading its weights.
fn config_only(src: &str) -> anyhow::Result<ModelConfig> {
    match model::resolve_source(Some(src))? {
        ModelSource::Dir(d) => Ok(ModelConfig::from_file(&d.join("config.json"))?),
        ModelSource::Gguf(p) => {
            let mut f = std::fs::File::open(&p).with_context(|| p.display().to_string())?;
            let ct = candle_core::quantized::gguf_file::Content::read(&mut f)
                .map_err(|e| anyhow::anyhow!("{}: not a valid GGUF file: {e}", p.display()))?;
            Ok(model::gguf_config::config_from_gguf(&ct)?.0)
        }
    }
}

pub fn capacity_report(args: &CapacityArgs) -> anyhow::Result<(ModelConfig, CapacityReport)> {
    check_block_size(args.block_size)?;
    let mut cfg = match (&args.model, &args.config) {
        (_, Some(path)) => ModelConfig::from_file(path)?,
        (Some(src), None) => config_only(src)?,
        (None, None) => bail!("give --model or --config"),
    };
    if let Some(s) = args.sharing.sharing()? {
        cfg.reshare(&s)?;
    }
    let dtype_bytes = match args.dtype {
        Some(d) => d.dtype().size_in_bytes(),
        None => match cfg.torch_dtype.as_deref() {
            Some("float32") => 4,
            _ => 2,
        },
    };
    let seq_len = args.seq_len.unwrap_or(cfg.max_position_embeddings);
    if seq_len == 0 {
        bail!("--seq-len must be at least 1");
    }
    let shard = crate::tp::Shard {
        rank: 0,
        world: args.tensor_parallel_size,
    };
    let split = shard
        .split(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size)
        .map_err(|e| anyhow::anyhow!("--tensor-parallel-size {}: {e}", args.tensor_parallel_size))?;
    let layout = KvLayout::new(cfg.kv_source.clone(), split.kv_heads.len(), cfg.head_dim, dtype_bytes);
    let report = layout.capacity(args.kv_cache_memory, args.block_size, seq_len);
    Ok((cfg, report))
}

pub fn capacity(args: &CapacityArgs) -> anyhow::Result<()> {
    let (_, r) = capacity_report(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", capacity_table(&r));
    }
    Ok(())
}

pub fn capacity_table(r: &CapacityReport) -> String {
    let src: Vec<String> = r.kv_source.iter().map(|s| s.to_string()).collect();
    let gain = r.capacity_tokens as f64 / r.non_cla_capacity_tokens.max(1) as f64;
    let rows = [
        (
            "layers / KV layers",
            format!("{} / {}", r.layers, r.kv_layers),
            format!("{} / {}", r.layers, r.layers),
        ),
        (
            "KV heads × head_dim × bytes",
            format!("{} × {} × {}", r.num_key_value_heads, r.head_dim, r.dtype_bytes),
            format!("{} × {} × {}", r.num_key_value_heads, r.head_dim, r.dtype_bytes),
        ),
        (
            "KV bytes per token",
            r.kv_bytes_per_token.to_string(),
            r.non_cla_kv_bytes_per_token.to_string(),
        ),
        (
            "KV cache budget",
            format_bytes(r.kv_cache_bytes),
            format_bytes(r.kv_cache_bytes),
        ),
        (
            &*format!("blocks of {} tokens", r.block_size),
            r.num_blocks.to_string(),
            r.num_blocks.to_string(),
        ),
        (
            "capacity (tokens)",
            r.capacity_tokens.to_string(),
            r.non_cla_capacity_tokens.to_string(),
        ),
        (
            &*format!("max concurrency @ {} tokens", r.seq_len),
            r.max_concurrency.to_string(),
            r.non_cla_max_concurrency.to_string(),
        ),
    ]
    .map(|(a, b, c)| (a.to_string(), b, c));
    let mut s = format!("kv_source: [{}]\n", src.join(", "));
    s += &format!("{:<34}{:>18}{:>18}\n", "", "with sharing", "without sharing");
    for (a, b, c) in rows {
        s += &format!("{a:<34}{b:>18}{c:>18}\n");
    }
    s += &format!("{:<34}{:>18}\n", "capacity gain from sharing", format!("{gain:.2}×"));
    s
}

pub fn convert(args: &ConvertArgs) -> anyhow::Result<()> {
    let sharing = args.sharing.sharing()?;
    let source = model::resolve_source(args.model.as_deref())?;
    let (n, layers, kv_layers) = crate::convert::convert(source, sharing.as_ref(), args.kv_init, &args.out)?;
    println!(
        "wrote {} ({n} tensors; {layers} layers, {kv_layers} KV layers)",
        args.out.display()
    );
    Ok(())
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    check_block_size(args.block_size)?;
    if args.prompt_tokens == 0 || args.decode_tokens == 0 || args.rounds == 0 {
        bail!("--prompt-tokens, --decode-tokens and --rounds must be at least 1");
    }
    let loaded = args.model.load()?;
    let source = loaded.source.path().display().to_string();
    // A fixed, deterministic prompt of exactly `prompt_tokens` tokens.
    let text = "The quick brown fox jumps over the lazy dog while the river runs to the sea. "
        .repeat(args.prompt_tokens / 8 + 1);
    let mut prompt = loaded.tokenizer.encode(&text, false)?;
    prompt.truncate(args.prompt_tokens);
    let (runner, mut mgr, tok) = runner_for(
        loaded,
        args.prompt_tokens + args.decode_tokens,
        args.block_size,
        !args.model.enforce_eager,
    )?;
    let opts = GenerateOptions {
        max_tokens: args.decode_tokens,
        sampling: SamplingParams::default(),
        stop_at_eos: false,
    };
    let mut prompt_speeds = Vec::new();
    let mut decode_speeds = Vec::new();
    for round in 0..args.rounds {
        let (_, st) = runner::generate(&runner, &mut mgr, &tok, &prompt, &opts, |_| {})?;
        eprintln!(
            "round {round}: prompt {:.1} tok/s, decode {:.1} tok/s",
            st.prompt_tok_per_s(),
            st.decode_tok_per_s()
        );
        prompt_speeds.push(st.prompt_tok_per_s());
        decode_speeds.push(st.decode_tok_per_s());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (p, d) = (median(&mut prompt_speeds), median(&mut decode_speeds));
    let threads = rayon::current_num_threads();
    if args.json {
        println!(
            "{}",
            serde_json::json!({"model": source, "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
                "threads": threads, "prompt_tok_per_s": p, "decode_tok_per_s": d})
        );
    } else {
        println!(
            "model {source}, {threads} threads, prompt {} tokens, decode {} tokens",
            args.prompt_tokens, args.decode_tokens
        );
        println!("prompt {p:.1} tok/s, decode {d:.1} tok/s (median of {})", args.rounds);
    }
    Ok(())
}

/// `crosskv eval`: held-out perplexity of `--model` on `--data`.
pub fn eval(args: &EvalArgs) -> anyhow::Result<()> {
    use crate::train::{pack_windows, perplexity, Corpus};
    if args.max_windows == Some(0) {
        bail!("--max-windows must be at least 1");
    }
    if args.model.tensor_parallel_size > 1 {
        bail!("--tensor-parallel-size: `crosskv eval` runs on one device (give 1)");
    }
    let loaded = args.model.load()?;
    let max = loaded.model.max_positions();
    let seq_len = args.seq_len.unwrap_or(max.min(512));
    if seq_len > max {
        bail!("--seq-len {seq_len}: longer than the model's {max} positions");
    }
    let corpus = Corpus::load(&args.data, &loaded.tokenizer)?;
    let mut windows = pack_windows(&corpus.tokens, seq_len)?;
    if let Some(n) = args.max_windows {
        windows.truncate(n);
    }
    let total = windows.len();
    let start = std::time::Instant::now();
    let p = perplexity(&loaded.model, &windows, |done, nll| {
        if !args.json {
            eprint!(
                "\rwindow {done}/{total}  perplexity so far {:.3}  {:.0} tok/s ",
                nll.exp(),
                (done * seq_len) as f64 / start.elapsed().as_secs_f64()
            );
        }
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"perplexity": p.perplexity, "tokens": p.tokens, "nll": p.nll,
                "windows": total, "seq_len": seq_len, "files": corpus.files.len()})
        );
    } else {
        eprintln!();
        println!(
            "perplexity {:.4} ({} tokens in {total} windows of {}, {} files; mean NLL {:.4} nats/token)",
            p.perplexity,
            p.tokens,
            seq_len,
            corpus.files.len(),
            p.nll
        );
    }
    Ok(())
}

/// Resolves when SIGTERM or Ctrl-C arrives.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Loads the model and starts the engine (blocking: run it off the async threads).
fn start_engine(args: &ServeArgs) -> anyhow::Result<crate::engine::EngineHandle> {
    use crate::engine::{EngineConfig, EngineHandle};
    check_block_size(args.block_size)?;
    if let Some(f) = args.gpu_memory_utilization {
        if args.model.device != "cuda" && !args.model.device.starts_with("cuda:") {
            bail!("--gpu-memory-utilization needs a GPU device; on CPU give --kv-cache-memory or --kv-cache-tokens");
        }
        if !(f > 0.0 && f <= 1.0) {
            bail!("--gpu-memory-utilization {f}: expected a fraction in (0, 1]");
        }
    }
    if args.max_num_seqs == 0 || args.max_num_batched_tokens == 0 || args.max_queued_requests == 0 {
        bail!("--max-num-seqs, --max-num-batched-tokens and --max-queued-requests must be at least 1");
    }
    let loaded = args.model.load()?;
    let model_max = loaded.model.config().max_position_embeddings;
    let max_model_len = args.max_model_len.unwrap_or(model_max);
    if max_model_len == 0 || max_model_len > model_max {
        bail!("--max-model-len {max_model_len}: expected 1..={model_max} (the model's max_position_embeddings)");
    }
    let layout = loaded.model.layout().clone();
    let kv_cache_bytes = match (args.kv_cache_memory, args.kv_cache_tokens) {
        (Some(b), _) => b,
        (None, Some(t)) => layout.bytes_for_tokens(t, args.block_size),
        (None, None) if loaded.model.device().is_cuda() => crate::runner::memory::gpu_kv_budget(
            &std::iter::once(loaded.model.clone())
                .chain(loaded.peers.iter().cloned())
                .collect::<Vec<_>>(),
            args.gpu_memory_utilization.unwrap_or(0.9),
            args.block_size,
            args.max_num_batched_tokens
                .min(max_model_len.max(1) * args.max_num_seqs),
        )?,
        (None, None) => 1 << 30,
    };
    let config = EngineConfig {
        kv_cache_bytes,
        block_size: args.block_size,
        max_model_len,
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_queued_requests: args.max_queued_requests,
        prefix_caching: !args.no_prefix_caching,
        cuda_graphs: !args.model.enforce_eager,
    };
    let ranks = std::iter::once(loaded.model).chain(loaded.peers).collect();
    Ok(EngineHandle::start_ranks(ranks, loaded.tokenizer, config)?)
}

/// `crosskv serve`: binds the port first (`/health` is 503 while the model loads), then
/// loads the model, starts the engine and serves until SIGTERM / Ctrl-C.
pub fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    use crate::api::http::{self, AppState, HttpConfig};
    if args.max_connections == 0 || args.header_read_timeout == 0 || args.keep_alive_timeout == 0 {
        bail!("--max-connections, --header-read-timeout and --keep-alive-timeout must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        eprintln!("crosskv: listening on http://{}", listener.local_addr()?);
        let name = args.served_model_name.clone().unwrap_or_else(|| {
            args.model
                .model
                .clone()
                .unwrap_or_else(|| crate::model::source::DEFAULT_REPO.to_string())
        });
        let state = AppState::loading(HttpConfig {
            served_model_name: name,
            api_key: args.api_key.clone(),
            max_body_bytes: usize::try_from(args.max_request_body).unwrap_or(usize::MAX),
            request_timeout: std::time::Duration::from_secs(args.request_timeout),
            max_prompt_bytes: args.max_prompt_bytes.map(|b| usize::try_from(b).unwrap_or(usize::MAX)),
        });
        let limits = crate::api::listener::ConnectionLimits {
            max_connections: args.max_connections,
            header_read_timeout: std::time::Duration::from_secs(args.header_read_timeout),
            keep_alive_timeout: std::time::Duration::from_secs(args.keep_alive_timeout),
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let until = stopped();
        let server = tokio::spawn(http::serve(listener, state.clone(), limits.clone(), until));
        let signal = tokio::spawn(async move {
            shutdown_signal().await;
            eprintln!("crosskv: shutting down");
            let _ = stop_tx.send(true);
        });
        let a = args.clone();
        let handle = tokio::select! {
            h = tokio::task::spawn_blocking(move || start_engine(&a)) => h??,
            _ = stopped() => return Ok(()),
        };
        state.set_ready(handle.clone());
        eprintln!("crosskv: ready");
        if let Some(port) = args.grpc_port {
            let addr: std::net::SocketAddr = format!("{}:{port}", args.host)
                .parse()
                .with_context(|| format!("--host {} --grpc-port {port}", args.host))?;
            let h = handle.clone();
            let fut = stopped();
            let grpc = crate::api::grpc::GrpcConfig {
                api_key: args.api_key.clone(),
                max_prompt_bytes: args.max_prompt_bytes.map(|b| usize::try_from(b).unwrap_or(usize::MAX)),
                connections: limits.clone(),
            };
            tokio::spawn(async move {
                if let Err(e) = crate::api::grpc::serve(h, grpc, addr, fut).await {
                    eprintln!("crosskv: gRPC server: {e:#}");
                }
            });
        }
        // After the signal: in-flight requests get the grace period, then are aborted.
        let grace = std::time::Duration::from_secs(args.shutdown_grace);
        let h = handle.clone();
        let fut = stopped();
        tokio::spawn(async move {
            fut.await;
            tokio::time::sleep(grace).await;
            let _ = tokio::task::spawn_blocking(move || h.shutdown()).await;
        });
        server.await??;
        signal.abort();
        tokio::task::spawn_blocking(move || handle.shutdown()).await?;
        Ok(())
    })
}
