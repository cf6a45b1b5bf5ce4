//! The OpenAI-compatible HTTP API against a real server on an ephemeral port, with a
//! real HTTP client: a tiny random llama (vocab 49152) behind the default model's real
//! tokenizer, so outputs are deterministic junk but real text.

use crate::common::{dense_logits, Checkpoint, Rng, Tiny};
use candle_core::quantized::gguf_file;
use crosskv::api::http::{self, AppState, HttpConfig};
use crosskv::api::listener::ConnectionLimits;
use crosskv::api::tool_calls::ToolCallParser;
use crosskv::engine::{EngineConfig, EngineHandle};
use crosskv::model::{self, ModelSource, Tok};
use serde_json::{json, Value};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub(crate) const VOCAB: usize = 49152;
pub(crate) const MODEL: &str = "tiny";

pub(crate) fn tokenizer() -> Tok {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    static FETCH: Mutex<()> = Mutex::new(());
    let path = PATH.get_or_init(|| {
        let _g = FETCH.lock().unwrap_or_else(|e| e.into_inner());
        match model::resolve_source(None).expect("the default model can be fetched") {
            ModelSource::Gguf(p) => p,
            ModelSource::Dir(d) => panic!("expected the default GGUF, got {}", d.display()),
        }
    });
    let mut f = std::fs::File::open(path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    Tok::from_gguf(&ct).unwrap()
}

pub(crate) fn tiny_checkpoint(vocab: usize) -> Checkpoint {
    let mut ck = Tiny::new(2, 4, 2, 8, 32, vocab).seed(7).write();
    ck.config["max_position_embeddings"] = json!(4096);
    ck.save();
    ck
}

pub(crate) struct Setup {
    pub kv_cache_bytes: u64,
    pub max_model_len: usize,
    pub max_queued_requests: usize,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub max_prompt_bytes: Option<usize>,
    pub limits: ConnectionLimits,
    /// The model's vocabulary (the tokenizer's is 49152).
    pub vocab: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Replaces the tokenizer's chat template.
    pub chat_template: Option<String>,
    pub tool_call_parser: ToolCallParser,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            kv_cache_bytes: 4 << 20,
            max_model_len: 256,
            max_queued_requests: 256,
            api_key: None,
            max_body_bytes: 1 << 20,
            max_prompt_bytes: None,
            limits: ConnectionLimits::default(),
            vocab: VOCAB,
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            chat_template: None,
            tool_call_parser: ToolCallParser::Auto,
        }
    }
}

