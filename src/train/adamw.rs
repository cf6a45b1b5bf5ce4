//! AdamW whose state can be saved and loaded (candle_nn's keeps its moments private).
//! The same math as `candle_nn::AdamW`: bias-corrected moments, decoupled weight decay
//! `θ ← θ·(1 − lr·wd)`, then `θ ← θ − lr·m̂ / (√v̂ + eps)`. A variable with no gradient
//! this step is left alone, its moments too. Each variable's update is two fused in-place
//! ops (`ops::adamw_update`; one kernel each on CUDA) rather than ~15 candle ops and
//! their temporaries: the optimizer step is memory-bound, and at ~150 tensors a step the
//! launches add up.

use crate::ops::adamw::Scalars;
use crate::ops::{adamw_update, adamw_update_mixed_many};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWParams {
    /// The paper's settings: β = (0.9, 0.95), eps 1e-8.
    pub fn new(lr: f64, weight_decay: f64) -> Self {
        AdamWParams {
            lr,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
        }
    }
}

struct Slot {
    name: String,
    /// The f32 master weight (what is saved and what the moments belong to).
    var: Var,
    /// Mixed precision: the variable the model computes with (bf16/f16), rewritten from
    /// the master by every update; the gradients are this copy's.
    copy: Option<Var>,
    /// First and second moments (PyTorch's `exp_avg`, `exp_avg_sq`) in one f32 tensor,
    /// `[2, …var's dims]`: the fused update writes both in one pass.
    mv: Tensor,
}

impl Slot {
    fn m(&self) -> Result<Tensor> {
        self.mv.get(0)
    }
    fn v(&self) -> Result<Tensor> {
        self.mv.get(1)
    }
}

pub struct AdamW {
    slots: Vec<Slot>,
    /// Updates done (the bias correction's t).
    step: usize,
    pub params: AdamWParams,
}

/// Why saved optimizer state does not fit the model being trained.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{0}")]
    Read(String),
    #[error("no moments for `{0}` (the optimizer state is for a different model)")]
    Missing(String),
    #[error("`{name}` has moments of shape {saved:?}, the model {model:?} (a different model)")]
    Shape {
        name: String,
        saved: Vec<usize>,
        model: Vec<usize>,
    },
    #[error("moments for `{0}`, which the model does not have (a different model)")]
    Extra(String),
}

const M: &str = "exp_avg.";
const V: &str = "exp_avg_sq.";
const STEP: &str = "step";

