//! Where a training step's time goes, op by op (written when crosskv's step was
//! slower than PyTorch eager on the same shape).
//!
//!   cargo bench --features cuda --bench train_ops              (on a CUDA machine)
//!   cargo bench --bench train_ops -- --device cpu --tokens 64  (anywhere)
//!
//! The ops of one layer of `benches/train_throughput.rs`'s shape (hidden 768, 12 heads
//! of 64, FFN 2048, vocab 32000; 8 windows of 1024 tokens = 8192 rows; bf16), each
//! timed forward, and forward + backward (the gradient of the sum of its output times a
//! fixed random tensor), with the device synchronised around every run; medians of 5
//! after 2 warm-ups. Multiply a per-layer op by 12 layers to compare with a step.

mod common;
use common::median;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use clap::Parser;
use crosskv::ops;
use std::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    /// cpu or cuda[:N] (default: cuda with the cuda feature, else cpu).
    #[arg(long)]
    device: Option<String>,
    /// Rows (batch × sequence); a multiple of --seq.
    #[arg(long, default_value_t = 8192)]
    tokens: usize,
    /// Sequence length of the attention windows.
    #[arg(long, default_value_t = 1024)]
    seq: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const HIDDEN: usize = 768;
const HEADS: usize = 12;
const HEAD_DIM: usize = 64;
const FFN: usize = 2048;
const VOCAB: usize = 32000;

/// Median ms of `f` with the device synchronised around each run.
fn time(dev: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut runs = Vec::new();
    for i in 0..7 {
        dev.synchronize()?;
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        if i >= 2 {
            runs.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(runs))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = common::device(args.device.as_deref())?;
    let dt = if dev.is_cuda() { DType::BF16 } else { DType::F32 };
    let n = args.tokens;
    let b = n / args.seq;
    let rnd = |shape: &[usize], scale: f64| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, scale as f32, shape, &dev)?.to_dtype(dt)?)
    };
    let var = |shape: &[usize], scale: f64| -> Result<Var> { Ok(Var::from_tensor(&rnd(shape, scale)?)?) };
    // fwd, and fwd + bwd of Σ y ∘ g.
    let mut rows: Vec<(String, f64, f64)> = Vec::new();
    let mut measure = |name: &str, f: &dyn Fn() -> Result<Tensor>| -> Result<()> {
        let y = f()?;
        let g = Tensor::randn(0f32, 1.0, y.shape(), &dev)?.to_dtype(y.dtype())?;
        let fwd = time(&dev, || {
            f()?;
            Ok(())
        })?;
        let both = time(&dev, || {
            let y = f()?;
            (y * &g)?.to_dtype(DType::F32)?.sum_all()?.backward()?;
            Ok(())
        })?;
        rows.push((name.to_string(), fwd, both));
        Ok(())
    };

    let ids = Tensor::new(
        (0..n as u32)
            .map(|i| (i * 7919) % VOCAB as u32)
            .collect::<Vec<_>>()
            .as_slice(),
        &dev,
    )?;
    let table = var(&[VOCAB, HIDDEN], 0.02)?;
    measure("embedding (index_select)", &|| {
        Ok(table.as_tensor().index_select(&ids, 0)?)
    })?;

    let x = var(&[n, HIDDEN], 1.0)?;
    let r = var(&[n, HIDDEN], 1.0)?;
    let nw = var(&[HIDDEN], 0.1)?;
    measure("rms_norm", &|| Ok(ops::rms_norm(x.as_tensor(), nw.as_tensor(), 1e-5)?))?;
    measure("add_rms_norm", &|| {
        Ok(ops::add_rms_norm(x.as_tensor(), r.as_tensor(), nw.as_tensor(), 1e-5)?.1)
    })?;

    let wq = var(&[HIDDEN, HIDDEN], 0.02)?;
    measure("q/k/v/o matmul [8192,768]·[768,768]", &|| {
        Ok(x.as_tensor().matmul(&wq.as_tensor().t()?)?)
    })?;
    let wg = var(&[FFN, HIDDEN], 0.02)?;
    measure("gate/up matmul [8192,768]·[768,2048]", &|| {
        Ok(x.as_tensor().matmul(&wg.as_tensor().t()?)?)
    })?;
    let wd = var(&[HIDDEN, FFN], 0.02)?;
    let h = var(&[n, FFN], 1.0)?;
    measure("down matmul [8192,2048]·[2048,768]", &|| {
        Ok(h.as_tensor().matmul(&wd.as_tensor().t()?)?)
    })?;
    let u = var(&[n, FFN], 1.0)?;
    measure("silu(gate) · up [8192,2048]", &|| {
        Ok((candle_nn::ops::silu(h.as_tensor())? * u.as_tensor())?)
    })?;

    let q = var(&[n, HEADS, HEAD_DIM], 1.0)?;
    let k = var(&[n, HEADS, HEAD_DIM], 1.0)?;
    let v = var(&[n, HEADS, HEAD_DIM], 1.0)?;
    let positions = Tensor::new(
        (0..n as u32)
            .map(|i| i % args.seq as u32)
            .collect::<Vec<_>>()
            .as_slice(),
        &dev,
    )?;
    let cos = rnd(&[args.seq, HEAD_DIM / 2], 1.0)?;
    let sin = rnd(&[args.seq, HEAD_DIM / 2], 1.0)?;
    measure("rope (q and k)", &|| {
        let (q2, k2) = ops::rope(q.as_tensor(), Some(k.as_tensor()), &positions, &cos, &sin, false)?;
        Ok((q2 + k2.expect("k"))?)
    })?;
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    measure("causal attention [8,1024,12,64]", &|| {
        let s = |t: &Var| t.as_tensor().reshape((b, args.seq, HEADS, HEAD_DIM));
        Ok(ops::causal_attention(&s(&q)?, &s(&k)?, &s(&v)?, scale)?)
    })?;
    measure("attention output reshape + to_dtype", &|| {
        Ok(q.as_tensor().reshape((n, HEADS * HEAD_DIM))?.to_dtype(dt)?)
    })?;
    let head = var(&[VOCAB, HIDDEN], 0.02)?;
    let targets = Tensor::new(
        (0..n as u32)
            .map(|i| (i * 31) % VOCAB as u32)
            .collect::<Vec<_>>()
            .as_slice(),
        &dev,
    )?;
    measure("lm_head [8192,768]·[768,32000] + cross_entropy", &|| {
        let logits = x.as_tensor().matmul(&head.as_tensor().t()?)?;
        Ok(ops::cross_entropy(&logits, &targets)?)
    })?;
    let master = Var::from_tensor(&Tensor::randn(0f32, 0.02, (FFN, HIDDEN), &dev)?)?;
    measure("f32 master → bf16 cast [2048,768]", &|| {
        Ok(master.as_tensor().to_dtype(dt)?)
    })?;

    println!(
        "device {:?}, {dt:?}, {n} rows ({b} × {}), medians of 5",
        dev.location(),
        args.seq
    );
    println!("| op | forward ms | forward + backward ms |");
    println!("| --- | --- | --- |");
    for (name, f, fb) in rows {
        println!("| {name} | {f:.3} | {fb:.3} |");
    }
    Ok(())
}
