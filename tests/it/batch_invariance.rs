//! One answer per request on CPU: a request's tokens and log-probs are bitwise the same
//! whether it runs alone or among others, with its prompt split by chunked prefill, or
//! preempted and recomputed. Greedy and seeded sampling, through the HTTP server, on
//! tiny random models in f32, bf16 and the GGUF block formats (our Q4_1/Q8_0 kernels
//! and candle's Q4_0).

use crate::common::{Checkpoint, Rng};
use crate::http::{start_model, text_of, tiny_checkpoint, Server, Setup};
use candle_core::quantized::GgmlDType;
use candle_core::DType;
use crosskv::engine::Fault;
use crosskv::model::{LoadOptions, Model};
use serde_json::{json, Value};

/// The requests: prompts of 3–40 tokens (or all of `prompt_len`), half greedy, half
/// sampled with a seed, all with log-probs and top-3 alternatives.
fn bodies(vocab: usize, prompt_len: Option<usize>) -> Vec<Value> {
    let mut rng = Rng::new(29);
    (0..12)
        .map(|i| {
            let len = prompt_len.unwrap_or(3 + (rng.next_u64() % 38) as usize);
            let mut b = json!({"prompt": rng.tokens(len, vocab), "max_tokens": 8 + i % 5,
                "ignore_eos": true, "logprobs": 3});
            if i % 2 == 0 {
                b["temperature"] = json!(0);
            } else {
                b["temperature"] = json!(0.9);
                b["seed"] = json!(1000 + i);
            }
            b
        })
        .collect()
}

/// What must not change: the text and every log-prob, as the JSON carries them.
fn answer(r: &Value) -> (String, Value) {
    (text_of(r, 0), r["choices"][0]["logprobs"].clone())
}

/// Each request alone, then all at once: the same answers, bit for bit.
async fn alone_equals_together(s: &Server, bodies: Vec<Value>, what: &str) {
    let mut alone = Vec::new();
    for b in &bodies {
        let (st, r) = s.post("/v1/completions", b.clone()).await;
        assert_eq!(st, 200, "{what}: {r}");
        alone.push(answer(&r));
    }
    // The first step stalls while the others arrive, so they all share the steps.
    s.handle
        .inject_fault(Fault::StallStep(std::time::Duration::from_millis(300)));
    let together = futures_util::future::join_all(bodies.iter().map(|b| s.post("/v1/completions", b.clone()))).await;
    for (i, (st, r)) in together.iter().enumerate() {
        assert_eq!(*st, 200, "{what}: {r}");
        assert_eq!(answer(r), alone[i], "{what}: request {i} ({})", bodies[i]);
    }
    s.wait_idle().await;
}

/// The three ways a request can share the engine: batched, chunked, preempted.
async fn every_schedule(vocab: usize, max_model_len: usize, model: impl Fn() -> (Checkpoint, Model)) {
    let plain = Setup {
        vocab,
        max_model_len,
        ..Default::default()
    };
    let (ck, m) = model();
    alone_equals_together(&start_model(plain, ck, m).await, bodies(vocab, None), "batched").await;

    // Prompts of up to 40 tokens split into chunks of at most 16 tokens a step.
    let chunked = Setup {
        vocab,
        max_model_len,
        max_num_batched_tokens: 16,
        ..Default::default()
    };
    let (ck, m) = model();
    alone_equals_together(&start_model(chunked, ck, m).await, bodies(vocab, None), "chunked").await;

    // A cache of 4 blocks a KV slot (64 tokens, one max_model_len sequence) and prompts
    // of 15 tokens: four requests start in one block each, and each needs a second one
    // two tokens later, so some are preempted and recomputed.
    let (ck, m) = model();
    let preempting = Setup {
        vocab,
        max_model_len: 64,
        kv_cache_bytes: 4 * m.layout().bytes_for_tokens(16, 16),
        ..Default::default()
    };
    let s = start_model(preempting, ck, m).await;
    alone_equals_together(&s, bodies(vocab, Some(15)), "preempted").await;
    assert!(
        s.metric("crosskv_num_preemptions_total").await > 0.0,
        "the small cache forced no preemption"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f32_and_bf16_models_answer_the_same_alone_or_shared() {
    for dtype in [DType::F32, DType::BF16] {
        every_schedule(crate::http::VOCAB, 256, || {
            let ck = tiny_checkpoint(crate::http::VOCAB);
            let m = ck.load_with(&LoadOptions {
                dtype: Some(dtype),
                ..Default::default()
            });
            (ck, m)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quantized_models_answer_the_same_alone_or_shared() {
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4_0] {
        every_schedule(crate::gguf::VOCAB, 64, || {
            // The checkpoint directory holds the GGUF file (and lives with the server).
            let ck = tiny_checkpoint(8);
            let path = ck.path().join("tiny.gguf");
            crate::gguf::write_gguf(&path, &crate::gguf::tiny_weights(), dtype);
            (ck, crate::gguf::load_gguf(&path))
        })
        .await;
    }
}

/// `--batch-invariant` on CUDA: the same guarantee through the server, for a tiny CLA
/// model the CUDA kernels take (head_dim 64), in bf16 (tensor cores) and f32.
#[cfg(feature = "cuda")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuda_batch_invariant_mode_answers_the_same_alone_or_shared() {
    for dtype in [DType::BF16, DType::F32] {
        every_schedule(crate::http::VOCAB, 256, || {
            let mut ck = crate::common::Tiny::new(4, 4, 2, 64, 128, crate::http::VOCAB)
                .cla("cla_share_factor", json!(2))
                .seed(7)
                .write();
            ck.config["max_position_embeddings"] = json!(4096);
            ck.save();
            let mut m = ck.load_with(&LoadOptions {
                dtype: Some(dtype),
                device: crosskv::device::cuda(0).expect("a CUDA device"),
                ..Default::default()
            });
            m.set_batch_invariant(true);
            (ck, m)
        })
        .await;
    }
}

/// `crosskv bench --batch`'s runner loop (`runner::decode_batch`): every sequence gets
/// exactly the greedy tokens it gets generated alone, and every block comes back.
#[test]
fn decode_batch_gives_each_prompt_its_tokens_alone() {
    use crosskv::kv::KvManager;
    use crosskv::runner::{decode_batch, generate, GenerateOptions, Runner, SamplingParams};
    let ck = tiny_checkpoint(crate::http::VOCAB);
    let m = ck.load();
    let layout = m.layout().clone();
    let blocks = 64 * layout.kv_layers();
    let runner = Runner::new(m, blocks, 16).unwrap();
    let mut mgr = KvManager::new(layout, blocks, 16);
    let mut rng = Rng::new(3);
    let prompts: Vec<Vec<u32>> = (0..5).map(|i| rng.tokens(3 + 7 * i, crate::http::VOCAB)).collect();
    let st = decode_batch(&runner, &mut mgr, &prompts, 9).unwrap();
    assert_eq!((st.sequences, st.decode_steps), (5, 8));
    assert_eq!(mgr.num_free_blocks(), blocks);
    let opts = GenerateOptions {
        max_tokens: 9,
        sampling: SamplingParams::default(),
        stop_at_eos: false,
    };
    let tok = crate::http::tokenizer();
    for (p, got) in prompts.iter().zip(&st.tokens) {
        let (alone, _) = generate(&runner, &mut mgr, &tok, p, &opts, |_| {}).unwrap();
        assert_eq!(&alone, got, "prompt of {} tokens", p.len());
    }
}
