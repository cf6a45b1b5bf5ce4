//! `crosskv capacity`: a model's KV layout and capacity with and without sharing, from
//! its config alone.

use super::capacity_plot::{capacity_series, plot_lengths, write_capacity_plot, DtypeSeries};
use super::{check_block_size, SharingArgs};
use crate::config::ModelConfig;
use crate::device::{DtypeArg, KvCacheDtypeArg};
use crate::kv::{CapacityReport, KvDtype, KvLayout};
use crate::model::{self, ModelSource};
use crate::units::{format_bytes, parse_size};
use anyhow::{bail, Context};
use clap::Args;
use std::path::{Path, PathBuf};

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
    /// Compute dtype, which `--kv-cache-dtype auto` stores (default: the checkpoint's
    /// torch_dtype, else f16).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// What the KV cache stores: auto (the compute dtype), bf16, f16, f32 or fp8 (e4m3,
    /// alias fp8_e4m3). The figures are also shown for fp8 (for a 16-bit or f32 cache)
    /// or for the compute dtype (for an fp8 one), side by side.
    #[arg(long, value_enum, default_value = "auto")]
    pub kv_cache_dtype: KvCacheDtypeArg,
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    #[command(flatten)]
    pub sharing: SharingArgs,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write an SVG chart of max concurrency against sequence length (the block
    /// size doubling up to --seq-len), with and without sharing.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
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

/// The config (re-shared as asked), its KV layout on one rank, and the sequence length
/// the figures are computed at.
fn capacity_layout(args: &CapacityArgs) -> anyhow::Result<(ModelConfig, KvLayout, usize)> {
    let (cfg, layout, _, seq_len) = capacity_layouts(args)?;
    Ok((cfg, layout, seq_len))
}

/// [`capacity_layout`], and the same layout in the dtype it is compared with: fp8 for a
/// float cache, the compute dtype for an fp8 one (bf16 when that is f32).
fn capacity_layouts(args: &CapacityArgs) -> anyhow::Result<(ModelConfig, KvLayout, KvLayout, usize)> {
    check_block_size(args.block_size)?;
    let mut cfg = match (&args.model, &args.config) {
        (_, Some(path)) => ModelConfig::from_file(path)?,
        (Some(src), None) => config_only(src)?,
        (None, None) => bail!("give --model or --config"),
    };
    if let Some(s) = args.sharing.sharing()? {
        cfg.reshare(&s)?;
    }
    let compute = match args.dtype {
        Some(d) => d.dtype(),
        None => match cfg.torch_dtype.as_deref() {
            Some("float32") => candle_core::DType::F32,
            Some("bfloat16") => candle_core::DType::BF16,
            _ => candle_core::DType::F16,
        },
    };
    let kv = args.kv_cache_dtype.resolve(compute);
    let other = match (kv, KvDtype::of_model(compute)) {
        (KvDtype::Fp8E4m3, KvDtype::F32) => KvDtype::BF16,
        (KvDtype::Fp8E4m3, d) => d,
        _ => KvDtype::Fp8E4m3,
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
    let layout = KvLayout::new(cfg.kv_source.clone(), split.kv_heads.len(), cfg.head_dim, kv.bytes());
    Ok((cfg, layout.clone().with_dtype(kv), layout.with_dtype(other), seq_len))
}

/// `capacity --json`: the report, and the same figures in the dtype it is compared with.
#[derive(serde::Serialize)]
struct CapacityJson<'a> {
    #[serde(flatten)]
    report: &'a CapacityReport,
    compared_kv_dtype: &'a CapacityReport,
}

pub fn capacity_report(args: &CapacityArgs) -> anyhow::Result<(ModelConfig, CapacityReport)> {
    let (cfg, layout, seq_len) = capacity_layout(args)?;
    Ok((cfg, layout.capacity(args.kv_cache_memory, args.block_size, seq_len)))
}

/// Writes the `--plot` chart for `args` to `path`: `layout`'s series, and `other`'s (the
/// same layout in the dtype the table compares it with) beside them.
fn plot_capacity(
    args: &CapacityArgs,
    (layout, other): (&KvLayout, &KvLayout),
    seq_len: usize,
    path: &Path,
) -> anyhow::Result<()> {
    let lengths = plot_lengths(args.block_size, seq_len);
    let dtypes: Vec<DtypeSeries> = [layout, other]
        .into_iter()
        .map(|l| DtypeSeries {
            dtype: l.dtype_name(),
            points: capacity_series(l, args.kv_cache_memory, args.block_size, &lengths),
        })
        .collect();
    write_capacity_plot(path, &plot_title(args, layout), &dtypes)
}

/// The chart's title: the model or config as given, its KV layers, the budget per GPU.
fn plot_title(args: &CapacityArgs, layout: &KvLayout) -> String {
    let source = match (&args.model, &args.config) {
        (Some(m), _) => m.clone(),
        (None, Some(c)) => c.display().to_string(),
        (None, None) => String::new(),
    };
    let per_gpu = if args.tensor_parallel_size > 1 { " per GPU" } else { "" };
    format!(
        "{source} ({} of {} layers keep KV): KV budget {}{per_gpu}",
        layout.kv_layers(),
        layout.layers(),
        format_bytes(args.kv_cache_memory)
    )
}

pub fn capacity(args: &CapacityArgs) -> anyhow::Result<()> {
    let (_, layout, other, seq_len) = capacity_layouts(args)?;
    // The chart first: a path that cannot be written fails before anything is printed.
    if let Some(path) = &args.plot {
        plot_capacity(args, (&layout, &other), seq_len, path)?;
    }
    let r = layout.capacity(args.kv_cache_memory, args.block_size, seq_len);
    let o = other.capacity(args.kv_cache_memory, args.block_size, seq_len);
    if args.json {
        let json = CapacityJson {
            report: &r,
            compared_kv_dtype: &o,
        };
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}{}", capacity_table(&r), capacity_comparison_rows(&o));
    }
    Ok(())
}

/// The rows that depend on the KV dtype, for the dtype the table is compared with.
pub fn capacity_comparison_rows(o: &CapacityReport) -> String {
    let mut s = format!("as {} ({} bytes an element):\n", o.kv_cache_dtype, o.dtype_bytes);
    let rows = [
        (
            "  KV bytes per token".to_string(),
            o.kv_bytes_per_token,
            o.non_cla_kv_bytes_per_token,
        ),
        (
            "  capacity (tokens)".to_string(),
            o.capacity_tokens,
            o.non_cla_capacity_tokens,
        ),
        (
            format!("  max concurrency @ {} tokens", o.seq_len),
            o.max_concurrency,
            o.non_cla_max_concurrency,
        ),
    ];
    for (a, b, c) in rows {
        s += &format!("{a:<34}{b:>18}{c:>18}\n");
    }
    s
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
        ("KV cache dtype", r.kv_cache_dtype.clone(), r.kv_cache_dtype.clone()),
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
