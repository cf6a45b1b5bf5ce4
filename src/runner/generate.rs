//! One prompt through the runner, token by token: what `crosskv generate` and the
//! benchmark drive, and a batch of prompts decoded together for `crosskv bench --batch`.
//! (The server's continuous batching lives in `engine/`.)

use super::{fetch_logits, Runner, Sampler, SamplingParams, SeqStep};
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

/// The next token from a full row: bias and penalties applied, then sampled; the
/// sampler counts the pick.
fn pick(sampler: &mut Sampler, mut row: Vec<f32>) -> u32 {
    sampler.adjust(&mut row);
    let t = sampler.sample(&row);
    sampler.accept(t);
    t
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
    let mut sampler = Sampler::with_prompt(opts.sampling.clone(), prompt);
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
        let mut next = pick(&mut sampler, logits.get(0)?.to_vec1::<f32>()?);
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
            next = pick(&mut sampler, logits.get(0)?.to_vec1::<f32>()?);
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

/// Times of [`decode_batch`]: the prefill step and the decode steps after it.
#[derive(Debug, Default, Clone)]
pub struct BatchStats {
    pub sequences: usize,
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    /// Decode steps run (each gives every sequence one token).
    pub decode_steps: usize,
    pub decode_secs: f64,
    /// Each sequence's generated tokens.
    pub tokens: Vec<Vec<u32>>,
}

impl BatchStats {
    pub fn prompt_tok_per_s(&self) -> f64 {
        (self.sequences * self.prompt_tokens) as f64 / self.prefill_secs.max(1e-9)
    }
    pub fn decode_tok_per_s(&self) -> f64 {
        (self.sequences * self.decode_steps) as f64 / self.decode_secs.max(1e-9)
    }
}

/// The engine's step at a batch, without the engine: `prompts` prefilled in one step,
/// then `decode_tokens - 1` greedy decode steps of every sequence together (the argmax
/// as the engine takes it for greedy rows, EOS ignored). Blocks are freed whatever
/// happens. The baseline the served path is compared with (`crosskv bench --batch`).
pub fn decode_batch(
    runner: &Runner,
    mgr: &mut KvManager,
    prompts: &[Vec<u32>],
    decode_tokens: usize,
) -> anyhow::Result<BatchStats> {
    anyhow::ensure!(
        !prompts.is_empty() && prompts.iter().all(|p| !p.is_empty()),
        "empty prompt"
    );
    let n = prompts.len();
    let mut stats = BatchStats {
        sequences: n,
        prompt_tokens: prompts[0].len(),
        ..Default::default()
    };
    let result = (|| -> anyhow::Result<()> {
        let t0 = Instant::now();
        for (i, p) in prompts.iter().enumerate() {
            mgr.allocate(i as u64, p.len())?;
        }
        let steps: Vec<SeqStep> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| SeqStep {
                seq: i as u64,
                tokens: p.clone(),
                start_pos: 0,
                all_logits: false,
            })
            .collect();
        let mut next = fetch_logits(&runner.step(mgr, &steps)?, &vec![false; n])?.argmax;
        stats.prefill_secs = t0.elapsed().as_secs_f64();
        stats.tokens = next.iter().map(|&t| vec![t]).collect();
        let mut pos: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let t1 = Instant::now();
        for _ in 1..decode_tokens {
            for (i, p) in pos.iter().enumerate() {
                mgr.allocate(i as u64, p + 1)?;
            }
            let steps: Vec<SeqStep> = (0..n)
                .map(|i| SeqStep {
                    seq: i as u64,
                    tokens: vec![next[i]],
                    start_pos: pos[i],
                    all_logits: false,
                })
                .collect();
            next = fetch_logits(&runner.step(mgr, &steps)?, &vec![false; n])?.argmax;
            stats.tokens.iter_mut().zip(&next).for_each(|(out, &t)| out.push(t));
            pos.iter_mut().for_each(|p| *p += 1);
            stats.decode_steps += 1;
        }
        stats.decode_secs = t1.elapsed().as_secs_f64();
        Ok(())
    })();
    for i in 0..n as u64 {
        if mgr.contains(i) {
            mgr.free(i)?;
        }
    }
    result.map(|()| stats)
}
