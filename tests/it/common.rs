//! Tiny random checkpoints for the CPU integration tests: a `config.json` (llama) and
//! one f32 `model.safetensors` in a temp dir, with consumers' k_proj/v_proj left out
//! as a CLA checkpoint has them, and helpers to compare logits.

#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use crosskv::config::kv_source_from_json;
use crosskv::model::{self, LoadOptions, Model};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// SplitMix64 with Box-Muller: a seeded normal source (candle's CPU rng cannot be seeded).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    pub fn tensor(&mut self, shape: &[usize], scale: f32, offset: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| offset + scale * self.normal()).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }
    /// `n` token ids below `vocab`.
    pub fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n).map(|_| (self.next_u64() % vocab as u64) as u32).collect()
    }
}

/// The shape of a tiny llama checkpoint and its CLA key.
#[derive(Debug, Clone)]
pub struct Tiny {
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub intermediate: usize,
    /// A CLA key and its value to put in config.json (`("cla_share_factor", json!(2))`).
    pub cla: Option<(String, Value)>,
    /// Give producers a `self_attn.kv_layernorm.weight` (those at even KV slots, so a
    /// model mixes producers with and without one).
    pub kv_layernorm: bool,
    pub seed: u64,
    /// `max_position_embeddings` (64 unless set).
    pub max_positions: usize,
}

impl Tiny {
    pub fn new(layers: usize, heads: usize, kv_heads: usize, head_dim: usize, hidden: usize, vocab: usize) -> Self {
        Tiny {
            layers,
            heads,
            kv_heads,
            head_dim,
            hidden,
            vocab,
            intermediate: 48,
            cla: None,
            kv_layernorm: false,
            seed: 1,
            max_positions: 64,
        }
    }
    pub fn cla(mut self, key: &str, value: Value) -> Self {
        self.cla = Some((key.to_string(), value));
        self
    }
    pub fn with_kv_layernorm(mut self, on: bool) -> Self {
        self.kv_layernorm = on;
        self
    }
    pub fn max_positions(mut self, n: usize) -> Self {
        self.max_positions = n;
        self
    }
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    pub fn config_json(&self) -> Value {
        let mut c = json!({
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": self.max_positions,
            "tie_word_embeddings": false,
            "torch_dtype": "float32",
        });
        if let Some((k, v)) = &self.cla {
            c[k.as_str()] = v.clone();
        }
        c
    }

    /// The normalised sharing of the config; every layer a producer when the CLA key
    /// is malformed (for tests that check the error).
    pub fn kv_source(&self) -> Vec<usize> {
        kv_source_from_json(&self.config_json(), self.layers).unwrap_or_else(|_| (0..self.layers).collect())
    }

    /// Every tensor of the checkpoint: random normal × 0.2, norms 1 + noise; consumers
    /// get no k_proj/v_proj.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let mut rng = Rng::new(self.seed);
        let (h, d, i) = (self.hidden, self.head_dim, self.intermediate);
        let (q_out, kv_out) = (self.heads * d, self.kv_heads * d);
        let src = self.kv_source();
        let mut t = HashMap::new();
        let mut w = |t: &mut HashMap<String, Tensor>, name: String, shape: &[usize]| {
            t.insert(name, rng.tensor(shape, 0.2, 0.0));
        };
        w(&mut t, "model.embed_tokens.weight".into(), &[self.vocab, h]);
        w(&mut t, "lm_head.weight".into(), &[self.vocab, h]);
        let mut norms = Vec::new();
        for (l, &source) in src.iter().enumerate() {
            let a = format!("model.layers.{l}.self_attn");
            let m = format!("model.layers.{l}.mlp");
            w(&mut t, format!("{a}.q_proj.weight"), &[q_out, h]);
            w(&mut t, format!("{a}.o_proj.weight"), &[h, q_out]);
            if source == l {
                w(&mut t, format!("{a}.k_proj.weight"), &[kv_out, h]);
                w(&mut t, format!("{a}.v_proj.weight"), &[kv_out, h]);
            }
            w(&mut t, format!("{m}.gate_proj.weight"), &[i, h]);
            w(&mut t, format!("{m}.up_proj.weight"), &[i, h]);
            w(&mut t, format!("{m}.down_proj.weight"), &[h, i]);
            norms.push(format!("model.layers.{l}.input_layernorm.weight"));
            norms.push(format!("model.layers.{l}.post_attention_layernorm.weight"));
        }
        let producers: Vec<usize> = (0..self.layers).filter(|&l| src[l] == l).collect();
        for (slot, l) in producers.into_iter().enumerate() {
            if self.kv_layernorm && slot % 2 == 0 {
                norms.push(format!("model.layers.{l}.self_attn.kv_layernorm.weight"));
            }
        }
        norms.push("model.norm.weight".into());
        for name in norms {
            t.insert(name, rng.tensor(&[h], 0.1, 1.0));
        }
        t
    }

    pub fn write(&self) -> Checkpoint {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpoint {
            dir,
            config: self.config_json(),
            tensors: self.tensors(),
        };
        ck.save();
        ck
    }
}

