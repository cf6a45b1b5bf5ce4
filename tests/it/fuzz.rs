//! Property-based fuzzing, bounded so it runs in CI (`PROPTEST_CASES` raises the case
//! count for a longer local run): request bodies through the real HTTP router and
//! engine, gRPC requests through their validation, and model configs through parsing
//! and the KV accounting. Whatever the input: never a panic, never a 5xx, and every
//! refusal in the OpenAI error shape.

use crate::common::Tiny;
use crate::http::tokenizer;
use axum::body::Body;
use crosskv::api::grpc::{self, pb};
use crosskv::api::http::{self, AppState, HttpConfig};
use crosskv::config::{KvSharing, ModelConfig};
use crosskv::engine::{EngineConfig, EngineHandle};
use crosskv::kv::KvLayout;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Map, Value};
use std::sync::OnceLock;
use tower::ServiceExt;

/// Field names the front ends and configs read, so generated objects hit real paths.
const KEYS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_tokens",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "n",
    "stream",
    "stream_options",
    "include_usage",
    "echo",
    "logprobs",
    "top_logprobs",
    "add_special_tokens",
    "add_generation_prompt",
    "role",
    "content",
    "type",
    "text",
    "tokens",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
];

const CONFIG_KEYS: &[&str] = &[
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_type",
    "factor",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "bos_token_id",
    "eos_token_id",
    "torch_dtype",
    "cla_share_factor",
    "kv_source",
    "layer_types",
    "kv_sharing_map",
    "num_kv_layers",
];

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(192)
}

/// Numbers at the edges of every integer and float type a field may be read as.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-3i64..300).prop_map(Value::from),
        prop::sample::select(vec![
            json!(0),
            json!(-1),
            json!(u32::MAX),
            json!(u32::MAX as u64 + 1),
            json!(i64::MIN),
            json!(i64::MAX),
            json!(u64::MAX),
            json!(1e308),
            json!(-1e308),
            json!(0.5),
            json!(1e-320),
        ]),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        number(),
        ".{0,12}".prop_map(Value::from),
        prop::sample::select(KEYS).prop_map(Value::from),
        prop::sample::select(vec![
            "user",
            "system",
            "assistant",
            "tool",
            "text",
            "llama",
            "",
            "\u{0}",
            "é"
        ])
        .prop_map(Value::from),
    ]
}

