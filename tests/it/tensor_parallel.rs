//! Tensor parallelism on the CPU: N ranks, threads of this process joined by
//! the in-process all-reduce (`tp::LocalGroup`), give the logits of the unsplit model
//! through the paged path (prefill, mixed batches, decode), for MHA, GQA and MQA (whose
//! one KV head every rank replicates), with and without CLA and with biases; the
//! split weights sum back to the whole; the CLI and the engine run sharded; bad sizes
//! fail naming what does not divide.

use crate::common::{crosskv, dense_logits, max_abs_diff, rows, tiny_with_default_tokenizer, Rng, Tiny};
use candle_core::{Device, Tensor};
use crosskv::engine::{EngineConfig, EngineEvent, EngineHandle, GenerateOptions, GenerateRequest};
use crosskv::kv::KvManager;
use crosskv::model::weights::{Part, Weights};
use crosskv::model::{self, LoadOptions, ModelSource};
use crosskv::runner::{Runner, SeqStep};
use serde_json::json;

const BLOCK: usize = 4;
const TOL: f32 = 1e-4;

fn opts(world: usize) -> LoadOptions {
    LoadOptions {
        tensor_parallel_size: world,
        ..Default::default()
    }
}

/// (name, model, tensor-parallel sizes to try): heads 4 and intermediate 48 split over
/// 2 and 4 ranks; KV heads 4 (split), 2 (split, then replicated over 4 ranks) and 1 (MQA).
fn cases() -> Vec<(&'static str, Tiny, Vec<usize>)> {
    vec![
        (
            "mha-cla2",
            Tiny::new(4, 4, 4, 8, 32, 61).cla("cla_share_factor", json!(2)).seed(1),
            vec![2, 4],
        ),
        ("gqa-cla1", Tiny::new(3, 4, 2, 8, 32, 61).seed(2), vec![2, 4]),
        (
            "gqa-cla2-kvnorm",
            Tiny::new(4, 4, 2, 8, 32, 61)
                .cla("cla_share_factor", json!(2))
                .with_kv_layernorm(true)
                .seed(3),
            vec![2, 4],
        ),
        (
            "mqa-cla2",
            Tiny::new(4, 4, 1, 8, 32, 61).cla("cla_share_factor", json!(2)).seed(4),
            vec![2, 4],
        ),
    ]
}

/// Logits of two sequences through the paged path of `ranks`: A prefills 6 tokens, then
/// B prefills 7 while A decodes, then both decode 3 steps. One row per output.
fn paged_run(ranks: Vec<model::Model>, a: &[u32], b: &[u32]) -> Vec<Vec<f32>> {
    let layout = ranks[0].layout().clone();
    let n = 6 * layout.kv_layers();
    let runner = Runner::tensor_parallel(ranks, n, BLOCK).unwrap();
    let mut mgr = KvManager::new(layout, n, BLOCK);
    let mut out = Vec::new();
    let mut run = |mgr: &mut KvManager, steps: &[(u64, &[u32], usize)]| {
        for (seq, t, start) in steps {
            mgr.allocate(*seq, start + t.len()).unwrap();
        }
        let steps: Vec<SeqStep> = steps
            .iter()
            .map(|(seq, t, start)| SeqStep {
                seq: *seq,
                tokens: t.to_vec(),
                start_pos: *start,
                all_logits: false,
            })
            .collect();
        out.extend(rows(&runner.step(mgr, &steps).unwrap()));
    };
    run(&mut mgr, &[(1, &a[..6], 0)]);
    run(&mut mgr, &[(2, &b[..7], 0), (1, &a[6..7], 6)]);
    for k in 0..3 {
        run(&mut mgr, &[(1, &a[7 + k..8 + k], 7 + k), (2, &b[7 + k..8 + k], 7 + k)]);
    }
    out
}

#[test]
fn n_ranks_give_the_logits_of_one() {
    for (name, tiny, worlds) in cases() {
        let ck = tiny.write();
        let mut rng = Rng::new(9);
        let (a, b) = (rng.tokens(10, 61), rng.tokens(10, 61));
        let whole = ck.load();
        // The paged path of the whole model is itself checked against the dense forward.
        let want = paged_run(vec![whole.clone()], &a, &b);
        let d = max_abs_diff(&want[0], &dense_logits(&whole, &a[..6])[5]);
        assert!(d <= TOL, "{name}: paged prefill differs from the dense forward by {d}");
        for world in worlds {
            let ranks = model::load_model_dir_ranks(ck.path(), &opts(world)).unwrap();
            assert_eq!(ranks.len(), world);
            // Each rank's cache holds its own KV heads: a split share, or the one MQA head.
            let kv_per_rank = (tiny.kv_heads / world).max(1);
            for (r, m) in ranks.iter().enumerate() {
                assert_eq!(m.shard().rank, r);
                assert_eq!(m.kv_heads(), kv_per_rank, "{name} world {world} rank {r}");
                assert_eq!(
                    m.layout().kv_bytes_per_token() * tiny.kv_heads,
                    whole.layout().kv_bytes_per_token() * kv_per_rank,
                    "{name}: KV bytes per token per rank"
                );
            }
            let got = paged_run(ranks, &a, &b);
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let d = max_abs_diff(g, w);
                assert!(
                    d <= TOL,
                    "{name} world {world}: output {i} differs from one rank by {d}"
                );
            }
        }
    }
}

