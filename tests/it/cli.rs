//! The built binary: `capacity` (JSON, table and `--plot` chart), clean failures on bad input (non-zero
//! exit, a message naming the problem, never a panic), and `convert`.

use crate::common::{dense_logits, Rng, Tiny};
use crosskv::config::KvSharing;
use crosskv::model::{self, LoadOptions};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Output;

use crate::common::crosskv;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_ok(o: &Output) {
    assert!(o.status.success(), "exit {:?}\nstderr:\n{}", o.status, stderr(o));
}

/// Fails with a non-zero exit, a message naming every part of `names`, and no panic.
#[track_caller]
fn assert_fails_naming(args: &[&str], names: &[&str]) {
    let o = crosskv(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "{args:?} succeeded:\n{}", stdout(&o));
    assert_ne!(o.status.code(), Some(101), "{args:?} exited like a panic:\n{err}");
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    for n in names {
        assert!(err.contains(n), "{args:?}: stderr does not mention `{n}`:\n{err}");
    }
}

/// A 4-layer GQA config (2 KV heads × head_dim 8, no torch_dtype: 2 bytes) with `extra`.
fn write_config(dir: &Path, extra: Value) -> String {
    let mut c = Tiny::new(4, 4, 2, 8, 32, 61).config_json();
    c.as_object_mut().unwrap().remove("torch_dtype");
    for (k, v) in extra.as_object().unwrap() {
        c[k.as_str()] = v.clone();
    }
    let path = dir.join("config.json");
    std::fs::write(&path, c.to_string()).unwrap();
    path.display().to_string()
}

#[test]
fn capacity_json_prints_every_documented_field_with_exact_values() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), json!({"cla_share_factor": 2}));
    let o = crosskv(&[
        "capacity",
        "--config",
        &cfg,
        "--json",
        "--kv-cache-memory",
        "1GiB",
        "--seq-len",
        "1024",
    ]);
    assert_ok(&o);
    let v: Value = serde_json::from_str(&stdout(&o)).expect("stdout is one JSON object");
    // Slot bytes/token = 2 × 2 heads × 8 × 2 bytes = 64; blocks of 16 tokens: 1024 bytes,
    // so 1 GiB is 1 048 576 blocks; 1024 tokens take 64 blocks per slot.
    let want = json!({
        "layers": 4,
        "kv_layers": 2,
        "kv_source": [0, 0, 2, 2],
        "num_key_value_heads": 2,
        "head_dim": 8,
        "dtype_bytes": 2,
        "kv_bytes_per_token": 128,
        "non_cla_kv_bytes_per_token": 256,
        "block_size": 16,
        "kv_cache_bytes": 1u64 << 30,
        "capacity_tokens": 1_048_576 / 2 * 16,
        "max_concurrency": 1_048_576 / (2 * 64),
        "non_cla_capacity_tokens": 1_048_576 / 4 * 16,
        "non_cla_max_concurrency": 1_048_576 / (4 * 64),
    });
    for (k, w) in want.as_object().unwrap() {
        assert_eq!(v.get(k), Some(w), "field `{k}` in\n{v:#}");
    }
    assert_eq!(v["capacity_tokens"], json!(8_388_608));
    assert_eq!(v["max_concurrency"], json!(8192));
}

