//! Where a decode step's time goes, op by op (written when the end-to-end step was far above
//! its bandwidth roofline at every batch, so something other than bytes costs it).
//!
//!   cargo bench --features cuda --bench op_overhead            (on a CUDA machine)
//!   cargo bench --bench op_overhead -- --device cpu --batch 2  (anywhere)
//!
//! Each op of one decoder layer of the CLA paper's 1B shape (hidden 2048, FFN 5472, 16
//! query heads of 128, one KV head; bf16), at one batch of decoding sequences, is called
//! `--iters` times back to back. Two numbers per op: **enqueue µs**, the host's time per
//! call with nothing synchronised (what the CPU spends issuing it: allocation, checks,
//! the launch), and **µs per call** once the device has finished them all. When the two
//! are equal the op is host-bound: the GPU waits on the CPU, and only fewer or cheaper
//! launches (fusion, CUDA graphs) make it faster. The last rows time a whole layer and a
//! trivial candle op (an add of two small tensors) as the floor of what any op costs.

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use crosskv::ops::{self, AttentionDims, PagedAttentionPlan, SeqSpan};
use std::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    /// cpu or cuda[:N] (default: cuda with the cuda feature, else cpu).
    #[arg(long)]
    device: Option<String>,
    /// Decoding sequences (one new token each).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Tokens already in each sequence's cache.
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// Calls per op.
    #[arg(long, default_value_t = 200)]
    iters: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const HIDDEN: usize = 2048;
const FFN: usize = 5472;
const HEADS: usize = 16;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 128;
const BLOCK: usize = 16;

fn sync(dev: &Device) -> Result<()> {
    Ok(dev.synchronize()?)
}

