//! The paged path (block tables per KV slot, consumers reading their producer's slot)
//! gives the logits of one dense, cache-free forward: for MHA/GQA/MQA, share factors
//! 1/2/3, a non-uniform `kv_source`, and a producer `kv_layernorm`; for incremental
//! decoding, a mixed prefill+decode batch with interleaved blocks, and chunked prefill.

use crate::common::{dense_logits, max_abs_diff, rows, Rng, Tiny};
use crosskv::config::KvSharing;
use crosskv::kv::KvManager;
use crosskv::model::{LoadOptions, Model};
use crosskv::runner::{Runner, SeqStep};
use serde_json::json;

const TOL: f32 = 1e-4;
const BLOCK: usize = 4;

struct Case {
    name: &'static str,
    tiny: Tiny,
    kv_source: Vec<usize>,
}

/// MHA / GQA / MQA × share factor 1, 2, 3 (5 layers), an explicit non-uniform
/// `kv_source`, and one with producer kv_layernorm. GQA uses head_dim 12 with
/// hidden 32 (heads × head_dim ≠ hidden).
fn cases() -> Vec<Case> {
    let attn = [("mha", 4, 4, 8), ("gqa", 4, 2, 12), ("mqa", 4, 1, 8)];
    let sharing: [(usize, Vec<usize>); 3] = [
        (1, vec![0, 1, 2, 3, 4]),
        (2, vec![0, 0, 2, 2, 4]),
        (3, vec![0, 0, 0, 3, 3]),
    ];
    let names = [
        ["mha-cla1", "mha-cla2", "mha-cla3"],
        ["gqa-cla1", "gqa-cla2", "gqa-cla3"],
        ["mqa-cla1", "mqa-cla2", "mqa-cla3"],
    ];
    let mut out = Vec::new();
    for (a, (_, heads, kv_heads, head_dim)) in attn.iter().enumerate() {
        for (s, (f, src)) in sharing.iter().enumerate() {
            let mut tiny = Tiny::new(5, *heads, *kv_heads, *head_dim, 32, 61).seed(100 + (a * 3 + s) as u64);
            if *f > 1 {
                tiny = tiny.cla("cla_share_factor", json!(f));
            }
            out.push(Case {
                name: names[a][s],
                tiny,
                kv_source: src.clone(),
            });
        }
    }
    out.push(Case {
        name: "gqa-explicit-0,0,2,2,2,5",
        tiny: Tiny::new(6, 4, 2, 8, 32, 61)
            .cla("kv_source", json!([0, 0, 2, 2, 2, 5]))
            .seed(200),
        kv_source: vec![0, 0, 2, 2, 2, 5],
    });
    out.push(Case {
        name: "gqa-cla2-kv_layernorm",
        tiny: Tiny::new(5, 4, 2, 8, 32, 61)
            .cla("cla_share_factor", json!(2))
            .with_kv_layernorm(true)
            .seed(300),
        kv_source: vec![0, 0, 2, 2, 4],
    });
    out
}

/// A runner and a manager with `blocks_per_slot` blocks for every KV slot.
fn paged(model: &Model, blocks_per_slot: usize) -> (Runner, KvManager) {
    let layout = model.layout().clone();
    let n = blocks_per_slot * layout.kv_layers();
    (
        Runner::new(model.clone(), n, BLOCK).unwrap(),
        KvManager::new(layout, n, BLOCK),
    )
}

fn step(runner: &Runner, mgr: &KvManager, steps: &[(u64, &[u32], usize)]) -> Vec<Vec<f32>> {
    let steps: Vec<SeqStep> = steps
        .iter()
        .map(|(seq, tokens, start_pos)| SeqStep {
            seq: *seq,
            tokens: tokens.to_vec(),
            start_pos: *start_pos,
            all_logits: false,
        })
        .collect();
    rows(&runner.step(mgr, &steps).unwrap())
}

#[track_caller]
fn assert_close(case: &str, what: &str, got: &[f32], want: &[f32]) {
    let d = max_abs_diff(got, want);
    assert!(d <= TOL, "{case}: {what}: paged logits differ from dense by {d}");
}