#[test]
fn capacity_with_resharing_flags_and_dtype_changes_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), json!({}));
    let run = |extra: &[&str]| -> Value {
        let mut args = vec!["capacity", "--config", &cfg, "--json", "--kv-cache-memory", "3MiB"];
        args.extend_from_slice(extra);
        let o = crosskv(&args);
        assert_ok(&o);
        serde_json::from_str(&stdout(&o)).unwrap()
    };
    let plain = run(&["--seq-len", "100"]);
    assert_eq!(plain["kv_source"], json!([0, 1, 2, 3]));
    assert_eq!(plain["capacity_tokens"], plain["non_cla_capacity_tokens"]);
    // 3 MiB / 1024-byte blocks = 3072 blocks; 100 tokens take 7 blocks per slot.
    assert_eq!(plain["capacity_tokens"], json!(3072 / 4 * 16));
    assert_eq!(plain["max_concurrency"], json!(3072 / (4 * 7)));
    let cla2 = run(&["--seq-len", "100", "--cla-share-factor", "2"]);
    assert_eq!(cla2["kv_source"], json!([0, 0, 2, 2]));
    assert_eq!(cla2["capacity_tokens"], json!(3072 / 2 * 16));
    assert_eq!(cla2["non_cla_capacity_tokens"], plain["capacity_tokens"]);
    let keep_ends = run(&[
        "--seq-len",
        "100",
        "--kv-source",
        "0,0,0,3",
        "--dtype",
        "f32",
        "--block-size",
        "8",
    ]);
    assert_eq!(keep_ends["kv_source"], json!([0, 0, 0, 3]));
    assert_eq!(keep_ends["dtype_bytes"], json!(4));
    assert_eq!(keep_ends["kv_bytes_per_token"], json!(2 * 2 * 2 * 8 * 4));
    // 8 tokens × 128 bytes = 1024-byte blocks again; 100 tokens take 13 blocks per slot.
    assert_eq!(keep_ends["max_concurrency"], json!(3072 / (2 * 13)));
    // No --seq-len: the model's context (64 tokens here).
    let ctx = run(&[]);
    assert_eq!(ctx["max_concurrency"], json!(3072 / (4 * 4)));
}

#[test]
fn capacity_table_prints_both_columns() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), json!({"cla_share_factor": 2}));
    let o = crosskv(&[
        "capacity",
        "--config",
        &cfg,
        "--kv-cache-memory",
        "1GiB",
        "--seq-len",
        "1024",
    ]);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.contains("with sharing") && out.contains("without sharing"), "{out}");
    assert!(out.contains("kv_source: [0, 0, 2, 2]"), "{out}");
    let row = |label: &str| crate::common::table_row(&out, label);
    assert_eq!(row("KV bytes per token"), ["128", "256"]);
    assert_eq!(row("capacity (tokens)"), ["8388608", "4194304"]);
    assert_eq!(row("max concurrency @ 1024 tokens"), ["8192", "4096"]);
    assert_eq!(row("layers / KV layers"), ["4", "/", "2", "4", "/", "4"]);
    assert!(row("capacity gain from sharing").concat().starts_with("2.00"), "{out}");
}

#[test]
fn bad_capacity_inputs_fail_cleanly_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), json!({}));
    let fwd_dir = tempfile::tempdir().unwrap();
    let fwd = write_config(fwd_dir.path(), json!({"kv_source": [0, 2, 2, 2]}));
    let missing = dir.path().join("nope.json").display().to_string();
    assert_fails_naming(&["capacity", "--config", &cfg, "--frobnicate"], &["--frobnicate"]);
    assert_fails_naming(
        &["capacity", "--config", &cfg, "--kv-cache-memory", "4parsecs"],
        &["--kv-cache-memory", "4parsecs", "parsecs"],
    );
    assert_fails_naming(
        &["capacity", "--config", &cfg, "--block-size", "0"],
        &["--block-size 0"],
    );
    assert_fails_naming(&["capacity", "--config", &fwd], &["kv_source", "layer 1", "forward"]);
    assert_fails_naming(&["capacity", "--config", &missing], &[&missing]);
    assert_fails_naming(
        &["capacity", "--config", &cfg, "--cla-share-factor", "0"],
        &["cla_share_factor", "at least 1"],
    );
    assert_fails_naming(
        &["capacity", "--config", &cfg, "--kv-source", "0,0,1,1"],
        &["kv_source", "layer 2", "consumer"],
    );
    assert_fails_naming(
        &[
            "capacity",
            "--config",
            &cfg,
            "--cla-share-factor",
            "2",
            "--kv-source",
            "0,0,2,2",
        ],
        &["--cla-share-factor", "--kv-source"],
    );
    assert_fails_naming(&["capacity", "--config", &cfg, "--seq-len", "0"], &["--seq-len"]);
    assert_fails_naming(&["capacity"], &["--model"]);
}

