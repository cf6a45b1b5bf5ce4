//! The gRPC API against a real server: the engine runs a tiny random llama (the
//! default model's vocabulary and tokenizer, hidden 32, 2 layers) in-process, tonic
//! serves it on an ephemeral loopback port, and a generated tonic client calls it.

use crate::common::Tiny;
use candle_core::quantized::gguf_file;
use crosskv::api::grpc::{self, pb};
use crosskv::engine::{EngineConfig, EngineHandle};
use crosskv::model::{self, ModelSource, Tok};
use pb::generation_client::GenerationClient;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const VOCAB: usize = 49152;
const MAX_MODEL_LEN: usize = 4096;

/// The default model's GGUF path (fetched once for every test of the binary).
fn default_gguf() -> std::path::PathBuf {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    static FETCH: Mutex<()> = Mutex::new(());
    PATH.get_or_init(|| {
        let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
        match model::resolve_source(None).expect("the default model can be fetched") {
            ModelSource::Gguf(p) => p,
            other => panic!(
                "the default model is expected as a GGUF, got {}",
                other.path().display()
            ),
        }
    })
    .clone()
}

fn tokenizer() -> Tok {
    let mut f = std::fs::File::open(default_gguf()).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    Tok::from_gguf(&ct).unwrap()
}

struct Server {
    handle: EngineHandle,
    client: GenerationClient<Channel>,
    channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Stops the server and checks `serve` returned cleanly.
    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        drop(self.client);
        drop(self.channel);
        let res = tokio::time::timeout(Duration::from_secs(30), self.served)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
        res.expect("serve ends with Ok");
        self.handle.shutdown();
    }
}

async fn start_with(max_queued_requests: usize) -> Server {
    start_configured(max_queued_requests, grpc::GrpcConfig::default()).await
}