#[test]
fn model_layout_kv_layers_follow_the_sharing_scheme() {
    for c in cases() {
        let ck = c.tiny.write();
        let m = ck.load();
        let l = m.layout();
        assert_eq!(l.kv_source(), c.kv_source.as_slice(), "{}", c.name);
        let producers: Vec<usize> = (0..l.layers()).filter(|&i| c.kv_source[i] == i).collect();
        assert_eq!(l.kv_layers(), producers.len(), "{}", c.name);
        for (slot, &p) in producers.iter().enumerate() {
            assert_eq!(l.producer_of_slot(slot), p, "{}", c.name);
        }
        for i in 0..l.layers() {
            assert_eq!(
                l.producer_of_slot(l.slot_of_layer(i)),
                c.kv_source[i],
                "{} layer {i}",
                c.name
            );
            assert_eq!(l.is_producer(i), c.kv_source[i] == i, "{} layer {i}", c.name);
        }
        assert_eq!(m.config().kv_layers(), producers.len(), "{}", c.name);
    }
}

#[test]
fn incremental_decode_after_prefix_prefill_matches_dense_forward() {
    for c in cases() {
        let m = c.tiny.write().load();
        let tokens = Rng::new(7).tokens(13, c.tiny.vocab);
        let dense = dense_logits(&m, &tokens);
        let (runner, mut mgr) = paged(&m, 6);
        mgr.allocate(0, 5).unwrap();
        let got = step(&runner, &mgr, &[(0, &tokens[..5], 0)]);
        assert_close(c.name, "prefill of 5", &got[0], &dense[4]);
        for p in 5..tokens.len() {
            mgr.allocate(0, p + 1).unwrap();
            let got = step(&runner, &mgr, &[(0, &tokens[p..p + 1], p)]);
            assert_close(c.name, &format!("decode at position {p}"), &got[0], &dense[p]);
        }
        // 13 tokens in blocks of 4: every slot's table chains 4 blocks; only producers hold any.
        let kv_layers = m.layout().kv_layers();
        let tables = mgr.tables(0).unwrap();
        assert_eq!(tables.len(), kv_layers, "{}", c.name);
        assert!(tables.iter().all(|t| t.len() == 4), "{}: {tables:?}", c.name);
        assert_eq!(mgr.num_used_blocks(), 4 * kv_layers, "{}", c.name);
    }
}

#[test]
fn mixed_prefill_and_decode_batch_with_interleaved_blocks_matches_each_dense_forward() {
    for c in cases() {
        let m = c.tiny.write().load();
        let mut rng = Rng::new(11);
        let a = rng.tokens(11, c.tiny.vocab);
        let b = rng.tokens(13, c.tiny.vocab);
        let (dense_a, dense_b) = (dense_logits(&m, &a), dense_logits(&m, &b));
        let (runner, mut mgr) = paged(&m, 8);
        // Grow the two sequences a block at a time, alternately, so their blocks interleave.
        for k in 1..=4 {
            mgr.allocate(1, (k * BLOCK).min(a.len())).unwrap();
            mgr.allocate(2, (k * BLOCK).min(b.len())).unwrap();
        }
        let (ta, tb) = (mgr.tables(1).unwrap().to_vec(), mgr.tables(2).unwrap().to_vec());
        for (slot, (ta, tb)) in ta.iter().zip(&tb).enumerate() {
            assert!(
                ta[0] < tb[0] && tb[0] < ta[1] && ta[1] < tb[1],
                "{}: slot {slot} tables do not interleave: {ta:?} {tb:?}",
                c.name
            );
            assert!(
                ta.windows(2).all(|w| w[1] != w[0] + 1),
                "{}: {ta:?} is contiguous",
                c.name
            );
            assert!(ta.iter().all(|x| !tb.contains(x)), "{}: tables share blocks", c.name);
        }

        // Step 1: A prefills 6 tokens alone.
        let got = step(&runner, &mgr, &[(1, &a[..6], 0)]);
        assert_close(c.name, "A prefill", &got[0], &dense_a[5]);
        // Step 2: B prefills its 10-token prompt while A decodes position 6.
        let got = step(&runner, &mgr, &[(2, &b[..10], 0), (1, &a[6..7], 6)]);
        assert_close(c.name, "B prefill in a mixed batch", &got[0], &dense_b[9]);
        assert_close(c.name, "A decode in a mixed batch", &got[1], &dense_a[6]);
        // Then both decode, in either order, until B is done; A finishes alone.
        for (i, (pa, pb)) in (7..10).zip(10..13).enumerate() {
            let (sa, sb) = ((1, &a[pa..pa + 1], pa), (2, &b[pb..pb + 1], pb));
            let (order, ia, ib) = if i % 2 == 0 { ([sa, sb], 0, 1) } else { ([sb, sa], 1, 0) };
            let got = step(&runner, &mgr, &order);
            assert_close(c.name, &format!("A decode at {pa}"), &got[ia], &dense_a[pa]);
            assert_close(c.name, &format!("B decode at {pb}"), &got[ib], &dense_b[pb]);
        }
        let got = step(&runner, &mgr, &[(1, &a[10..11], 10)]);
        assert_close(c.name, "A decode at 10", &got[0], &dense_a[10]);
    }
}