#[test]
fn capacity_plot_writes_an_svg_chart_with_each_dtypes_series() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), json!({"cla_share_factor": 2}));
    let svg_path = dir.path().join("capacity.svg");
    let svg_arg = svg_path.display().to_string();
    let o = crosskv(&[
        "capacity",
        "--config",
        &cfg,
        "--kv-cache-memory",
        "1MiB",
        "--plot",
        &svg_arg,
    ]);
    assert_ok(&o);
    // The table is still printed alongside the chart.
    assert!(stdout(&o).contains("max concurrency @ 64 tokens"), "{}", stdout(&o));
    let svg = std::fs::read_to_string(&svg_path).expect("the chart was written");
    assert!(svg.trim_start().starts_with("<svg"), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
    // The config's dtype (f16 without `torch_dtype`) and fp8, which the table sets beside it.
    for text in [
        "with CLA sharing, f16",
        "without sharing, f16",
        "with CLA sharing, fp8",
        "without sharing, fp8",
        "1.00 MiB",
        "config.json",
        "2 of 4 layers",
    ] {
        assert!(svg.contains(text), "no `{text}` in the chart:\n{svg}");
    }
}

#[test]
fn capacity_plot_series_with_cla2_are_twice_those_without_sharing() {
    use crosskv::cli::{capacity_series, plot_lengths};
    use crosskv::kv::KvLayout;
    // 4 layers, factor 2, 2 KV heads × head_dim 8 × 2 bytes: 1024-byte blocks of 16 tokens,
    // so 1 MiB is 1024 blocks and every length below divides it evenly.
    let layout = KvLayout::new(vec![0, 0, 2, 2], 2, 8, 2);
    let lengths = plot_lengths(16, 1024);
    assert_eq!(lengths, [16, 32, 64, 128, 256, 512, 1024]);
    let points = capacity_series(&layout, 1 << 20, 16, &lengths);
    assert_eq!(points.len(), lengths.len());
    for (p, &len) in points.iter().zip(&lengths) {
        assert_eq!(p.seq_len, len);
        assert_eq!(p.without_sharing, 1024 / (4 * len / 16), "{p:?}");
        assert_eq!(p.with_sharing, 2 * p.without_sharing, "{p:?}");
    }
    // Without sharing the same layout is every layer a producer: both series agree.
    let plain = KvLayout::new(vec![0, 1, 2, 3], 2, 8, 2);
    for p in capacity_series(&plain, 1 << 20, 16, &lengths) {
        assert_eq!(p.with_sharing, p.without_sharing, "{p:?}");
    }
}

#[test]
fn capacity_plot_to_an_unwritable_path_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), json!({}));
    let bad = dir.path().join("no-such-dir").join("chart.svg");
    let bad_arg = bad.display().to_string();
    assert_fails_naming(
        &["capacity", "--config", &cfg, "--plot", &bad_arg],
        &["--plot", &bad_arg],
    );
    assert!(!bad.exists());
}

#[test]
fn generate_with_a_missing_model_fails_cleanly() {
    assert_fails_naming(
        &["generate", "--model", "/nonexistent", "--prompt", "x"],
        &["/nonexistent"],
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    assert_fails_naming(&["generate", "--model", &d, "--prompt", "x"], &[&d, "config.json"]);
}

/// `--load-format dummy` serves a config with no weight files (random weights, the
/// default model's tokenizer); without it the same directory is refused, naming what is
/// missing; a GGUF file is refused naming the flag.
#[test]
fn dummy_load_format_runs_a_config_without_weights() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), json!({"vocab_size": 49152}));
    let d = dir.path().display().to_string();
    let args = [
        "generate",
        "--model",
        &d,
        "--prompt",
        "Hello",
        "--max-tokens",
        "5",
        "--stats",
    ];
    let o = crosskv(&[&args[..], &["--load-format", "dummy"]].concat());
    assert_ok(&o);
    assert!(stderr(&o).contains("generated "), "{}", stderr(&o));
    assert_fails_naming(&args, &["tokenizer.json"]);
    let gguf = dir.path().join("m.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    assert_fails_naming(
        &[
            "generate",
            "--model",
            &gguf.display().to_string(),
            "--prompt",
            "x",
            "--load-format",
            "dummy",
        ],
        &["--load-format dummy", "m.gguf"],
    );
}

