//! `crosskv train` / `finetune`: a tiny CLA2 model learns (held-out perplexity falls),
//! the output loads for eval, the per-step log is complete, bad flags fail cleanly; a
//! run stopped and resumed gives the same losses as one straight run; bf16 compute with
//! f32 master weights learns like f32; a converted (re-shared) model recovers by fine-tuning.

use crate::common::{crosskv, tiny_with_default_tokenizer, Tiny};
use serde_json::{json, Value};
use std::path::Path;

/// A small, very repetitive corpus: a model learns it in a few dozen steps.
fn corpus(dir: &std::path::Path) -> String {
    corpus_of(dir, 60)
}

/// The corpus with `n` sentences (60: about 40 training windows of 16 tokens).
fn corpus_of(dir: &std::path::Path, n: usize) -> String {
    let lines = [
        "The cat sat on the mat and looked at the dog.",
        "The dog sat on the rug and looked at the cat.",
        "A bird sang in the tree while the sun went down.",
    ];
    let text: String = (0..n).map(|i| lines[i % 3]).collect::<Vec<_>>().join(" ");
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

/// Runs crosskv with `args` (ending in `--json`), asserting success; the JSON summary.
fn run_json(args: &[&str]) -> Value {
    let o = crosskv(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{args:?}: {err}");
    let out = String::from_utf8(o.stdout).unwrap();
    assert_eq!(out.lines().count(), 1, "one JSON line on stdout: {out}");
    serde_json::from_str(&out).unwrap()
}

fn log_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A tiny CLA2 config (2 layers, the real tokenizer's vocabulary) in `dir`.
fn cla2_config(dir: &Path) -> String {
    let tiny = Tiny::new(2, 4, 2, 8, 32, 49152).cla("cla_share_factor", json!(2));
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_string(&tiny.config_json()).unwrap()).unwrap();
    p.to_str().unwrap().to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_run_stopped_and_resumed_gives_the_same_losses_as_one_straight_run() {
    let tok_src = tiny_with_default_tokenizer();
    let tokenizer = tok_src.path().join("tokenizer.json");
    let work = tempfile::tempdir().unwrap();
    let cfg = cla2_config(work.path());
    // About 16 training windows: by step 10, 2 a step have taken more than one pass, so
    // the resumed data order is past a reshuffle.
    let data = corpus_of(work.path(), 24);
    let (straight, split) = (work.path().join("straight"), work.path().join("split"));
    let (log_a, log_b) = (work.path().join("a.jsonl"), work.path().join("b.jsonl"));
    let common = [
        "--data",
        &data,
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--lr",
        "1e-2",
        "--holdout",
        "0.1",
        "--json",
    ];
    let train = |out: &Path, log: &Path, extra: &[&str]| {
        let mut args = vec!["train", "--out", s(out), "--log-json", s(log)];
        args.extend(common);
        args.extend(extra);
        run_json(&args)
    };
    let tok_cfg = ["--config", &cfg, "--tokenizer", s(&tokenizer)];
    let a = train(&straight, &log_a, &[&tok_cfg[..], &["--steps", "20"]].concat());
    assert_eq!((a["steps"].clone(), a["step"].clone()), (json!(20), json!(20)));

    let b1 = train(
        &split,
        &log_b,
        &[
            &tok_cfg[..],
            &["--steps", "20", "--stop-after", "10", "--save-every", "4"],
        ]
        .concat(),
    );
    assert_eq!((b1["step"].clone(), b1["total_steps"].clone()), (json!(10), json!(20)));
    let state = read_json(&split.join("trainer_state.json"));
    assert_eq!((state["step"].clone(), state["steps"].clone()), (json!(10), json!(20)));
    assert_eq!(state["data"]["epoch"], json!(1), "{state}");
    assert!(split.join("optimizer.safetensors").exists() && split.join("tokenizer.json").exists());
    // A run that died after its checkpoint logged steps the resumed run does again.
    let mut log = std::fs::OpenOptions::new().append(true).open(&log_b).unwrap();
    use std::io::Write;
    writeln!(log, "{}", json!({"step": 11, "loss": 0.0})).unwrap();
    drop(log);

    // Resumed in place, with nothing but the checkpoint, the data and the total.
    let b2 = run_json(
        &[
            &[
                "train",
                "--resume",
                s(&split),
                "--out",
                s(&split),
                "--log-json",
                s(&log_b),
                "--steps",
                "20",
            ][..],
            &["--data", &data, "--json"],
        ]
        .concat(),
    );
    assert_eq!(
        (b2["steps"].clone(), b2["step"].clone(), b2["resumed_from"].clone()),
        (json!(10), json!(20), json!(10))
    );
    let (la, lb) = (log_lines(&log_a), log_lines(&log_b));
    assert_eq!(la.len(), 20);
    assert_eq!(lb.len(), 20, "{lb:?}");
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(x["step"], y["step"]);
        assert_eq!(x["lr"], y["lr"], "the schedule continues: {x} vs {y}");
        let (p, q) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!((p - q).abs() <= 1e-5 * p.abs(), "step {}: {p} vs {q}", x["step"]);
    }
    assert_eq!(a["heldout_perplexity_after"], b2["heldout_perplexity_after"]);
    let load =
        |d: &Path| candle_core::safetensors::load(d.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let (wa, wb) = (load(&straight), load(&split));
    assert_eq!(wa.len(), wb.len());
    for (name, t) in &wa {
        let d = (t - &wb[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= 1e-6, "{name} differs by {d}");
    }
}

#[test]
fn bad_resume_input_fails_naming_the_problem() {
    let tok_src = tiny_with_default_tokenizer();
    let tokenizer = tok_src.path().join("tokenizer.json");
    let work = tempfile::tempdir().unwrap();
    let cfg = cla2_config(work.path());
    let data = corpus(work.path());
    let ck = work.path().join("ck");
    let base = [
        "--data",
        &data,
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--holdout",
        "0.1",
    ];
    let mut args = vec!["train", "--config", &cfg, "--tokenizer", s(&tokenizer), "--out", s(&ck)];
    args.extend(base);
    args.extend(["--steps", "6", "--stop-after", "3", "--json"]);
    run_json(&args);

    // A checkpoint without its state file; a model of another size.
    let no_state = work.path().join("no_state");
    std::fs::create_dir(&no_state).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "tokenizer.json",
    ] {
        std::fs::copy(ck.join(f), no_state.join(f)).unwrap();
    }
    let wide_dir = work.path().join("wide");
    std::fs::create_dir(&wide_dir).unwrap();
    let wide = Tiny::new(2, 4, 2, 8, 64, 49152).cla("cla_share_factor", json!(2));
    let wide_cfg = wide_dir.join("config.json");
    std::fs::write(&wide_cfg, serde_json::to_string(&wide.config_json()).unwrap()).unwrap();
    let other_data = work.path().join("other.txt");
    std::fs::write(&other_data, "Something else entirely, written only once. ".repeat(30)).unwrap();
    let out = work.path().join("out");

    let ck = s(&ck);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["train", "--resume", "/no/such/ck"],
            "/no/such/ck: no such directory",
        ),
        (vec!["train", "--resume", s(&no_state)], "no trainer_state.json"),
        (vec!["train", "--resume", ck, "--steps", "2"], "already at step 3"),
        (vec!["train", "--resume", ck, "--stop-after", "3"], "--stop-after 3"),
        (
            vec!["train", "--resume", ck, "--config", s(&wide_cfg)],
            "a different model",
        ),
        (
            vec!["finetune", "--resume", ck, "--cla-share-factor", "1"],
            "a different model",
        ),
        (vec!["train", "--resume", ck, "--lr", "0.5"], "--lr 0.5"),
    ];
    for (mut args, needle) in cases {
        args.extend(["--out", s(&out)]);
        args.extend(base);
        let o = crosskv(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let o = crosskv(&[
        "train",
        "--resume",
        ck,
        "--out",
        s(&out),
        "--data",
        s(&other_data),
        "--seq-len",
        "16",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--data differs"), "{err}");
    // The good checkpoint still resumes (as finetune too: the same loop).
    let v = run_json(&[&["finetune", "--resume", ck, "--out", s(&out), "--json"][..], &base[..]].concat());
    assert_eq!((v["step"].clone(), v["resumed_from"].clone()), (json!(6), json!(3)));
}

#[test]
fn bf16_compute_with_f32_master_weights_learns_like_f32() {
    let tok_src = tiny_with_default_tokenizer();
    let tokenizer = tok_src.path().join("tokenizer.json");
    let work = tempfile::tempdir().unwrap();
    let cfg = cla2_config(work.path());
    let data = corpus(work.path());
    let run = |dtype: &str| {
        let out = work.path().join(dtype);
        let log = work.path().join(format!("{dtype}.jsonl"));
        let v = run_json(&[
            "train",
            "--config",
            &cfg,
            "--tokenizer",
            s(&tokenizer),
            "--data",
            &data,
            "--out",
            s(&out),
            "--steps",
            "20",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--lr",
            "1e-2",
            "--holdout",
            "0.1",
            "--dtype",
            dtype,
            "--log-json",
            s(&log),
            "--json",
        ]);
        let ppl = |k: &str| v[k].as_f64().unwrap();
        (
            (ppl("heldout_perplexity_before"), ppl("heldout_perplexity_after")),
            log_lines(&log),
            out,
            v,
        )
    };
    let ((before32, after32), log32, _, _) = run("f32");
    let ((before16, after16), log16, out, v) = run("bf16");
    assert_eq!(v["dtype"], json!("bf16"));
    // The first step: the same weights, the same batch; the gradient norms and losses agree.
    let at0 = |log: &[Value], k: &str| log[0][k].as_f64().unwrap();
    let (g32, g16) = (at0(&log32, "grad_norm"), at0(&log16, "grad_norm"));
    assert!((g32 - g16).abs() < 0.03 * g32, "grad norm f32 {g32}, bf16 {g16}");
    let (l32, l16) = (at0(&log32, "loss"), at0(&log16, "loss"));
    assert!((l32 - l16).abs() < 0.01 * l32, "loss f32 {l32}, bf16 {l16}");
    assert_ne!(l32, l16, "bf16 rounds differently");
    // Training in bf16 lowers held-out perplexity as f32 does, to about the same level.
    assert!(log16.iter().all(|l| l["loss"].as_f64().unwrap().is_finite()));
    assert_eq!(
        before16, before32,
        "evaluated on the f32 weights, both from the same init"
    );
    assert!(after32 < before32 / 10.0, "f32: {before32} → {after32}");
    assert!(after16 < before16 / 10.0, "bf16: {before16} → {after16}");
    assert!(
        (after16 / after32 - 1.0).abs() < 0.25,
        "after: f32 {after32}, bf16 {after16}"
    );
    // The master weights (what is saved) are f32.
    let w = candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(w.values().all(|t| t.dtype() == candle_core::DType::F32));
    assert_eq!(read_json(&out.join("trainer_state.json"))["dtype"], json!("bf16"));
    eprintln!("grad norm f32 {g32} bf16 {g16}; perplexity f32 {after32} bf16 {after16}");
}

#[test]
fn convert_then_finetune_improves_the_converted_model() {
    // A plain (every layer a producer) tiny model, trained a little so that it has
    // something to lose, then converted to CLA2 and fine-tuned on the same corpus.
    let plain = tiny_with_default_tokenizer();
    let work = tempfile::tempdir().unwrap();
    let data = corpus(work.path());
    let common = [
        "--data",
        &data,
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--holdout",
        "0.1",
    ];
    let trained = work.path().join("plain");
    let mut args = vec![
        "finetune",
        "--model",
        s(plain.path()),
        "--out",
        s(&trained),
        "--steps",
        "20",
        "--json",
    ];
    args.extend(common);
    let p = run_json(&args);
    let plain_ppl = p["heldout_perplexity_after"].as_f64().unwrap();

    let cla = work.path().join("cla2");
    let o = crosskv(&[
        "convert",
        "--model",
        s(&trained),
        "--cla-share-factor",
        "2",
        "--out",
        s(&cla),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_json(&cla.join("config.json"))["kv_source"], json!([0, 0]));

    let tuned = work.path().join("tuned");
    let mut args = vec![
        "finetune",
        "--model",
        s(&cla),
        "--out",
        s(&tuned),
        "--steps",
        "10",
        "--json",
    ];
    args.extend(common);
    let f = run_json(&args);
    let (before, after) = (
        f["heldout_perplexity_before"].as_f64().unwrap(),
        f["heldout_perplexity_after"].as_f64().unwrap(),
    );
    // The same held-out windows throughout (same data, --seq-len, --holdout, --seed).
    assert!(before > plain_ppl, "converting loses something: {plain_ppl} → {before}");
    assert!(after < before, "fine-tuning recovers: {before} → {after}");
    eprintln!("plain {plain_ppl}, converted {before}, fine-tuned {after}");
}