#[test]
fn chunked_prefill_matches_dense_forward() {
    for c in cases() {
        let m = c.tiny.write().load();
        let tokens = Rng::new(13).tokens(15, c.tiny.vocab);
        let dense = dense_logits(&m, &tokens);
        let (runner, mut mgr) = paged(&m, 4);
        // A 13-token prompt in chunks of 5, 4, 4 (each chunk starts mid-block), then two decodes.
        for (start, end) in [(0, 5), (5, 9), (9, 13), (13, 14), (14, 15)] {
            mgr.allocate(3, end).unwrap();
            let got = step(&runner, &mgr, &[(3, &tokens[start..end], start)]);
            assert_close(c.name, &format!("chunk {start}..{end}"), &got[0], &dense[end - 1]);
        }
        assert_eq!(mgr.num_free_blocks(), 0, "{}: 15 tokens fill 4 blocks per slot", c.name);
    }
}

#[test]
fn consumer_attends_to_its_producers_kv_exactly() {
    // Layers 0..=2 add nothing to the residual stream (o_proj and down_proj are zero), so
    // every layer sees the embeddings; with layer 3's input norm equal to layer 1's, a CLA
    // layer 3 reading layer 1's K/V equals a plain layer 3 whose k/v weights are layer 1's.
    let tiny = Tiny::new(4, 4, 2, 8, 32, 61)
        .cla("kv_source", json!([0, 1, 2, 1]))
        .seed(400);
    let mut cla = tiny.write();
    for l in 0..3 {
        for w in ["self_attn.o_proj", "mlp.down_proj"] {
            let name = format!("model.layers.{l}.{w}.weight");
            let z = cla.tensors[&name].zeros_like().unwrap();
            cla.tensors.insert(name, z);
        }
    }
    let norm1 = cla.tensors["model.layers.1.input_layernorm.weight"].clone();
    cla.tensors
        .insert("model.layers.3.input_layernorm.weight".into(), norm1);
    cla.save();
    let with_kv_of = |producer: usize| {
        let mut plain = Tiny::new(4, 4, 2, 8, 32, 61).write();
        plain.tensors = cla.tensors.clone();
        for p in ["k_proj", "v_proj"] {
            let t = cla.tensors[&format!("model.layers.{producer}.self_attn.{p}.weight")].clone();
            plain.tensors.insert(format!("model.layers.3.self_attn.{p}.weight"), t);
        }
        plain.save();
        plain.load()
    };
    let m = cla.load();
    assert_eq!(m.layout().slot_of_layer(3), 1);
    let tokens = Rng::new(17).tokens(10, 61);
    let want = dense_logits(&with_kv_of(1), &tokens);
    let dense = dense_logits(&m, &tokens);
    let (runner, mut mgr) = paged(&m, 3);
    mgr.allocate(0, 6).unwrap();
    let got = step(&runner, &mgr, &[(0, &tokens[..6], 0)]);
    assert_close("kv_source [0,1,2,1]", "paged prefill vs plain", &got[0], &want[5]);
    for p in 6..tokens.len() {
        mgr.allocate(0, p + 1).unwrap();
        let got = step(&runner, &mgr, &[(0, &tokens[p..p + 1], p)]);
        assert_close(
            "kv_source [0,1,2,1]",
            &format!("paged decode at {p} vs plain"),
            &got[0],
            &want[p],
        );
    }
    for p in 0..tokens.len() {
        assert_close(
            "kv_source [0,1,2,1]",
            &format!("dense at {p} vs plain"),
            &dense[p],
            &want[p],
        );
    }
    // The oracle is sensitive: reading another producer's K/V gives other logits.
    for other in [0, 2] {
        let wrong = dense_logits(&with_kv_of(other), &tokens);
        let d = max_abs_diff(&wrong[9], &want[9]);
        assert!(d > 1e-2, "K/V of layer {other} vs layer 1 differ by only {d}");
    }
}

