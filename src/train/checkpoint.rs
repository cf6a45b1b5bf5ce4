//! Resumable checkpoints: a HF directory that `serve` loads (config.json, f32
//! model.safetensors, tokenizer files) plus `optimizer.safetensors` (AdamW moments and
//! step) and `trainer_state.json` (the step, the options the run continues with, the
//! data order's position). Each file is written beside its name and renamed over it,
//! the state last, so a crash mid-save leaves the previous checkpoint readable.

use super::adamw::{AdamW, AdamWParams};
use super::files::replace_file;
use super::trainer::{Trainable, Trainer};
use candle_core::DType;
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Where the data order stands, and which data it is for.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DataState {
    /// Training windows (after the held-out split).
    pub windows: usize,
    /// `data::fingerprint` of them.
    pub fingerprint: String,
    pub epoch: usize,
    /// Windows drawn in this epoch.
    pub next: usize,
}

/// `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    /// `train` or `finetune`.
    pub command: String,
    /// Steps done.
    pub step: usize,
    /// The total the learning-rate schedule spans.
    pub steps: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub batch_size: usize,
    pub seq_len: usize,
    pub seed: u64,
    pub holdout: f64,
    /// Compute dtype: f32, bf16 or f16.
    pub dtype: String,
    pub data: DataState,
}

#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("--resume {0}: no such directory")]
    NoDir(PathBuf),
    #[error("--resume {dir}: no {file} in it (not a checkpoint that crosskv train/finetune wrote)")]
    NoFile { dir: PathBuf, file: &'static str },
    #[error("--resume {path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error("--resume {dir}: {reason}")]
    Mismatch { dir: PathBuf, reason: String },
    #[error("--steps {steps}: the checkpoint in {dir} is already at step {done}")]
    StepsBelow { steps: usize, done: usize, dir: PathBuf },
}

/// A compute dtype as `trainer_state.json` writes it.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        d => anyhow::bail!("{STATE_FILE}: dtype `{d}`: expected f32, bf16 or f16"),
    })
}

/// A full checkpoint of the run into `out`, the tokenizer files copied from `tok_dir`
/// (which may be `out` itself).
pub fn save(out: &Path, t: &Trainable, trainer: &Trainer, state: &TrainerState, tok_dir: &Path) -> anyhow::Result<()> {
    t.save(out)?;
    for name in crate::model::reshare::TOKENIZER_FILES {
        let src = tok_dir.join(name);
        if src.exists() {
            replace_file(&out.join(name), |tmp| {
                std::fs::copy(&src, tmp).map_err(|e| anyhow::anyhow!("copying {}: {e}", src.display()))?;
                Ok(())
            })?;
        }
    }
    replace_file(&out.join(OPTIMIZER_FILE), |tmp| {
        trainer.optimizer().save(tmp)?;
        Ok(())
    })?;
    replace_file(&out.join(STATE_FILE), |tmp| {
        std::fs::write(tmp, serde_json::to_string_pretty(state)?)?;
        Ok(())
    })
}

/// The trainer state in `dir`, checked to be a complete checkpoint.
pub fn load_state(dir: &Path) -> Result<TrainerState, ResumeError> {
    if !dir.is_dir() {
        return Err(ResumeError::NoDir(dir.to_path_buf()));
    }
    for file in ["config.json", "model.safetensors", OPTIMIZER_FILE, STATE_FILE] {
        if !dir.join(file).is_file() {
            return Err(ResumeError::NoFile {
                dir: dir.to_path_buf(),
                file,
            });
        }
    }
    let path = dir.join(STATE_FILE);
    let bad = |reason: String| ResumeError::Bad {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if state.step > state.steps || state.batch_size == 0 {
        return Err(bad(format!(
            "step {} of {} with batch size {}: not a state this program writes",
            state.step, state.steps, state.batch_size
        )));
    }
    Ok(state)
}

/// The optimizer state in `dir` for `t`'s variables, at `state.step`.
pub fn load_optimizer(dir: &Path, t: &Trainable, state: &TrainerState) -> Result<AdamW, ResumeError> {
    let path = dir.join(OPTIMIZER_FILE);
    let opt = AdamW::load(t.vars(), AdamWParams::new(state.lr, state.weight_decay), &path).map_err(|e| {
        ResumeError::Mismatch {
            dir: dir.to_path_buf(),
            reason: format!("{OPTIMIZER_FILE}: {e}"),
        }
    })?;
    if opt.steps_done() != state.step {
        return Err(ResumeError::Mismatch {
            dir: dir.to_path_buf(),
            reason: format!(
                "{OPTIMIZER_FILE} is at step {} but {STATE_FILE} at step {} (a checkpoint cut short?)",
                opt.steps_done(),
                state.step
            ),
        });
    }
    Ok(opt)
}
