//! Training and fine-tuning on the serving model's own code: every checkpoint tensor is
//! a candle `Var` (f32 master weights), the model is built from them with
//! `Model::load`, and `forward_dense_batch` (differentiable, see the ops' backward
//! passes; one graph for the step's windows) gives the next-token loss. AdamW with the
//! paper's settings (β = (0.9, 0.95), weight decay 0.1, gradient clipping 1.0, linear
//! warm-up then cosine decay to 10 % of the peak learning rate). With a compute dtype
//! other than f32 (bf16 on the GPU) the optimizer keeps a compute copy of every f32
//! master (`AdamW::keep_compute_copies`); the trainer builds its model once from those
//! copies, the gradients are theirs, and each update rewrites them from the masters
//! (no per-step casts of the weights or their gradients). The loss is taken in f32.

use super::adamw::{AdamW, AdamWParams};
use super::data::DataOrder;
use crate::config::{KvSharing, ModelConfig};
use crate::model::weights::Weights;
use crate::model::{LoadOptions, Model};
use anyhow::{bail, Context};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
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
    /// checkpoint → CLA; `init` picks the producers' K/V projections).
    pub fn from_dir(
        dir: &Path,
        sharing: Option<KvSharing>,
        init: crate::model::reshare::KvInit,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let opts = LoadOptions {
            dtype: Some(DType::F32),
            ..Default::default()
        };
        let m = crate::model::load_model_dir(dir, &opts)?;
        let (cfg, tensors) = crate::model::reshare::reshared_checkpoint(&m, sharing.as_ref(), init)?;
        Self::from_tensors(&cfg, tensors, device)
    }

    /// Every variable by name, sorted.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Exactly the variables [`Trainable::save`] wrote into `dir` (a checkpoint being resumed).
    pub fn from_saved(dir: &Path, device: &Device) -> anyhow::Result<Self> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let path = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
            .with_context(|| format!("reading {}", path.display()))?;
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
        super::files::replace_file(&out.join("model.safetensors"), |tmp| {
            candle_core::safetensors::save(&tensors, tmp).context("writing model.safetensors")
        })?;
        let config = self.model.config().to_json_with_kv_source();
        super::files::replace_file(&out.join("config.json"), |tmp| {
            Ok(std::fs::write(tmp, serde_json::to_string_pretty(&config)?)?)
        })
    }
}

#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Total steps: the learning-rate schedule spans them.
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Warm-up steps (the paper: 5 % of the steps).
    pub warmup: usize,
    pub weight_decay: f64,
    pub grad_clip: f64,
    /// Seeds the order the windows are drawn in.
    pub seed: u64,
    /// The forward and backward pass's dtype; the variables stay f32.
    pub dtype: DType,
}

/// The learning rate at `step` (0-based): linear warm-up to `peak` over `warmup` steps,
/// then cosine decay to 10 % of `peak` at the last step.
pub fn lr_at(step: usize, steps: usize, peak: f64, warmup: usize) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = steps.saturating_sub(warmup).max(1) as f64;
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
    /// Host time at the end of each phase (benchmarks print it; not logged).
    #[serde(skip)]
    pub phases: StepPhases,
}

/// When each phase of a step returned on the host, ms from the step's start. Only the
/// gradient norm and the final loss wait for the device, so a phase that returns long
/// before the device is done was issued faster than it ran, and one that ends late was
/// bound by the host issuing it.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepPhases {
    /// The forward and the loss issued.
    pub forward: f64,
    /// The backward issued.
    pub backward: f64,
    /// The gradient norm back on the host (waits for the backward to finish).
    pub norm: f64,
    /// The optimizer's updates issued.
    pub update: f64,
    /// The loss back on the host (waits for the updates).
    pub end: f64,
}

/// Mean next-token cross-entropy over `batch` windows (all one length, as
/// `pack_windows` makes them): one batched forward, one cross-entropy.
fn batch_loss(model: &Model, batch: &[&Vec<u32>]) -> candle_core::Result<Tensor> {
    let windows: Vec<&[u32]> = batch.iter().map(|w| w.as_slice()).collect();
    super::eval::windows_loss(model, &windows)
}

/// The gradients' global L2 norm, and the factor that clips it to `clip` (`clip / norm`
/// when the norm exceeds it, else 1), which the optimizer applies as it reads them.
fn clip_gradients(grads: &GradStore, vars: &[(String, Var)], clip: f64) -> candle_core::Result<(f64, f64)> {
    let present: Vec<&Tensor> = vars.iter().filter_map(|(_, v)| grads.get(v.as_tensor())).collect();
    let Some(first) = present.first() else {
        return Ok((0.0, 1.0));
    };
    // The squares of every gradient summed into one f32 on the device (one kernel on
    // CUDA, where candle's sqr + sum_all per gradient took a fifth of a step: BENCHMARKS.md,
    // "Measurements behind design choices"; bf16 gradients are widened as they are
    // read, not squared and summed in bf16); one scalar comes back.
    let acc = Tensor::zeros(1, DType::F32, first.device())?;
    crate::ops::sum_squares_many(&acc, &present)?;
    let norm = (acc.to_vec1::<f32>()?[0] as f64).sqrt();
    let scale = if clip > 0.0 && norm > clip { clip / norm } else { 1.0 };
    Ok((norm, scale))
}

