//! End-to-end decode and measured capacity (BENCHMARKS.md, "CUDA end-to-end decode" and
//! "KV capacity").
//!
//!   cargo bench --features cuda --bench e2e_decode                (on a CUDA machine)
//!   cargo bench --bench e2e_decode -- --tiny --device cpu         (a tiny shape, anywhere)
//!
//! Models: the CLA paper's 1B shapes with random bf16 weights made on the device
//! (`Weights::random`): hidden 2048, FFN 5472, 20 layers, 16 query heads of 128,
//! vocab 50304; H128-MQA (1 KV head), H128-MQA-CLA2 (cla_share_factor 2: consumers have
//! no k/v projections), and for capacity also the MHA pair (16 KV heads).
//!
//! **e2e**: for each model, batch and context, every sequence gets blocks for
//! `context + warm-up + steps` tokens, the whole KV cache is filled with random values
//! (no prefill: a decode step costs the same whatever wrote the cache), then `warm-up`
//! and `steps` timed decode steps run: `Runner::step` with one new token per sequence
//! at position `context + i`, then what the engine does with the logits
//! (`runner::fetch_logits`: greedy rows take the device's argmax, others are copied
//! whole; one `Sampler` per sequence; greedy unless `--temperature`). The device is synchronized before the step, after the forward
//! and after sampling; medians are reported. Roofline: bytes a step must read (every
//! linear and lm_head, the norms, one embedding row per sequence; K and V of every
//! layer's slot at the step's context: a CLA consumer reads its producer's slot again)
//! over the device-to-device copy bandwidth measured in this process (read + write
//! counted, as benches/decode_attention.rs does).
//!
//! **capacity**: under one fixed KV budget (the engine's accounting:
//! `KvLayout::capacity` gives the blocks the budget buys and the computed max
//! concurrency), sequences of `context + warm-up + steps` tokens are admitted into a
//! `KvManager` of that many blocks until allocation fails; the measured and computed
//! maxima must be equal (the binary exits non-zero otherwise); the max batch is then
//! decoded as above.

mod common;
use common::median;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, ValueEnum};
use crosskv::config::ModelConfig;
use crosskv::device::DtypeArg;
use crosskv::kv::{KvCache, KvManager};
use crosskv::model::weights::Weights;
use crosskv::model::Model;
use crosskv::runner::{fetch_logits, Runner, Sampler, SamplingParams, SeqStep};
use crosskv::units::{format_bytes, parse_size};
use serde_json::{json, Value};
use std::io::Write;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Mode {
    E2e,
    Capacity,
    All,
}

/// End-to-end decode and measured capacity of the CLA paper's 1B shapes (random weights).
#[derive(Parser, Debug)]
struct Args {
    /// A tiny shape (4 layers, hidden 64) with small defaults: for testing on a CPU.
    #[arg(long)]
    tiny: bool,
    /// cpu or cuda[:N] (default: cuda with the cuda feature, else cpu).
    #[arg(long)]
    device: Option<String>,
    /// Weights, activations and KV dtype (default: bf16 on CUDA, f32 on CPU).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    #[arg(long, value_enum, default_value = "all")]
    mode: Mode,
    /// e2e batches (default 1,64,256; tiny 1,4).
    #[arg(long, value_delimiter = ',')]
    batches: Option<Vec<usize>>,
    /// e2e contexts (default 512,1024,2048,4096; tiny 32,64).
    #[arg(long, value_delimiter = ',')]
    contexts: Option<Vec<usize>>,
    /// Timed decode steps per row (default 20; tiny 4).
    #[arg(long)]
    steps: Option<usize>,
    /// Untimed decode steps before them (default 3; tiny 1).
    #[arg(long)]
    warmup: Option<usize>,
    /// Capacity: sequence lengths before the decode steps (default 2048,8192; tiny 64,128).
    #[arg(long, value_delimiter = ',')]
    cap_contexts: Option<Vec<usize>>,
    /// Capacity: KV budget of the MQA pair (default 4GiB; tiny 256KiB).
    #[arg(long, value_parser = parse_size)]
    mqa_budget: Option<u64>,
    /// Capacity: KV budget of the MHA pair (default 32GiB; tiny 1MiB).
    #[arg(long, value_parser = parse_size)]
    mha_budget: Option<u64>,
    /// Capacity: skip the MHA pair.
    #[arg(long)]
    no_mha: bool,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Sampling temperature of every sequence (0: greedy, the engine's default).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Tensor parallelism: each model spread over N GPUs (needs the nccl feature);
    /// bytes, roofline and KV capacity are then per GPU.
    #[arg(long, alias = "tp", default_value_t = 1)]
    tensor_parallel_size: usize,
    /// Decode steps as CUDA graphs (`graph`), op by op (`eager`), or each row both ways
    /// side by side (`both`, the default; the capacity rows then use graphs, as `serve`).
    #[arg(long, value_enum, default_value = "both")]
    graphs: Graphs,
    /// The batch-invariant mode (`--batch-invariant` of serve): fixed-tile matmuls and
    /// per-token attention, no graphs.
    #[arg(long)]
    batch_invariant: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy)]
