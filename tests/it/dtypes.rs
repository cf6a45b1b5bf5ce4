//! Half-precision runs: the golden checkpoint in f16 and bf16 stays close to the
//! transformers f32 logits, through both the dense and the paged path (K/V cached in
//! the same half dtype).

use candle_core::DType;
use crosskv::kv::KvManager;
use crosskv::model::{load_model_dir, LoadOptions};
use crosskv::runner::{Runner, SeqStep};

fn fixture() -> (std::path::PathBuf, Vec<u32>, Vec<Vec<f32>>) {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/llama_gqa");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ids = v["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let logits = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    (dir, ids, logits)
}

fn max_rel(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale
}

#[test]
fn half_precision_models_track_the_f32_logits_in_both_paths() {
    let (dir, ids, want) = fixture();
    for (dtype, bound) in [(DType::F16, 5e-3), (DType::BF16, 4e-2)] {
        let model = load_model_dir(
            &dir,
            &LoadOptions {
                dtype: Some(dtype),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(model.dtype(), dtype);
        let dense: Vec<Vec<f32>> = model.forward_dense(&ids).unwrap().to_vec2().unwrap();
        for (pos, row) in dense.iter().enumerate() {
            let err = max_rel(row, &want[pos]);
            assert!(err < bound, "{dtype:?} dense position {pos}: relative error {err}");
        }
        let layout = model.layout().clone();
        let runner = Runner::new(model, 32, 4).unwrap();
        assert_eq!(
            runner.cache().k().dtype(),
            dtype,
            "the cache holds K/V in the model dtype"
        );
        let mut mgr = KvManager::new(layout, 32, 4);
        mgr.allocate(0, 5).unwrap();
        let mut rows = vec![runner
            .step(
                &mgr,
                &[SeqStep {
                    seq: 0,
                    tokens: ids[..5].to_vec(),
                    start_pos: 0,
                    all_logits: false,
                }],
            )
            .unwrap()];
        for (pos, &id) in ids.iter().enumerate().skip(5) {
            mgr.allocate(0, pos + 1).unwrap();
            rows.push(
                runner
                    .step(
                        &mgr,
                        &[SeqStep {
                            seq: 0,
                            tokens: vec![id],
                            start_pos: pos,
                            all_logits: false,
                        }],
                    )
                    .unwrap(),
            );
        }
        for (i, r) in rows.iter().enumerate() {
            let pos = 4 + i;
            let err = max_rel(&r.get(0).unwrap().to_vec1::<f32>().unwrap(), &want[pos]);
            assert!(err < bound, "{dtype:?} paged position {pos}: relative error {err}");
        }
    }
}
