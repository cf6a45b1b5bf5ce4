//! A tiny CLA model on CUDA: logits against the CPU over a mixed schedule, decode graphs against eager steps, the forward-memory profile.

use super::*;

/// A tiny random CLA model (4 layers, share factor 2, GQA 4/2, head_dim 64) runs a
/// mixed prefill + decode schedule on CUDA (f32) and gives the CPU's logits.
#[test]
fn tiny_cla_model_logits_match_cpu() {
    let dev = gpu();
    let tiny = Tiny::new(4, 4, 2, 64, 128, 97)
        .cla("cla_share_factor", json!(2))
        .seed(42);
    let ck = tiny.write();
    let cpu = ck.load();
    // f32 runs the CUDA-core attention kernel, bf16 the tensor-core ones (and the step's
    // shared attention plans across the layers of a slot); both against CPU f32. bf16
    // alone moves this tiny model's logits by 2-8 % (the same model in bf16 on the CPU:
    // its error is the yardstick), so bf16 on CUDA may be off by at most twice that.
    let cpu_bf16 = ck.load_with(&LoadOptions {
        dtype: Some(DType::BF16),
        device: Device::Cpu,
        ..LoadOptions::default()
    });
    let bf16_alone = tiny_model_schedule(&cpu, &cpu_bf16, &tiny, DType::BF16, f32::INFINITY);
    for (dtype, tol) in [(DType::F32, 1e-3f32), (DType::BF16, 2.0 * bf16_alone)] {
        let cuda = ck.load_with(&LoadOptions {
            dtype: Some(dtype),
            device: dev.clone(),
            ..LoadOptions::default()
        });
        assert!(cuda.device().is_cuda());
        tiny_model_schedule(&cpu, &cuda, &tiny, dtype, tol);
    }
}

/// The fp8 KV cache on CUDA (its write, and the CUDA-core attention kernel reading fp8
/// pages under f32 and bf16 queries) over the mixed schedule, against the same model
/// with an fp8 cache on the CPU. CUDA's K/V differ from the CPU's by rounding, which can
/// move an element to the neighbouring e4m3 code: the CPU's own fp8 effect (f32 cache
/// against fp8 cache) is the yardstick, halved for f32; bf16 adds its own.
#[test]
fn tiny_cla_model_fp8_kv_logits_match_cpu() {
    let dev = gpu();
    let tiny = Tiny::new(4, 4, 2, 64, 128, 97)
        .cla("cla_share_factor", json!(2))
        .seed(42);
    let ck = tiny.write();
    let cpu = ck.load();
    let mut cpu_fp8 = ck.load();
    cpu_fp8.set_kv_cache_dtype(KvDtype::Fp8E4m3);
    let fp8_alone = tiny_model_schedule(&cpu, &cpu_fp8, &tiny, DType::F32, f32::INFINITY);
    let cpu_bf16 = ck.load_with(&LoadOptions {
        dtype: Some(DType::BF16),
        device: Device::Cpu,
        ..LoadOptions::default()
    });
    let bf16_alone = tiny_model_schedule(&cpu, &cpu_bf16, &tiny, DType::BF16, f32::INFINITY);
    for (dtype, tol) in [
        (DType::F32, (fp8_alone / 2.0).max(1e-3)),
        (DType::BF16, 2.0 * bf16_alone + fp8_alone),
    ] {
        let mut cuda = ck.load_with(&LoadOptions {
            dtype: Some(dtype),
            device: dev.clone(),
            ..LoadOptions::default()
        });
        cuda.set_kv_cache_dtype(KvDtype::Fp8E4m3);
        let e = tiny_model_schedule(&cpu_fp8, &cuda, &tiny, dtype, tol);
        eprintln!("fp8 KV {dtype:?} on CUDA: worst logits rel err {e:.2e} (fp8 alone on the CPU {fp8_alone:.2e})");
    }
}

