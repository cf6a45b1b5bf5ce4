//! Training and fine-tuning on the serving model's own code: every checkpoint tensor is
//! a candle `Var` (f32 master weights), the model is built from them with
//! `Model::load`, and `forward_dense` (differentiable, see the ops' backward passes)
//! gives the next-token loss. AdamW with the paper's settings (β = (0.9, 0.95), weight
//! decay 0.1, gradient clipping 1.0, linear warm-up then cosine decay to 10 % of the
//! peak learning rate).

use crate::config::{KvSharing, ModelConfig};
use crate::model::weights::Weights;
use crate::model::{LoadOptions, Model};
use anyhow::{bail, Context};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// A model whose every tensor is a trainable variable.
pub struct Trainable {
    pub model: Model,
    vars: Vec<(String, Var)>,
}

impl Trainable {
    fn from_tensors(cfg: &ModelConfig, tensors: HashMap<String, Tensor>, device: &Device) -> anyhow::Result<Self> {
        let mut vars: Vec<(String, Var)> = tensors
            .into_iter()
            .map(|(name, t)| Ok((name, Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(device)?)?)))
            .collect::<candle_core::Result<_>>()?;
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let weights = Weights::Tensors {
            tensors: vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect(),
            dtype: DType::F32,
            device: device.clone(),
        };
        let model = Model::load(cfg, &weights, false)?;
        Ok(Trainable { model, vars })
    }

    /// Random initialisation of `cfg` (std 0.02, norms 1), seeded.
    pub fn random(cfg: &ModelConfig, device: &Device, seed: u64) -> anyhow::Result<Self> {
        let Weights::Tensors { tensors, .. } = Weights::random(cfg, DType::F32, device, seed)? else {
            bail!("Weights::random returns tensors");
        };
        Self::from_tensors(cfg, tensors, device)
    }

    /// A HF checkpoint directory, re-shared first when `sharing` is given (a plain
    /// checkpoint → CLA: the consumers' K/V projections are dropped).
    pub fn from_dir(dir: &Path, sharing: Option<KvSharing>, device: &Device) -> anyhow::Result<Self> {
        let opts = LoadOptions {
            dtype: Some(DType::F32),
            sharing,
            ..Default::default()
        };
        let m = crate::model::load_model_dir(dir, &opts)?;
        let tensors = crate::convert::checkpoint_tensors(&m)?;
        let cfg = m.config().clone();
        Self::from_tensors(&cfg, tensors, device)
    }

    pub fn parameters(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// `config.json` (with an explicit `kv_source`) and `model.safetensors` (f32) into `out`.
    pub fn save(&self, out: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let tensors: HashMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&tensors, out.join("model.safetensors")).context("writing model.safetensors")?;
        let config = self.model.config().to_json_with_kv_source();
        std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&config)?)?;
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Warm-up steps (the paper: 5 % of the steps).
    pub warmup: usize,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub seed: u64,
}

/// The learning rate at `step` (0-based): linear warm-up to `peak` over `warmup` steps,
/// then cosine decay to 10 % of `peak` at the last step.
pub fn lr_at(step: usize, steps: usize, peak: f64, warmup: usize) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = (steps - warmup).max(1) as f64;
    let t = ((step - warmup) as f64 / span).min(1.0);
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
}

/// One step's record (`--log-json` writes these, one JSON line each).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
}

/// Mean next-token cross-entropy over `batch` windows: one graph.
fn batch_loss(model: &Model, batch: &[&Vec<u32>]) -> candle_core::Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for w in batch {
        let l = super::eval::window_loss(model, w)?;
        total = Some(match total {
            None => l,
            Some(t) => (t + l)?,
        });
    }
    total.expect("a non-empty batch") / batch.len() as f64
}

/// Scales every gradient by `clip / norm` when their global L2 norm exceeds `clip`;
/// returns the norm before clipping.
fn clip_gradients(grads: &mut GradStore, vars: &[(String, Var)], clip: f64) -> candle_core::Result<f64> {
    let mut sq = 0f64;
    for (_, v) in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    if clip > 0.0 && norm > clip {
        for (_, v) in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g * (clip / norm))?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// Trains on `windows` (each `seq_len + 1` tokens) for `opts.steps` steps of
/// `opts.batch_size` windows, reshuffled (seeded) every pass; `log` gets every step.
pub fn train(
    t: &Trainable,
    windows: &[Vec<u32>],
    opts: &TrainOptions,
    mut log: impl FnMut(&StepLog),
) -> anyhow::Result<Vec<StepLog>> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    if windows.is_empty() {
        bail!("no training windows");
    }
    if opts.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let params = ParamsAdamW {
        lr: opts.lr,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: opts.weight_decay,
    };
    let mut opt = AdamW::new(t.vars.iter().map(|(_, v)| v.clone()).collect(), params)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut order: Vec<usize> = (0..windows.len()).collect();
    order.shuffle(&mut rng);
    let mut next = 0;
    let mut out = Vec::with_capacity(opts.steps);
    for step in 0..opts.steps {
        let start = std::time::Instant::now();
        let mut batch = Vec::with_capacity(opts.batch_size);
        while batch.len() < opts.batch_size {
            if next == order.len() {
                order.shuffle(&mut rng);
                next = 0;
            }
            batch.push(&windows[order[next]]);
            next += 1;
        }
        let lr = lr_at(step, opts.steps, opts.lr, opts.warmup);
        opt.set_learning_rate(lr);
        let loss = batch_loss(&t.model, &batch)?;
        let mut grads = loss.backward()?;
        let grad_norm = clip_gradients(&mut grads, &t.vars, opts.grad_clip)?;
        opt.step(&grads)?;
        let tokens: usize = batch.iter().map(|w| w.len() - 1).sum();
        let rec = StepLog {
            step: step + 1,
            loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / start.elapsed().as_secs_f64(),
        };
        log(&rec);
        out.push(rec);
    }
    Ok(out)
}

/// Appends `rec` as one JSON line.
pub fn write_log_line(f: &mut std::fs::File, rec: &StepLog) -> anyhow::Result<()> {
    writeln!(f, "{}", serde_json::to_string(rec)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::lr_at;

    #[test]
    fn warmup_then_cosine_to_a_tenth() {
        let (steps, peak, warmup) = (100, 1.0, 5);
        assert!((lr_at(0, steps, peak, warmup) - 0.2).abs() < 1e-12);
        assert!((lr_at(4, steps, peak, warmup) - 1.0).abs() < 1e-12);
        assert!((lr_at(5, steps, peak, warmup) - 1.0).abs() < 1e-12);
        assert!((lr_at(99, steps, peak, warmup) - 0.1).abs() < 1e-3);
        let mid = lr_at(52, steps, peak, warmup);
        assert!((mid - 0.55).abs() < 0.01, "{mid}");
        assert!((1..100).all(|s| lr_at(s, steps, peak, warmup) <= lr_at(s - 1, steps, peak, warmup) + 1e-12 || s < 5));
    }
}