#[test]
fn biases_are_split_with_their_rows_and_added_once() {
    // llama's attention_bias (q/k/v and o) and mlp_bias (gate/up/down).
    let tiny = Tiny::new(2, 4, 2, 8, 32, 61).seed(5);
    let mut ck = tiny.write();
    ck.config["attention_bias"] = json!(true);
    ck.config["mlp_bias"] = json!(true);
    let mut rng = Rng::new(6);
    for l in 0..2 {
        for (p, n) in [
            ("self_attn.q_proj", 32),
            ("self_attn.k_proj", 16),
            ("self_attn.v_proj", 16),
            ("self_attn.o_proj", 32),
            ("mlp.gate_proj", 48),
            ("mlp.up_proj", 48),
            ("mlp.down_proj", 32),
        ] {
            ck.tensors
                .insert(format!("model.layers.{l}.{p}.bias"), rng.tensor(&[n], 0.5, 0.0));
        }
    }
    ck.save();
    let (a, b) = (rng.tokens(10, 61), rng.tokens(10, 61));
    let want = paged_run(vec![ck.load()], &a, &b);
    let got = paged_run(model::load_model_dir_ranks(ck.path(), &opts(2)).unwrap(), &a, &b);
    for (g, w) in got.iter().zip(&want) {
        let d = max_abs_diff(g, w);
        assert!(d <= TOL, "biased model over 2 ranks differs by {d}");
    }
}