/// A checkpoint on disk; `config` and `tensors` may be edited and `save`d again.
pub struct Checkpoint {
    pub dir: tempfile::TempDir,
    pub config: Value,
    pub tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn weights_path(&self) -> PathBuf {
        self.path().join("model.safetensors")
    }
    pub fn save(&self) {
        write_checkpoint(self.path(), &self.config, &self.tensors);
    }
    pub fn load(&self) -> Model {
        self.load_with(&LoadOptions::default())
    }
    pub fn load_with(&self, opts: &LoadOptions) -> Model {
        model::load_model_dir(self.path(), opts).unwrap_or_else(|e| panic!("loading {}: {e}", self.path().display()))
    }
}

pub fn write_checkpoint(dir: &Path, config: &Value, tensors: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
    candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
}

/// f32 logits as rows.
pub fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32).unwrap().to_vec2::<f32>().unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit rows of different widths");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Logits of a dense, cache-free forward of `tokens`: one row per position.
pub fn dense_logits(model: &Model, tokens: &[u32]) -> Vec<Vec<f32>> {
    rows(&model.forward_dense(tokens).unwrap())
}

/// A tiny random llama (2 layers, vocab 49152) with the default model's real tokenizer,
/// as a HF directory.
pub fn tiny_with_default_tokenizer() -> Checkpoint {
    with_default_tokenizer(Tiny::new(2, 4, 2, 8, 32, 49152).seed(7))
}

/// `tiny` (whose vocabulary must be the tokenizer's 49152) with the default model's real
/// tokenizer, as a HF directory.
pub fn with_default_tokenizer(tiny: Tiny) -> Checkpoint {
    use candle_core::quantized::gguf_file;
    use crosskv::model::{resolve_source, ModelSource, Tok};
    let ckpt = tiny.write();
    let ModelSource::Gguf(path) = resolve_source(None).unwrap() else {
        panic!("default model is a GGUF")
    };
    let content = gguf_file::Content::read(&mut std::fs::File::open(path).unwrap()).unwrap();
    let tok = Tok::from_gguf(&content).unwrap();
    tok.inner().save(ckpt.path().join("tokenizer.json"), false).unwrap();
    ckpt
}

/// Runs the `crosskv` binary (offline, warnings only) to completion.
pub fn crosskv(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_crosskv"))
        .args(args)
        .env("CROSSKV_LOG", "warn")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("the crosskv binary runs")
}

/// Every element as f32, on the host.
/// The gradients of `Σ y·dy` (the product in y's dtype, summed in f32): what every tensor
/// `y` depends on receives when `dy` flows back into `y`.
pub fn grads_of(y: &Tensor, dy: &Tensor) -> candle_core::backprop::GradStore {
    (y * dy)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
}

pub fn flat(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |got - want| / max |want|; every element of `got` must be finite.
pub fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let (g, w) = (flat(got), flat(want));
    assert!(g.iter().all(|x| x.is_finite()), "non-finite output");
    let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
    g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale
}

/// The Python that runs the deployment tools of the tests (the chart check, the
/// router): `CROSSKV_TEST_PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("CROSSKV_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Whether that Python imports every one of `modules`.
pub fn python_imports(modules: &[&str]) -> bool {
    std::process::Command::new(python())
        .args(["-c", &format!("import {}", modules.join(", "))])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The cells after `label` on the first line of a printed table that starts with it.
pub fn table_row(out: &str, label: &str) -> Vec<String> {
    let line = out
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` row in\n{out}"));
    line[label.len()..].split_whitespace().map(String::from).collect()
}