/// Decode graphs over an fp8 cache give the eager steps' logits (the scales are
/// captured with each layer's launch).
#[test]
fn fp8_kv_decode_graphs_match_eager() {
    let dev = gpu();
    let tiny = Tiny::new(4, 4, 2, 64, 128, 97)
        .cla("cla_share_factor", json!(2))
        .max_positions(1024)
        .seed(7);
    let ck = tiny.write();
    let mut cpu = ck.load();
    cpu.set_kv_cache_dtype(KvDtype::Fp8E4m3);
    for dtype in [DType::F32, DType::BF16] {
        let mut model = ck.load_with(&LoadOptions {
            dtype: Some(dtype),
            device: dev.clone(),
            ..LoadOptions::default()
        });
        model.set_kv_cache_dtype(KvDtype::Fp8E4m3);
        for (block, first, stride, blocks, graphs) in [(4, 25, 1, 64, (4, None)), (16, 600, 97, 400, (3, None))] {
            decode_graph_case(&model, &cpu, &tiny, dtype, block, (first, stride), blocks, graphs);
        }
    }
}

/// Runs the mixed prefill/decode schedule on both models; the worst relative error of
/// `got`'s logits against `want`'s, each step within `tol`.
pub(super) fn tiny_model_schedule(
    want_model: &crosskv::model::Model,
    got_model: &crosskv::model::Model,
    tiny: &Tiny,
    dtype: DType,
    tol: f32,
) -> f32 {
    tiny_model_schedule_ranks(want_model, std::slice::from_ref(got_model), tiny, dtype, tol)
}

/// [`tiny_model_schedule`] with `got` run over tensor-parallel ranks.
pub(super) fn tiny_model_schedule_ranks(
    want_model: &crosskv::model::Model,
    got_ranks: &[crosskv::model::Model],
    tiny: &Tiny,
    dtype: DType,
    tol: f32,
) -> f32 {
    let got_model = &got_ranks[0];
    let block = 16;
    let n = 8 * want_model.layout().kv_layers();
    let mk = |ms: &[crosskv::model::Model]| {
        (
            Runner::tensor_parallel(ms.to_vec(), n, block).unwrap(),
            KvManager::new(ms[0].layout().clone(), n, block),
        )
    };
    let (rc, mut mc) = mk(std::slice::from_ref(want_model));
    let (rg, mut mg) = mk(got_ranks);
    let toks = Rng::new(5).tokens(60, tiny.vocab);
    let (a, b) = (&toks[..30], &toks[30..]);
    // (seq, tokens, start): A prefills 20 and B a first chunk of 7; then A decodes while B
    // prefills its next chunk; then both decode.
    let schedule: Vec<Vec<(u64, &[u32], usize)>> = vec![
        vec![(0, &a[..20], 0), (1, &b[..7], 0)],
        vec![(0, &a[20..21], 20), (1, &b[7..17], 7)],
        vec![(1, &b[17..18], 17), (0, &a[21..22], 21)],
        vec![(0, &a[22..23], 22), (1, &b[18..19], 18)],
    ];
    let mut worst = 0f32;
    for (i, step) in schedule.iter().enumerate() {
        let steps: Vec<SeqStep> = step
            .iter()
            .map(|(seq, t, start)| SeqStep {
                seq: *seq,
                tokens: t.to_vec(),
                start_pos: *start,
                all_logits: false,
            })
            .collect();
        for (seq, t, start) in step {
            mc.allocate(*seq, start + t.len()).unwrap();
            mg.allocate(*seq, start + t.len()).unwrap();
        }
        let want = flat(&rc.step(&mc, &steps).unwrap());
        let got = flat(&rg.step(&mg, &steps).unwrap());
        let e = rel_err(&got, &want);
        eprintln!("tiny CLA model {dtype:?} step {i}: logits max rel err {e:.2e}");
        assert!(
            e <= tol,
            "{dtype:?} step {i}: CUDA logits differ from CPU f32 by {e} (relative)"
        );
        worst = worst.max(e);
    }
    eprintln!(
        "tiny CLA model (4 layers, cla 2, {}/{} heads, d64, {dtype:?} on {:?}, {} rank(s)): worst logits rel err {worst:.2e}",
        tiny.heads,
        tiny.kv_heads,
        got_model.device(),
        got_ranks.len()
    );
    worst
}

