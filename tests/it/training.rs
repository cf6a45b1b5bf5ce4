//! `crosskv train` / `finetune`: a tiny CLA2 model learns (held-out perplexity falls),
//! the output loads for eval, the per-step log is complete, bad flags fail cleanly.

use crate::common::{crosskv, tiny_with_default_tokenizer, Tiny};
use serde_json::{json, Value};

/// A small, very repetitive corpus: a model learns it in a few dozen steps.
fn corpus(dir: &std::path::Path) -> String {
    let lines = [
        "The cat sat on the mat and looked at the dog.",
        "The dog sat on the rug and looked at the cat.",
        "A bird sang in the tree while the sun went down.",
    ];
    let text: String = (0..60).map(|i| lines[i % 3]).collect::<Vec<_>>().join(" ");
    let p = dir.join("corpus.txt");
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn train_a_tiny_cla2_model_lowers_heldout_perplexity() {
    let tok_src = tiny_with_default_tokenizer();
    let tiny = Tiny::new(2, 4, 2, 8, 32, 49152).cla("cla_share_factor", json!(2));
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("config.json");
    std::fs::write(&cfg, serde_json::to_string(&tiny.config_json()).unwrap()).unwrap();
    let work = tempfile::tempdir().unwrap();
    let data = corpus(work.path());
    let out = work.path().join("model");
    let log = work.path().join("log.jsonl");
    let tokenizer = tok_src.path().join("tokenizer.json");
    let o = crosskv(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--data",
        &data,
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "40",
        "--batch-size",
        "4",
        "--seq-len",
        "16",
        "--lr",
        "1e-2",
        "--holdout",
        "0.1",
        "--log-json",
        log.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let (before, after) = (
        v["heldout_perplexity_before"].as_f64().unwrap(),
        v["heldout_perplexity_after"].as_f64().unwrap(),
    );
    // Random init is near-uniform over 49k tokens; 40 steps on this corpus get far below.
    assert!(before > 1000.0, "{before}");
    assert!(after < before / 10.0, "held-out perplexity {before} → {after}");
    let lines: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 40);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["step"].as_u64().unwrap() as usize, i + 1);
        for k in ["loss", "lr", "grad_norm", "tokens_per_s"] {
            assert!(l[k].as_f64().unwrap().is_finite(), "{k} in {l}");
        }
    }
    let mean = |s: &[Value]| s.iter().map(|l| l["loss"].as_f64().unwrap()).sum::<f64>() / s.len() as f64;
    assert!(mean(&lines[35..]) < mean(&lines[..5]) - 1.0);

    // The output is a CLA checkpoint that eval loads, with the perplexity train reported.
    let cfg_out: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg_out["kv_source"], json!([0, 0]));
    let e = crosskv(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        &data,
        "--seq-len",
        "16",
        "--json",
    ]);
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    let ev: Value = serde_json::from_slice(&e.stdout).unwrap();
    assert!(ev["perplexity"].as_f64().unwrap() < before / 10.0);

    // finetune: the trained model re-shared is loaded and trained further.
    let out2 = work.path().join("ft");
    let f = crosskv(&[
        "finetune",
        "--model",
        out.to_str().unwrap(),
        "--data",
        &data,
        "--out",
        out2.to_str().unwrap(),
        "--steps",
        "5",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--lr",
        "1e-3",
        "--json",
    ]);
    assert!(f.status.success(), "{}", String::from_utf8_lossy(&f.stderr));
    let fv: Value = serde_json::from_slice(&f.stdout).unwrap();
    assert_eq!(fv["steps"], json!(5));
    assert!(out2.join("model.safetensors").exists() && out2.join("tokenizer.json").exists());
}

#[test]
fn train_bad_flags_fail_naming_the_problem() {
    let tok_src = tiny_with_default_tokenizer();
    let work = tempfile::tempdir().unwrap();
    let data = corpus(work.path());
    let model = tok_src.path().to_str().unwrap();
    let out = work.path().join("o");
    let out = out.to_str().unwrap();
    for (extra, needle) in [
        (vec!["--seq-len", "16", "--holdout", "1.5"], "--holdout"),
        (vec!["--seq-len", "16", "--batch-size", "0"], "--batch-size"),
        (vec!["--seq-len", "100000"], "positions"),
        (
            vec!["--seq-len", "16", "--log-json", "/no/such/dir/log.jsonl"],
            "--log-json",
        ),
    ] {
        let mut args = vec![
            "finetune", "--model", model, "--data", &data, "--out", out, "--steps", "1",
        ];
        args.extend(extra);
        let o = crosskv(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