/// A training run's state beside the model: the optimizer (its step count is the run's)
/// and the data order. Everything a checkpoint saves to continue exactly.
pub struct Trainer {
    pub opts: TrainOptions,
    opt: AdamW,
    order: DataOrder,
    windows: usize,
    /// The model built from the compute copies (None: f32, the Trainable's own model).
    compute_model: Option<Model>,
}

impl Trainer {
    /// A fresh run over `windows` training windows.
    pub fn new(t: &Trainable, windows: usize, opts: TrainOptions) -> anyhow::Result<Self> {
        let opt = AdamW::new(&t.vars, AdamWParams::new(opts.lr, opts.weight_decay))?;
        let order = DataOrder::new(windows, opts.seed);
        Self::resume(t, opt, order, windows, opts)
    }

    /// A run of `t` continued from saved optimizer state and data order.
    pub fn resume(
        t: &Trainable,
        mut opt: AdamW,
        order: DataOrder,
        windows: usize,
        opts: TrainOptions,
    ) -> anyhow::Result<Self> {
        if windows == 0 {
            bail!("no training windows");
        }
        if opts.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        #[cfg(feature = "cuda")]
        crate::device::retain_freed_memory(t.model.device())?;
        opt.keep_compute_copies(opts.dtype)?;
        let compute_model = match opts.dtype {
            DType::F32 => None,
            dtype => {
                let weights = Weights::Tensors {
                    tensors: opt
                        .compute_vars()
                        .into_iter()
                        .map(|(n, v)| (n, v.as_tensor().clone()))
                        .collect(),
                    dtype,
                    device: t.model.device().clone(),
                };
                Some(Model::load(t.model.config(), &weights, false)?)
            }
        };
        Ok(Trainer {
            opts,
            opt,
            order,
            windows,
            compute_model,
        })
    }

    /// Steps done so far.
    pub fn step_done(&self) -> usize {
        self.opt.steps_done()
    }

    /// The data order's `(epoch, next)`.
    pub fn data_position(&self) -> (usize, usize) {
        self.order.position()
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// One optimizer step on the next `batch_size` windows of `windows` (the set this
    /// trainer was made for).
    pub fn step(&mut self, t: &Trainable, windows: &[Vec<u32>]) -> anyhow::Result<StepLog> {
        if windows.len() != self.windows {
            bail!("{} windows given to a trainer made for {}", windows.len(), self.windows);
        }
        let start = std::time::Instant::now();
        let step = self.step_done();
        let batch: Vec<&Vec<u32>> = (0..self.opts.batch_size)
            .map(|_| &windows[self.order.next_index()])
            .collect();
        let o = &self.opts;
        let lr = lr_at(step, o.steps, o.lr, o.warmup);
        self.opt.set_learning_rate(lr);
        let ms = || start.elapsed().as_secs_f64() * 1e3;
        let model = self.compute_model.as_ref().unwrap_or(&t.model);
        let loss = batch_loss(model, &batch)?;
        let forward = ms();
        let grads = loss.backward()?;
        // The forward graph (every saved activation, ~1 000 tensors at 125M) is freed now,
        // while the device is still running the backward: freeing is ordered on the
        // stream, and the host would otherwise spend a third of the step on it with the
        // device idle (BENCHMARKS.md, "Measurements behind design choices").
        let loss = {
            let value = loss.detach();
            drop(loss); // shadowing alone would keep the graph alive to the end of the step
            value
        };
        let backward = ms();
        // The gradients are the compute variables' (the copies, or the f32 masters).
        let (grad_norm, grad_scale) = clip_gradients(&grads, &self.opt.compute_vars(), o.grad_clip)?;
        let norm = ms();
        self.opt.step_scaled(&grads, grad_scale)?;
        drop(grads); // likewise, behind the updates
        let update = ms();
        let loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let tokens: usize = batch.iter().map(|w| w.len() - 1).sum();
        Ok(StepLog {
            step: step + 1,
            loss,
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / start.elapsed().as_secs_f64(),
            phases: StepPhases {
                forward,
                backward,
                norm,
                update,
                end: ms(),
            },
        })
    }
}

/// The `--log-json` file: created, or when resuming at step `done`, kept up to that
/// step (lines a run wrote after its last checkpoint dropped) to be appended to.
pub fn open_log(path: &Path, done: Option<usize>) -> anyhow::Result<std::fs::File> {
    let ctx = || format!("--log-json {}", path.display());
    let keep = match (done, path.exists()) {
        (Some(done), true) => std::fs::read_to_string(path)
            .with_context(ctx)?
            .lines()
            .filter(|l| {
                let step = serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64());
                step.is_none_or(|s| s as usize <= done)
            })
            .map(|l| format!("{l}\n"))
            .collect(),
        _ => String::new(),
    };
    let mut file = std::fs::File::create(path).with_context(ctx)?;
    file.write_all(keep.as_bytes()).with_context(ctx)?;
    Ok(file)
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
