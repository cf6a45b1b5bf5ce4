//! Training-attention benchmark on the GPU (issue 5): `causal_attention` (the
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
//! matmuls). The backward runs through candle's autograd on a loss Σ out∘dO, so its time
//! also holds that product, the sum and the gradient bookkeeping (each a pass over
//! b·t·heads·d elements, small next to the attention).

#[cfg(feature = "cuda")]
fn main() -> anyhow::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{DType, Tensor, Var};

    const ITERS: usize = 20;
    let dev = crosskv::ops::cuda::device(0)?;
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
    println!("| heads / kv heads | d | b | t | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let (b, t, heads) = (8usize, 2048usize, 16usize);
    for d in [64usize, 128] {
        for kv_heads in [1usize, 16] {
            let rand = |h: usize| Tensor::randn(0f32, 1.0, (b, t, h, d), &dev)?.to_dtype(DType::BF16);
            let (q, k, v, w) = (
                Var::from_tensor(&rand(heads)?)?,
                Var::from_tensor(&rand(kv_heads)?)?,
                Var::from_tensor(&rand(kv_heads)?)?,
                rand(heads)?,
            );
            let scale = 1.0 / (d as f32).sqrt();
            let fwd = || crosskv::ops::causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale);
            let mut f = || fwd().map(|_| ());
            time(3, &mut f)?;
            let fwd_ms = time(ITERS, &mut f)?;
            let mut fb = || -> candle_core::Result<()> {
                let grads = (fwd()? * &w)?.sum_all()?.backward()?;
                for x in [&q, &k, &v] {
                    grads.get(x.as_tensor()).expect("a gradient");
                }
                Ok(())
            };
            time(3, &mut fb)?;
            let fb_ms = time(ITERS, &mut fb)?;
            let flops = 4.0 * (b * heads * t * t * d) as f64 / 2.0;
            let tf = |f: f64, ms: f64| f / (ms * 1e-3) / 1e12;
            println!(
                "| {heads}/{kv_heads} | {d} | {b} | {t} | {fwd_ms:.3} | {:.0} | {fb_ms:.3} | {:.0} |",
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
