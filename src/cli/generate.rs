//! `crosskv generate`: one prompt through the model, the text streamed to stdout.

use super::{check_block_size, runner_for, ModelArgs};
use crate::model::ChatMessage;
use crate::runner::{self, GenerateOptions, SamplingParams};
use anyhow::bail;
use clap::Args;
use std::io::Write;

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

pub fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    check_block_size(args.block_size)?;
    let temperature_ok = args.temperature.is_finite() && args.temperature >= 0.0;
    if !temperature_ok || args.top_p.is_nan() || args.top_p <= 0.0 || args.top_p > 1.0 {
        bail!("--temperature must be ≥ 0 and --top-p in (0, 1]");
    }
    let loaded = args.model.load()?;
    let tok = &loaded.tokenizer;
    let text = if args.chat {
        tok.apply_chat_template(&[ChatMessage::new("user", args.prompt.clone())], true)?
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
            ..Default::default()
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
