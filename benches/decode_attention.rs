//! Decode-attention benchmark on the GPU (BENCHMARKS.md): our paged decode attention
//! (bf16, block_size 16, random data, shuffled block tables) timed with CUDA events
//! against the device-to-device copy bandwidth measured in the same process.
//!
//!   cargo bench --features cuda --bench decode_attention        (on a CUDA machine)
//!   cargo bench --features cuda --bench decode_attention -- --kv-cache-dtype fp8
//!
//! With `--kv-cache-dtype fp8` the pages hold e4m3 codes (random finite codes, scales
//! 0.5 for K and 0.25 for V): half the bytes of each K/V read, and the reference reads
//! the same codes dequantized.
//! Each shape: 5 warm-up runs, then `ITERS` runs back to back, one CUDA event pair per
//! run; the median is reported. Every shape's K/V (≥ 128 MiB) is larger than the H100's
//! 50 MB L2. Bytes moved = K + V read once per KV head + q + out. The output is checked
//! against a dense f32 reference (gathered through the block tables) on the GPU.

#[cfg(feature = "cuda")]
mod common;

#[cfg(feature = "cuda")]
fn main() -> anyhow::Result<()> {
    use candle_core::{DType, Tensor, D};
    use crosskv::ops::{AttentionDims, PagedAttentionPlan, SeqSpan};

    const ITERS: usize = 30;
    let args: Vec<String> = std::env::args().collect();
    let fp8 = match args
        .iter()
        .position(|a| a == "--kv-cache-dtype")
        .map(|i| args.get(i + 1).map(String::as_str))
    {
        None | Some(Some("bf16")) => false,
        Some(Some("fp8")) => true,
        Some(other) => anyhow::bail!("--kv-cache-dtype: bf16 or fp8, not {other:?}"),
    };
    let kv_scale = crosskv::kv::KvScale { k: 0.5, v: 0.25 };
    let dev = crosskv::device::cuda(0)?;
    // CUDA event times are f32; widening keeps their order, so the median is the same.
    let median = |v: Vec<f32>| common::median(v.into_iter().map(f64::from).collect());
    let copy_bytes = 2usize << 30;
    common::copy_times(&dev, copy_bytes, 3)?;
    let copy_ms = median(common::copy_times(&dev, copy_bytes, 20)?);
    let copy_gbs = 2.0 * copy_bytes as f64 / (copy_ms * 1e-3) / 1e9;
    println!(
        "device-to-device copy: {} MiB in {:.3} ms = {:.0} GB/s (read + write)",
        copy_bytes >> 20,
        copy_ms,
        copy_gbs
    );
    let part =
        std::env::var("CROSSKV_PA_PART_SIZE").unwrap_or_else(|_| "auto (the default: sized to fill the GPU)".into());
    println!("partition size: {part}");
    println!("KV cache: {}", if fp8 { "fp8 e4m3 codes" } else { "bf16" });
    println!("| shape | q heads / kv heads | batch | context | median µs | GB/s | % of copy | rel err |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let (d, bs) = (128usize, 16usize);
    let shapes = [
        ("MQA", 16usize, 1usize, 64usize, 4096usize),
        ("GQA4", 16, 4, 64, 4096),
        ("MHA", 16, 16, 32, 4096),
        ("GQA8", 32, 4, 16, 16384),
        ("MQA", 16, 1, 256, 1024),
    ];
    let mut rng_state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    for (name, hq, hkv, b, l) in shapes {
        let nb = l / bs;
        let blocks = b * nb;
        let mut perm: Vec<u32> = (0..blocks as u32).collect();
        for i in (1..blocks).rev() {
            perm.swap(i, (next() % (i as u64 + 1)) as usize);
        }
        // fp8: random finite codes (0x7f and 0xff are NaN), and their values times the
        // scale as the reference's K/V.
        let mut codes = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| match (next() >> 24) as u8 {
                    c @ (0x7f | 0xff) => c - 1,
                    c => c,
                })
                .collect()
        };
        let mut cache = |scale: f32| -> anyhow::Result<(Tensor, Tensor)> {
            if !fp8 {
                let x = Tensor::randn(0f32, 1.0, (blocks, bs, hkv, d), &dev)?.to_dtype(DType::BF16)?;
                return Ok((x.clone(), x));
            }
            let c = codes(blocks * bs * hkv * d);
            let values: Vec<f32> = c.iter().map(|&c| crosskv::ops::fp8::e4m3_to_f32(c) * scale).collect();
            Ok((
                Tensor::from_vec(c, (blocks, bs, hkv, d), &dev)?,
                Tensor::from_vec(values, (blocks, bs, hkv, d), &dev)?,
            ))
        };
        let (k, k_ref) = cache(kv_scale.k)?;
        let (v, v_ref) = cache(kv_scale.v)?;
        let q = Tensor::randn(0f32, 1.0, (b, hq, d), &dev)?.to_dtype(DType::BF16)?;
        let seqs: Vec<SeqSpan> = (0..b)
            .map(|s| SeqSpan {
                q_start: s as u32,
                q_len: 1,
                ctx_len: l as u32,
            })
            .collect();
        let scale = 1.0 / (d as f32).sqrt();
        // One plan for every run (as one decode step's layers share theirs): its launch,
        // device copies and the table uploaded once, by the warm-up.
        let tables = [perm.clone()];
        let dims = AttentionDims {
            tokens: b,
            heads: hq,
            kv_heads: hkv,
            head_dim: d,
            block_size: bs,
            dtype: DType::BF16,
            fp8_cache: fp8,
        };
        let plan = PagedAttentionPlan::new(&dev, &seqs, &tables, nb, scale, dims)?.with_kv_scales(vec![kv_scale]);
        let mut out = None;
        let mut run = |iters| {
            common::gpu_times(&dev, iters, || {
                out = Some(crosskv::ops::paged_attention_run(&plan, 0, &q, &k, &v)?);
                Ok(())
            })
        };
        run(5)?;
        let times = run(ITERS)?;
        let out = out.expect("ran");
        let ms = median(times);
        // Dense f32 reference through the same block tables.
        let idx: Vec<u32> = (0..b)
            .flat_map(|s| {
                let perm = &perm;
                (0..l).map(move |p| perm[s * nb + p / bs] * bs as u32 + (p % bs) as u32)
            })
            .collect();
        let idx = Tensor::from_vec(idx, b * l, &dev)?;
        let gather = |c: &Tensor| -> candle_core::Result<Tensor> {
            c.reshape((blocks * bs, hkv, d))?
                .index_select(&idx, 0)?
                .reshape((b, l, hkv, d))?
                .transpose(1, 2)?
                .contiguous()?
                .to_dtype(DType::F32)
        };
        let (kg, vg) = (gather(&k_ref)?, gather(&v_ref)?);
        drop((k_ref, v_ref));
        let qf = q.to_dtype(DType::F32)?.reshape((b, hkv, hq / hkv, d))?;
        let s = (qf.matmul(&kg.transpose(2, 3)?.contiguous()?)? * scale as f64)?;
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        let want = p.matmul(&vg)?.reshape((b, hq, d))?;
        drop((kg, vg));
        let got = out.to_dtype(DType::F32)?;
        let err = (got - &want)?
            .abs()?
            .flatten_all()?
            .max(D::Minus1)?
            .to_scalar::<f32>()?
            / want.abs()?.flatten_all()?.max(D::Minus1)?.to_scalar::<f32>()?;
        let bytes = 2 * b * l * hkv * d * if fp8 { 1 } else { 2 } + 2 * b * hq * d * 2;
        let gbs = bytes as f64 / (ms * 1e-3) / 1e9;
        println!(
            "| {name} d{d} | {hq}/{hkv} | {b} | {l} | {:.1} | {:.0} | {:.1} % | {:.1e} |",
            ms * 1e3,
            gbs,
            100.0 * gbs / copy_gbs,
            err
        );
        if !err.is_finite() || err > 1e-2 {
            anyhow::bail!("{name} B{b} L{l}: relative error {err} over 1e-2");
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("decode_attention needs --features cuda");
}
