//! `crosskv train` / `finetune`: flags, resuming from a checkpoint, the step loop with its
//! progress bar, checkpoints every `--save-every` steps and at the end.

use super::SharingArgs;
use crate::config::ModelConfig;
use crate::device::{parse_device, DtypeArg};
use crate::model::{self, weights::Weights};
use crate::train::checkpoint::{self, dtype_name, parse_dtype, DataState, ResumeError, TrainerState};
use crate::train::{pack_windows, perplexity, Corpus, DataOrder, StepLog, TrainOptions, Trainable, Trainer};
use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::Args;
use std::path::{Path, PathBuf};

/// What `train` and `finetune` share. The options a run trains with are saved in its
/// checkpoints; with --resume they come from there (giving a different value is an error).
#[derive(Args, Debug)]
pub struct TrainFlags {
    /// Text files or directories of them: tokenized, packed into --seq-len windows, shuffled by --seed.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Output: a HF directory (config.json, model.safetensors, tokenizer files) that serve
    /// loads, plus optimizer.safetensors and trainer_state.json for --resume.
    #[arg(long)]
    pub out: PathBuf,
    /// Total optimizer steps, which the learning-rate schedule spans (default 100; with
    /// --resume, the resumed run's). 0 writes the initial model.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Windows per step (default 8).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Tokens per window (default 256).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Peak learning rate (default 3e-4).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warm-up steps (default: 5 % of --steps); then cosine decay to 10 % of --lr.
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Decoupled AdamW weight decay (default 0.1).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clip, 0 for none (default 1.0).
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// Seeds the initial weights (train), the held-out split and the window order (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Share of the windows held out: their perplexity is reported before and after (default 0.05).
    #[arg(long)]
    pub holdout: Option<f64>,
    /// cpu or cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype of the forward and backward passes; the weights stay f32 (default:
    /// bf16 on CUDA, f32 on the CPU; with --resume, the resumed run's).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Also write the checkpoint into --out every N steps (default: only at the end).
    #[arg(long)]
    pub save_every: Option<usize>,
    /// End this run after step N of --steps (checkpoint written; continue with --resume).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Continue the checkpoint in DIR (an --out of train/finetune): its weights, optimizer
    /// state, options and data position, up to --steps in total.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// One JSON line per step: step, loss, lr, grad_norm, tokens_per_s (appended to with --resume).
    #[arg(long)]
    pub log_json: Option<PathBuf>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The model's config.json (a CLA key such as cla_share_factor makes a CLA model).
    /// With --resume it may be left out (if given, it must describe the resumed model).
    #[arg(long, required_unless_present = "resume")]
    pub config: Option<PathBuf>,
    /// A tokenizer.json, or a directory holding one (its tokenizer_config.json too); with
    /// --resume, the checkpoint's by default.
    #[arg(long, required_unless_present = "resume")]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub train: TrainFlags,
}

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    /// A HF safetensors directory (with its tokenizer). With --resume it may be left out
    /// (if given, re-shared by the sharing flags it must be the resumed model).
    #[arg(long, required_unless_present = "resume")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub sharing: SharingArgs,
    /// How each re-shared producer's K/V projections start: its own (`first`), or the
    /// mean of those of the layers that will read its cache (`mean`).
    #[arg(long, value_enum, default_value = "first")]
    pub kv_init: crate::model::reshare::KvInit,
    #[command(flatten)]
    pub train: TrainFlags,
}

/// A checkpoint being continued.
struct Resume {
    dir: PathBuf,
    state: TrainerState,
}

fn open_resume(f: &TrainFlags, device: &Device) -> anyhow::Result<Option<(Resume, Trainable)>> {
    let Some(dir) = &f.resume else { return Ok(None) };
    let state = checkpoint::load_state(dir)?;
    let t = Trainable::from_saved(dir, device).with_context(|| format!("--resume {}", dir.display()))?;
    Ok(Some((
        Resume {
            dir: dir.clone(),
            state,
        },
        t,
    )))
}

/// How `given` differs from `saved` in what training depends on, if it does.
fn model_difference(given: &ModelConfig, saved: &ModelConfig) -> Option<String> {
    let ours: std::collections::HashMap<_, _> = Weights::expected_tensors(saved).into_iter().collect();
    let theirs = Weights::expected_tensors(given);
    for (name, shape) in &theirs {
        match ours.get(name) {
            None => return Some(format!("it has `{name}`, the checkpoint does not")),
            Some(s) if s != shape => return Some(format!("`{name}` is {shape:?} there, {s:?} in the checkpoint")),
            _ => {}
        }
    }
    if theirs.len() != ours.len() {
        return Some(format!(
            "{} tensors there, {} in the checkpoint",
            theirs.len(),
            ours.len()
        ));
    }
    if given.kv_source != saved.kv_source {
        return Some(format!(
            "kv_source {:?} there, {:?} in the checkpoint",
            given.kv_source, saved.kv_source
        ));
    }
    None
}