#[test]
fn forward_memory_profile_sees_weights_and_activations() {
    let dev = gpu();
    let tiny = Tiny::new(4, 4, 2, 64, 128, 97)
        .cla("cla_share_factor", json!(2))
        .seed(42);
    let ck = tiny.write();
    let cuda = ck.load_with(&LoadOptions {
        dtype: Some(DType::BF16),
        device: dev.clone(),
        ..LoadOptions::default()
    });
    let small = crosskv::runner::memory::profile_forward_peak(&cuda, 16, 16).unwrap();
    let big = crosskv::runner::memory::profile_forward_peak(&cuda, 16, cuda.max_positions()).unwrap();
    println!(
        "forward memory profile: 16 tokens {small:?}; {} tokens {big:?}",
        cuda.max_positions()
    );
    assert!(small.total > small.in_use_after_load && small.in_use_after_load > 0);
    assert!(big.activation_peak > 0 && big.activation_peak >= small.activation_peak);
}

/// Decode steps as CUDA graphs give the eager steps' logits and leave the same cache:
/// a tiny CLA model (GQA 4/2, share factor 2) decodes ragged sequences at batch sizes
/// that need padding (5 → a graph of 8, 3 → 4) so graphs are captured, reused with new
/// contexts and tables, and padded. Short contexts in blocks of 4 cross a block-table
/// width (8 → 16 blocks); long ones (600-1000 keys in blocks of 16) split each
/// sequence's keys over several partitions, evenly per sequence.
#[test]
fn decode_graphs_match_eager() {
    let dev = gpu();
    let tiny = Tiny::new(4, 4, 2, 64, 128, 97)
        .cla("cla_share_factor", json!(2))
        .max_positions(1024)
        .seed(7);
    let ck = tiny.write();
    let cpu = ck.load();
    for dtype in [DType::F32, DType::BF16] {
        let model = ck.load_with(&LoadOptions {
            dtype: Some(dtype),
            device: dev.clone(),
            ..LoadOptions::default()
        });
        // (block size, prompt of sequence s = first + s * stride, blocks per slot, graphs
        // wanted: at least that many captured, or with Some(limit) exactly the limit kept)
        for (block, first, stride, blocks, graphs) in [
            (4, 25, 1, 64, (4, None)),
            (4, 25, 1, 64, (2, Some(2))),
            (16, 600, 97, 400, (3, None)),
        ] {
            decode_graph_case(&model, &cpu, &tiny, dtype, block, (first, stride), blocks, graphs);
        }
    }
}

