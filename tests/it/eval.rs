//! `crosskv eval`: perplexity over packed windows, checked against an independent
//! computation, and bad inputs that fail cleanly.

use crate::common::{crosskv, tiny_with_default_tokenizer};
use crosskv::model::{load, LoadOptions, ModelSource};

const TEXT: &str = "It was the best of times, it was the worst of times, it was the age of wisdom, \\
it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity.";

#[test]
fn eval_perplexity_matches_an_independent_computation() {
    let ck = tiny_with_default_tokenizer();
    let dir = ck.path().to_str().unwrap().to_string();
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("a.txt"), TEXT).unwrap();
    std::fs::write(data.path().join("b.txt"), "The rest is silence.").unwrap();
    let seq_len = 8;
    let out = crosskv(&[
        "eval",
        "--model",
        &dir,
        "--data",
        data.path().to_str().unwrap(),
        "--seq-len",
        "8",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    // The same by hand: both files (in name order) joined with EOS, windows of 9 tokens
    // stepping by 8, log-softmax on the host in f64.
    let loaded = load(ModelSource::Dir(ck.path().to_path_buf()), &LoadOptions::default()).unwrap();
    let tok = &loaded.tokenizer;
    let mut ids = tok.encode(TEXT, false).unwrap();
    ids.extend(tok.eos_ids.iter().min());
    ids.extend(tok.encode("The rest is silence.", false).unwrap());
    let (mut nll, mut n) = (0f64, 0usize);
    let mut start = 0;
    while start + seq_len < ids.len() {
        let w = &ids[start..start + seq_len + 1];
        let rows = loaded
            .model
            .forward_dense(&w[..seq_len])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (row, &target) in rows.iter().zip(&w[1..]) {
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            nll += lse - row[target as usize] as f64;
            n += 1;
        }
        start += seq_len;
    }
    let want = (nll / n as f64).exp();
    let got = v["perplexity"].as_f64().unwrap();
    assert_eq!(v["tokens"].as_u64().unwrap() as usize, n);
    assert_eq!(v["files"].as_u64().unwrap(), 2);
    assert!((got - want).abs() / want < 1e-4, "perplexity {got}, by hand {want}");
    // A random model over a 49k vocabulary is far from certain.
    assert!(got > 100.0, "{got}");

    // --max-windows scores only the first windows.
    let out = crosskv(&[
        "eval",
        "--model",
        &dir,
        "--data",
        data.path().to_str().unwrap(),
        "--seq-len",
        "8",
        "--max-windows",
        "2",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tokens"].as_u64().unwrap(), 16);
}

#[test]
fn eval_bad_inputs_fail_naming_the_problem() {
    let ck = tiny_with_default_tokenizer();
    let dir = ck.path().to_str().unwrap().to_string();
    let data = tempfile::tempdir().unwrap();
    let short = data.path().join("short.txt");
    std::fs::write(&short, "Too short.").unwrap();
    let empty_dir = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--data".into(), "/no/such/file.txt".into()], "/no/such/file.txt"),
        (
            vec!["--data".into(), empty_dir.path().to_str().unwrap().into()],
            "no text files",
        ),
        (
            vec![
                "--data".into(),
                short.to_str().unwrap().into(),
                "--seq-len".into(),
                "64".into(),
            ],
            "too few",
        ),
        (
            vec![
                "--data".into(),
                short.to_str().unwrap().into(),
                "--seq-len".into(),
                "0".into(),
            ],
            "--seq-len",
        ),
        (
            vec![
                "--data".into(),
                short.to_str().unwrap().into(),
                "--seq-len".into(),
                "100000000".into(),
            ],
            "positions",
        ),
        (
            vec![
                "--data".into(),
                short.to_str().unwrap().into(),
                "--max-windows".into(),
                "0".into(),
            ],
            "--max-windows",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["eval".to_string(), "--model".into(), dir.clone()];
        args.extend(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = crosskv(&refs);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
