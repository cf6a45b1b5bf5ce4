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

/// Mean next-token cross-entropy of one window (`window[1..]` given `window[..n-1]`):
/// a scalar tensor that training differentiates and eval reads.
pub fn window_loss(model: &Model, window: &[u32]) -> Result<Tensor> {
    let n = window.len();
    if n < 2 {
        candle_core::bail!("a window needs at least 2 tokens");
    }
    let logits = model.forward_dense(&window[..n - 1])?.to_dtype(DType::F32)?;
    let targets = Tensor::new(&window[1..], logits.device())?;
    candle_nn::loss::cross_entropy(&logits, &targets)
}

/// Negative log-likelihood summed over the targets of one window, in f64.
pub fn window_nll(model: &Model, window: &[u32]) -> Result<f64> {
    let mean = window_loss(model, window)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(mean * (window.len() - 1) as f64)
}

/// Perplexity of `model` over `windows` (see `data::pack_windows`); `progress` is called
/// after each window with (windows done, mean NLL so far).
pub fn perplexity(model: &Model, windows: &[Vec<u32>], mut progress: impl FnMut(usize, f64)) -> Result<Perplexity> {
    let max = model.max_positions();
    let (mut nll, mut tokens) = (0f64, 0usize);
    for (i, w) in windows.iter().enumerate() {
        if w.len() - 1 > max {
            candle_core::bail!(
                "a window of {} tokens is longer than the model's {max} positions",
                w.len() - 1
            );
        }
        nll += window_nll(model, w)?;
        tokens += w.len() - 1;
        progress(i + 1, nll / tokens as f64);
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
