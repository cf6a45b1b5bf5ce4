//! Golden logits: crosskv against Hugging Face transformers on tiny random checkpoints.
//!
//! Each `tests/fixtures/golden/<name>/` holds a float32 checkpoint written by
//! `save_pretrained` and the logits of one eager float32 forward in transformers
//! (`expected.json`). `make_golden.py` beside them rebuilds them; README.md there
//! names the torch/transformers versions. Both paths of the engine must reproduce
//! every position: the dense reference forward, and the paged runner prefilling half
//! the sequence and then decoding the rest one token at a time.

use crosskv::kv::KvManager;
use crosskv::model::{load_model_dir, LoadOptions, Model};
use crosskv::runner::{Runner, SeqStep};
use std::path::PathBuf;

const TOL: f32 = 1e-4;
const BLOCK_SIZE: usize = 4;
const NUM_BLOCKS: usize = 64;

struct Golden {
    input_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(name)
}

fn load_golden(name: &str) -> (Model, Golden) {
    let dir = fixture_dir(name);
    let model = load_model_dir(&dir, &LoadOptions::default()).unwrap_or_else(|e| panic!("{name}: load failed: {e}"));
    let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let input_ids: Vec<u32> = v["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let logits: Vec<Vec<f32>> = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    assert_eq!(logits.len(), input_ids.len(), "{name}: one logits row per input id");
    assert!(logits.iter().all(|r| r.len() == model.config().vocab_size));
    (model, Golden { input_ids, logits })
}

fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

/// Max |diff| of the dense forward over all positions.
fn dense_max_diff(name: &str) -> f32 {
    let (model, g) = load_golden(name);
    let got: Vec<Vec<f32>> = model.forward_dense(&g.input_ids).unwrap().to_vec2().unwrap();
    assert_eq!(got.len(), g.logits.len());
    let mut worst = 0f32;
    for (pos, (row, want)) in got.iter().zip(&g.logits).enumerate() {
        let d = max_abs_diff(row, want);
        assert!(
            d <= TOL,
            "{name}: dense logits at position {pos} differ from transformers by {d:e}"
        );
        worst = worst.max(d);
    }
    eprintln!("{name}: dense max |diff| = {worst:e}");
    worst
}

/// Max |diff| of the paged runner: prefill the first half, then decode one token a step.
fn paged_max_diff(name: &str) -> f32 {
    let (model, g) = load_golden(name);
    let layout = model.layout().clone();
    let runner = Runner::new(model, NUM_BLOCKS, BLOCK_SIZE).unwrap();
    let mut mgr = KvManager::new(layout, NUM_BLOCKS, BLOCK_SIZE);
    let seq = 7;
    let ids = &g.input_ids;
    let half = ids.len() / 2;
    let mut worst = 0f32;
    let mut check = |pos: usize, logits: candle_core::Tensor, what: &str| {
        let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        assert_eq!(rows.len(), 1, "one logits row per sequence");
        let d = max_abs_diff(&rows[0], &g.logits[pos]);
        assert!(
            d <= TOL,
            "{name}: paged {what} logits at position {pos} differ from transformers by {d:e}"
        );
        worst = worst.max(d);
    };

    mgr.allocate(seq, half).unwrap();
    let prefill = SeqStep {
        seq,
        tokens: ids[..half].to_vec(),
        start_pos: 0,
        all_logits: false,
    };
    check(half - 1, runner.step(&mgr, &[prefill]).unwrap(), "prefill");
    for (pos, &id) in ids.iter().enumerate().skip(half) {
        mgr.allocate(seq, pos + 1).unwrap();
        let step = SeqStep {
            seq,
            tokens: vec![id],
            start_pos: pos,
            all_logits: false,
        };
        check(pos, runner.step(&mgr, &[step]).unwrap(), "decode");
    }
    eprintln!("{name}: paged max |diff| = {worst:e}");
    worst
}

macro_rules! golden_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn dense_forward_matches_transformers_logits_at_every_position() {
                    super::dense_max_diff(stringify!($name));
                }

                #[test]
                fn paged_prefill_then_token_by_token_decode_matches_transformers_logits() {
                    super::paged_max_diff(stringify!($name));
                }
            }
        )*
    };
}

// The fixtures:
// - llama_gqa: llama, GQA 4/2, tied embeddings, plain RoPE.
// - llama_headdim_rope3: llama, head_dim 16 != 48/4, MQA, llama3 RoPE scaling, q/k/v/o biases, untied lm_head.
// - qwen2_bias: qwen2, GQA 4/2, q/k/v biases (no o bias), rope_theta 1e6.
golden_tests!(llama_gqa, llama_headdim_rope3, qwen2_bias);