/// One schedule of [`decode_graphs_match_eager`]. In f32 the graph's logits must equal
/// the eager ones within rounding. In bf16 a graph may split a context over other
/// partitions than the eager step (bf16 then rounds other partial sums: this tiny
/// model's logits move by up to 5-8 %), so both are held to the CPU's f32 logits: the
/// graph's error at most twice the eager one's, plus 1e-2.
#[allow(clippy::too_many_arguments)]
fn decode_graph_case(
    model: &crosskv::model::Model,
    cpu: &crosskv::model::Model,
    tiny: &Tiny,
    dtype: DType,
    block: usize,
    (first, stride): (usize, usize),
    blocks: usize,
    (want_graphs, limit): (usize, Option<usize>),
) {
    let n = blocks * model.layout().kv_layers();
    let eager = Runner::new(model.clone(), n, block).unwrap();
    let mut graph = Runner::new(model.clone(), n, block).unwrap();
    let reference = Runner::new(cpu.clone(), n, block).unwrap();
    assert!(graph.set_cuda_graphs(true), "graphs are on for one CUDA rank");
    if let Some(limit) = limit {
        // Fewer graphs kept than the schedule needs: older ones are dropped and
        // captured again, and the logits must not notice.
        graph.set_cuda_graphs_limit(limit);
    }
    let mut managers = [
        KvManager::new(model.layout().clone(), n, block),
        KvManager::new(model.layout().clone(), n, block),
        KvManager::new(model.layout().clone(), n, block),
    ];
    let mut rng = Rng::new(11);
    // Five sequences, prefilled eagerly by both runners.
    let mut next: Vec<u32> = Vec::new();
    let mut pos: Vec<usize> = Vec::new();
    for seq in 0..5u64 {
        let len = first + seq as usize * stride;
        let prompt = rng.tokens(len, tiny.vocab);
        let step = [SeqStep {
            seq,
            tokens: prompt,
            start_pos: 0,
            all_logits: false,
        }];
        for (r, m) in [&eager, &graph, &reference].into_iter().zip(&mut managers) {
            m.allocate(seq, len).unwrap();
            r.step(m, &step).unwrap();
        }
        next.push(rng.tokens(1, tiny.vocab)[0]);
        pos.push(len);
    }
    let mut worst = 0f32;
    // 12 decode steps: 5 sequences (in reverse order from step 4: the same graph sees
    // other tables in each row, which it must restage whole), then 3 (1 and 3
    // finished), then only sequence 4.
    for i in 0..12 {
        let live: Vec<u64> = match i {
            0..=3 => vec![0, 1, 2, 3, 4],
            4..=5 => vec![4, 3, 2, 1, 0],
            6..=9 => vec![4, 0, 2],
            _ => vec![4],
        };
        let steps: Vec<SeqStep> = live
            .iter()
            .map(|&s| SeqStep {
                seq: s,
                tokens: vec![next[s as usize]],
                start_pos: pos[s as usize],
                all_logits: false,
            })
            .collect();
        for m in managers.iter_mut() {
            for s in &steps {
                m.allocate(s.seq, s.start_pos + 1).unwrap();
            }
        }
        let want = flat(&eager.step(&managers[0], &steps).unwrap());
        let got = flat(&graph.step(&managers[1], &steps).unwrap());
        let exact = flat(&reference.step(&managers[2], &steps).unwrap());
        let e = rel_err(&got, &want);
        let (e_graph, e_eager) = (rel_err(&got, &exact), rel_err(&want, &exact));
        eprintln!(
            "decode graph {dtype:?} block {block} step {i} (batch {}): logits max rel err {e:.2e} to eager; to CPU f32 graph {e_graph:.2e}, eager {e_eager:.2e}",
            live.len()
        );
        if dtype == DType::F32 {
            assert!(
                e <= tol(dtype),
                "{dtype:?} step {i}: graph logits differ from eager by {e}"
            );
        } else {
            assert!(
                e_graph <= 2.0 * e_eager + 1e-2,
                "{dtype:?} step {i}: graph logits differ from CPU f32 by {e_graph}, eager ones by {e_eager}"
            );
        }
        worst = worst.max(e);
        for s in &steps {
            pos[s.seq as usize] += 1;
            next[s.seq as usize] = rng.tokens(1, tiny.vocab)[0];
        }
    }
    // Batches 5, 3 and 1 in graphs of 8, 4 and 1 (and with blocks of 4, tables of 8
    // blocks, then 16: the longest sequence passes 32 tokens).
    let captured = graph.cuda_graphs_captured();
    match limit {
        None => assert!(
            captured >= want_graphs,
            "{captured} graphs captured, want at least {want_graphs}"
        ),
        Some(l) => assert_eq!(captured, l, "graphs held under a limit of {l}"),
    }
    // The padding wrote nothing: both caches hold the same K/V everywhere (in f32, where
    // the graph's hidden states, hence every later layer's K/V, equal the eager ones).
    if dtype == DType::F32 {
        for (g, e) in [
            (graph.cache().k(), eager.cache().k()),
            (graph.cache().v(), eager.cache().v()),
        ] {
            let err = rel_err(&flat(g), &flat(e));
            assert!(
                err <= tol(dtype),
                "{dtype:?}: the graph runner's cache differs by {err}"
            );
        }
    }
    eprintln!("decode graphs {dtype:?} block {block}: {captured} graphs, worst logits rel err {worst:.2e}");
}