impl AdamW {
    /// Fresh state (zero moments, step 0) for the float variables in `vars`.
    pub fn new(vars: &[(String, Var)], params: AdamWParams) -> Result<Self> {
        let slots = vars
            .iter()
            .filter(|(_, v)| v.dtype().is_float())
            .map(|(name, var)| {
                let mut dims = vec![2];
                dims.extend_from_slice(var.dims());
                Ok(Slot {
                    name: name.clone(),
                    var: var.clone(),
                    copy: None,
                    mv: Tensor::zeros(dims, DType::F32, var.device())?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW { slots, step: 0, params })
    }

    /// Mixed precision: each master gets a compute copy in `dtype` (bf16/f16), which
    /// [`AdamW::compute_vars`] hands to the model and every update rewrites from the
    /// master; the masters' own f32→`dtype` casts and their gradients' casts back drop
    /// out of the step. F32 keeps the masters as the compute variables.
    pub fn keep_compute_copies(&mut self, dtype: DType) -> Result<()> {
        for s in self.slots.iter_mut() {
            s.copy = match dtype {
                DType::F32 => None,
                DType::BF16 | DType::F16 => Some(Var::from_tensor(&s.var.as_tensor().to_dtype(dtype)?)?),
                d => candle_core::bail!("compute dtype {d:?}: f32, bf16 or f16 only"),
            };
        }
        Ok(())
    }

    /// The variables the model computes with, by name: the compute copies, or the masters.
    pub fn compute_vars(&self) -> Vec<(String, Var)> {
        self.slots
            .iter()
            .map(|s| (s.name.clone(), s.copy.clone().unwrap_or_else(|| s.var.clone())))
            .collect()
    }

    /// Updates done so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_scaled(grads, 1.0)
    }

    /// [`AdamW::step`] on the gradients times `grad_scale` (gradient clipping's factor),
    /// exactly as if they had been scaled first, without writing scaled copies.
    pub fn step_scaled(&mut self, grads: &GradStore, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let scalars =
            Scalars::new(p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, self.step).with_grad_scale(grad_scale);
        // Mixed precision: every variable in one update call (one launch on CUDA).
        let mut mixed = Vec::new();
        for s in &self.slots {
            match &s.copy {
                Some(copy) => {
                    if let Some(g) = grads.get(copy.as_tensor()) {
                        mixed.push((s.var.as_tensor(), &s.mv, copy.as_tensor(), g));
                    }
                }
                None => {
                    if let Some(g) = grads.get(s.var.as_tensor()) {
                        adamw_update(s.var.as_tensor(), &s.mv, g, &scalars)?;
                    }
                }
            }
        }
        adamw_update_mixed_many(&mixed, &scalars)
    }

    /// The moments (`exp_avg.NAME`, `exp_avg_sq.NAME`) and the step count, as safetensors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut t: HashMap<String, Tensor> = HashMap::new();
        for s in &self.slots {
            t.insert(format!("{M}{}", s.name), s.m()?);
            t.insert(format!("{V}{}", s.name), s.v()?);
        }
        t.insert(STEP.into(), Tensor::new(&[self.step as i64], &Device::Cpu)?);
        candle_core::safetensors::save(&t, path)
    }

    /// State saved by [`AdamW::save`] for exactly these variables (same names and shapes).
    pub fn load(vars: &[(String, Var)], params: AdamWParams, path: &Path) -> std::result::Result<Self, StateError> {
        let read = |e: candle_core::Error| StateError::Read(format!("{}: {e}", path.display()));
        let mut saved = candle_core::safetensors::load(path, &Device::Cpu).map_err(read)?;
        let step = saved
            .remove(STEP)
            .ok_or_else(|| StateError::Read(format!("{}: no `step`", path.display())))?
            .flatten_all()
            .and_then(|s| s.to_dtype(DType::I64))
            .and_then(|s| s.to_vec1::<i64>())
            .map_err(read)?;
        let step = match step.as_slice() {
            [s] if *s >= 0 => *s as usize,
            _ => return Err(StateError::Read(format!("{}: a bad `step`", path.display()))),
        };
        let mut opt = AdamW::new(vars, params).map_err(read)?;
        for s in opt.slots.iter_mut() {
            let mut mv = Vec::with_capacity(2);
            for prefix in [M, V] {
                let key = format!("{prefix}{}", s.name);
                let t = saved.remove(&key).ok_or_else(|| StateError::Missing(s.name.clone()))?;
                if t.dims() != s.var.dims() {
                    return Err(StateError::Shape {
                        name: s.name.clone(),
                        saved: t.dims().to_vec(),
                        model: s.var.dims().to_vec(),
                    });
                }
                mv.push(t);
            }
            s.mv = Tensor::stack(&mv, 0)
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.to_device(s.var.device()))
                .map_err(read)?;
        }
        if let Some(extra) = saved.keys().min() {
            let name = extra.strip_prefix(V).or(extra.strip_prefix(M)).unwrap_or(extra);
            return Err(StateError::Extra(name.to_string()));
        }
        opt.step = step;
        Ok(opt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::Optimizer;

    fn vars(seed: f32) -> Vec<(String, Var)> {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 12.0, &dev).unwrap().reshape((3, 4)).unwrap();
        let b = Tensor::new(&[0.5f32, -1.5, 2.0], &dev).unwrap();
        vec![
            (
                "a".into(),
                Var::from_tensor(&((a * 0.1).unwrap() + seed as f64).unwrap()).unwrap(),
            ),
            ("b".into(), Var::from_tensor(&b).unwrap()),
        ]
    }

    fn loss(v: &[(String, Var)]) -> Tensor {
        let a = v[0].1.as_tensor();
        let b = v[1].1.as_tensor();
        let x = a.sqr().unwrap().sum_all().unwrap();
        let y = a.sum(1).unwrap().mul(b).unwrap().sin().unwrap().sum_all().unwrap();
        (x + y).unwrap()
    }

    #[test]
    fn same_updates_as_candle_adamw() {
        let (ours, theirs) = (vars(0.3), vars(0.3));
        let p = AdamWParams::new(0.05, 0.1);
        let mut a = AdamW::new(&ours, p).unwrap();
        let mut b = candle_nn::AdamW::new(
            theirs.iter().map(|(_, v)| v.clone()).collect(),
            candle_nn::ParamsAdamW {
                lr: p.lr,
                beta1: p.beta1,
                beta2: p.beta2,
                eps: p.eps,
                weight_decay: p.weight_decay,
            },
        )
        .unwrap();
        for step in 0..5 {
            let lr = 0.05 / (step + 1) as f64;
            a.set_learning_rate(lr);
            b.set_learning_rate(lr);
            a.step(&loss(&ours).backward().unwrap()).unwrap();
            b.step(&loss(&theirs).backward().unwrap()).unwrap();
        }
        for ((_, x), (_, y)) in ours.iter().zip(&theirs) {
            let (x, y) = (x.flatten_all().unwrap(), y.flatten_all().unwrap());
            assert_eq!(x.to_vec1::<f32>().unwrap(), y.to_vec1::<f32>().unwrap());
        }
    }

    #[test]
    fn a_scaled_step_equals_a_step_on_scaled_gradients() {
        let (ours, theirs) = (vars(0.2), vars(0.2));
        let p = AdamWParams::new(0.05, 0.1);
        let (mut a, mut b) = (AdamW::new(&ours, p).unwrap(), AdamW::new(&theirs, p).unwrap());
        for step in 0..4 {
            let scale = [1.0, 0.3, 0.07, 1.0][step];
            a.step_scaled(&loss(&ours).backward().unwrap(), scale).unwrap();
            let mut grads = loss(&theirs).backward().unwrap();
            for (_, v) in &theirs {
                let g = (grads.get(v.as_tensor()).unwrap() * scale).unwrap();
                grads.insert(v.as_tensor(), g);
            }
            b.step(&grads).unwrap();
        }
        for ((_, x), (_, y)) in ours.iter().zip(&theirs) {
            let (x, y) = (x.flatten_all().unwrap(), y.flatten_all().unwrap());
            assert_eq!(x.to_vec1::<f32>().unwrap(), y.to_vec1::<f32>().unwrap());
        }
    }

    /// Mixed precision: the masters move exactly as f32 AdamW moves them on the same
    /// (bf16) gradients, and the compute copies are the masters rounded to bf16.
    #[test]
    fn compute_copies_follow_the_masters() {
        let (mixed, plain) = (vars(0.4), vars(0.4));
        let p = AdamWParams::new(0.05, 0.1);
        let (mut a, mut b) = (AdamW::new(&mixed, p).unwrap(), AdamW::new(&plain, p).unwrap());
        a.keep_compute_copies(DType::BF16).unwrap();
        let copies = a.compute_vars();
        assert!(copies.iter().all(|(_, v)| v.dtype() == DType::BF16));
        for _ in 0..3 {
            let grads = loss(&copies).backward().unwrap();
            let mut as_f32 = loss(&plain).backward().unwrap();
            for ((_, c), (_, v)) in copies.iter().zip(&plain) {
                let g = grads.get(c.as_tensor()).unwrap();
                assert_eq!(g.dtype(), DType::BF16);
                as_f32.insert(v.as_tensor(), g.to_dtype(DType::F32).unwrap());
            }
            a.step_scaled(&grads, 0.5).unwrap();
            b.step_scaled(&as_f32, 0.5).unwrap();
        }
        let start = vars(0.4);
        for (i, (_, m)) in mixed.iter().enumerate() {
            let flat = |t: &Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(flat(m.as_tensor()), flat(plain[i].1.as_tensor()));
            assert_eq!(
                flat(copies[i].1.as_tensor()),
                flat(&m.as_tensor().to_dtype(DType::BF16).unwrap())
            );
            assert_ne!(
                flat(m.as_tensor()),
                flat(start[i].1.as_tensor()),
                "the update moved nothing"
            );
        }
    }

    #[test]
    fn saved_and_loaded_state_continues_identically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optimizer.safetensors");
        let p = AdamWParams::new(0.05, 0.1);
        let straight = vars(0.7);
        let mut a = AdamW::new(&straight, p).unwrap();
        let split = vars(0.7);
        let mut b = AdamW::new(&split, p).unwrap();
        for _ in 0..3 {
            a.step(&loss(&straight).backward().unwrap()).unwrap();
            b.step(&loss(&split).backward().unwrap()).unwrap();
        }
        b.save(&path).unwrap();
        let mut b = AdamW::load(&split, p, &path).unwrap();
        assert_eq!(b.steps_done(), 3);
        for _ in 0..3 {
            a.step(&loss(&straight).backward().unwrap()).unwrap();
            b.step(&loss(&split).backward().unwrap()).unwrap();
        }
        for ((_, x), (_, y)) in straight.iter().zip(&split) {
            let (x, y) = (x.flatten_all().unwrap(), y.flatten_all().unwrap());
            assert_eq!(x.to_vec1::<f32>().unwrap(), y.to_vec1::<f32>().unwrap());
        }
        // Another model's variables do not fit this state.
        let other = vec![("a".to_string(), Var::zeros((2, 2), DType::F32, &Device::Cpu).unwrap())];
        let e = AdamW::load(&other, p, &path).err().unwrap().to_string();
        assert!(e.contains("different model") && e.contains("`a`"), "{e}");
        let fewer = vec![straight[0].clone()];
        let e = AdamW::load(&fewer, p, &path).err().unwrap().to_string();
        assert!(e.contains("`b`") && e.contains("does not have"), "{e}");
    }
}