fn check_same_model(r: &Resume, t: &Trainable, what: &str, given: &ModelConfig) -> Result<(), ResumeError> {
    match model_difference(given, t.model.config()) {
        None => Ok(()),
        Some(d) => Err(ResumeError::Mismatch {
            dir: r.dir.clone(),
            reason: format!("a different model from {what} ({d})"),
        }),
    }
}

/// The directory of `--tokenizer` (a tokenizer.json or a directory holding one).
fn tokenizer_dir(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(match p.is_dir() {
        true => p.to_path_buf(),
        false if p.file_name().is_some_and(|n| n == "tokenizer.json") => {
            p.parent().map(PathBuf::from).unwrap_or_default()
        }
        false => bail!(
            "--tokenizer {}: expected a tokenizer.json or a directory holding one",
            p.display()
        ),
    })
}

/// `crosskv train`: random init of `--config` (or the `--resume` checkpoint), trained on `--data`.
pub fn train(args: &TrainArgs) -> anyhow::Result<()> {
    let f = &args.train;
    let device = parse_device(&f.device)?;
    let given = args.config.as_deref().map(ModelConfig::from_file).transpose()?;
    let (resume, t) = match (open_resume(f, &device)?, given) {
        (Some((r, t)), given) => {
            if let (Some(cfg), Some(p)) = (&given, &args.config) {
                check_same_model(&r, &t, &format!("--config {}", p.display()), cfg)?;
            }
            (Some(r), t)
        }
        (None, Some(cfg)) => (None, Trainable::random(&cfg, &device, f.seed.unwrap_or(0))?),
        (None, None) => bail!("--config is required (or --resume)"),
    };
    let tok_dir = match (&args.tokenizer, &resume) {
        (Some(p), _) => tokenizer_dir(p)?,
        (None, Some(r)) => r.dir.clone(),
        (None, None) => bail!("--tokenizer is required (or --resume)"),
    };
    let tok = model::Tok::from_dir(&tok_dir, &t.model.config().eos_token_ids)?;
    run(t, &tok, &tok_dir, f, resume, "train")
}

/// `crosskv finetune`: `--model` (re-shared first with the sharing flags), or the
/// `--resume` checkpoint, trained on `--data`.
pub fn finetune(args: &FinetuneArgs) -> anyhow::Result<()> {
    let f = &args.train;
    let device = parse_device(&f.device)?;
    let sharing = args.sharing.sharing()?;
    let (resume, t, tok_dir) = match open_resume(f, &device)? {
        Some((r, t)) => {
            let (what, mut cfg) = match &args.model {
                Some(m) => (
                    format!("--model {}", m.display()),
                    ModelConfig::from_file(&m.join("config.json"))?,
                ),
                None => ("the sharing flags".to_string(), t.model.config().clone()),
            };
            if let Some(s) = &sharing {
                cfg.reshare(s)?;
            }
            check_same_model(&r, &t, &what, &cfg)?;
            let dir = r.dir.clone();
            (Some(r), t, dir)
        }
        None => {
            let Some(m) = &args.model else {
                bail!("--model is required (or --resume)")
            };
            (None, Trainable::from_dir(m, sharing, args.kv_init, &device)?, m.clone())
        }
    };
    let tok = model::Tok::from_dir(&tok_dir, &t.model.config().eos_token_ids)?;
    run(t, &tok, &tok_dir, f, resume, "finetune")
}

/// The options a run trains with: the flags (or defaults), or the resumed run's.
struct Plan {
    opts: TrainOptions,
    seq_len: usize,
    holdout: f64,
}

