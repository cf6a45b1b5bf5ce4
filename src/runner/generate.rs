//! One prompt through the runner, token by token: what `crosskv generate` and the
//! benchmark drive. (The server's continuous batching lives in `engine/`.)

use super::{Runner, Sampler, SamplingParams, SeqStep};
use crate::kv::KvManager;
use crate::model::{StreamDecoder, Tok};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop at the model's end-of-sequence tokens (off for fixed-length benchmarks).
    pub stop_at_eos: bool,
}

#[derive(Debug, Clone, Default)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl GenerateStats {
    pub fn prompt_tok_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    /// Decode speed over the tokens after the first (the first comes from the prefill).
    pub fn decode_tok_per_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Generates up to `max_tokens` after `prompt`, calling `on_text` with each printable
/// piece. The sequence's blocks are freed whatever happens.
pub fn generate(
    runner: &Runner,
    mgr: &mut KvManager,
    tok: &Tok,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> anyhow::Result<(Vec<u32>, GenerateStats)> {
    const SEQ: u64 = 0;
    anyhow::ensure!(!prompt.is_empty(), "the prompt is empty");
    let max_pos = runner.model().max_positions();
    anyhow::ensure!(
        prompt.len() < max_pos,
        "the prompt has {} tokens; the model's context is {max_pos}",
        prompt.len()
    );
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut stats = GenerateStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let mut out = Vec::new();
    let mut decoder = StreamDecoder::default();
    let result = (|| -> anyhow::Result<()> {
        if opts.max_tokens == 0 {
            return Ok(());
        }
        let t0 = Instant::now();
        mgr.allocate(SEQ, prompt.len())?;
        let logits = runner.step(
            mgr,
            &[SeqStep {
                seq: SEQ,
                tokens: prompt.to_vec(),
                start_pos: 0,
                all_logits: false,
            }],
        )?;
        let mut next = sampler.sample(&logits.get(0)?.to_vec1::<f32>()?);
        stats.prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut pos = prompt.len();
        loop {
            out.push(next);
            if opts.stop_at_eos && tok.eos_ids.contains(&next) {
                break;
            }
            if let Some(piece) = decoder.push(tok, next)? {
                on_text(&piece);
            }
            if out.len() >= opts.max_tokens || pos + 1 >= max_pos {
                break;
            }
            mgr.allocate(SEQ, pos + 1)?;
            let logits = runner.step(
                mgr,
                &[SeqStep {
                    seq: SEQ,
                    tokens: vec![next],
                    start_pos: pos,
                    all_logits: false,
                }],
            )?;
            next = sampler.sample(&logits.get(0)?.to_vec1::<f32>()?);
            pos += 1;
        }
        stats.decode_secs = t1.elapsed().as_secs_f64();
        Ok(())
    })();
    if mgr.contains(SEQ) {
        mgr.free(SEQ)?;
    }
    result?;
    stats.generated_tokens = out.len();
    Ok((out, stats))
}
