//! Training-attention benchmark on the GPU: `causal_attention` (the
//! flash-attention kernels, bf16) forward, and forward + backward, on b = 8, t = 2048,
//! 16 query heads over 1 (MQA) or 16 (MHA) KV heads, head_dim 64 and 128. The same
//! shapes with PyTorch's `scaled_dot_product_attention(is_causal=True)`:
//! `python3 benches/flash_attention_sdpa.py`.
//!
//!   cargo bench --features cuda --bench flash_attention        (on a CUDA machine)
//!
//! Timed with CUDA events around each run on the op's stream: 3 warm-up runs, the median
//! of `ITERS`. FLOPs as FlashAttention-2 counts them for causal attention: forward
//! 4·b·heads·t²·d / 2 (Q·Kᵀ and P·V over half the scores), backward 2.5× that (five
//! matmuls). "fwd+bwd" runs the op and its backward op directly
//! (`causal_attention_with_grads`: the kernels, their buffers and the casts); "autograd"
//! runs the same through candle's autograd on a loss Σ out∘dO, which adds that product,
//! the sum and candle's gradient bookkeeping.
//! `CROSSKV_FA_BENCH_ONLY=16x128` runs only kv_heads 16, d 128 (e.g. under a profiler).
//!
//! Measured on an H100 80GB HBM3 (2026-11-25), with PyTorch 2.11's SDPA (flash backend)
//! from flash_attention_sdpa.py in the same session, ms:
//!
//! | heads/kv | d | fwd | fwd+bwd | autograd fwd+bwd | SDPA fwd | SDPA fwd+bwd |
//! | --- | --- | --- | --- | --- | --- | --- |
//! | 16/1 | 64 | 0.288 (238 TFLOP/s) | 1.289 (187) | 2.949 | 0.280 (246) | 1.143 (210) |
//! | 16/16 | 64 | 0.286 (240) | 1.312 (183) | 3.203 | 0.284 (242) | 1.109 (217) |
//! | 16/1 | 128 | 0.522 (263) | 2.421 (199) | 5.769 | 0.478 (287) | 1.944 (247) |
//! | 16/16 | 128 | 0.529 (260) | 2.528 (190) | 6.380 | 0.470 (293) | 1.876 (256) |

#[cfg(feature = "cuda")]
fn main() -> anyhow::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{DType, Tensor, Var};

    const ITERS: usize = 20;
    let dev = crosskv::device::cuda(0)?;
    let stream = dev.as_cuda_device()?.cuda_stream();
    let ctx = stream.context().clone();
    // GPU ms of each of `iters` runs of `f`.
    let time = |iters: usize, f: &mut dyn FnMut() -> candle_core::Result<()>| -> candle_core::Result<f64> {
        let events = (0..=iters)
            .map(|_| ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .w()?;
        events[0].record(&stream).w()?;
        for e in &events[1..] {
            f()?;
            e.record(&stream).w()?;
        }
        stream.synchronize().w()?;
        let mut ms = events
            .windows(2)
            .map(|w| w[0].elapsed_ms(&w[1]))
            .collect::<std::result::Result<Vec<_>, _>>()
            .w()?;
        ms.sort_by(|a, b| a.total_cmp(b));
        Ok(ms[ms.len() / 2] as f64)
    };
    println!(
        "| heads / kv heads | d | b | t | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | autograd fwd+bwd ms |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let (b, t, heads) = (8usize, 2048usize, 16usize);
    let only = std::env::var("CROSSKV_FA_BENCH_ONLY").ok();
    for d in [64usize, 128] {
        for kv_heads in [1usize, 16] {
            if only.as_deref().is_some_and(|o| o != format!("{kv_heads}x{d}")) {
                continue;
            }
            let rand = |h: usize| Tensor::randn(0f32, 1.0, (b, t, h, d), &dev)?.to_dtype(DType::BF16);
            let (q, k, v, w) = (
                Var::from_tensor(&rand(heads)?)?,
                Var::from_tensor(&rand(kv_heads)?)?,
                Var::from_tensor(&rand(kv_heads)?)?,
                rand(heads)?,
            );
            let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
            let scale = 1.0 / (d as f32).sqrt();
            let mut f = || crosskv::ops::causal_attention(qt, kt, vt, scale).map(|_| ());
            time(3, &mut f)?;
            let fwd_ms = time(ITERS, &mut f)?;
            let mut fb = || crosskv::ops::causal_attention_with_grads(qt, kt, vt, &w, scale).map(|_| ());
            time(3, &mut fb)?;
            let fb_ms = time(ITERS, &mut fb)?;
            let mut ag = || -> candle_core::Result<()> {
                let out = crosskv::ops::causal_attention(qt, kt, vt, scale)?;
                let grads = (out * &w)?.sum_all()?.backward()?;
                for x in [qt, kt, vt] {
                    grads.get(x).expect("a gradient");
                }
                Ok(())
            };
            time(3, &mut ag)?;
            let ag_ms = time(ITERS, &mut ag)?;
            let flops = 4.0 * (b * heads * t * t * d) as f64 / 2.0;
            let tf = |f: f64, ms: f64| f / (ms * 1e-3) / 1e12;
            println!(
                "| {heads}/{kv_heads} | {d} | {b} | {t} | {fwd_ms:.3} | {:.0} | {fb_ms:.3} | {:.0} | {ag_ms:.3} |",
                tf(flops, fwd_ms),
                tf(3.5 * flops, fb_ms)
            );
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("flash_attention bench: build with --features cuda and run on a CUDA machine");
}