#[test]
fn split_weights_sum_back_to_the_whole() {
    let ck = Tiny::new(2, 4, 2, 8, 32, 61).seed(8).write();
    let w = Weights::safetensors(&[ck.weights_path()], candle_core::DType::F32, &Device::Cpu).unwrap();
    let name = "model.layers.0.mlp.down_proj.weight";
    let whole = w.tensor(name, &[32, 48]).unwrap();
    let x = Rng::new(3).tensor(&[5, 48], 1.0, 0.0);
    let want = x.matmul(&whole.t().unwrap()).unwrap();
    // Row-parallel: each rank's columns times its slice of the input, summed.
    let mut sum: Option<Tensor> = None;
    let mut rows_back = Vec::new();
    for r in 0..4 {
        let cols = w
            .tensor_part(name, &[32, 48], &Part::Cols(r * 12..(r + 1) * 12))
            .unwrap();
        assert_eq!(cols.dims(), &[32, 12]);
        let part = x.narrow(1, r * 12, 12).unwrap().matmul(&cols.t().unwrap()).unwrap();
        sum = Some(match sum {
            None => part,
            Some(s) => (s + part).unwrap(),
        });
        rows_back.push(w.tensor_part(name, &[32, 48], &Part::Rows(r * 8..(r + 1) * 8)).unwrap());
    }
    let d = max_abs_diff(
        &sum.unwrap().flatten_all().unwrap().to_vec1().unwrap(),
        &want.flatten_all().unwrap().to_vec1().unwrap(),
    );
    assert!(d < 1e-5, "summed row-parallel partials differ by {d}");
    // Column-parallel: the ranks' output rows stack back to the whole weight.
    let stacked = Tensor::cat(&rows_back, 0).unwrap();
    assert_eq!(
        stacked.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        whole.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn generate_over_two_ranks_prints_what_one_rank_prints() {
    let ck = tiny_with_default_tokenizer();
    let dir = ck.path().to_str().unwrap();
    let run = |tp: &str| {
        let out = crosskv(&[
            "generate",
            "--model",
            dir,
            "--prompt",
            "The river runs",
            "--max-tokens",
            "12",
            "--tensor-parallel-size",
            tp,
        ]);
        assert!(
            out.status.success(),
            "tp {tp}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let (one, two) = (run("1"), run("2"));
    assert!(!one.trim().is_empty());
    assert_eq!(one, two);
}

#[test]
fn the_engine_serves_a_sharded_model_and_frees_its_blocks() {
    let ck = tiny_with_default_tokenizer();
    let config = EngineConfig {
        kv_cache_bytes: 1 << 20,
        block_size: BLOCK,
        max_model_len: 64,
        max_num_seqs: 4,
        max_num_batched_tokens: 64,
        max_queued_requests: 8,
        prefix_caching: true,
        cuda_graphs: false,
        async_scheduling: false,
    };
    let ids = |world: usize| {
        let loaded = model::load(ModelSource::Dir(ck.path().to_path_buf()), &opts(world)).unwrap();
        assert_eq!(loaded.peers.len(), world - 1);
        let ranks = std::iter::once(loaded.model).chain(loaded.peers).collect();
        let h = EngineHandle::start_ranks(ranks, loaded.tokenizer, config.clone()).unwrap();
        let mut got = Vec::new();
        for prompt in [vec![1u32, 50, 900, 77], vec![3, 3, 3, 3, 3, 3, 3]] {
            let mut s = h
                .submit(GenerateRequest {
                    prompt_ids: prompt,
                    options: GenerateOptions {
                        max_tokens: 10,
                        ignore_eos: true,
                        ..Default::default()
                    },
                })
                .unwrap();
            loop {
                match s.blocking_next().expect("a request ends with Finished") {
                    EngineEvent::Token { id, .. } => got.push(id),
                    EngineEvent::Finished { .. } => break,
                    EngineEvent::Error(e) => panic!("world {world}: {e}"),
                    EngineEvent::PromptLogprobs(_) => {}
                }
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while h.status().blocks_used != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "world {world}: KV blocks still held"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        h.shutdown();
        got
    };
    assert_eq!(ids(2), ids(1));
}

#[test]
fn sizes_that_do_not_divide_the_model_fail_naming_it() {
    let ck = tiny_with_default_tokenizer();
    let dir = ck.path().to_str().unwrap();
    let out = crosskv(&[
        "generate",
        "--model",
        dir,
        "--prompt",
        "x",
        "--tensor-parallel-size",
        "3",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("num_attention_heads 4") && err.contains("tensor-parallel size 3"),
        "{err}"
    );
    let out = crosskv(&[
        "generate",
        "--model",
        dir,
        "--prompt",
        "x",
        "--tensor-parallel-size",
        "0",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tensor-parallel-size 0"));
    let out = crosskv(&["eval", "--model", dir, "--data", dir, "--tensor-parallel-size", "2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("one device"));
}

#[test]
fn capacity_per_gpu_counts_each_ranks_kv_heads() {
    let dir = tempfile::tempdir().unwrap();
    let config = |kv: usize| {
        let p = dir.path().join(format!("kv{kv}.json"));
        let mut c = Tiny::new(4, 8, kv, 64, 512, 1000)
            .cla("cla_share_factor", json!(2))
            .config_json();
        c["intermediate_size"] = json!(1024);
        std::fs::write(&p, c.to_string()).unwrap();
        p
    };
    let bytes = |kv: usize, tp: &str| -> u64 {
        let p = config(kv);
        let out = crosskv(&[
            "capacity",
            "--config",
            p.to_str().unwrap(),
            "--json",
            "--tensor-parallel-size",
            tp,
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["kv_bytes_per_token"].as_u64().unwrap()
    };
    // 4 KV heads split over 2 GPUs: half the bytes per token on each.
    assert_eq!(bytes(4, "2") * 2, bytes(4, "1"));
    // MQA: the one KV head is replicated, so each GPU holds as much as one GPU did.
    assert_eq!(bytes(1, "2"), bytes(1, "1"));
    let p = config(4);
    let out = crosskv(&[
        "capacity",
        "--config",
        p.to_str().unwrap(),
        "--tensor-parallel-size",
        "3",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tensor-parallel-size 3"));
}

/// A rank whose all-reduce fails (as a rank failing mid-forward would leave its peers):
/// the step returns an error instead of leaving rank 0 waiting in its all-reduce.
#[test]
fn a_failing_rank_fails_the_step_instead_of_hanging_it() {
    use crosskv::tp::{AllReduce, LocalGroup};
    use std::sync::Arc;
    #[derive(Debug)]
    struct Failing(LocalGroup);
    impl AllReduce for Failing {
        fn all_reduce_sum(&self, _: &Tensor) -> candle_core::Result<Tensor> {
            candle_core::bail!("this rank broke")
        }
        fn abort(&self) {
            self.0.abort()
        }
    }
    let ck = Tiny::new(2, 4, 2, 8, 32, 61).seed(12).write();
    let mut ranks = model::load_model_dir_ranks(ck.path(), &opts(2)).unwrap();
    let mut groups = LocalGroup::new(2);
    let failing = groups.pop().unwrap();
    ranks[0].set_all_reduce(Arc::new(groups.pop().unwrap()));
    ranks[1].set_all_reduce(Arc::new(Failing(failing)));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let layout = ranks[0].layout().clone();
        let runner = Runner::tensor_parallel(ranks, 8, BLOCK).unwrap();
        let mut mgr = KvManager::new(layout, 8, BLOCK);
        mgr.allocate(0, 3).unwrap();
        let step = SeqStep {
            seq: 0,
            tokens: vec![1, 2, 3],
            start_pos: 0,
            all_logits: false,
        };
        let first = runner.step(&mgr, std::slice::from_ref(&step)).map(|_| ());
        let second = runner.step(&mgr, &[step]).map(|_| ());
        let _ = tx.send((first, second));
    });
    let (first, second) = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the step returned instead of hanging");
    let e = first.unwrap_err().to_string();
    assert!(
        e.contains("broke") || e.contains("another tensor-parallel rank failed"),
        "{e}"
    );
    assert!(second.is_err(), "the ranks are out of step: later steps fail too");
}