#[test]
fn convert_writes_a_cla_checkpoint_that_loads_like_resharing_at_load() {
    let src = Tiny::new(4, 4, 2, 8, 32, 61).seed(900).write();
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().join("cla2");
    let o = crosskv(&[
        "convert",
        "--model",
        &src.path().display().to_string(),
        "--cla-share-factor",
        "2",
        "--out",
        &out_dir.display().to_string(),
    ]);
    assert_ok(&o);

    let config: Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["kv_source"], json!([0, 0, 2, 2]));
    assert_eq!(config["num_hidden_layers"], json!(4));
    let tensors = candle_core::safetensors::load(out_dir.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    for l in 0..4 {
        for p in ["k_proj", "v_proj"] {
            let name = format!("model.layers.{l}.self_attn.{p}.weight");
            assert_eq!(tensors.contains_key(&name), l % 2 == 0, "{name}");
        }
        assert!(tensors.contains_key(&format!("model.layers.{l}.self_attn.q_proj.weight")));
    }
    assert_eq!(tensors.len(), src.tensors.len() - 4);

    let converted = model::load_model_dir(&out_dir, &LoadOptions::default()).unwrap();
    assert_eq!(converted.layout().kv_source(), &[0, 0, 2, 2]);
    let reshared = src.load_with(&LoadOptions {
        sharing: Some(KvSharing::ShareFactor(2)),
        ..Default::default()
    });
    let tokens = Rng::new(31).tokens(11, 61);
    assert_eq!(dense_logits(&converted, &tokens), dense_logits(&reshared, &tokens));
    assert_ne!(dense_logits(&converted, &tokens), dense_logits(&src.load(), &tokens));

    // Converting needs a sharing scheme.
    let o = crosskv(&[
        "convert",
        "--model",
        &src.path().display().to_string(),
        "--out",
        &out.path().join("x").display().to_string(),
    ]);
    assert!(!o.status.success() && !stderr(&o).contains("panicked"));
    assert!(stderr(&o).contains("--cla-share-factor"), "{}", stderr(&o));
}

#[test]
fn convert_with_mean_kv_init_averages_each_groups_projections() {
    let src = Tiny::new(4, 4, 2, 8, 32, 61).seed(901).write();
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().join("cla2-mean");
    let path = |p: &Path| p.display().to_string();
    let o = crosskv(&[
        "convert",
        "--model",
        &path(src.path()),
        "--cla-share-factor",
        "2",
        "--kv-init",
        "mean",
        "--out",
        &path(&out_dir),
    ]);
    assert_ok(&o);
    let got = candle_core::safetensors::load(out_dir.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let want = &src.tensors;
    for (producer, consumer) in [(0, 1), (2, 3)] {
        for p in ["k_proj", "v_proj"] {
            let name = |l: usize| format!("model.layers.{l}.self_attn.{p}.weight");
            let mean = ((&want[&name(producer)] + &want[&name(consumer)]).unwrap() / 2.0).unwrap();
            let diff =
                crate::common::max_abs_diff(&crate::common::flat(&got[&name(producer)]), &crate::common::flat(&mean));
            assert!(diff < 1e-6, "{}: {diff}", name(producer));
            assert!(!got.contains_key(&name(consumer)));
        }
    }
    let converted = model::load_model_dir(&out_dir, &LoadOptions::default()).unwrap();
    assert_eq!(converted.layout().kv_source(), &[0, 0, 2, 2]);

    // Re-sharing a CLA2 checkpoint by 4: layer 0's cache is read by layers that used
    // two distinct projections (0's and 2's), and their mean is taken once each.
    let mut tensors = got.clone();
    crosskv::model::reshare::reshare_tensors(
        &mut tensors,
        &[0, 0, 2, 2],
        &[0, 0, 0, 0],
        crosskv::model::reshare::KvInit::Mean,
    )
    .unwrap();
    let name = |l: usize| format!("model.layers.{l}.self_attn.k_proj.weight");
    let mean = ((&got[&name(0)] + &got[&name(2)]).unwrap() / 2.0).unwrap();
    let diff = crate::common::max_abs_diff(&crate::common::flat(&tensors[&name(0)]), &crate::common::flat(&mean));
    assert!(diff < 1e-6, "{diff}");
    assert!(!tensors.contains_key(&name(2)));
    // `first` keeps the producer's own.
    let mut tensors = got.clone();
    crosskv::model::reshare::reshare_tensors(
        &mut tensors,
        &[0, 0, 2, 2],
        &[0, 0, 0, 0],
        crosskv::model::reshare::KvInit::First,
    )
    .unwrap();
    assert_eq!(
        crate::common::flat(&tensors[&name(0)]),
        crate::common::flat(&got[&name(0)])
    );
}