fn plan(f: &TrainFlags, resume: Option<&Resume>, device: &Device) -> anyhow::Result<Plan> {
    /// `given` when fresh (else `default`); the saved value when resuming, which `given`
    /// must then equal.
    fn pick<T: PartialEq + std::fmt::Display + Copy>(
        flag: &str,
        given: Option<T>,
        saved: Option<(T, &Path)>,
        default: T,
    ) -> anyhow::Result<T> {
        match (given, saved) {
            (Some(g), Some((s, dir))) if g != s => bail!(
                "{flag} {g}: the run resumed from {} trains with {s}; a resumed run keeps its options",
                dir.display()
            ),
            (_, Some((s, _))) => Ok(s),
            (g, None) => Ok(g.unwrap_or(default)),
        }
    }
    let st = resume.map(|r| (&r.state, r.dir.as_path()));
    let steps = f.steps.or(st.map(|(s, _)| s.steps)).unwrap_or(100);
    let dtype = match (f.dtype, st) {
        (Some(d), _) => d.dtype(),
        (None, Some((s, _))) => parse_dtype(&s.dtype)?,
        (None, None) if device.is_cuda() => DType::BF16,
        (None, None) => DType::F32,
    };
    let opts = TrainOptions {
        steps,
        batch_size: pick("--batch-size", f.batch_size, st.map(|(s, d)| (s.batch_size, d)), 8)?,
        lr: pick("--lr", f.lr, st.map(|(s, d)| (s.lr, d)), 3e-4)?,
        warmup: pick(
            "--warmup",
            f.warmup,
            st.map(|(s, d)| (s.warmup, d)),
            (steps as f64 * 0.05).ceil() as usize,
        )?,
        weight_decay: pick(
            "--weight-decay",
            f.weight_decay,
            st.map(|(s, d)| (s.weight_decay, d)),
            0.1,
        )?,
        grad_clip: pick("--grad-clip", f.grad_clip, st.map(|(s, d)| (s.grad_clip, d)), 1.0)?,
        seed: pick("--seed", f.seed, st.map(|(s, d)| (s.seed, d)), 0)?,
        dtype,
    };
    let seq_len = pick("--seq-len", f.seq_len, st.map(|(s, d)| (s.seq_len, d)), 256)?;
    let holdout = pick("--holdout", f.holdout, st.map(|(s, d)| (s.holdout, d)), 0.05)?;
    let o = &opts;
    if !(0.0..1.0).contains(&holdout) {
        bail!("--holdout {holdout}: expected a share in [0, 1)");
    }
    let lr_ok = o.lr.is_finite() && o.lr > 0.0;
    if o.batch_size == 0 || !lr_ok || o.weight_decay < 0.0 || o.grad_clip < 0.0 {
        bail!("--batch-size must be at least 1, --lr positive, --weight-decay and --grad-clip not negative");
    }
    if f.save_every == Some(0) {
        bail!("--save-every must be at least 1");
    }
    Ok(Plan { opts, seq_len, holdout })
}

/// The progress bar on stderr (hidden when stderr is not a terminal).
fn progress_bar(steps: usize, done: usize) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::with_draw_target(Some(steps as u64), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {pos}/{len} {msg} eta {eta}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_position(done as u64);
    pb
}