struct Shape {
    name: &'static str,
    hidden: usize,
    ffn: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    cla: usize,
}

impl Shape {
    /// The four shapes: MQA, MQA-CLA2, MHA, MHA-CLA2.
    fn all(tiny: bool) -> [Shape; 4] {
        let base = if tiny {
            Shape {
                name: "tiny-MQA",
                hidden: 64,
                ffn: 160,
                layers: 4,
                heads: 4,
                kv_heads: 1,
                head_dim: 16,
                vocab: 512,
                cla: 1,
            }
        } else {
            Shape {
                name: "H128-MQA",
                hidden: 2048,
                ffn: 5472,
                layers: 20,
                heads: 16,
                kv_heads: 1,
                head_dim: 128,
                vocab: 50304,
                cla: 1,
            }
        };
        let (mqa2, mha, mha2) = if tiny {
            ("tiny-MQA-CLA2", "tiny-MHA", "tiny-MHA-CLA2")
        } else {
            ("H128-MQA-CLA2", "H128-MHA", "H128-MHA-CLA2")
        };
        [
            base,
            Shape {
                name: mqa2,
                cla: 2,
                ..base
            },
            Shape {
                name: mha,
                kv_heads: base.heads,
                ..base
            },
            Shape {
                name: mha2,
                kv_heads: base.heads,
                cla: 2,
                ..base
            },
        ]
    }

    fn config(&self, max_positions: usize) -> Result<ModelConfig> {
        Ok(ModelConfig::from_json(json!({
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": max_positions,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
            "cla_share_factor": self.cla,
        }))?)
    }
}

/// What the run shares: device, dtype, steps, measured copy bandwidth.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Debug)]
enum Graphs {
    Graph,
    Eager,
    Both,
}

impl Graphs {
    /// Whether each run uses graphs, in table order.
    fn modes(self) -> &'static [bool] {
        match self {
            Graphs::Graph => &[true],
            Graphs::Eager => &[false],
            Graphs::Both => &[false, true],
        }
    }
}

fn mode_name(graphs: bool) -> &'static str {
    if graphs {
        "graph"
    } else {
        "eager"
    }
}

struct Ctx {
    /// Decode with CUDA graphs (`Runner::set_cuda_graphs`): each e2e row once per entry.
    graph_modes: &'static [bool],
    dev: Device,
    dtype: DType,
    block_size: usize,
    warmup: usize,
    steps: usize,
    temperature: f32,
    seed: u64,
    copy_gbs: f64,
    /// Tensor-parallel ranks (GPUs `dev`, `dev + 1`, …).
    tp: usize,
    batch_invariant: bool,
}