/// JSON values whose object keys are mostly `keys`.
fn value(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(keys), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

/// A top-level object over `keys`.
fn object(keys: &'static [&'static str]) -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::vec((prop::sample::select(keys), value(keys)), 0..10)
        .prop_map(|kv| kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// A body: a generated object, or bytes cut from one, or bytes of nothing in particular.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => object(KEYS).prop_map(|m| serde_json::to_vec(&Value::Object(m)).unwrap()),
        1 => (object(KEYS), any::<prop::sample::Index>()).prop_map(|(m, cut)| {
            let b = serde_json::to_vec(&Value::Object(m)).unwrap();
            let at = cut.index(b.len() + 1);
            b[..at].to_vec()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

struct Fixture {
    _checkpoint: crate::common::Checkpoint,
    rt: tokio::runtime::Runtime,
    handle: EngineHandle,
    app: axum::Router,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let ck = Tiny::new(2, 4, 2, 8, 32, crate::http::VOCAB).seed(3).write();
        let handle = EngineHandle::start(
            ck.load(),
            tokenizer(),
            EngineConfig {
                kv_cache_bytes: 2 << 20,
                block_size: 16,
                max_model_len: 64,
                max_num_seqs: 16,
                max_num_batched_tokens: 256,
                max_queued_requests: 32,
                prefix_caching: true,
                cuda_graphs: false,
                async_scheduling: false,
            },
        )
        .unwrap();
        let state = AppState::ready(
            HttpConfig {
                served_model_name: "tiny".into(),
                max_body_bytes: 1 << 20,
                ..Default::default()
            },
            handle.clone(),
        );
        let app = http::router(state);
        Fixture {
            _checkpoint: ck,
            rt,
            handle,
            app,
        }
    })
}

/// Sends one body to `path`; checks the outcome.
fn check_http(path: &str, bytes: Vec<u8>) -> Result<(), TestCaseError> {
    let f = fixture();
    let req = axum::http::Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(bytes.clone()))
        .unwrap();
    let (status, body) = f.rt.block_on(async {
        let resp = f.app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = axum::body::to_bytes(resp.into_body(), 16 << 20).await.unwrap();
        (status, body)
    });
    let shown = String::from_utf8_lossy(&bytes);
    prop_assert!(
        status < 500,
        "{path} {shown} -> {status}: {}",
        String::from_utf8_lossy(&body)
    );
    if status >= 400 {
        let v: Value = serde_json::from_slice(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let e = &v["error"];
        prop_assert!(
            e["message"].is_string() && e["type"].is_string(),
            "{path} {shown} -> {v}"
        );
    } else if status == 200 && !body.starts_with(b"data:") {
        serde_json::from_slice::<Value>(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    Ok(())
}

fn run(name: &str, strategy: impl Strategy<Value = Vec<u8>>, path: &'static str) {
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, |b| check_http(path, b)) {
        panic!("{name}: {e}");
    }
}

#[test]
fn fuzz_completions_bodies() {
    run("completions", body(), "/v1/completions");
}

#[test]
fn fuzz_chat_bodies() {
    run("chat", body(), "/v1/chat/completions");
}

#[test]
fn fuzz_tokenize_bodies() {
    run("tokenize", body(), "/tokenize");
    run("detokenize", body(), "/detokenize");
}

#[test]
fn fuzz_grpc_generate_requests() {
    let f = fixture();
    let strategy = (
        ".{0,40}",
        prop::collection::vec(prop_oneof![0u32..100, Just(u32::MAX), any::<u32>()], 0..8),
        prop_oneof![0u32..80, any::<u32>()],
        prop_oneof![Just(0.0f32), -1.0f32..3.0, any::<f32>()],
        prop_oneof![Just(0.0f32), 0.0f32..1.5, any::<f32>()],
        any::<u32>(),
        prop::option::of(any::<u64>()),
        prop::collection::vec(".{0,8}", 0..20),
        any::<bool>(),
    );
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(
        &strategy,
        |(prompt, prompt_ids, max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)| {
            let req = pb::GenerateRequest {
                prompt,
                prompt_ids,
                max_tokens,
                temperature,
                top_p,
                top_k,
                seed,
                stop,
                ignore_eos,
                ..Default::default()
            };
            if let Err(status) = grpc::validate(&f.handle, req, 4096, Default::default()) {
                prop_assert_eq!(status.code(), tonic::Code::InvalidArgument, "{:?}", status);
            }
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("grpc: {e}");
    }
}

#[test]
fn fuzz_model_configs_and_kv_sharing() {
    let strategy = (
        object(CONFIG_KEYS),
        // A valid base most of the time, so the deeper checks are reached.
        any::<bool>(),
        ".{0,12}",
        any::<u64>(),
    );
    let mut runner = TestRunner::new(Config {
        cases: cases() * 4,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |(fields, on_base, list, budget)| {
        let mut raw = if on_base {
            Tiny::new(4, 4, 2, 8, 32, 64).config_json()
        } else {
            json!({})
        };
        for (k, v) in fields {
            raw[k] = v;
        }
        let Ok(mut cfg) = ModelConfig::from_json(raw) else {
            return Ok(());
        };
        // Whatever parsed is usable: the sharing covers every layer and the KV
        // accounting answers without overflow.
        prop_assert_eq!(cfg.kv_source.len(), cfg.num_hidden_layers);
        for (i, &s) in cfg.kv_source.iter().enumerate() {
            prop_assert!(s <= i && cfg.kv_source[s] == s);
        }
        if let Ok(src) = KvSharing::parse_list(&list) {
            let _ = cfg.reshare(&KvSharing::Explicit(src));
        }
        let layout = KvLayout::new(cfg.kv_source.clone(), cfg.num_key_value_heads, cfg.head_dim, 2);
        let cap = layout.capacity(budget, 16, cfg.max_position_embeddings.max(1));
        prop_assert!(cap.num_blocks as u128 * cap.block_bytes as u128 <= budget as u128);
        Ok(())
    });
    if let Err(e) = result {
        panic!("config: {e}");
    }
}