async fn start_configured(max_queued_requests: usize, cfg: grpc::GrpcConfig) -> Server {
    let mut tiny = Tiny::new(2, 4, 2, 8, 32, VOCAB);
    tiny.intermediate = 64;
    let mut ck = tiny.write();
    ck.config["max_position_embeddings"] = serde_json::json!(MAX_MODEL_LEN);
    ck.save();
    let model = ck.load();
    let handle = EngineHandle::start(
        model,
        tokenizer(),
        EngineConfig {
            kv_cache_bytes: 8 << 20,
            block_size: 16,
            max_model_len: MAX_MODEL_LEN,
            max_num_seqs: 8,
            max_num_batched_tokens: 512,
            max_queued_requests,
            prefix_caching: true,
            cuda_graphs: false,
            async_scheduling: false,
        },
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(grpc::serve_with_listener(handle.clone(), cfg, listener, async move {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Server {
        handle,
        client: GenerationClient::new(channel.clone()),
        channel,
        stop: Some(stop),
        served,
    }
}

async fn start() -> Server {
    start_with(64).await
}

fn greedy(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: prompt.into(),
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn grpc_generate_returns_max_tokens_ids_text_and_length() {
    let mut s = start().await;
    let r = s
        .client
        .generate(greedy("The capital of France is", 7))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.token_ids.len(), 7);
    assert_eq!(r.finish_reason, "length");
    assert!(r.token_ids.iter().all(|&t| (t as usize) < VOCAB));
    let tok = s.handle.tokenizer().clone();
    assert_eq!(
        r.text,
        tok.decode(&r.token_ids, true).unwrap(),
        "text is the decoded ids"
    );
    // Token-id prompts work too, and max_tokens 0 means 16.
    let ids = tok.encode("Hello there", true).unwrap();
    let req = pb::GenerateRequest {
        prompt_ids: ids,
        ignore_eos: true,
        ..Default::default()
    };
    let r = s.client.generate(req).await.unwrap().into_inner();
    assert_eq!(r.token_ids.len(), 16);
    assert_eq!(r.finish_reason, "length");
    s.shutdown().await;
}

#[tokio::test]
async fn grpc_stream_concatenates_to_the_unary_result_and_ends_with_finish_reason() {
    let mut s = start().await;
    let req = greedy("Once upon a time", 24);
    let whole = s.client.generate(req.clone()).await.unwrap().into_inner();
    let mut stream = s.client.generate_stream(req).await.unwrap().into_inner();
    let mut msgs = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        msgs.push(m);
    }
    assert!(msgs.len() >= 2, "streamed in pieces: {msgs:?}");
    let (last, rest) = msgs.split_last().unwrap();
    assert_eq!(last.finish_reason, "length");
    assert!(
        rest.iter().all(|m| m.finish_reason.is_empty()),
        "only the last carries finish_reason"
    );
    assert!(
        rest.iter().all(|m| !m.text.is_empty()),
        "each message before the last is a new piece of text"
    );
    let text: String = msgs.iter().map(|m| m.text.as_str()).collect();
    let ids: Vec<u32> = msgs.iter().flat_map(|m| m.token_ids.iter().copied()).collect();
    assert_eq!(text, whole.text);
    assert_eq!(ids, whole.token_ids);
    s.shutdown().await;
}

#[tokio::test]
async fn grpc_tokenize_matches_the_tokenizer() {
    let mut s = start().await;
    let tok = s.handle.tokenizer().clone();
    for (text, special) in [("Hello, world! ünïcödé", true), ("Hello, world!", false), ("", false)] {
        let r = s
            .client
            .tokenize(pb::TokenizeRequest {
                text: text.into(),
                add_special_tokens: special,
            })
            .await
            .unwrap()
            .into_inner();
        let want = tok.encode(text, special).unwrap();
        assert_eq!(r.token_ids, want, "{text:?} special={special}");
        assert_eq!(r.count as usize, want.len());
    }
    s.shutdown().await;
}

#[tokio::test]
async fn grpc_kv_status_reports_the_engine_capacity_and_usage() {
    let mut s = start().await;
    let r = s.client.kv_status(pb::KvStatusRequest {}).await.unwrap().into_inner();
    let c = s.handle.capacity().clone();
    assert_eq!(r.layers as usize, c.layers);
    assert_eq!(r.kv_layers as usize, c.kv_layers);
    assert_eq!(r.kv_source.iter().map(|&x| x as usize).collect::<Vec<_>>(), c.kv_source);
    assert_eq!(r.kv_bytes_per_token as usize, c.kv_bytes_per_token);
    assert_eq!(r.non_cla_kv_bytes_per_token as usize, c.non_cla_kv_bytes_per_token);
    assert_eq!(r.block_size as usize, c.block_size);
    assert_eq!(r.num_blocks as usize, c.num_blocks);
    assert_eq!(r.capacity_tokens as usize, c.capacity_tokens);
    assert_eq!(r.max_concurrency as usize, c.max_concurrency);
    assert_eq!(r.non_cla_capacity_tokens as usize, c.non_cla_capacity_tokens);
    assert_eq!(r.non_cla_max_concurrency as usize, c.non_cla_max_concurrency);
    assert_eq!((r.layers, r.kv_layers, r.block_size), (2, 2, 16));
    assert_eq!(r.blocks_used, 0);
    assert_eq!(r.blocks_free, r.num_blocks);
    assert_eq!(r.blocks_used_per_slot.len(), 2);
    assert_eq!((r.num_running, r.num_waiting), (0, 0));
    s.shutdown().await;
}

#[tokio::test]
async fn grpc_bad_requests_are_invalid_argument_naming_the_field() {
    let mut s = start().await;
    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (pb::GenerateRequest::default(), "prompt"),
        (
            pb::GenerateRequest {
                prompt_ids: vec![1, VOCAB as u32],
                ..Default::default()
            },
            "prompt_ids",
        ),
        (
            pb::GenerateRequest {
                prompt_ids: vec![1, u32::MAX],
                ..Default::default()
            },
            "prompt_ids",
        ),
        (greedy("Hi", MAX_MODEL_LEN as u32), "max_tokens"),
        (
            pb::GenerateRequest {
                prompt_ids: vec![1; MAX_MODEL_LEN],
                max_tokens: 1,
                ..Default::default()
            },
            "max_tokens",
        ),
        (
            pb::GenerateRequest {
                temperature: -0.5,
                ..greedy("Hi", 2)
            },
            "temperature",
        ),
        (
            pb::GenerateRequest {
                temperature: f32::NAN,
                ..greedy("Hi", 2)
            },
            "temperature",
        ),
        (
            pb::GenerateRequest {
                top_p: 1.5,
                ..greedy("Hi", 2)
            },
            "top_p",
        ),
        (
            pb::GenerateRequest {
                top_p: -0.1,
                ..greedy("Hi", 2)
            },
            "top_p",
        ),
    ];
    for (req, field) in cases {
        let e = s.client.generate(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
        let e = s.client.generate_stream(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "stream {field}: {e:?}");
    }
    // Sampling knobs in range are accepted.
    let req = pb::GenerateRequest {
        temperature: 0.8,
        top_p: 0.9,
        top_k: 20,
        seed: Some(7),
        ..greedy("Hi", 3)
    };
    let r = s.client.generate(req).await.unwrap().into_inner();
    assert_eq!(r.token_ids.len(), 3);
    s.shutdown().await;
}

#[tokio::test]
async fn grpc_full_queue_is_resource_exhausted() {
    let mut s = start_with(0).await;
    let e = s.client.generate(greedy("Hi", 2)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let e = s.client.generate_stream(greedy("Hi", 2)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    s.shutdown().await;
}

#[tokio::test]
async fn grpc_health_reports_serving() {
    let s = start().await;
    let mut health = HealthClient::new(s.channel.clone());
    for service in ["", "crosskv.v1.Generation"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
    s.shutdown().await;
}

#[tokio::test]
async fn grpc_cancelled_stream_is_aborted_and_frees_its_blocks() {
    let mut s = start().await;
    let max_tokens = (MAX_MODEL_LEN - 64) as u32;
    let before = s.handle.metrics().generation_tokens_total.get();
    let mut stream = s
        .client
        .generate_stream(greedy("Tell me a long story", max_tokens))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first piece");
    assert!(first.finish_reason.is_empty());
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = s.client.kv_status(pb::KvStatusRequest {}).await.unwrap().into_inner();
        if r.blocks_used == 0 && r.num_running == 0 && r.num_waiting == 0 {
            assert_eq!(r.blocks_free, r.num_blocks);
            break;
        }
        assert!(Instant::now() < deadline, "blocks still used after the cancel: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let generated = s.handle.metrics().generation_tokens_total.get() - before;
    assert!(
        generated < max_tokens as u64,
        "the request was aborted, not run to the end ({generated} tokens)"
    );
    // The server goes on serving.
    let r = s.client.generate(greedy("Hi", 2)).await.unwrap().into_inner();
    assert_eq!(r.token_ids.len(), 2);
    s.shutdown().await;
}

fn with_auth<T>(msg: T, auth: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(a) = auth {
        r.metadata_mut().insert("authorization", a.parse().unwrap());
    }
    r
}

#[tokio::test]
async fn grpc_api_key_guards_every_generation_method_but_not_health() {
    let cfg = grpc::GrpcConfig {
        api_key: Some("sekret".into()),
        ..Default::default()
    };
    let mut s = start_configured(64, cfg).await;
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("sekret"),
        Some("Basic sekret"),
        Some("Bearer sekre"),
    ] {
        let what = format!("{auth:?}");
        let e = s.client.generate(with_auth(greedy("Hi", 2), auth)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "generate {what}");
        let e = s
            .client
            .generate_stream(with_auth(greedy("Hi", 2), auth))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "stream {what}");
        let tok = pb::TokenizeRequest {
            text: "Hi".into(),
            add_special_tokens: false,
        };
        let e = s.client.tokenize(with_auth(tok, auth)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "tokenize {what}");
        let e = s
            .client
            .kv_status(with_auth(pb::KvStatusRequest {}, auth))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "kv_status {what}");
    }
    // The scheme is case-insensitive (RFC 7235).
    for auth in ["Bearer sekret", "bearer sekret"] {
        let r = s
            .client
            .generate(with_auth(greedy("Hi", 2), Some(auth)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.token_ids.len(), 2, "{auth}");
        s.client
            .kv_status(with_auth(pb::KvStatusRequest {}, Some(auth)))
            .await
            .unwrap();
    }
    let mut health = HealthClient::new(s.channel.clone());
    let r = health
        .check(HealthCheckRequest { service: "".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, ServingStatus::Serving as i32);
    s.shutdown().await;
}

/// Sends bytes as they are as a unary call's message.
#[derive(Clone, Default)]
struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;
    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }
    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

#[tokio::test]
async fn grpc_malformed_protobuf_and_oversized_fields_are_invalid_argument() {
    let mut s = start().await;
    let mut raw = tonic::client::Grpc::new(s.channel.clone());
    // Field 1 (prompt, length-delimited) declares 100 bytes and carries 2.
    for (bytes, what) in [(vec![0x0a, 100, b'h', b'i'], "truncated"), (vec![0xff; 8], "bad tag")] {
        raw.ready().await.unwrap();
        let e = raw
            .unary(
                tonic::Request::new(bytes),
                http::uri::PathAndQuery::from_static("/crosskv.v1.Generation/Generate"),
                RawBytes,
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
    }
    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (
            pb::GenerateRequest {
                stop: (0..17).map(|i| format!("s{i}")).collect(),
                ..greedy("Hi", 2)
            },
            "stop",
        ),
        (
            pb::GenerateRequest {
                stop: vec!["x".repeat(2000)],
                ..greedy("Hi", 2)
            },
            "stop",
        ),
        (greedy("Hi", u32::MAX), "max_tokens"),
        (greedy(&"word ".repeat(MAX_MODEL_LEN * 20), 1), "prompt"),
    ];
    for (req, field) in cases {
        let e = s.client.generate(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    let e = s
        .client
        .tokenize(pb::TokenizeRequest {
            text: "word ".repeat(MAX_MODEL_LEN * 20),
            add_special_tokens: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // 16 stop strings of the longest length are accepted.
    let req = pb::GenerateRequest {
        stop: (0..16).map(|i| format!("{i:04}").repeat(256)).collect(),
        ..greedy("Hi", 3)
    };
    assert_eq!(s.client.generate(req).await.unwrap().into_inner().token_ids.len(), 3);
    s.shutdown().await;
}

#[tokio::test]
async fn grpc_health_turns_not_serving_when_the_engine_is_gone() {
    let s = start().await;
    let mut health = HealthClient::new(s.channel.clone());
    s.handle.shutdown();
    for service in ["", "crosskv.v1.Generation"] {
        let t0 = Instant::now();
        loop {
            let r = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner();
            if r.status == ServingStatus::NotServing as i32 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "`{service}` still serving");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    s.shutdown().await;
}

#[tokio::test]
async fn grpc_logit_bias_and_penalties_are_checked_and_honoured() {
    let mut s = start().await;
    let tok = tokenizer();
    let forced = tok.encode(" river", false).unwrap()[0];
    let bias = |pairs: &[(u32, f32)]| pairs.iter().copied().collect::<std::collections::HashMap<u32, f32>>();
    // +100 forces a token; −100 bans the greedy pick.
    let r = s
        .client
        .generate(pb::GenerateRequest {
            logit_bias: bias(&[(forced, 100.0)]),
            ..greedy("Once upon a time", 6)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.token_ids, vec![forced; 6]);
    let base = s
        .client
        .generate(greedy("The meaning of life is", 8))
        .await
        .unwrap()
        .into_inner()
        .token_ids;
    let r = s
        .client
        .generate(pb::GenerateRequest {
            logit_bias: bias(&[(base[0], -100.0)]),
            ..greedy("The meaning of life is", 8)
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(r.token_ids, base);
    assert!(!r.token_ids.contains(&base[0]), "{:?}", r.token_ids);
    // A frequency penalty of 2 never repeats more than plain greedy.
    let plain = s.client.generate(greedy("the the the", 24)).await.unwrap().into_inner();
    let pen = s
        .client
        .generate(pb::GenerateRequest {
            frequency_penalty: 2.0,
            presence_penalty: 1.0,
            repetition_penalty: Some(1.5),
            min_p: 0.1,
            ..greedy("the the the", 24)
        })
        .await
        .unwrap()
        .into_inner();
    let distinct = |ids: &[u32]| ids.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(distinct(&pen.token_ids) >= distinct(&plain.token_ids));
    // Out of range: INVALID_ARGUMENT naming the field.
    let many: std::collections::HashMap<u32, f32> = (0..1025).map(|i| (i, 1.0)).collect();
    let cases = [
        (
            pb::GenerateRequest {
                logit_bias: bias(&[(VOCAB as u32, 1.0)]),
                ..greedy("Hi", 2)
            },
            "logit_bias",
        ),
        (
            pb::GenerateRequest {
                logit_bias: bias(&[(3, 100.5)]),
                ..greedy("Hi", 2)
            },
            "logit_bias",
        ),
        (
            pb::GenerateRequest {
                logit_bias: bias(&[(3, f32::NAN)]),
                ..greedy("Hi", 2)
            },
            "logit_bias",
        ),
        (
            pb::GenerateRequest {
                logit_bias: many,
                ..greedy("Hi", 2)
            },
            "logit_bias",
        ),
        (
            pb::GenerateRequest {
                presence_penalty: 2.5,
                ..greedy("Hi", 2)
            },
            "presence_penalty",
        ),
        (
            pb::GenerateRequest {
                frequency_penalty: -3.0,
                ..greedy("Hi", 2)
            },
            "frequency_penalty",
        ),
        (
            pb::GenerateRequest {
                repetition_penalty: Some(0.0),
                ..greedy("Hi", 2)
            },
            "repetition_penalty",
        ),
        (
            pb::GenerateRequest {
                repetition_penalty: Some(f32::INFINITY),
                ..greedy("Hi", 2)
            },
            "repetition_penalty",
        ),
        (
            pb::GenerateRequest {
                min_p: 1.5,
                ..greedy("Hi", 2)
            },
            "min_p",
        ),
        (
            pb::GenerateRequest {
                temperature: 2.5,
                ..greedy("Hi", 2)
            },
            "temperature",
        ),
    ];
    for (req, field) in cases {
        let e = s.client.generate(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    s.shutdown().await;
}

#[tokio::test]
async fn grpc_constraint_shapes_the_output_and_an_invalid_one_is_invalid_argument() {
    use pb::output_constraint::Kind;
    let mut s = start().await;
    let constrained = |kind: Kind| pb::GenerateRequest {
        prompt: "Answer:".into(),
        max_tokens: 120,
        constraint: Some(pb::OutputConstraint { kind: Some(kind) }),
        ..Default::default()
    };
    let schema = serde_json::json!({"type": "object",
        "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}, "s": {"enum": ["p", "q"]}},
        "required": ["n", "s"], "additionalProperties": false});
    let r = s
        .client
        .generate(constrained(Kind::JsonSchema(schema.to_string())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.finish_reason, "stop", "{}", r.text);
    let v: serde_json::Value = serde_json::from_str(&r.text).unwrap();
    assert!((1..=9).contains(&v["n"].as_i64().unwrap()), "{v}");
    assert!(v["s"] == "p" || v["s"] == "q", "{v}");
    let choices = vec!["alpha".to_string(), "beta".to_string()];
    let mut stream = s
        .client
        .generate_stream(constrained(Kind::Choice(pb::Choices {
            choices: choices.clone(),
        })))
        .await
        .unwrap()
        .into_inner();
    let (mut text, mut finish) = (String::new(), String::new());
    while let Some(m) = stream.message().await.unwrap() {
        text += &m.text;
        finish = m.finish_reason;
    }
    assert_eq!(finish, "stop");
    assert!(choices.contains(&text), "{text}");
    let r = s
        .client
        .generate(constrained(Kind::Regex("[0-9]{3}-[a-z]{2}".into())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.finish_reason, "stop");
    assert!(
        regex::Regex::new("^[0-9]{3}-[a-z]{2}$").unwrap().is_match(&r.text),
        "{}",
        r.text
    );
    for kind in [
        Kind::JsonSchema("{not json".into()),
        Kind::JsonSchema(r#"{"type": "nope"}"#.into()),
        Kind::Regex("(".into()),
        Kind::Choice(pb::Choices { choices: vec![] }),
        Kind::Grammar("start: missing".into()),
        Kind::JsonObject(false),
    ] {
        let e = s.client.generate(constrained(kind.clone())).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{kind:?}: {e:?}");
        assert!(e.message().starts_with("constraint"), "{kind:?}: {}", e.message());
    }
    let e = s
        .client
        .generate(pb::GenerateRequest {
            constraint: Some(pb::OutputConstraint { kind: None }),
            ..greedy("Hi", 2)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    s.shutdown().await;
}
