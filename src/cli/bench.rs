//! `crosskv bench`: prompt and decode speed of a model on this machine.

use super::{check_block_size, runner_for, ModelArgs};
use crate::runner::{self, GenerateOptions, SamplingParams};
use anyhow::bail;
use clap::Args;

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
    /// Sequences decoded together (each with the prompt): the engine's step at this
    /// batch without the engine, the baseline for the served path
    /// (`benches/serve_decode.rs`). Tok/s then count every sequence's tokens.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Rounds; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    check_block_size(args.block_size)?;
    if args.prompt_tokens == 0 || args.decode_tokens == 0 || args.rounds == 0 || args.batch == 0 {
        bail!("--prompt-tokens, --decode-tokens, --batch and --rounds must be at least 1");
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
        (args.prompt_tokens + args.decode_tokens).next_multiple_of(args.block_size) * args.batch,
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
        let (ps, ds) = if args.batch == 1 {
            let (_, st) = runner::generate(&runner, &mut mgr, &tok, &prompt, &opts, |_| {})?;
            (st.prompt_tok_per_s(), st.decode_tok_per_s())
        } else {
            let prompts = vec![prompt.clone(); args.batch];
            let st = runner::decode_batch(&runner, &mut mgr, &prompts, args.decode_tokens)?;
            (st.prompt_tok_per_s(), st.decode_tok_per_s())
        };
        eprintln!("round {round}: prompt {ps:.1} tok/s, decode {ds:.1} tok/s");
        prompt_speeds.push(ps);
        decode_speeds.push(ds);
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
                "batch": args.batch, "threads": threads, "prompt_tok_per_s": p, "decode_tok_per_s": d})
        );
    } else {
        println!(
            "model {source}, {threads} threads, batch {}, prompt {} tokens, decode {} tokens",
            args.batch, args.prompt_tokens, args.decode_tokens
        );
        println!("prompt {p:.1} tok/s, decode {d:.1} tok/s (median of {})", args.rounds);
    }
    Ok(())
}
