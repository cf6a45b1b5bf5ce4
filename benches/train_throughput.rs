//! Training throughput and model FLOPs utilisation: crosskv's own
//! `Trainer` (batched forward, autograd, gradient clipping, AdamW; bf16 compute with f32
//! master weights on CUDA) on a ~125M-parameter LLaMA shape with random init and random
//! token windows. PyTorch on the same shape, eager and `torch.compile`:
//! `python3 benches/train_throughput_torch.py`; both side by side on the GPU machine:
//! `scripts/gpu-bench.sh train`.
//!
//!   cargo bench --features cuda --bench train_throughput             (on a CUDA machine)
//!   cargo bench --bench train_throughput -- --tiny --device cpu      (a tiny shape, anywhere)
//!
//! Shape: hidden 768, 12 layers, 12 heads of 64, FFN 2048, vocab 32000 (untied lm_head),
//! sequence 1024, batch 8; MHA (12 KV heads) and CLA2 (consumers have no K/V
//! projections). Each step is timed on the host from before `Trainer::step` to after a
//! device synchronize; warm-up steps are excluded from the summary (median and mean).
//!
//! MFU = model FLOPs per token × tokens/s ÷ peak (989.4 TFLOP/s: H100 SXM dense bf16).
//! Model FLOPs per token = 6·N + 12·layers·seq·hidden, N the matmul parameters (every
//! projection and the lm_head; not the embedding or the norms), the second term the
//! attention scores and their product with V, the causal mask counted in full as PaLM
//! (appendix B) does.

mod common;

use anyhow::{bail, Result};
use candle_core::DType;
use clap::Parser;
use crosskv::config::ModelConfig;
use crosskv::device::DtypeArg;
use crosskv::train::{TrainOptions, Trainable, Trainer};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::time::Instant;

/// Training tokens/s and MFU of crosskv's trainer on a ~125M LLaMA shape.
#[derive(Parser, Debug)]
struct Args {
    /// A tiny shape (2 layers, hidden 64, vocab 512, seq 32): for testing on a CPU.
    #[arg(long)]
    tiny: bool,
    /// cpu or cuda[:N] (default: cuda with the cuda feature, else cpu).
    #[arg(long)]
    device: Option<String>,
    /// Compute dtype (default bf16 on CUDA, f32 on the CPU); the variables stay f32.
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long)]
    seq: Option<usize>,
    /// Timed steps per variant.
    #[arg(long)]
    steps: Option<usize>,
    /// Untimed steps first (kernel loading, allocator warm-up).
    #[arg(long)]
    warmup: Option<usize>,
    /// Comma-separated: mha, cla2.
    #[arg(long, default_value = "mha,cla2")]
    variants: String,
    /// Dense bf16 peak of the GPU, TFLOP/s (H100 SXM: 989.4).
    #[arg(long, default_value_t = 989.4)]
    peak_tflops: f64,
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy)]
struct Shape {
    hidden: usize,
    layers: usize,
    heads: usize,
    head_dim: usize,
    ffn: usize,
    vocab: usize,
}

impl Shape {
    fn config(&self, kv_heads: usize, cla: usize, seq: usize) -> Result<ModelConfig> {
        Ok(ModelConfig::from_json(json!({
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": seq,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
            "cla_share_factor": cla,
        }))?)
    }
}