fn run(
    t: Trainable,
    tok: &model::Tok,
    tok_dir: &Path,
    f: &TrainFlags,
    resume: Option<Resume>,
    command: &str,
) -> anyhow::Result<()> {
    let Plan { opts, seq_len, holdout } = plan(f, resume.as_ref(), t.model.device())?;
    let max = t.model.max_positions();
    if seq_len > max {
        bail!("--seq-len {seq_len}: longer than the model's {max} positions");
    }
    std::fs::create_dir_all(&f.out).with_context(|| format!("--out {}: cannot create it", f.out.display()))?;
    let corpus = Corpus::load(&f.data, tok)?;
    let mut windows = pack_windows(&corpus.tokens, seq_len)?;
    {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        windows.shuffle(&mut rand::rngs::StdRng::seed_from_u64(opts.seed));
    }
    let held = if holdout > 0.0 && windows.len() >= 2 {
        ((windows.len() as f64 * holdout).round() as usize).clamp(1, windows.len() - 1)
    } else {
        0
    };
    let (heldout, train_windows) = windows.split_at(held);
    let fingerprint = crate::train::data::fingerprint(train_windows);
    let mut trainer = match &resume {
        None => Trainer::new(&t, train_windows.len(), opts.clone())?,
        Some(r) => {
            let s = &r.state.data;
            if (s.windows, &s.fingerprint) != (train_windows.len(), &fingerprint) {
                return Err(ResumeError::Mismatch {
                    dir: r.dir.clone(),
                    reason: format!(
                        "--data differs from the resumed run's ({} training windows now, {} then, or other tokens)",
                        train_windows.len(),
                        s.windows
                    ),
                }
                .into());
            }
            if opts.steps < r.state.step {
                return Err(ResumeError::StepsBelow {
                    steps: opts.steps,
                    done: r.state.step,
                    dir: r.dir.clone(),
                }
                .into());
            }
            let order = DataOrder::at(s.windows, opts.seed, s.epoch, s.next).ok_or_else(|| ResumeError::Bad {
                path: r.dir.join(checkpoint::STATE_FILE),
                reason: format!("data position {} beyond its {} windows", s.next, s.windows),
            })?;
            let opt = checkpoint::load_optimizer(&r.dir, &t, &r.state)?;
            if opts.steps != r.state.steps {
                eprintln!(
                    "note: --steps {} differs from the {} the resumed run planned: the learning-rate schedule spans {} from here",
                    opts.steps, r.state.steps, opts.steps
                );
            }
            Trainer::resume(&t, opt, order, train_windows.len(), opts.clone())?
        }
    };
    let done = trainer.step_done();
    let stop = match f.stop_after {
        Some(n) if n <= done => bail!("--stop-after {n}: the run is already at step {done}"),
        Some(n) => n.min(opts.steps),
        None => opts.steps,
    };
    let mut log_file = f
        .log_json
        .as_deref()
        .map(|p| crate::train::trainer::open_log(p, resume.as_ref().map(|_| done)))
        .transpose()?;
    let state_now = |trainer: &Trainer| {
        let (epoch, next) = trainer.data_position();
        TrainerState {
            command: command.to_string(),
            step: trainer.step_done(),
            steps: opts.steps,
            lr: opts.lr,
            warmup: opts.warmup,
            weight_decay: opts.weight_decay,
            grad_clip: opts.grad_clip,
            batch_size: opts.batch_size,
            seq_len,
            seed: opts.seed,
            holdout,
            dtype: dtype_name(opts.dtype).to_string(),
            data: DataState {
                windows: train_windows.len(),
                fingerprint: fingerprint.clone(),
                epoch,
                next,
            },
        }
    };

    // Perplexity of the f32 weights on at most 64 held-out windows, before and after.
    let eval_set = &heldout[..heldout.len().min(64)];
    let ppl = |t: &Trainable| -> anyhow::Result<Option<f64>> {
        Ok(match eval_set.is_empty() {
            true => None,
            false => Some(perplexity(&t.model, eval_set, |_, _| {})?.perplexity),
        })
    };
    let pb = progress_bar(opts.steps, done);
    pb.set_message("held-out perplexity…");
    let before = ppl(&t)?;
    pb.reset_eta();
    let plain = !f.json && !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (start, mut tokens, mut last_line) = (std::time::Instant::now(), 0usize, std::time::Instant::now());
    let mut logs: Vec<StepLog> = Vec::new();
    while trainer.step_done() < stop {
        let rec = trainer.step(&t, train_windows)?;
        tokens += opts.batch_size * seq_len;
        let tok_s = tokens as f64 / start.elapsed().as_secs_f64();
        pb.set_message(format!("loss {:.4} lr {:.2e} {tok_s:.0} tok/s", rec.loss, rec.lr));
        pb.set_position(rec.step as u64);
        // No terminal (a log file): a plain line every 10 s and at the end instead.
        if plain && (last_line.elapsed().as_secs() >= 10 || rec.step == stop) {
            eprintln!(
                "step {}/{}  loss {:.4}  lr {:.2e}  grad norm {:.3}  {tok_s:.0} tok/s",
                rec.step, opts.steps, rec.loss, rec.lr, rec.grad_norm
            );
            last_line = std::time::Instant::now();
        }
        if let Some(file) = log_file.as_mut() {
            crate::train::trainer::write_log_line(file, &rec).context("writing --log-json")?;
        }
        if f.save_every.is_some_and(|n| rec.step % n == 0) && rec.step < stop {
            checkpoint::save(&f.out, &t, &trainer, &state_now(&trainer), tok_dir)?;
        }
        logs.push(rec);
    }
    let after = ppl(&t)?;
    pb.finish();
    if !pb.is_hidden() {
        eprintln!();
    }
    checkpoint::save(&f.out, &t, &trainer, &state_now(&trainer), tok_dir)?;
    let step = trainer.step_done();
    if f.json {
        println!(
            "{}",
            serde_json::json!({"steps": logs.len(), "step": step, "total_steps": opts.steps,
                "resumed_from": resume.as_ref().map(|_| done), "final_loss": logs.last().map(|l| l.loss),
                "parameters": t.parameters(), "dtype": dtype_name(opts.dtype),
                "train_windows": train_windows.len(), "heldout_windows": eval_set.len(), "seq_len": seq_len,
                "heldout_perplexity_before": before, "heldout_perplexity_after": after, "out": f.out})
        );
    } else {
        println!(
            "{} parameters, steps {}..{} of {} on {} windows of {} tokens ({}); held-out perplexity {} → {}; wrote {}",
            t.parameters(),
            done,
            step,
            opts.steps,
            train_windows.len(),
            seq_len,
            dtype_name(opts.dtype),
            before.map_or("-".into(), |p| format!("{p:.3}")),
            after.map_or("-".into(), |p| format!("{p:.3}")),
            f.out.display()
        );
    }
    Ok(())
}
