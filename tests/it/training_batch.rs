//! The training step's batched forward (`Model::forward_dense_batch`: b windows as one
//! `[b·t, …]` graph, attention on `[b, t, heads, d]`) against one `forward_dense` per
//! window on a tiny random CLA model: the same logits, the same batch loss (the mean of
//! the windows' mean losses through candle_nn's cross-entropy, as the step computed it
//! before) and the same gradients.

use crate::common::{flat, max_abs_diff, Rng, Tiny};
use candle_core::{Device, Tensor};
use crosskv::train::eval::windows_loss;
use crosskv::train::Trainable;
use serde_json::json;

/// 4 layers sharing K/V in pairs, GQA 4/2, and 3 windows of 9 tokens.
fn setup() -> (Trainable, Vec<Vec<u32>>) {
    let tiny = Tiny::new(4, 4, 2, 8, 32, 61).cla("cla_share_factor", json!(2)).seed(5);
    let ck = tiny.write();
    let t = Trainable::from_dir(ck.path(), None, crosskv::model::reshare::KvInit::First, &Device::Cpu).unwrap();
    let mut rng = Rng::new(11);
    let windows = (0..3).map(|_| rng.tokens(9, tiny.vocab)).collect();
    (t, windows)
}

#[test]
fn batched_forward_gives_each_windows_own_logits() {
    let (t, windows) = setup();
    let inputs: Vec<&[u32]> = windows.iter().map(|w| &w[..8]).collect();
    let batched = t.model.forward_dense_batch(&inputs).unwrap();
    assert_eq!(batched.dims(), &[3 * 8, 61]);
    for (i, w) in inputs.iter().enumerate() {
        let one = flat(&t.model.forward_dense(w).unwrap());
        let rows = flat(&batched.narrow(0, i * 8, 8).unwrap());
        let d = max_abs_diff(&rows, &one);
        assert!(d < 1e-5, "window {i}: max |Δlogit| {d}");
    }
    // Windows of different lengths are refused, naming the lengths.
    let e = t
        .model
        .forward_dense_batch(&[&windows[0][..8], &windows[1][..7]])
        .unwrap_err();
    assert!(e.to_string().contains("7 and 8"), "{e}");
}

#[test]
fn batch_loss_and_gradients_equal_the_mean_over_windows() {
    let (t, windows) = setup();
    let batch: Vec<&[u32]> = windows.iter().map(|w| w.as_slice()).collect();
    let batched = windows_loss(&t.model, &batch).unwrap();
    // The step's loss before batching: one graph per window (candle_nn's cross-entropy,
    // as it was), their mean.
    let mut per_window: Option<Tensor> = None;
    for w in &batch {
        let logits = t.model.forward_dense(&w[..w.len() - 1]).unwrap();
        let targets = Tensor::new(&w[1..], &Device::Cpu).unwrap();
        let l = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        per_window = Some(match per_window {
            None => l,
            Some(s) => (s + l).unwrap(),
        });
    }
    let per_window = (per_window.unwrap() / batch.len() as f64).unwrap();
    let (a, b) = (
        batched.to_scalar::<f32>().unwrap(),
        per_window.to_scalar::<f32>().unwrap(),
    );
    assert!((a - b).abs() < 1e-6 * b.abs(), "batched {a}, per window {b}");
    let (ga, gb) = (batched.backward().unwrap(), per_window.backward().unwrap());
    for (name, var) in t.vars() {
        let (x, y) = (
            flat(ga.get(var.as_tensor()).unwrap()),
            flat(gb.get(var.as_tensor()).unwrap()),
        );
        let scale = y.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let d = max_abs_diff(&x, &y);
        assert!(d < 1e-5 * scale.max(1.0), "{name}: max |Δgrad| {d} (largest {scale})");
    }
}