/// Matmul parameters: Q and O of every layer, K and V of the producers, the MLP, the lm_head.
fn matmul_params(s: &Shape, kv_heads: usize, cla: usize) -> usize {
    let (h, q) = (s.hidden, s.heads * s.head_dim);
    let producers = s.layers.div_ceil(cla.max(1));
    s.layers * (2 * h * q + 3 * h * s.ffn) + producers * 2 * h * kv_heads * s.head_dim + h * s.vocab
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dev = common::device(a.device.as_deref())?;
    let dtype = a
        .dtype
        .map(DtypeArg::dtype)
        .unwrap_or(if dev.is_cpu() { DType::F32 } else { DType::BF16 });
    let t = a.tiny;
    let shape = if t {
        Shape {
            hidden: 64,
            layers: 2,
            heads: 4,
            head_dim: 16,
            ffn: 128,
            vocab: 512,
        }
    } else {
        Shape {
            hidden: 768,
            layers: 12,
            heads: 12,
            head_dim: 64,
            ffn: 2048,
            vocab: 32000,
        }
    };
    let batch = a.batch.unwrap_or(8);
    let seq = a.seq.unwrap_or(if t { 32 } else { 1024 });
    let steps = a.steps.unwrap_or(if t { 3 } else { 10 });
    let warmup = a.warmup.unwrap_or(if t { 1 } else { 3 });
    if batch == 0 || seq == 0 || steps == 0 {
        bail!("--batch, --seq and --steps must be at least 1");
    }
    println!(
        "crosskv train throughput: device {:?}, compute {dtype:?} (f32 master weights), batch {batch}, seq {seq}, \
         {warmup} warm-up + {steps} timed steps; MFU against {} TFLOP/s; model FLOPs/token = 6·N_matmul + \
         12·layers·seq·hidden (attention counted in full under the causal mask, as PaLM)",
        dev.location(),
        a.peak_tflops
    );
    let mut summary = Vec::new();
    for variant in a.variants.split(',').map(str::trim) {
        let (kv_heads, cla) = match variant {
            "mha" => (shape.heads, 1),
            "cla2" => (shape.heads, 2),
            v => bail!("--variants: unknown `{v}` (mha, cla2)"),
        };
        let cfg = shape.config(kv_heads, cla, seq)?;
        let n_matmul = matmul_params(&shape, kv_heads, cla);
        let flops_per_token = 6.0 * n_matmul as f64 + 12.0 * (shape.layers * seq * shape.hidden) as f64;
        let model = Trainable::random(&cfg, &dev, a.seed)?;
        // Random windows of seq + 1 tokens, as many as the run draws (each step new ones).
        let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed + 1);
        let windows: Vec<Vec<u32>> = (0..batch * (warmup + steps))
            .map(|_| (0..=seq).map(|_| rng.random_range(0..shape.vocab as u32)).collect())
            .collect();
        let opts = TrainOptions {
            steps: warmup + steps,
            batch_size: batch,
            lr: a.lr,
            warmup: 1,
            weight_decay: 0.1,
            grad_clip: 1.0,
            seed: a.seed,
            dtype,
        };
        let mut trainer = Trainer::new(&model, windows.len(), opts)?;
        println!(
            "\n{variant}: {:.1}M parameters ({:.1}M in matmuls), {:.3} GFLOP/token",
            model.parameters() as f64 / 1e6,
            n_matmul as f64 / 1e6,
            flops_per_token / 1e9
        );
        println!(
            "| {variant} step | loss | grad norm | ms | tokens/s | MFU | host ms at: forward issued / backward issued / \
             norm back / update issued / loss back / step returned |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        let tokens = (batch * seq) as f64;
        let mut timed = Vec::new();
        for i in 0..warmup + steps {
            dev.synchronize()?;
            let start = Instant::now();
            let log = trainer.step(&model, &windows)?;
            let returned = start.elapsed().as_secs_f64() * 1e3;
            dev.synchronize()?;
            let s = start.elapsed().as_secs_f64();
            let tps = tokens / s;
            let mfu = flops_per_token * tps / (a.peak_tflops * 1e12);
            let note = if i < warmup { " (warm-up)" } else { "" };
            let p = log.phases;
            println!(
                "| {}{note} | {:.4} | {:.3} | {:.1} | {tps:.0} | {:.1} % | {:.1} / {:.1} / {:.1} / {:.1} / {:.1} / {returned:.1} |",
                log.step,
                log.loss,
                log.grad_norm,
                s * 1e3,
                100.0 * mfu,
                p.forward,
                p.backward,
                p.norm,
                p.update,
                p.end
            );
            if i >= warmup {
                timed.push(s);
            }
        }
        let med = common::median(timed.clone());
        let mean = timed.iter().sum::<f64>() / timed.len() as f64;
        let mfu = |s: f64| 100.0 * flops_per_token * tokens / s / (a.peak_tflops * 1e12);
        summary.push(format!(
            "| crosskv | {variant} | {batch} | {seq} | {:.1} | {:.0} | {:.1} % | {:.0} | {:.1} % |",
            med * 1e3,
            tokens / med,
            mfu(med),
            tokens / mean,
            mfu(mean)
        ));
        drop(trainer);
        drop(model);
        dev.synchronize()?;
    }
    println!("\n| engine | model | batch | seq | median ms/step | tokens/s (median) | MFU (median) | tokens/s (mean) | MFU (mean) |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in summary {
        println!("{row}");
    }
    Ok(())
}