pub(crate) struct Server {
    pub base: String,
    pub addr: std::net::SocketAddr,
    pub client: reqwest::Client,
    pub ck: Checkpoint,
    pub handle: EngineHandle,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

/// A 4-layer model whose layers share KV in pairs (2 KV slots), positions up to 4096.
pub(crate) fn small_cla_checkpoint() -> Checkpoint {
    let mut ck = Tiny::new(4, 4, 2, 8, 32, VOCAB)
        .cla("cla_share_factor", json!(2))
        .seed(7)
        .write();
    ck.config["max_position_embeddings"] = json!(4096);
    ck.save();
    ck
}

pub(crate) async fn start(s: Setup) -> Server {
    let ck = tiny_checkpoint(s.vocab);
    let m = ck.load();
    start_model(s, ck, m).await
}

/// `start` with a model of the caller's (`ck` is kept alive with the server).
pub(crate) async fn start_model(s: Setup, ck: Checkpoint, m: crosskv::model::Model) -> Server {
    let mut tok = tokenizer();
    if let Some(t) = s.chat_template {
        tok.chat_template = Some(t);
    }
    let handle = EngineHandle::start(
        m,
        tok,
        EngineConfig {
            kv_cache_bytes: s.kv_cache_bytes,
            block_size: 16,
            max_model_len: s.max_model_len,
            max_num_seqs: s.max_num_seqs,
            max_num_batched_tokens: s.max_num_batched_tokens,
            max_queued_requests: s.max_queued_requests,
            prefix_caching: true,
            cuda_graphs: false,
            async_scheduling: false,
        },
    )
    .unwrap();
    let state = AppState::ready(
        HttpConfig {
            served_model_name: MODEL.into(),
            api_key: s.api_key,
            max_body_bytes: s.max_body_bytes,
            request_timeout: Duration::from_secs(60),
            max_prompt_bytes: s.max_prompt_bytes,
            tool_call_parser: s.tool_call_parser,
        },
        handle.clone(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let base = format!("http://{addr}");
    tokio::spawn(http::serve(listener, state, s.limits, std::future::pending()));
    Server {
        base,
        addr,
        client: reqwest::Client::new(),
        ck,
        handle,
    }
}

impl Server {
    pub(crate) async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
    pub(crate) async fn get(&self, path: &str) -> (u16, String) {
        let r = self.client.get(format!("{}{path}", self.base)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }
    pub(crate) async fn get_json(&self, path: &str) -> Value {
        let (status, text) = self.get(path).await;
        assert_eq!(status, 200, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
    }
    /// The SSE events of a streamed request, up to `[DONE]` (which must come last).
    pub(crate) async fn stream(&self, path: &str, body: Value) -> Vec<Value> {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let text = r.text().await.unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.trim().is_empty()).collect();
        assert_eq!(events.last(), Some(&"data: [DONE]"), "{text}");
        events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").expect("data lines")).unwrap())
            .collect()
    }
    pub(crate) async fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not in /metrics"))
            .parse()
            .unwrap()
    }
    /// Waits until no request runs or waits and no block is used.
    pub(crate) async fn wait_idle(&self) -> Value {
        let t0 = Instant::now();
        loop {
            let kv = self.get_json("/v1/kv").await;
            if kv["blocks_used"] == 0 && kv["num_running"] == 0 && kv["num_waiting"] == 0 {
                return kv;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "never idle: {kv}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub(crate) fn text_of(resp: &Value, i: usize) -> String {
    resp["choices"][i]["text"].as_str().unwrap().to_string()
}

pub(crate) fn assert_error(status: u16, body: &Value, want_status: u16, want_param: Option<&str>, what: &str) {
    assert_eq!(status, want_status, "{what}: {body}");
    let e = &body["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
    assert!(e["type"].is_string(), "{what}: {body}");
    assert!(e.as_object().unwrap().contains_key("code"), "{what}: {body}");
    assert_eq!(e["param"].as_str(), want_param, "{what}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_get_endpoint_and_tokenize_round_trip() {
    let s = start(Setup::default()).await;
    assert_eq!(s.get("/health").await.0, 200);
    let models = s.get_json("/v1/models").await;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["max_model_len"], 256);
    let kv = s.get_json("/v1/kv").await;
    for k in [
        "layers",
        "kv_layers",
        "kv_bytes_per_token",
        "capacity_tokens",
        "num_blocks",
        "blocks_free",
    ] {
        assert!(kv[k].is_number(), "{k} in {kv}");
    }
    assert_eq!(kv["blocks_used_per_slot"].as_array().unwrap().len(), 2);
    let info = s.get_json("/tokenizer_info").await;
    assert_eq!(info["vocab_size"], VOCAB);
    assert!(info["eos_token"].is_string());

    let (st, t) = s
        .post("/tokenize", json!({"prompt": "Hello world", "model": MODEL}))
        .await;
    assert_eq!(st, 200, "{t}");
    let ids = t["tokens"].as_array().unwrap().clone();
    assert_eq!(t["count"], ids.len());
    let (st, d) = s.post("/detokenize", json!({"tokens": ids})).await;
    assert_eq!(st, 200);
    assert_eq!(d["prompt"], "Hello world");
    let (st, t) = s
        .post("/tokenize", json!({"messages": [{"role": "user", "content": "Hi"}]}))
        .await;
    assert_eq!(st, 200);
    assert!(t["count"].as_u64().unwrap() > 3);

    // Something ran, so the histograms have samples; the text parses line by line.
    let (st, _) = s
        .post("/v1/completions", json!({"prompt": "Hi", "max_tokens": 2}))
        .await;
    assert_eq!(st, 200);
    let r = s.client.get(format!("{}/metrics", s.base)).send().await.unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = r.text().await.unwrap();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {line}");
        let bare = name.split('{').next().unwrap();
        assert!(
            bare.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name in {line}"
        );
        if let Some(labels) = name.strip_prefix(bare) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "{line}"
            );
        }
    }
    for name in crosskv::metrics::METRIC_NAMES {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing from /metrics"
        );
    }
}

/// The worker metadata a cache-aware router reads: the served name it routes by and the
/// engine's own sizes, matching `/v1/kv` and the setup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_model_info_report_this_engine() {
    let s = start(Setup {
        max_num_seqs: 7,
        max_num_batched_tokens: 96,
        ..Setup::default()
    })
    .await;
    let info = s.get_json("/server_info").await;
    let kv = s.get_json("/v1/kv").await;
    assert_eq!(info["served_model_name"], MODEL);
    assert_eq!(info["max_running_requests"], 7);
    assert_eq!(info["max_prefill_tokens"], 96);
    assert_eq!(info["max_model_len"], 256);
    assert_eq!(info["max_total_tokens"], kv["capacity_tokens"]);
    assert!(info["max_total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(info["prefix_caching"], true);
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    let model = s.get_json("/model_info").await;
    assert_eq!(model["served_model_name"], MODEL);
    assert_eq!(model["is_generation"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_while_loading_then_200() {
    let state = AppState::loading(HttpConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn({
        let state = state.clone();
        async move { axum::serve(listener, http::router(state)).await }
    });
    let c = reqwest::Client::new();
    let r = c.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let body: Value = r.json().await.unwrap();
    assert_error(503, &body, 503, None, "health while loading");
    let r = c
        .post(format!("{base}/v1/completions"))
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let ck = tiny_checkpoint(VOCAB);
    let cfg = EngineConfig {
        kv_cache_bytes: 1 << 20,
        block_size: 16,
        max_model_len: 64,
        max_num_seqs: 4,
        max_num_batched_tokens: 64,
        max_queued_requests: 4,
        prefix_caching: true,
        cuda_graphs: false,
        async_scheduling: false,
    };
    let handle = EngineHandle::start(ck.load(), tokenizer(), cfg).unwrap();
    state.set_ready(handle.clone());
    assert_eq!(
        c.get(format!("{base}/health")).send().await.unwrap().status().as_u16(),
        200
    );
    handle.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_equals_non_streaming() {
    let s = start(Setup::default()).await;
    let body = json!({"model": MODEL, "prompt": "The meaning of life is", "max_tokens": 12, "temperature": 0,
        "ignore_eos": true});
    let (st, whole) = s.post("/v1/completions", body.clone()).await;
    assert_eq!(st, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    assert_eq!(whole["usage"]["completion_tokens"], 12);
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let chunks = s.stream("/v1/completions", sb).await;
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).map(|ch| ch["text"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(streamed, text_of(&whole, 0));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"], whole["usage"]);
    assert_eq!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"], "length");

    let chat = json!({"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]}], "max_tokens": 10, "temperature": 0,
        "ignore_eos": true});
    let (st, whole) = s.post("/v1/chat/completions", chat.clone()).await;
    assert_eq!(st, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let mut sc = chat;
    sc["stream"] = json!(true);
    let chunks = s.stream("/v1/chat/completions", sc).await;
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(String::from))
        .collect();
    assert_eq!(streamed, whole["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_string_across_token_boundary_cuts_the_output() {
    let s = start(Setup::default()).await;
    let body = json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": true,
        "logprobs": 0});
    let (_, r) = s.post("/v1/completions", body.clone()).await;
    let text = text_of(&r, 0);
    let toks: Vec<String> = r["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    assert_eq!(toks.concat(), text, "per-token strings concatenate to the text");
    // A stop string made of the end of one token and the start of the next.
    let ascii = |t: &str| !t.is_empty() && t.is_ascii();
    let k = (2..toks.len() - 1)
        .find(|&k| ascii(&toks[k]) && ascii(&toks[k + 1]))
        .expect("two ASCII tokens in a row");
    let a = &toks[k];
    let b = &toks[k + 1];
    let stop = format!("{}{}", &a[a.len() - 1..], &b[..1]);
    let expected = &text[..text.find(&stop).unwrap()];
    let mut sb = body;
    sb["stop"] = json!([stop.clone(), "\u{1F600}never"]);
    let (st, r2) = s.post("/v1/completions", sb.clone()).await;
    assert_eq!(st, 200, "{r2}");
    assert_eq!(text_of(&r2, 0), expected, "stop {stop:?}");
    assert_eq!(r2["choices"][0]["finish_reason"], "stop");
    sb["stream"] = json!(true);
    let chunks = s.stream("/v1/completions", sb).await;
    let streamed: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_are_indexed_prompt_major_and_seeded() {
    let s = start(Setup::default()).await;
    let body = json!({"prompt": ["Alpha beta", "Gamma"], "n": 3, "max_tokens": 6, "temperature": 1.0,
        "seed": 11, "ignore_eos": true});
    let (st, a) = s.post("/v1/completions", body.clone()).await;
    assert_eq!(st, 200, "{a}");
    let ch = a["choices"].as_array().unwrap();
    assert_eq!(ch.len(), 6);
    for (i, c) in ch.iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    let (_, b) = s.post("/v1/completions", body).await;
    assert_eq!(a["choices"], b["choices"], "the same seed gives the same choices");
    // Choice j of a prompt runs with seed + j: choice 1 equals a lone request with seed 12.
    let (_, lone) = s
        .post(
            "/v1/completions",
            json!({"prompt": "Alpha beta", "max_tokens": 6, "temperature": 1.0, "seed": 12, "ignore_eos": true}),
        )
        .await;
    assert_eq!(text_of(&a, 1), text_of(&lone, 0));
    // Usage counts each prompt once and every completion token.
    let p0 = s.post("/tokenize", json!({"prompt": "Alpha beta"})).await.1["count"]
        .as_u64()
        .unwrap();
    let p1 = s.post("/tokenize", json!({"prompt": "Gamma"})).await.1["count"]
        .as_u64()
        .unwrap();
    assert_eq!(a["usage"]["prompt_tokens"], p0 + p1);
    assert_eq!(a["usage"]["completion_tokens"], 36);
    // Greedy choices agree; chat n streams every index.
    let (_, g) = s
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 4, "temperature": 0}),
        )
        .await;
    assert_eq!(g["choices"][0]["message"], g["choices"][1]["message"]);
    let chunks = s
        .stream(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 4, "stream": true}),
        )
        .await;
    for i in 0..2 {
        assert!(chunks
            .iter()
            .any(|c| c["choices"][0]["index"] == i && c["choices"][0]["finish_reason"].is_string()));
    }
}

fn log_softmax_at(row: &[f32], t: usize) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let lse = max + row.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    row[t] - lse
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_logprobs_match_a_full_forward() {
    let s = start(Setup::default()).await;
    let prompt = Rng::new(5).tokens(21, VOCAB);
    let reference = dense_logits(&s.ck.load(), &prompt);
    // lm-evaluation-harness log-likelihood requests: max_tokens 1, and 0 (score only).
    for max_tokens in [1, 0] {
        let (st, r) = s
            .post(
                "/v1/completions",
                json!({"model": MODEL, "prompt": [prompt.clone()], "echo": true, "logprobs": 1,
                    "max_tokens": max_tokens, "temperature": 0}),
            )
            .await;
        assert_eq!(st, 200, "{r}");
        let lp = &r["choices"][0]["logprobs"];
        let token_lps = lp["token_logprobs"].as_array().unwrap();
        assert_eq!(token_lps.len(), prompt.len() + max_tokens);
        assert_eq!(lp["tokens"].as_array().unwrap().len(), token_lps.len());
        assert_eq!(lp["text_offset"].as_array().unwrap().len(), token_lps.len());
        assert!(token_lps[0].is_null());
        assert!(lp["top_logprobs"][0].is_null());
        for p in 1..prompt.len() {
            let want = log_softmax_at(&reference[p - 1], prompt[p] as usize);
            let got = token_lps[p].as_f64().unwrap() as f32;
            assert!((got - want).abs() < 1e-3, "position {p}: {got} vs {want}");
            let top = lp["top_logprobs"][p].as_object().unwrap();
            assert!(!top.is_empty() && top.len() <= 2);
            let best = top.values().map(|v| v.as_f64().unwrap()).fold(f64::MIN, f64::max) as f32;
            let row = &reference[p - 1];
            let argmax = (0..VOCAB).fold(0, |b, t| if row[t] > row[b] { t } else { b });
            let want_best = log_softmax_at(row, argmax);
            assert!((best - want_best).abs() < 1e-3);
        }
        let offsets: Vec<u64> = lp["text_offset"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
        let text = text_of(&r, 0);
        let prompt_text = s.post("/detokenize", json!({"tokens": prompt})).await.1["prompt"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(text.starts_with(&prompt_text));
        if max_tokens == 0 {
            assert_eq!(text, prompt_text);
            assert_eq!(r["usage"]["completion_tokens"], 0);
        } else {
            let last = reference.last().unwrap();
            let gen = (0..VOCAB).fold(0, |b, t| if last[t] > last[b] { t } else { b });
            let got = token_lps[prompt.len()].as_f64().unwrap() as f32;
            assert!((got - log_softmax_at(last, gen)).abs() < 1e-3);
        }
    }
    // Chat logprobs: the chat shape.
    let (st, r) = s
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": true,
                "top_logprobs": 2, "ignore_eos": true}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    for c in content {
        assert!(c["token"].is_string() && c["logprob"].is_number() && c["bytes"].is_array());
        assert_eq!(c["top_logprobs"].as_array().unwrap().len(), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_openai_errors_naming_the_field() {
    let s = start(Setup::default()).await;
    let c = "/v1/completions";
    let chat = "/v1/chat/completions";
    let cases: Vec<(&str, Value, u16, Option<&str>)> = vec![
        (c, json!({"prompt": "x", "max_tokens": "many"}), 400, Some("max_tokens")),
        (c, json!({"prompt": "x", "max_tokens": -1}), 400, Some("max_tokens")),
        (c, json!({"prompt": "x", "max_tokens": 0}), 400, Some("max_tokens")),
        (c, json!({"prompt": "x", "temperature": -0.5}), 400, Some("temperature")),
        (c, json!({"prompt": "x", "top_p": 0}), 400, Some("top_p")),
        (c, json!({"prompt": "x", "top_k": -3}), 400, Some("top_k")),
        (c, json!({"prompt": "x", "n": 0}), 400, Some("n")),
        (c, json!({"prompt": "x", "logprobs": 99}), 400, Some("logprobs")),
        (c, json!({"prompt": "x", "stop": 5}), 400, Some("stop")),
        (c, json!({"prompt": "x", "stream": "yes"}), 400, Some("stream")),
        (
            c,
            json!({"prompt": "x", "min_tokens": 50, "max_tokens": 5}),
            400,
            Some("min_tokens"),
        ),
        (c, json!({"prompt": [1, 2, VOCAB]}), 400, Some("prompt")),
        (c, json!({"prompt": [[1, 2], [3, -4]]}), 400, Some("prompt")),
        (c, json!({"prompt": []}), 400, Some("prompt")),
        (c, json!({"prompt": {"a": 1}}), 400, Some("prompt")),
        (c, json!({"prompt": ""}), 400, Some("prompt")),
        (c, json!({"max_tokens": 3}), 400, Some("prompt")),
        (
            c,
            json!({"prompt": "x", "stop_token_ids": [VOCAB + 5]}),
            400,
            Some("stop_token_ids"),
        ),
        (
            c,
            json!({"prompt": vec![1u32; 250], "max_tokens": 10}),
            400,
            Some("max_tokens"),
        ),
        (
            c,
            json!({"prompt": vec![1u32; 300], "max_tokens": 1}),
            400,
            Some("prompt"),
        ),
        (c, json!({"prompt": "x", "model": "gpt-4"}), 404, Some("model")),
        (chat, json!({"messages": []}), 400, Some("messages")),
        (chat, json!({"messages": "hi"}), 400, Some("messages")),
        (chat, json!({"messages": [{"content": "hi"}]}), 400, Some("messages[0]")),
        (
            chat,
            json!({"messages": [{"role": "user"}]}),
            400,
            Some("messages[0].content"),
        ),
        (
            chat,
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            400,
            Some("messages[0].role"),
        ),
        (
            chat,
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            400,
            Some("messages[0].content"),
        ),
        (
            chat,
            json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
            400,
            Some("top_logprobs"),
        ),
        (
            chat,
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}),
            400,
            Some("max_tokens"),
        ),
        ("/detokenize", json!({"tokens": [VOCAB]}), 400, Some("tokens")),
        ("/tokenize", json!({}), 400, Some("prompt")),
    ];
    for (path, body, status, param) in cases {
        let (st, b) = s.post(path, body.clone()).await;
        assert_error(st, &b, status, param, &format!("{path} {body}"));
    }
    // Malformed JSON, trailing garbage, unknown routes and methods.
    for (raw, param) in [
        ("{\"prompt\": ", Some("prompt")),
        ("not json", None),
        ("{\"prompt\": \"x\"} extra", None),
        ("[1, 2]", None),
    ] {
        let r = s
            .client
            .post(format!("{}{c}", s.base))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        assert_error(st, &r.json().await.unwrap(), 400, param, raw);
    }
    let r = s.client.get(format!("{}/v1/nothing", s.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let r = s.client.get(format!("{}{c}", s.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    // The server is still healthy and nothing leaked.
    assert_eq!(s.wait_idle().await["blocks_used"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_body_limit_and_full_queue() {
    let s = start(Setup {
        api_key: Some("sekret".into()),
        max_body_bytes: 4096,
        max_queued_requests: 1,
        max_model_len: 2048,
        ..Default::default()
    })
    .await;
    let url = format!("{}/v1/completions", s.base);
    let body = json!({"prompt": "x", "max_tokens": 1});
    for auth in [None, Some("Bearer wrong"), Some("sekret"), Some("Bearer sekre")] {
        let mut rq = s.client.post(&url).json(&body);
        if let Some(a) = auth {
            rq = rq.header("authorization", a);
        }
        let r = rq.send().await.unwrap();
        let st = r.status().as_u16();
        assert_error(st, &r.json().await.unwrap(), 401, None, &format!("{auth:?}"));
    }
    // /health and /metrics stay open.
    assert_eq!(s.get("/health").await.0, 200);
    assert_eq!(s.get("/metrics").await.0, 200);
    assert_eq!(s.get("/v1/models").await.0, 401);
    assert_eq!(s.get("/server_info").await.0, 401);
    let ok = s
        .client
        .post(&url)
        .bearer_auth("sekret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);

    let big = json!({"prompt": "x".repeat(8000)});
    let r = s
        .client
        .post(&url)
        .bearer_auth("sekret")
        .json(&big)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    assert_error(st, &r.json().await.unwrap(), 413, None, "oversized body");

    // One long request fills the queue of one: the next gets 429.
    let long = json!({"prompt": "x", "max_tokens": 2000, "ignore_eos": true, "stream": true});
    let mut first = s
        .client
        .post(&url)
        .bearer_auth("sekret")
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status().as_u16(), 200);
    first.chunk().await.unwrap();
    let r = s
        .client
        .post(&url)
        .bearer_auth("sekret")
        .json(&body)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    assert_eq!(r.headers()["retry-after"], "1");
    let b: Value = r.json().await.unwrap();
    assert_error(st, &b, 429, None, "queue full");
    drop(first);
    // Once the first is gone (aborted), requests are accepted again.
    let t0 = Instant::now();
    loop {
        let r = s
            .client
            .post(&url)
            .bearer_auth("sekret")
            .json(&body)
            .send()
            .await
            .unwrap();
        if r.status().as_u16() == 200 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_its_blocks() {
    let s = start(Setup {
        max_model_len: 2048,
        ..Default::default()
    })
    .await;
    let long = json!({"prompt": "Tell me everything", "max_tokens": 2000, "ignore_eos": true});
    // Streaming: read one chunk, then go away.
    let mut sb = long.clone();
    sb["stream"] = json!(true);
    let mut r = s
        .client
        .post(format!("{}/v1/completions", s.base))
        .json(&sb)
        .send()
        .await
        .unwrap();
    r.chunk().await.unwrap();
    let t0 = Instant::now();
    while s.get_json("/v1/kv").await["blocks_used"] == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the request never held blocks");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(r);
    s.wait_idle().await;
    // Non-streaming: the client times out and closes the connection.
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = quick
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&json!({"messages": [{"role": "user", "content": "Go on"}], "max_tokens": 2000, "ignore_eos": true}))
        .send()
        .await;
    assert!(err.is_err(), "the request should have timed out");
    s.wait_idle().await;
    let generated = s.metric("crosskv_generation_tokens_total").await;
    assert!(
        generated < 4000.0,
        "both requests were aborted early ({generated} tokens)"
    );
}

/// 32 different greedy prompts, each alone, then all at once: the same texts.
async fn concurrent_matches_alone(s: &Server) {
    let mut rng = Rng::new(3);
    let bodies: Vec<Value> = (0..32)
        .map(|i| {
            let len = 3 + (rng.next_u64() % 18) as usize;
            json!({"prompt": rng.tokens(len, VOCAB), "max_tokens": 10 + i % 5, "temperature": 0, "ignore_eos": true})
        })
        .collect();
    let mut alone = Vec::new();
    for b in &bodies {
        let (st, r) = s.post("/v1/completions", b.clone()).await;
        assert_eq!(st, 200, "{r}");
        alone.push(text_of(&r, 0));
    }
    let together = futures_util::future::join_all(bodies.iter().map(|b| s.post("/v1/completions", b.clone()))).await;
    for (i, (st, r)) in together.iter().enumerate() {
        assert_eq!(*st, 200, "{r}");
        assert_eq!(text_of(r, 0), alone[i], "request {i}");
    }
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_greedy_requests_match_each_alone() {
    let s = start(Setup::default()).await;
    concurrent_matches_alone(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_greedy_requests_match_each_alone_under_preemption() {
    // 16 blocks of 2048 bytes: 8 per KV slot, room for about 4 of the 32 requests.
    let s = start(Setup {
        kv_cache_bytes: 16 * 2048,
        max_model_len: 64,
        ..Default::default()
    })
    .await;
    assert_eq!(s.get_json("/v1/kv").await["num_blocks"], 16);
    concurrent_matches_alone(&s).await;
    assert!(s.metric("crosskv_num_preemptions_total").await > 0.0);
}

/// The exact requests the official `openai` Python client sends (headers and bodies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_request_shapes() {
    let s = start(Setup {
        api_key: Some("sk-test".into()),
        ..Default::default()
    })
    .await;
    let send = |path: &str, body: Value| {
        s.client
            .post(format!("{}{path}", s.base))
            .header("authorization", "Bearer sk-test")
            .header("content-type", "application/json")
            .header("user-agent", "OpenAI/Python 1.54.0")
            .header("x-stainless-lang", "python")
            .header("x-stainless-retry-count", "0")
            .body(body.to_string())
            .send()
    };
    // client.completions.create(model=..., prompt=..., max_tokens=5, temperature=0)
    let r = send(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Say hi", "max_tokens": 5, "temperature": 0}),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    for k in ["id", "object", "created", "model", "choices", "usage"] {
        assert!(v.get(k).is_some(), "{k} in {v}");
    }
    let ch = &v["choices"][0];
    assert!(ch["index"].is_number() && ch["text"].is_string() && ch["finish_reason"].is_string());
    // client.chat.completions.create(model=..., messages=[...], max_completion_tokens=5, stream=True,
    //     stream_options={"include_usage": True}, logprobs=False, seed=1, n=1, stop=None)
    let r = send(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hello"}], "model": MODEL, "logprobs": false,
            "max_completion_tokens": 5, "n": 1, "seed": 1, "stop": null, "stream": true,
            "stream_options": {"include_usage": true}, "temperature": 0.7, "top_p": 0.9}),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let usage: Value = serde_json::from_str(
        text.split("\n\n")
            .filter(|e| e.starts_with("data: {"))
            .last()
            .unwrap()
            .strip_prefix("data: ")
            .unwrap(),
    )
    .unwrap();
    assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() <= 5);
    // client.models.list()
    let r = s
        .client
        .get(format!("{}/v1/models", s.base))
        .header("authorization", "Bearer sk-test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["data"][0]["object"], "model");
}
