//! `crosskv eval`: held-out perplexity of a model on text files.

use super::ModelArgs;
use anyhow::bail;
use clap::Args;
use std::path::PathBuf;

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

/// `crosskv eval`: held-out perplexity of `--model` on `--data`.
pub fn eval(args: &EvalArgs) -> anyhow::Result<()> {
    use crate::train::{pack_windows, perplexity, Corpus};
    if args.max_windows == Some(0) {
        bail!("--max-windows must be at least 1");
    }
    if args.model.kv_cache_dtype != crate::device::KvCacheDtypeArg::Auto {
        // Perplexity runs one dense forward a window: there is no KV cache to store.
        bail!("--kv-cache-dtype: `crosskv eval` keeps no KV cache (a dense forward a window); measure a KV dtype with `crosskv serve` and echo log-probs");
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