/// Device-to-device copy bandwidth, read + write counted (GB/s), and how it was measured.
fn copy_bandwidth(dev: &Device, tiny: bool) -> Result<(f64, String)> {
    if dev.is_cpu() {
        let n: usize = if tiny { 64 << 20 } else { 512 << 20 };
        let src = vec![1u8; n];
        let mut dst = vec![0u8; n];
        let mut times = Vec::new();
        for i in 0..12 {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
            if i >= 2 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let ms = median(times);
        return Ok((
            2.0 * n as f64 / (ms * 1e-3) / 1e9,
            format!("host memcpy of {} MiB, median of 10: {ms:.3} ms", n >> 20),
        ));
    }
    cuda_copy_bandwidth(dev)
}

#[cfg(feature = "cuda")]
fn cuda_copy_bandwidth(dev: &Device) -> Result<(f64, String)> {
    let bytes = 2usize << 30;
    common::copy_times(dev, bytes, 3)?;
    let ms = median(common::copy_times(dev, bytes, 20)?.into_iter().map(f64::from).collect());
    Ok((
        2.0 * bytes as f64 / (ms * 1e-3) / 1e9,
        format!(
            "device-to-device copy of {} MiB, CUDA events, median of 20: {ms:.3} ms",
            bytes >> 20
        ),
    ))
}

#[cfg(not(feature = "cuda"))]
fn cuda_copy_bandwidth(_: &Device) -> Result<(f64, String)> {
    bail!("a CUDA device needs the cuda feature")
}

/// Fills K and V with random values, a chunk of blocks at a time.
fn fill_random(cache: &KvCache) -> Result<()> {
    for t in [cache.k(), cache.v()] {
        let (n, bs, h, d) = t.dims4()?;
        let chunk = ((32 << 20) / (bs * h * d)).max(1);
        let mut b = 0;
        while b < n {
            let m = chunk.min(n - b);
            let r = Tensor::randn(0f32, 1.0, (m, bs, h, d), t.device())?.to_dtype(t.dtype())?;
            t.slice_set(&r, 0, b)?;
            b += m;
        }
    }
    Ok(())
}

/// Bytes one decode step must read, by part.
#[derive(Debug, Clone, Copy)]
struct StepBytes {
    /// Every linear (q/k/v/o, gate/up/down, lm_head) and norm, read once per step.
    weights: u64,
    /// One embedding row, per sequence.
    embed_row: u64,
    /// K + V of one token of one slot.
    kv_token_slot: u64,
    layers: u64,
    kv_layers: u64,
}

impl StepBytes {
    fn of(model: &Model) -> Result<Self> {
        let eb = model.dtype().size_in_bytes() as u64;
        let mut weights = 0u64;
        for (_, l) in model.named_linears() {
            weights += l.dense_weight()?.elem_count() as u64 * eb;
            weights += l.bias().map_or(0, |b| b.elem_count() as u64 * eb);
        }
        for (name, t) in model.named_tensors() {
            if name != "model.embed_tokens.weight" {
                weights += t.elem_count() as u64 * eb;
            }
        }
        let cfg = model.config();
        Ok(StepBytes {
            weights,
            embed_row: cfg.hidden_size as u64 * eb,
            // This rank's KV heads (all of them without tensor parallelism).
            kv_token_slot: 2 * (model.kv_heads() * cfg.head_dim) as u64 * eb,
            layers: cfg.num_hidden_layers as u64,
            kv_layers: model.layout().kv_layers() as u64,
        })
    }
    fn weights_read(&self, batch: usize) -> f64 {
        (self.weights + batch as u64 * self.embed_row) as f64
    }
    /// K/V every layer reads at a mean context of `ctx` tokens.
    fn kv_read(&self, batch: usize, ctx: f64) -> f64 {
        self.layers as f64 * batch as f64 * ctx * self.kv_token_slot as f64
    }
    /// The same if each slot were read once (by its producer only).
    fn kv_read_once_per_slot(&self, batch: usize, ctx: f64) -> f64 {
        self.kv_layers as f64 * batch as f64 * ctx * self.kv_token_slot as f64
    }
}

/// One decode row's measurement.
struct Decode {
    total_ms: f64,
    forward_ms: f64,
    /// Host time `Runner::step` took to return (launches queued, nothing awaited): when
    /// it is close to `forward_ms`, the GPU waits on the CPU.
    enqueue_ms: f64,
    sample_ms: f64,
    /// Mean context length (keys attended) over the timed steps.
    mean_ctx: f64,
}

/// Decodes sequences `0..batch` (already holding blocks for `context + warmup + steps`
/// tokens) one token per step at positions `context + i`, as the engine does.
fn decode(c: &Ctx, runner: &Runner, mgr: &KvManager, batch: usize, context: usize) -> Result<Decode> {
    let vocab = runner.model().config().vocab_size;
    let mut samplers: Vec<Sampler> = (0..batch)
        .map(|s| {
            Sampler::new(SamplingParams {
                temperature: c.temperature,
                seed: Some(c.seed + s as u64),
                ..SamplingParams::default()
            })
        })
        .collect();
    let mut tokens: Vec<u32> = (0..batch).map(|s| ((s * 7919 + 13) % vocab) as u32).collect();
    let (mut total, mut forward, mut sample, mut enqueue) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..c.warmup + c.steps {
        let steps: Vec<SeqStep> = (0..batch)
            .map(|s| SeqStep {
                seq: s as u64,
                tokens: vec![tokens[s]],
                start_pos: context + i,
                all_logits: false,
            })
            .collect();
        c.dev.synchronize()?;
        let t0 = Instant::now();
        let logits = runner.step(mgr, &steps)?;
        let queued = Instant::now();
        c.dev.synchronize()?;
        let t1 = Instant::now();
        // As the engine does: greedy rows take the device's argmax, others come whole.
        let full: Vec<bool> = samplers.iter().map(|s| !s.is_greedy()).collect();
        let fetched = fetch_logits(&logits, &full)?;
        for (i, (tok, sampler)) in tokens.iter_mut().zip(&mut samplers).enumerate() {
            *tok = match &fetched.rows[i] {
                Some(row) => sampler.sample(row),
                None => fetched.argmax[i],
            };
        }
        let t2 = Instant::now();
        if i >= c.warmup {
            total.push((t2 - t0).as_secs_f64() * 1e3);
            forward.push((t1 - t0).as_secs_f64() * 1e3);
            sample.push((t2 - t1).as_secs_f64() * 1e3);
            enqueue.push((queued - t0).as_secs_f64() * 1e3);
        }
    }
    Ok(Decode {
        total_ms: median(total),
        forward_ms: median(forward),
        enqueue_ms: median(enqueue),
        sample_ms: median(sample),
        // Step i attends context + i + 1 keys.
        mean_ctx: (context + c.warmup) as f64 + (c.steps + 1) as f64 / 2.0,
    })
}

/// The columns both tables share, and their JSON.
struct Perf {
    cells: String,
    json: Value,
}

fn perf(c: &Ctx, b: &StepBytes, batch: usize, d: &Decode) -> Perf {
    let (w, kv) = (b.weights_read(batch), b.kv_read(batch, d.mean_ctx));
    let roof_ms = (w + kv) / (c.copy_gbs * 1e9) * 1e3;
    let roof_once_ms = (w + b.kv_read_once_per_slot(batch, d.mean_ctx)) / (c.copy_gbs * 1e9) * 1e3;
    let tok_s = batch as f64 / (d.total_ms * 1e-3);
    let pct = 100.0 * roof_ms / d.total_ms;
    Perf {
        cells: format!(
            "{:.2} | {:.2} | {:.2} | {:.0} | {:.1} | {:.1} | {:.2} | {:.1} % | {:.1} %",
            d.total_ms,
            d.forward_ms,
            d.sample_ms,
            tok_s,
            w / 1e6,
            kv / 1e6,
            roof_ms,
            pct,
            100.0 * roof_once_ms / d.total_ms
        ),
        json: json!({
            "ms_per_step": d.total_ms,
            "forward_ms": d.forward_ms,
            "forward_enqueue_ms": d.enqueue_ms,
            "logits_to_host_and_sample_ms": d.sample_ms,
            "tokens_per_s": tok_s,
            "weight_bytes_per_step": w,
            "kv_bytes_per_step": kv,
            "mean_context": d.mean_ctx,
            "roofline_ms": roof_ms,
            "pct_of_roofline": pct,
            "roofline_ms_kv_once_per_slot": roof_once_ms,
            "pct_of_roofline_kv_once_per_slot": 100.0 * roof_once_ms / d.total_ms,
            "copy_gbs": c.copy_gbs,
        }),
    }
}

const PERF_HEAD: &str =
    "ms/step | forward ms | logits→host + sample ms | tok/s | weights MB/step | KV MB/step | roofline ms | % of roofline | % of roofline, KV read once per slot";

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// The model's ranks (one without tensor parallelism), random weights on each device.
fn build_model(c: &Ctx, shape: &Shape, max_positions: usize) -> Result<Vec<Model>> {
    let t = Instant::now();
    let cfg = shape.config(max_positions)?;
    let mut ranks = Vec::with_capacity(c.tp);
    for rank in 0..c.tp {
        let dev = crosskv::tp::rank_device(&c.dev, rank)?;
        let w = Weights::random(&cfg, c.dtype, &dev, c.seed)?;
        ranks.push(Model::load_shard(
            &cfg,
            &w,
            false,
            crosskv::tp::Shard { rank, world: c.tp },
        )?);
        dev.synchronize()?;
    }
    crosskv::model::connect_ranks(&mut ranks)?;
    for m in &mut ranks {
        m.set_batch_invariant(c.batch_invariant);
    }
    eprintln!(
        "{}: random weights on the device{} in {:.2} s",
        label(c, shape),
        if c.tp > 1 { "s" } else { "" },
        t.elapsed().as_secs_f64()
    );
    Ok(ranks)
}

/// The shape's name, with the tensor-parallel size when there is one.
fn label(c: &Ctx, shape: &Shape) -> String {
    let name = if c.tp > 1 {
        format!("{} TP{}", shape.name, c.tp)
    } else {
        shape.name.to_string()
    };
    if c.batch_invariant {
        format!("{name} batch-invariant")
    } else {
        name
    }
}

fn runner_with_random_cache(c: &Ctx, ranks: &[Model], blocks: usize) -> Result<Runner> {
    let t = Instant::now();
    let runner = Runner::tensor_parallel(ranks.to_vec(), blocks, c.block_size)?;
    for cache in runner.rank_caches() {
        fill_random(cache)?;
        cache.k().device().synchronize()?;
    }
    eprintln!(
        "  KV cache: {blocks} blocks, {} per rank, filled with random values in {:.2} s",
        format_bytes(runner.cache().bytes() as u64),
        t.elapsed().as_secs_f64()
    );
    Ok(runner)
}

/// A markdown table printed whole on stdout (so progress on stderr cannot split it);
/// each row also goes to stderr as soon as it is measured.
struct Table {
    lines: Vec<String>,
}

impl Table {
    fn new(header: &str) -> Self {
        let cols = header.matches('|').count() - 1;
        Table {
            lines: vec![header.to_string(), format!("|{}", " --- |".repeat(cols))],
        }
    }
    fn row(&mut self, line: String) {
        eprintln!("{line}");
        self.lines.push(line);
    }
    fn print(&self, json: &[Value]) {
        let mut out = std::io::stdout().lock();
        for l in &self.lines {
            let _ = writeln!(out, "{l}");
        }
        let _ = writeln!(out);
        for j in json {
            let _ = writeln!(out, "{j}");
        }
        let _ = writeln!(out);
        let _ = out.flush();
    }
}

fn e2e(c: &Ctx, shapes: &[Shape], batches: &[usize], contexts: &[usize]) -> Result<()> {
    let mut table = Table::new(&format!("| model | decode | batch | context | {PERF_HEAD} |"));
    let (max_b, max_ctx) = (
        *batches.iter().max().unwrap_or(&1),
        *contexts.iter().max().unwrap_or(&1),
    );
    let per_seq_max = max_ctx + c.warmup + c.steps;
    let mut rows = Vec::new();
    for shape in shapes {
        let ranks = build_model(c, shape, per_seq_max + 1)?;
        let bytes = StepBytes::of(&ranks[0])?;
        let layout = ranks[0].layout().clone();
        let blocks = max_b * per_seq_max.div_ceil(c.block_size) * layout.kv_layers();
        let mut runner = runner_with_random_cache(c, &ranks, blocks)?;
        for &batch in batches {
            for &context in contexts {
                let mut mgr = KvManager::new(layout.clone(), blocks, c.block_size);
                for s in 0..batch {
                    mgr.allocate(s as u64, context + c.warmup + c.steps)?;
                }
                // Eager and graph side by side; a graph is captured by the first warm-up step.
                for &graphs in c.graph_modes {
                    let on = runner.set_cuda_graphs(graphs);
                    let d = decode(c, &runner, &mgr, batch, context)?;
                    let p = perf(c, &bytes, batch, &d);
                    let mode = mode_name(on);
                    table.row(format!(
                        "| {} | {mode} | {batch} | {context} | {} |",
                        label(c, shape),
                        p.cells
                    ));
                    rows.push(merge(
                        json!({"bench": "e2e_decode", "engine": "crosskv", "model": label(c, shape),
                               "decode": mode, "graphs_captured": runner.cuda_graphs_captured(),
                               "tensor_parallel_size": c.tp,
                               "batch": batch, "context": context, "steps": c.steps, "warmup": c.warmup}),
                        p.json,
                    ));
                }
            }
        }
    }
    table.print(&rows);
    Ok(())
}

/// One model's capacity rows: (context, computed max, measured max, computed max with
/// every layer a producer).
type CapRow = (usize, usize, usize, usize);

fn capacity_model(
    c: &Ctx,
    shape: &Shape,
    budget: u64,
    contexts: &[usize],
    table: &mut Table,
    out: &mut Vec<Value>,
) -> Result<Vec<CapRow>> {
    let per_seq_max = contexts.iter().max().unwrap_or(&1) + c.warmup + c.steps;
    let ranks = build_model(c, shape, per_seq_max + 1)?;
    let bytes = StepBytes::of(&ranks[0])?;
    let layout = ranks[0].layout().clone();
    // The blocks a budget buys do not depend on the sequence length.
    let num_blocks = layout.capacity(budget, c.block_size, 1).num_blocks;
    let mut runner = runner_with_random_cache(c, &ranks, num_blocks)?;
    // As `serve` decodes: with graphs unless only eager runs were asked for.
    let mode = mode_name(runner.set_cuda_graphs(c.graph_modes.contains(&true)));
    let mut rows = Vec::new();
    for &context in contexts {
        let per_seq = context + c.warmup + c.steps;
        let cap = layout.capacity(budget, c.block_size, per_seq);
        let mut mgr = KvManager::new(layout.clone(), cap.num_blocks, c.block_size);
        let mut measured = 0usize;
        while mgr.allocate(measured as u64, per_seq).is_ok() {
            measured += 1;
        }
        let equal = measured == cap.max_concurrency;
        let perf_cells;
        let mut j = json!({"bench": "capacity", "engine": "crosskv", "model": label(c, shape),
            "tensor_parallel_size": c.tp,
            "kv_budget_bytes": budget, "kv_cache_bytes": runner.cache().bytes(),
            "context": context, "tokens_per_seq": per_seq, "decode": mode,
            "kv_bytes_per_token": cap.kv_bytes_per_token, "block_bytes": cap.block_bytes,
            "num_blocks": cap.num_blocks, "computed_max_batch": cap.max_concurrency,
            "measured_max_batch": measured, "equal": equal,
            "non_cla_computed_max_batch": cap.non_cla_max_concurrency,
            "free_blocks_left": mgr.num_free_blocks(), "steps": c.steps, "warmup": c.warmup});
        if measured > 0 {
            let d = decode(c, &runner, &mgr, measured, context)?;
            let p = perf(c, &bytes, measured, &d);
            perf_cells = p.cells;
            j = merge(j, p.json);
        } else {
            perf_cells = "– | – | – | – | – | – | – | – | –".into();
        }
        table.row(format!(
            "| {} | {} | {context} + {} | {} | {} | {} | {measured} | {} | {perf_cells} |",
            label(c, shape),
            format_bytes(budget),
            c.warmup + c.steps,
            cap.kv_bytes_per_token,
            cap.num_blocks,
            cap.max_concurrency,
            if equal { "yes" } else { "**NO**" },
        ));
        out.push(j);
        rows.push((context, cap.max_concurrency, measured, cap.non_cla_max_concurrency));
    }
    Ok(rows)
}

fn capacity(c: &Ctx, pairs: &[(Shape, Shape, u64)], contexts: &[usize]) -> Result<bool> {
    let mut table = Table::new(&format!(
        "| model | KV budget | tokens per sequence | KV bytes/token | blocks | computed max batch | measured max batch | equal | {PERF_HEAD} |"
    ));
    let mut json_rows = Vec::new();
    let mut ratios = Vec::new();
    let mut ok = true;
    for (base, cla, budget) in pairs {
        let rb = capacity_model(c, base, *budget, contexts, &mut table, &mut json_rows)?;
        let rc = capacity_model(c, cla, *budget, contexts, &mut table, &mut json_rows)?;
        for (b, k) in rb.iter().zip(&rc) {
            ok &= b.1 == b.2 && k.1 == k.2 && k.3 == b.1;
            ratios.push((cla.name, base.name, *budget, b.0, *b, *k));
        }
    }
    table.print(&json_rows);
    let mut json_rows = Vec::new();
    let mut table = Table::new(
        "| CLA2 / base | KV budget | context | computed max batch (base → CLA2) | measured | computed ratio | measured ratio | CLA2's without-sharing figure = base's |",
    );
    for (cla, base, budget, context, b, k) in &ratios {
        let r = |x: usize, y: usize| if y == 0 { f64::NAN } else { x as f64 / y as f64 };
        table.row(format!(
            "| {cla} / {base} | {} | {context} | {} → {} | {} → {} | {:.3}× | {:.3}× | {} |",
            format_bytes(*budget),
            b.1,
            k.1,
            b.2,
            k.2,
            r(k.1, b.1),
            r(k.2, b.2),
            if k.3 == b.1 { "yes" } else { "**NO**" }
        ));
        json_rows.push(
            json!({"bench": "capacity_ratio", "engine": "crosskv", "model": cla, "base": base,
            "kv_budget_bytes": budget, "context": context,
            "computed_ratio": r(k.1, b.1), "measured_ratio": r(k.2, b.2)}),
        );
    }
    table.print(&json_rows);
    Ok(ok)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dev = common::device(a.device.as_deref())?;
    let dtype = a
        .dtype
        .map(DtypeArg::dtype)
        .unwrap_or(if dev.is_cpu() { DType::F32 } else { DType::BF16 });
    let t = a.tiny;
    let pick = |v: &Option<Vec<usize>>, full: &[usize], tiny: &[usize]| {
        v.clone()
            .unwrap_or_else(|| if t { tiny.to_vec() } else { full.to_vec() })
    };
    let batches = pick(&a.batches, &[1, 64, 256], &[1, 4]);
    let contexts = pick(&a.contexts, &[512, 1024, 2048, 4096], &[32, 64]);
    let cap_contexts = pick(&a.cap_contexts, &[2048, 8192], &[64, 128]);
    let steps = a.steps.unwrap_or(if t { 4 } else { 20 });
    let warmup = a.warmup.unwrap_or(if t { 1 } else { 3 });
    let mqa_budget = a.mqa_budget.unwrap_or(if t { 256 << 10 } else { 4 << 30 });
    let mha_budget = a.mha_budget.unwrap_or(if t { 1 << 20 } else { 32 << 30 });
    if steps == 0 || a.block_size == 0 || batches.contains(&0) {
        bail!("--steps, --block-size and every batch must be at least 1");
    }
    let (copy_gbs, how) = copy_bandwidth(&dev, t)?;
    let c = Ctx {
        graph_modes: if dev.is_cuda() && !a.batch_invariant {
            a.graphs.modes()
        } else {
            &[false]
        },
        dev,
        dtype,
        block_size: a.block_size,
        warmup,
        steps,
        temperature: a.temperature,
        seed: a.seed,
        copy_gbs,
        tp: a.tensor_parallel_size.max(1),
        batch_invariant: a.batch_invariant,
    };
    println!(
        "device {:?}, dtype {:?}, block size {}, {} warm-up + {} timed decode steps per row, sampling {}",
        c.dev.location(),
        c.dtype,
        c.block_size,
        c.warmup,
        c.steps,
        if c.temperature > 0.0 {
            format!("temperature {}", c.temperature)
        } else {
            "greedy".into()
        }
    );
    println!("copy bandwidth: {copy_gbs:.0} GB/s (read + write; {how})");
    println!(
        "decode: eager = the forward op by op; graph = one CUDA graph launch per step (captured per padded batch size and block-table width; captured in the first warm-up step)"
    );
    println!(
        "no prefill: the KV cache is filled with random values, so a decode step costs what it would after a prefill"
    );
    println!(
        "ms/step = forward (Runner::step, device synchronized) + logits→host + sampling as the engine does them (greedy rows: the argmax on the device, one u32 a row; other rows copied whole), medians; roofline = (weights + K/V that every layer reads, a CLA consumer its producer's slot again) / copy bandwidth; the last column counts each slot's K/V once (what CLA would read if consumers hit in cache)"
    );
    println!();
    let shapes = Shape::all(t);
    if a.mode != Mode::Capacity {
        println!("### e2e decode");
        println!();
        e2e(&c, &shapes[..2], &batches, &contexts)?;
    }
    if a.mode != Mode::E2e {
        println!("### capacity under a fixed KV budget");
        println!();
        let mut pairs = vec![(shapes[0], shapes[1], mqa_budget)];
        if !a.no_mha {
            pairs.push((shapes[2], shapes[3], mha_budget));
        }
        if !capacity(&c, &pairs, &cap_contexts)? {
            bail!("a measured max batch differs from the computed one (see the tables)");
        }
    }
    Ok(())
}
