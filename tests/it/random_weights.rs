//! `Weights::random`: a model of any config without files. CLA consumers get no k/v
//! projections, the same seed gives the same weights, and the paged path of such a
//! model gives the dense forward's logits.

use crate::common::{dense_logits, max_abs_diff, rows, Rng};
use candle_core::{DType, Device};
use crosskv::config::ModelConfig;
use crosskv::kv::KvManager;
use crosskv::model::weights::Weights;
use crosskv::model::Model;
use crosskv::runner::{Runner, SeqStep};
use serde_json::json;

fn cfg(cla: usize) -> ModelConfig {
    ModelConfig::from_json(json!({
        "model_type": "llama",
        "vocab_size": 67, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 16, "max_position_embeddings": 64, "cla_share_factor": cla,
    }))
    .unwrap()
}

#[test]
fn random_weights_respect_cla_and_the_seed() {
    let c = cfg(2);
    let w = Weights::random(&c, DType::F32, &Device::Cpu, 7).unwrap();
    for i in 0..4 {
        let k = format!("model.layers.{i}.self_attn.k_proj.weight");
        assert_eq!(w.contains(&k), i % 2 == 0, "{k}");
        assert!(w.contains(&format!("model.layers.{i}.self_attn.q_proj.weight")));
    }
    assert!(w.contains("lm_head.weight"));
    let again = Weights::random(&c, DType::F32, &Device::Cpu, 7).unwrap();
    let other = Weights::random(&c, DType::F32, &Device::Cpu, 8).unwrap();
    let name = "model.layers.2.mlp.down_proj.weight";
    let t = |w: &Weights| {
        w.tensor(name, &[32, 48])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(t(&w), t(&again));
    assert_ne!(t(&w), t(&other));
    let std = (t(&w).iter().map(|x| x * x).sum::<f32>() / (32.0 * 48.0)).sqrt();
    assert!((0.015..0.025).contains(&std), "std {std}");
    let model = Model::load(&c, &w, false).unwrap();
    assert_eq!(model.layout().kv_layers(), 2);
    // q, o, gate, up, down per layer, k and v for the two producers, lm_head.
    assert_eq!(model.named_linears().len(), 4 * 5 + 2 * 2 + 1);
}

#[test]
fn random_model_paged_decode_matches_dense() {
    let c = cfg(2);
    let model = Model::load(&c, &Weights::random(&c, DType::F32, &Device::Cpu, 3).unwrap(), false).unwrap();
    let toks = Rng::new(1).tokens(9, 67);
    let want = dense_logits(&model, &toks);
    let blocks = 3 * model.layout().kv_layers();
    let mut mgr = KvManager::new(model.layout().clone(), blocks, 4);
    let runner = Runner::new(model, blocks, 4).unwrap();
    mgr.allocate(0, toks.len()).unwrap();
    let step = |tokens: &[u32], start_pos| SeqStep {
        seq: 0,
        tokens: tokens.to_vec(),
        start_pos,
        all_logits: false,
    };
    runner.step(&mgr, &[step(&toks[..8], 0)]).unwrap();
    let got = rows(&runner.step(&mgr, &[step(&toks[8..], 8)]).unwrap());
    let d = max_abs_diff(&got[0], &want[8]);
    assert!(d < 1e-4, "paged decode differs from dense by {d}");
}
