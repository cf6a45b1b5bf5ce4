//! Held-out perplexity: exp of the mean next-token negative log-likelihood over packed
//! windows, each window one causal forward of the serving model from position 0.

use crate::model::Model;
use candle_core::{DType, Result, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    pub perplexity: f64,
    /// Targets scored.
    pub tokens: usize,
    /// Mean negative log-likelihood, nats per token.
    pub nll: f64,
}

/// Windows scored per forward in [`perplexity`]: one graph for several windows (fewer,
/// larger matmuls) with the logits of a batch (`[batch·t, vocab]` f32) still small.
const EVAL_BATCH: usize = 8;

/// Mean next-token cross-entropy of one window (`window[1..]` given `window[..n-1]`):
/// a scalar tensor that training differentiates and eval reads.
pub fn window_loss(model: &Model, window: &[u32]) -> Result<Tensor> {
    windows_loss(model, &[window])
}

/// Mean next-token cross-entropy over all `b·(n−1)` targets of `b` windows of one length
/// `n`, in one batched forward ([`Model::forward_dense_batch`]). With equal lengths this
/// is also the mean of the windows' own means (the training step's batch loss).
pub fn windows_loss(model: &Model, windows: &[&[u32]]) -> Result<Tensor> {
    let n = windows.first().map_or(0, |w| w.len());
    if n < 2 {
        candle_core::bail!("a window needs at least 2 tokens");
    }
    let inputs: Vec<&[u32]> = windows.iter().map(|w| &w[..w.len().saturating_sub(1)]).collect();
    // The logits in the model's dtype: the loss kernel reads f16/bf16 and computes in f32.
    let logits = model.forward_dense_batch_in_dtype(&inputs)?;
    let targets: Vec<u32> = windows.iter().flat_map(|w| w[1..].iter().copied()).collect();
    let targets = Tensor::new(targets.as_slice(), logits.device())?;
    crate::ops::cross_entropy(&logits, &targets)
}

/// Negative log-likelihood summed over the targets of one window, in f64.
pub fn window_nll(model: &Model, window: &[u32]) -> Result<f64> {
    windows_nll(model, &[window])
}

/// Negative log-likelihood summed over the targets of windows of one length, in f64.
fn windows_nll(model: &Model, windows: &[&[u32]]) -> Result<f64> {
    let mean = windows_loss(model, windows)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(mean * windows.iter().map(|w| w.len() - 1).sum::<usize>() as f64)
}

/// Perplexity of `model` over `windows` (see `data::pack_windows`), scored up to
/// `EVAL_BATCH` windows of one length at a time; `progress` is called after each such
/// batch with (windows done, mean NLL so far).
pub fn perplexity(model: &Model, windows: &[Vec<u32>], mut progress: impl FnMut(usize, f64)) -> Result<Perplexity> {
    let max = model.max_positions();
    let (mut nll, mut tokens, mut done) = (0f64, 0usize, 0usize);
    if let Some(w) = windows.iter().find(|w| w.len().saturating_sub(1) > max) {
        candle_core::bail!(
            "a window of {} tokens is longer than the model's {max} positions",
            w.len() - 1
        );
    }
    while done < windows.len() {
        let n = windows[done].len();
        let batch: Vec<&[u32]> = windows[done..]
            .iter()
            .take(EVAL_BATCH)
            .take_while(|w| w.len() == n)
            .map(|w| w.as_slice())
            .collect();
        nll += windows_nll(model, &batch)?;
        tokens += batch.iter().map(|w| w.len() - 1).sum::<usize>();
        done += batch.len();
        progress(done, nll / tokens as f64);
    }
    if tokens == 0 {
        candle_core::bail!("no windows to evaluate");
    }
    let mean = nll / tokens as f64;
    Ok(Perplexity {
        perplexity: mean.exp(),
        tokens,
        nll: mean,
    })
}