#[test]
fn producer_kv_layernorm_is_applied_when_present() {
    let tiny = Tiny::new(5, 4, 2, 8, 32, 61)
        .cla("cla_share_factor", json!(2))
        .with_kv_layernorm(true)
        .seed(500);
    let mut ck = tiny.write();
    assert!(ck.tensors.contains_key("model.layers.0.self_attn.kv_layernorm.weight"));
    assert!(ck.tensors.contains_key("model.layers.4.self_attn.kv_layernorm.weight"));
    let tokens = Rng::new(19).tokens(9, 61);
    let with_norm = dense_logits(&ck.load(), &tokens);
    ck.tensors.retain(|k, _| !k.contains("kv_layernorm"));
    ck.save();
    let without = dense_logits(&ck.load(), &tokens);
    let d = max_abs_diff(&with_norm[8], &without[8]);
    assert!(d > 1e-3, "dropping kv_layernorm changed the logits by only {d}");
}

#[test]
fn resharing_a_plain_checkpoint_at_load_ignores_consumer_kv_weights() {
    let tiny = Tiny::new(4, 4, 2, 8, 32, 61).seed(600);
    let mut plain = tiny.write();
    let share2 = LoadOptions {
        sharing: Some(KvSharing::ShareFactor(2)),
        ..Default::default()
    };
    let tokens = Rng::new(23).tokens(13, 61);
    let unshared = plain.load();
    assert_eq!(unshared.layout().kv_layers(), 4);
    let shared = plain.load_with(&share2);
    assert_eq!(shared.layout().kv_source(), &[0, 0, 2, 2]);
    let dense_unshared = dense_logits(&unshared, &tokens);
    let dense = dense_logits(&shared, &tokens);

    // Dense and paged agree for the re-shared model.
    let (runner, mut mgr) = paged(&shared, 4);
    mgr.allocate(0, 7).unwrap();
    let got = step(&runner, &mgr, &[(0, &tokens[..7], 0)]);
    assert_close("reshared cla2", "prefill", &got[0], &dense[6]);
    for p in 7..tokens.len() {
        mgr.allocate(0, p + 1).unwrap();
        let got = step(&runner, &mgr, &[(0, &tokens[p..p + 1], p)]);
        assert_close("reshared cla2", &format!("decode at {p}"), &got[0], &dense[p]);
    }
    assert_eq!(mgr.num_used_blocks(), 2 * 4, "two KV slots × 4 blocks");
    // Sharing changes the model.
    let d = max_abs_diff(&dense[12], &dense_unshared[12]);
    assert!(d > 1e-2, "re-sharing changed the logits by only {d}");

    // Consumers' k/v weights are ignored: other values give the same logits ...
    let mut rng = Rng::new(601);
    for l in [1, 3] {
        for p in ["k_proj", "v_proj"] {
            plain.tensors.insert(
                format!("model.layers.{l}.self_attn.{p}.weight"),
                rng.tensor(&[16, 32], 1.0, 0.0),
            );
        }
    }
    plain.save();
    let other = dense_logits(&plain.load_with(&share2), &tokens);
    assert_eq!(other, dense, "consumers' k_proj/v_proj changed the logits");
    // ... and so does a checkpoint without them that declares the sharing itself.
    plain.tensors.retain(|k, _| {
        !(k.starts_with("model.layers.1.self_attn.") || k.starts_with("model.layers.3.self_attn."))
            || !(k.contains("k_proj") || k.contains("v_proj"))
    });
    assert_eq!(plain.tensors.len(), tiny.tensors().len() - 4);
    plain.config["cla_share_factor"] = json!(2);
    plain.save();
    let declared = dense_logits(&plain.load(), &tokens);
    assert_eq!(
        declared, dense,
        "a declared CLA2 checkpoint differs from re-sharing at load"
    );
}
