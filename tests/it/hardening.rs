//! Hostile input against the HTTP server, as an attacker would send it: each case gets
//! a clean error (status, OpenAI error shape naming the field), costs the server
//! nothing unbounded, and leaves it healthy with every block free.

use crate::http::{assert_error, start, Server, Setup, MODEL, VOCAB};
use crosskv::api::listener::ConnectionLimits;
use crosskv::engine::Fault;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const C: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

impl Server {
    /// After a hostile request: `/health` is 200, a plain request works, no block leaks.
    async fn still_serves(&self, what: &str) {
        assert_eq!(self.get("/health").await.0, 200, "{what}");
        let (st, r) = self
            .post(C, json!({"prompt": "Hello", "max_tokens": 2, "ignore_eos": true}))
            .await;
        assert_eq!(st, 200, "{what}: {r}");
        assert_eq!(r["usage"]["completion_tokens"], 2, "{what}");
        self.wait_idle().await;
    }
}

/// Reads what the server sends until it closes the connection (or `limit` passes).
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&out).into_owned()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_numbers_never_overflow_the_context_check() {
    let s = start(Setup::default()).await;
    let huge = u64::MAX;
    for (path, body, param) in [
        (C, json!({"prompt": "Hello", "max_tokens": huge}), "max_tokens"),
        (
            C,
            json!({"prompt": "Hello", "max_tokens": huge - 3, "n": 2}),
            "max_tokens",
        ),
        (
            C,
            json!({"prompt": "Hello", "max_tokens": 4, "min_tokens": huge}),
            "min_tokens",
        ),
        (
            CHAT,
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": huge}),
            "max_tokens",
        ),
        (
            CHAT,
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": huge - 1}),
            "max_completion_tokens",
        ),
        (
            CHAT,
            json!({"messages": [{"role": "user", "content": "Hi"}], "n": huge}),
            "n",
        ),
    ] {
        let (st, r) = s.post(path, body.clone()).await;
        assert_error(st, &r, 400, Some(param), &body.to_string());
    }
    s.still_serves("overflow").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_could_never_be_admitted_are_400_before_anything_is_built() {
    let s = start(Setup {
        max_queued_requests: 8,
        ..Default::default()
    })
    .await;
    // 60,000 prompts × n 128: refused from the JSON's shape, nothing tokenized.
    let many: Vec<&str> = vec!["x"; 60_000];
    let (st, r) = s.post(C, json!({"prompt": many, "n": 128, "max_tokens": 1})).await;
    assert_error(st, &r, 400, Some("prompt"), "60k prompts");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-queued-requests"));
    let (st, r) = s
        .post(C, json!({"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1}))
        .await;
    assert_error(st, &r, 400, Some("n"), "3 × 3 > 8");
    let (st, r) = s.post(C, json!({"prompt": [[1, 2], [3, 4], [5]], "n": 3})).await;
    assert_error(st, &r, 400, Some("n"), "id lists 3 × 3 > 8");
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "n": 9, "max_tokens": 1});
    let (st, r) = s.post(CHAT, chat).await;
    assert_error(st, &r, 400, Some("n"), "chat n 9 > 8");
    // At the bound it is served.
    let (st, r) = s
        .post(
            C,
            json!({"prompt": ["a", "b"], "n": 4, "max_tokens": 1, "ignore_eos": true}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["choices"].as_array().unwrap().len(), 8);
    s.still_serves("admission").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_and_stop_ids_are_bounded() {
    let s = start(Setup::default()).await;
    let seventeen: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    let too_long = "x".repeat(1025);
    let many_ids: Vec<u32> = (0..1025).collect();
    for (path, body, param) in [
        (C, json!({"prompt": "Hi", "stop": seventeen}), "stop"),
        (C, json!({"prompt": "Hi", "stop": too_long}), "stop"),
        (C, json!({"prompt": "Hi", "stop": ["ok", too_long]}), "stop"),
        (C, json!({"prompt": "Hi", "stop_token_ids": many_ids}), "stop_token_ids"),
        (
            CHAT,
            json!({"messages": [{"role": "user", "content": "Hi"}], "stop": [too_long]}),
            "stop",
        ),
    ] {
        let (st, r) = s.post(path, body).await;
        assert_error(st, &r, 400, Some(param), param);
    }
    // At the bounds: 16 stop strings of 1,024 bytes that nearly match the output, and
    // 1,024 stop ids, next to a plain request that must not be slowed by them.
    let stops: Vec<String> = (0..16).map(|i| format!("{}{i:x}", " ".repeat(1023))).collect();
    let ids: Vec<u32> = (VOCAB as u32 - 1024..VOCAB as u32).collect();
    let (heavy, plain) = tokio::join!(
        s.post(
            C,
            json!({"prompt": "Hello", "max_tokens": 24, "ignore_eos": true, "stop": stops, "stop_token_ids": ids, "temperature": 0}),
        ),
        s.post(C, json!({"prompt": "Hello", "max_tokens": 24, "ignore_eos": true, "temperature": 0})),
    );
    assert_eq!(heavy.0, 200, "{}", heavy.1);
    assert_eq!(plain.0, 200, "{}", plain.1);
    s.still_serves("stops").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_text_over_the_byte_cap_is_refused_before_tokenizing() {
    let s = start(Setup {
        max_prompt_bytes: Some(4096),
        ..Default::default()
    })
    .await;
    let long = "word ".repeat(1000);
    for (path, body, param) in [
        (C, json!({"prompt": long}), "prompt"),
        (C, json!({"prompt": ["short", long]}), "prompt"),
        (
            CHAT,
            json!({"messages": [{"role": "user", "content": long}]}),
            "messages",
        ),
        (
            CHAT,
            json!({"messages": [{"role": "system", "content": "word ".repeat(500)},
                                {"role": "user", "content": [{"type": "text", "text": "word ".repeat(500)}]}]}),
            "messages",
        ),
        ("/tokenize", json!({"prompt": long}), "prompt"),
    ] {
        let (st, r) = s.post(path, body).await;
        assert_error(st, &r, 400, Some(param), path);
        assert!(r["error"]["message"].as_str().unwrap().contains("--max-prompt-bytes"));
    }
    s.still_serves("prompt bytes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenizing_big_prompts_never_blocks_health_or_other_requests() {
    // A cap far above the model's length: the prompts are tokenized, then refused for
    // their length.
    let s = start(Setup {
        max_prompt_bytes: Some(64 << 20),
        max_body_bytes: 64 << 20,
        ..Default::default()
    })
    .await;
    let big = "lorem ipsum dolor sit amet, ".repeat(200_000);
    let slow = |s: &Server| {
        let (client, url, big) = (s.client.clone(), format!("{}{C}", s.base), big.clone());
        tokio::spawn(async move {
            let r = client.post(url).json(&json!({"prompt": big})).send().await.unwrap();
            let st = r.status().as_u16();
            (st, Instant::now())
        })
    };
    let (a, b) = (slow(&s), slow(&s));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (st, _) = s.get("/health").await;
    let health_done = Instant::now();
    assert_eq!(st, 200);
    let (sa, ta) = a.await.unwrap();
    let (sb, tb) = b.await.unwrap();
    assert_eq!((sa, sb), (400, 400));
    // Inline on the async workers, /health would have waited for a tokenization.
    assert!(
        health_done < ta && health_done < tb,
        "/health waited for the big prompts"
    );
    s.still_serves("big prompts").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shapes_that_are_not_objects_and_ids_outside_the_model_are_400() {
    let s = start(Setup {
        // The tokenizer knows 49,152 tokens; the model only the first 1,000.
        vocab: 1000,
        ..Default::default()
    })
    .await;
    for (path, body, param) in [
        (CHAT, json!({"messages": [["user", "hi"]]}), "messages[0]"),
        (
            CHAT,
            json!({"messages": [{"role": "user", "content": "hi"}], "stream_options": []}),
            "stream_options",
        ),
        (
            C,
            json!({"prompt": "hi", "stream": true, "stream_options": [true]}),
            "stream_options",
        ),
        ("/tokenize", json!({"messages": [["user", "hi"]]}), "messages[0]"),
        // Ordinary text: its ids are the tokenizer's, beyond this model's rows.
        (
            C,
            json!({"prompt": "The quick brown fox jumps over the lazy dog"}),
            "prompt",
        ),
        (
            CHAT,
            json!({"messages": [{"role": "user", "content": "The quick brown fox"}]}),
            "messages",
        ),
    ] {
        let (st, r) = s.post(path, body.clone()).await;
        assert_error(st, &r, 400, Some(param), &body.to_string());
    }
    // Token ids inside the model's vocabulary still work.
    let (st, r) = s
        .post(C, json!({"prompt": [5, 6, 7], "max_tokens": 2, "ignore_eos": true}))
        .await;
    assert_eq!(st, 200, "{r}");
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    let s = start(Setup {
        api_key: Some("k3y".into()),
        ..Default::default()
    })
    .await;
    for (auth, want) in [
        ("bearer k3y", 200),
        ("BEARER k3y", 200),
        ("Bearer k3y", 200),
        ("bearer k3", 401),
    ] {
        let r = s
            .client
            .get(format!("{}/v1/models", s.base))
            .header("authorization", auth)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{auth}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_oversized_body_is_413_before_it_is_sent() {
    let s = start(Setup {
        max_body_bytes: 4096,
        ..Default::default()
    })
    .await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    // Declares a gigabyte and sends none of it: the answer must not wait for the body.
    c.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
        .await
        .expect("answered before the body")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains("payload_too_large"), "{head}");
    s.still_serves("declared length").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_idle_connections_are_closed_and_the_cap_answers_503() {
    let s = start(Setup {
        limits: ConnectionLimits {
            max_connections: 6,
            header_read_timeout: Duration::from_secs(1),
            keep_alive_timeout: Duration::from_secs(2),
        },
        ..Default::default()
    })
    .await;
    // Half a header, then nothing: closed once the header deadline passes.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        c.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
            .await
            .unwrap();
        stalled.push(c);
    }
    // Two more fill the cap of 6; the 7th is answered 503 and closed.
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(TcpStream::connect(s.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = TcpStream::connect(s.addr).await.unwrap();
    let answer = read_until_closed(&mut over, Duration::from_secs(5))
        .await
        .expect("the connection over the cap is closed");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("Retry-After: 1"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    for (i, c) in stalled.iter_mut().enumerate() {
        let t0 = Instant::now();
        read_until_closed(c, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("stalled connection {i} still open"));
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
    // Connected but silent: closed after the idle deadline.
    for c in idle.iter_mut() {
        read_until_closed(c, Duration::from_secs(10))
            .await
            .expect("an idle connection is closed");
    }
    // A keep-alive connection that goes idle after a response is closed too.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let got = read_until_closed(&mut c, Duration::from_secs(10))
        .await
        .expect("closed after the keep-alive deadline");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    s.still_serves("connections").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_outlives_the_connection_deadlines() {
    let s = start(Setup {
        limits: ConnectionLimits {
            max_connections: 8,
            header_read_timeout: Duration::from_millis(500),
            keep_alive_timeout: Duration::from_millis(500),
        },
        ..Default::default()
    })
    .await;
    // The step stalls past both deadlines while the request waits for its answer.
    s.handle.inject_fault(Fault::StallStep(Duration::from_millis(1500)));
    let (st, r) = s
        .post(C, json!({"prompt": "Hello", "max_tokens": 3, "ignore_eos": true}))
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 3);
    s.still_serves("slow step").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_step_fails_its_requests_and_the_engine_goes_on() {
    let s = start(Setup::default()).await;
    s.handle.inject_fault(Fault::PanicInStep);
    let (st, r) = s
        .post(C, json!({"prompt": "Hello", "max_tokens": 4, "ignore_eos": true}))
        .await;
    assert_error(st, &r, 500, None, "the panicked step's request");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("injected fault"),
        "{r}"
    );
    s.still_serves("after a panic").await;
    // A streamed request in a panicking step ends with an error event, not a hang.
    s.handle.inject_fault(Fault::PanicInStep);
    let resp = s
        .client
        .post(format!("{}{C}", s.base))
        .json(&json!({"prompt": "Hello", "max_tokens": 4, "stream": true}))
        .send()
        .await
        .unwrap();
    let text = tokio::time::timeout(Duration::from_secs(20), resp.text())
        .await
        .expect("the stream ends")
        .unwrap();
    assert!(text.contains("error"), "{text}");
    s.still_serves("after a streamed panic").await;
    // An engine that is gone: /health says so, requests get 503.
    s.handle.shutdown();
    let (st, body) = s.get("/health").await;
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_error(st, &body, 503, None, "health of a dead engine");
    assert_eq!(body["error"]["code"], "engine_dead");
    let (st, r) = s.post(C, json!({"prompt": "Hello", "max_tokens": 2})).await;
    assert_error(st, &r, 503, None, "request to a dead engine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_status_is_current_during_a_long_step() {
    let s = start(Setup {
        max_num_seqs: 1,
        ..Default::default()
    })
    .await;
    s.handle.inject_fault(Fault::StallStep(Duration::from_secs(3)));
    let body = json!({"model": MODEL, "prompt": "Hello there", "max_tokens": 2, "ignore_eos": true});
    let first = tokio::spawn({
        let (c, url, b) = (s.client.clone(), format!("{}{C}", s.base), body.clone());
        async move { c.post(url).json(&b).send().await.unwrap().status().as_u16() }
    });
    // The first request's step has started and stalls; two more arrive meanwhile.
    let t0 = Instant::now();
    loop {
        let kv = s.get_json("/v1/kv").await;
        if kv["num_running"] == 1 {
            assert!(kv["blocks_used"].as_u64().unwrap() > 0, "{kv}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "the step never showed: {kv}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let more: Vec<_> = (0..2)
        .map(|_| {
            let (c, url, b) = (s.client.clone(), format!("{}{C}", s.base), body.clone());
            tokio::spawn(async move { c.post(url).json(&b).send().await.unwrap().status().as_u16() })
        })
        .collect();
    let t1 = Instant::now();
    loop {
        let kv = s.get_json("/v1/kv").await;
        if kv["num_waiting"] == 2 {
            assert_eq!(kv["num_running"], 1, "{kv}");
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(2),
            "arrivals not shown during the step: {kv}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(first.await.unwrap(), 200);
    for m in more {
        assert_eq!(m.await.unwrap(), 200);
    }
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_logprobs_of_a_long_prompt_are_scored_in_chunks_and_match_short_ones() {
    // Longer than one scoring chunk: split over steps, each position scored once.
    let s = start(Setup {
        max_model_len: 1024,
        kv_cache_bytes: 16 << 20,
        ..Default::default()
    })
    .await;
    let prompt = crate::common::Rng::new(11).tokens(600, VOCAB);
    let body = |p: &[u32]| json!({"prompt": [p], "echo": true, "logprobs": 1, "max_tokens": 0});
    let (st, long) = s.post(C, body(&prompt)).await;
    assert_eq!(st, 200, "{long}");
    let lps = long["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(lps.len(), 600);
    assert!(lps[0].is_null() && lps[1..].iter().all(Value::is_number));
    // A prefix's scores are the long prompt's first scores (causal attention).
    let (st, short) = s.post(C, body(&prompt[..300])).await;
    assert_eq!(st, 200, "{short}");
    let short = short["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .clone();
    for p in 1..300 {
        let (a, b) = (lps[p].as_f64().unwrap(), short[p].as_f64().unwrap());
        assert!((a - b).abs() < 1e-3, "position {p}: {a} vs {b}");
    }
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_the_server_does_not_honour_are_400_unless_neutral() {
    let s = start(Setup::default()).await;
    let msgs = json!([{"role": "user", "content": "Hi"}]);
    let refused = [
        (C, "suffix", json!("the end")),
        (C, "best_of", json!(3)),
        (C, "best_of", json!(0)),
        (
            CHAT,
            "tools",
            json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ),
        (CHAT, "tool_choice", json!("required")),
        (CHAT, "functions", json!([{"name": "f"}])),
    ];
    for (path, name, value) in refused {
        let mut body = if path == C {
            json!({"prompt": "Hi", "max_tokens": 2})
        } else {
            json!({"messages": msgs, "max_tokens": 2})
        };
        body[name] = value;
        let (st, r) = s.post(path, body).await;
        assert_error(st, &r, 400, Some(name), name);
    }
    // Their neutral values are what not sending them means: accepted.
    let (st, r) = s
        .post(
            C,
            json!({"prompt": "Hi", "max_tokens": 2, "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0,
                "repetition_penalty": 1, "suffix": "", "best_of": 1, "user": "u1"}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    // best_of equal to n is plain sampling.
    let (st, r) = s
        .post(
            C,
            json!({"prompt": "Hi", "max_tokens": 2, "n": 2, "best_of": 2, "suffix": null, "temperature": 0.5}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["choices"].as_array().unwrap().len(), 2);
    // best_of above n (more candidates than returned) is refused.
    let (st, r) = s
        .post(C, json!({"prompt": "Hi", "max_tokens": 2, "n": 2, "best_of": 3}))
        .await;
    assert_error(st, &r, 400, Some("best_of"), "best_of 3 with n 2");
    let (st, r) = s
        .post(
            CHAT,
            json!({"messages": msgs, "max_tokens": 2, "tools": [], "tool_choice": "none",
                "response_format": {"type": "text"}, "parallel_tool_calls": true}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    s.still_serves("not honoured").await;
}

/// A top-level field the server does not declare is refused, naming it, as OpenAI
/// refuses an unrecognized argument, unless it is metadata about the caller or a field
/// other servers define at the value that asks for what this server does anyway (what a
/// router such as sglang-router adds); a value asking for more is refused too. Fields
/// inside messages are left alone (clients echo an assistant message's own fields).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_fields_are_refused_unless_metadata_or_neutral() {
    let s = start(Setup::default()).await;
    let completion = |extra: Value| {
        let mut b = json!({"model": MODEL, "prompt": "hello", "max_tokens": 2, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let chat = |extra: Value| {
        let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "refusal": null}, {"role": "user", "content": "again"}],
            "max_tokens": 2, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (path, body) in [
        ("/v1/completions", completion(json!({"frobnicate": true}))),
        ("/v1/chat/completions", chat(json!({"frobnicate": 1}))),
    ] {
        let (st, r) = s.post(path, body).await;
        assert_error(st, &r, 400, Some("frobnicate"), "an unknown field");
    }
    // Metadata, and the neutral values sglang-router sends.
    let neutral = json!({"user": "u-1", "metadata": {"k": "v"}, "store": false, "no_stop_trim": false,
        "skip_special_tokens": true, "return_hidden_states": false, "service_tier": "auto"});
    let (st, r) = s.post("/v1/completions", completion(neutral.clone())).await;
    assert_eq!(st, 200, "{r}");
    let mut chat_neutral = neutral;
    for (k, v) in [
        ("continue_final_message", json!(false)),
        ("separate_reasoning", json!(true)),
        ("stream_reasoning", json!(true)),
    ] {
        chat_neutral[k] = v;
    }
    let (st, r) = s.post("/v1/chat/completions", chat(chat_neutral)).await;
    assert_eq!(st, 200, "{r}");
    // The same fields asking for something this server does not do.
    for (name, value) in [
        ("store", json!(true)),
        ("skip_special_tokens", json!(false)),
        ("no_stop_trim", json!(true)),
        ("service_tier", json!("priority")),
        ("return_hidden_states", json!(true)),
    ] {
        let (st, r) = s.post("/v1/completions", completion(json!({ name: value }))).await;
        assert_error(st, &r, 400, Some(name), "a non-neutral value");
    }
    let (st, r) = s
        .post("/v1/chat/completions", chat(json!({"continue_final_message": true})))
        .await;
    assert_error(st, &r, 400, Some("continue_final_message"), "a non-neutral value");
    // Inside `stream_options`: an unknown key, and vLLM's usage on every chunk, which is
    // not honoured, are refused; `continuous_usage_stats: false` asks for nothing.
    let streamed = |opts: Value| completion(json!({"stream": true, "stream_options": opts}));
    for (opts, param) in [
        (json!({"include_usage": true, "bogus": 1}), "stream_options.bogus"),
        (
            json!({"continuous_usage_stats": true}),
            "stream_options.continuous_usage_stats",
        ),
    ] {
        let (st, r) = s.post("/v1/completions", streamed(opts.clone())).await;
        assert_error(st, &r, 400, Some(param), "a stream option");
        let (st, r) = s
            .post(
                "/v1/chat/completions",
                chat(json!({"stream": true, "stream_options": opts})),
            )
            .await;
        assert_error(st, &r, 400, Some(param), "a chat stream option");
    }
    let events = s
        .stream(
            "/v1/completions",
            streamed(json!({"include_usage": true, "continuous_usage_stats": false})),
        )
        .await;
    assert!(
        events.iter().any(|e| e["usage"]["completion_tokens"] == 2),
        "{events:?}"
    );
}
