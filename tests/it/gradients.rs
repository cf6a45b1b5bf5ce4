//! The model is differentiable on the CPU (the training path's base): gradients of the
//! next-token loss through our fused ops (RMSNorm, add+RMSNorm, RoPE, each with a
//! backward) and a CLA model's shared K/V match central finite differences.

use crate::common::{Rng, Tiny};
use candle_core::{DType, Device, Tensor, Var};
use crosskv::config::ModelConfig;
use crosskv::model::weights::Weights;
use crosskv::model::Model;
use serde_json::json;
use std::collections::HashMap;

fn loss(model: &Model, tokens: &[u32]) -> Tensor {
    let n = tokens.len();
    let logits = model.forward_dense(&tokens[..n - 1]).unwrap();
    let targets = Tensor::new(&tokens[1..], &Device::Cpu).unwrap();
    candle_nn::loss::cross_entropy(&logits, &targets).unwrap()
}

#[test]
fn cla_model_gradients_match_finite_differences() {
    // 4 layers sharing K/V in pairs, GQA 4/2, head_dim 8: a producer's K/V gradient is
    // the sum over the two layers that read it.
    let tiny = Tiny::new(4, 4, 2, 8, 32, 61).cla("cla_share_factor", json!(2)).seed(3);
    let ck = tiny.write();
    let cfg = ModelConfig::from_file(&ck.path().join("config.json")).unwrap();
    let vars: HashMap<String, Var> = ck
        .tensors
        .iter()
        .map(|(k, t)| (k.clone(), Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap()))
        .collect();
    let weights = Weights::Tensors {
        tensors: vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect(),
        dtype: DType::F32,
        device: Device::Cpu,
    };
    let model = Model::load(&cfg, &weights, false).unwrap();
    let tokens = Rng::new(9).tokens(12, tiny.vocab);
    let grads = loss(&model, &tokens).backward().unwrap();

    let names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.k_proj.weight", // producer of layers 0 and 1
        "model.layers.2.self_attn.v_proj.weight", // producer of layers 2 and 3
        "model.layers.1.self_attn.q_proj.weight", // a consumer
        "model.layers.3.self_attn.o_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.2.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
    ];
    let eps = 1e-2f32;
    let mut checked = 0;
    for name in names {
        let var = &vars[name];
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The three entries with the largest gradient.
        let mut idx: Vec<usize> = (0..g.len()).collect();
        idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &i in &idx[..3] {
            let at = |delta: f32| {
                let mut w = base.clone();
                w[i] += delta;
                var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&model, &tokens).to_scalar::<f32>().unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let err = (fd - g[i]).abs();
            assert!(
                err <= 0.02 * g[i].abs() + 1e-3,
                "{name}[{i}]: autograd {} vs finite difference {fd}",
                g[i]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 27);
}

/// Each fused op's backward against central finite differences of a random projection
/// of its output.
#[test]
fn fused_op_backwards_match_finite_differences() {
    use crosskv::ops::{add_rms_norm, rms_norm, rope};
    let mut rng = Rng::new(21);
    let (t, h, kvh, d) = (5, 4, 2, 8);
    let x = Var::from_tensor(&rng.tensor(&[t, 24], 1.0, 0.0)).unwrap();
    let r = Var::from_tensor(&rng.tensor(&[t, 24], 1.0, 0.0)).unwrap();
    let w = Var::from_tensor(&rng.tensor(&[24], 0.5, 1.0)).unwrap();
    let q = Var::from_tensor(&rng.tensor(&[t, h, d], 1.0, 0.0)).unwrap();
    let k = Var::from_tensor(&rng.tensor(&[t, kvh, d], 1.0, 0.0)).unwrap();
    let pos = Tensor::new(&[3u32, 0, 7, 1, 5], &Device::Cpu).unwrap();
    let angles: Vec<f32> = (0..16 * d / 2).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
    let ang = Tensor::from_vec(angles, (16, d / 2), &Device::Cpu).unwrap();
    let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
    let proj = |n: usize, seed: u64| Rng::new(seed).tensor(&[n], 1.0, 0.0);
    type Scalar<'a> = Box<dyn Fn() -> Tensor + 'a>;
    let ops: Vec<(&str, Scalar)> = vec![
        (
            "rms_norm",
            Box::new(|| {
                (rms_norm(&x, &w, 1e-5).unwrap().flatten_all().unwrap() * proj(t * 24, 1))
                    .unwrap()
                    .sum_all()
                    .unwrap()
            }),
        ),
        (
            "add_rms_norm",
            Box::new(|| {
                let (s, n) = add_rms_norm(&x, &r, &w, 1e-5).unwrap();
                let a = (s.flatten_all().unwrap() * proj(t * 24, 2)).unwrap().sum_all().unwrap();
                let b = (n.flatten_all().unwrap() * proj(t * 24, 3)).unwrap().sum_all().unwrap();
                (a + b).unwrap()
            }),
        ),
        (
            "rope",
            Box::new(|| {
                let (qr, kr) = rope(&q, Some(&k), &pos, &cos, &sin, false).unwrap();
                let a = (qr.flatten_all().unwrap() * proj(t * h * d, 4))
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let b = (kr.unwrap().flatten_all().unwrap() * proj(t * kvh * d, 5))
                    .unwrap()
                    .sum_all()
                    .unwrap();
                (a + b).unwrap()
            }),
        ),
    ];
    for (name, f) in &ops {
        let grads = f().backward().unwrap();
        let params: Vec<(&str, &Var)> = match *name {
            "rms_norm" => vec![("x", &x), ("w", &w)],
            "add_rms_norm" => vec![("x", &x), ("r", &r), ("w", &w)],
            _ => vec![("q", &q), ("k", &k)],
        };
        for (pname, var) in params {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {pname}"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for i in [0, g.len() / 3, g.len() - 1] {
                let at = |delta: f32| {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    f().to_scalar::<f32>().unwrap()
                };
                let fd = (at(1e-2) - at(-1e-2)) / 2e-2;
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                assert!(
                    (fd - g[i]).abs() <= 0.02 * g[i].abs() + 2e-3,
                    "{name} d/d{pname}[{i}]: {} vs {fd}",
                    g[i]
                );
            }
        }
    }
}