/// `(enqueue µs, µs per call)` of `iters` calls of `f` (its result dropped).
fn time<T, E: Into<anyhow::Error>>(
    dev: &Device,
    iters: usize,
    mut f: impl FnMut() -> std::result::Result<T, E>,
) -> Result<(f64, f64)> {
    for _ in 0..3 {
        f().map_err(Into::into)?;
    }
    sync(dev)?;
    let start = Instant::now();
    for _ in 0..iters {
        f().map_err(Into::into)?;
    }
    let enqueue = start.elapsed().as_secs_f64();
    sync(dev)?;
    let total = start.elapsed().as_secs_f64();
    let per = |s: f64| s * 1e6 / iters as f64;
    Ok((per(enqueue), per(total)))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = common::device(args.device.as_deref())?;
    let dtype = if dev.is_cuda() { DType::BF16 } else { DType::F32 };
    let b = args.batch;
    let rnd = |shape: &[usize]| -> Result<Tensor> { Ok(Tensor::randn(0f32, 0.02, shape, &dev)?.to_dtype(dtype)?) };
    let x = rnd(&[b, HIDDEN])?;
    let wq = rnd(&[HEADS * HEAD_DIM, HIDDEN])?;
    let wk = rnd(&[KV_HEADS * HEAD_DIM, HIDDEN])?;
    let wo = rnd(&[HIDDEN, HEADS * HEAD_DIM])?;
    let wg = rnd(&[FFN, HIDDEN])?;
    let wd = rnd(&[HIDDEN, FFN])?;
    let norm_w = (rnd(&[HIDDEN])? + 1.0)?;
    let linear = |x: &Tensor, w: &Tensor| -> Result<Tensor> { Ok(x.matmul(&w.t()?)?) };

    // The paged cache: every sequence's context in its own blocks, plus the new token.
    let blocks_per_seq = (args.context + 1).div_ceil(BLOCK);
    let num_blocks = b * blocks_per_seq;
    let k_cache = rnd(&[num_blocks, BLOCK, KV_HEADS, HEAD_DIM])?;
    let v_cache = rnd(&[num_blocks, BLOCK, KV_HEADS, HEAD_DIM])?;
    let table: Vec<u32> = (0..num_blocks as u32).collect();
    let spans: Vec<SeqSpan> = (0..b)
        .map(|s| SeqSpan {
            q_start: s as u32,
            q_len: 1,
            ctx_len: args.context as u32 + 1,
        })
        .collect();
    let rows: Vec<u32> = (0..b)
        .map(|s| (s * blocks_per_seq * BLOCK + args.context) as u32)
        .collect();
    let rows = Tensor::new(rows.as_slice(), &dev)?;
    let positions = Tensor::new(vec![args.context as u32; b].as_slice(), &dev)?;
    let max_pos = args.context + 16;
    let cos = rnd(&[max_pos, HEAD_DIM / 2])?;
    let sin = rnd(&[max_pos, HEAD_DIM / 2])?;
    let q = rnd(&[b, HEADS, HEAD_DIM])?;
    let k = rnd(&[b, KV_HEADS, HEAD_DIM])?;
    let gate = rnd(&[b, FFN])?;
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    let tables = std::slice::from_ref(&table);
    let (_, block_size, _, _) = k_cache.dims4()?;
    let dims = AttentionDims {
        tokens: b,
        heads: HEADS,
        kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        block_size,
        dtype: q.dtype(),
        fp8_cache: false,
    };
    let plan = || PagedAttentionPlan::new(&dev, &spans, tables, blocks_per_seq, scale, dims);

    let mut table_rows: Vec<(&str, (f64, f64))> = Vec::new();
    let n = args.iters;
    table_rows.push(("q_proj matmul [B,2048]·[2048,2048]", time(&dev, n, || linear(&x, &wq))?));
    table_rows.push(("k_proj matmul [B,2048]·[2048,128]", time(&dev, n, || linear(&x, &wk))?));
    table_rows.push((
        "rope (q and k)",
        time(&dev, n, || ops::rope(&q, Some(&k), &positions, &cos, &sin, false))?,
    ));
    table_rows.push((
        "reshape_and_cache (k)",
        time(&dev, n, || ops::reshape_and_cache(&k_cache, &k, &rows))?,
    ));
    table_rows.push((
        "paged attention, plan made each call",
        time(&dev, n, || {
            ops::paged_attention_run(&plan()?, 0, &q, &k_cache, &v_cache)
        })?,
    ));
    let shared = plan()?;
    table_rows.push((
        "paged attention, plan reused (later layers)",
        time(&dev, n, || ops::paged_attention_run(&shared, 0, &q, &k_cache, &v_cache))?,
    ));
    table_rows.push(("o_proj matmul [B,2048]·[2048,2048]", time(&dev, n, || linear(&x, &wo))?));
    table_rows.push((
        "add + rms_norm (fused)",
        time(&dev, n, || ops::add_rms_norm(&x, &x, &norm_w, 1e-5))?,
    ));
    table_rows.push((
        "gate_proj matmul [B,2048]·[2048,5472]",
        time(&dev, n, || linear(&x, &wg))?,
    ));
    table_rows.push(("silu", time(&dev, n, || candle_nn::ops::silu(&gate))?));
    table_rows.push(("mul [B,5472]", time(&dev, n, || &gate * &gate)?));
    table_rows.push((
        "down_proj matmul [B,5472]·[5472,2048]",
        time(&dev, n, || linear(&gate, &wd))?,
    ));
    table_rows.push(("add of two [B,2048] (candle's floor)", time(&dev, n, || &x + &x)?));
    table_rows.push((
        "alloc: Tensor::zeros [B,2048]",
        time(&dev, n, || Tensor::zeros((b, HIDDEN), dtype, &dev))?,
    ));
    table_rows.push((
        "upload 64 u32 (Tensor::new)",
        time(&dev, n, || Tensor::new(&[0u32; 64], &dev))?,
    ));
    // One producer layer as the model runs it (q, k, v projections; rope; K and V
    // written; attention; o; norm; gate, up, silu·up, down; norm).
    let layer = || -> Result<()> {
        let (q2, k2, v2) = (linear(&x, &wq)?, linear(&x, &wk)?, linear(&x, &wk)?);
        let (q2, k2) = ops::rope(
            &q2.reshape((b, HEADS, HEAD_DIM))?,
            Some(&k2.reshape((b, KV_HEADS, HEAD_DIM))?),
            &positions,
            &cos,
            &sin,
            false,
        )?;
        let k2 = k2.expect("k");
        ops::reshape_and_cache(&k_cache, &k2, &rows)?;
        ops::reshape_and_cache(&v_cache, &v2.reshape((b, KV_HEADS, HEAD_DIM))?, &rows)?;
        let o = ops::paged_attention_run(&shared, 0, &q2, &k_cache, &v_cache)?;
        let o = linear(&o.reshape((b, HEADS * HEAD_DIM))?, &wo)?;
        let (x2, h) = ops::add_rms_norm(&x, &o, &norm_w, 1e-5)?;
        let (g, u) = (linear(&h, &wg)?, linear(&h, &wg)?);
        let m = linear(&(candle_nn::ops::silu(&g)? * u)?, &wd)?;
        ops::add_rms_norm(&x2, &m, &norm_w, 1e-5)?;
        Ok(())
    };
    table_rows.push(("one whole producer layer", time(&dev, n / 4, layer)?));

    println!(
        "device {:?}, {dtype:?}, batch {b}, context {}, {} calls per op",
        dev.location(),
        args.context,
        n
    );
    println!("| op | enqueue µs | µs per call | host-bound |");
    println!("| --- | --- | --- | --- |");
    for (name, (enq, total)) in table_rows {
        let bound = if enq >= 0.9 * total { "yes" } else { "no" };
        println!("| {name} | {enq:.1} | {total:.1} | {bound} |");
    }
    Ok(())
}
