//! The sampling controls (`logit_bias`, the penalties, `min_p`) and the small OpenAI
//! gaps around them, through the real HTTP server with the tiny random llama of
//! `http.rs`: greedy outputs are deterministic, so a bias or a penalty must visibly
//! change them, and every out-of-range value is a 400 naming its field.

use crate::http::{assert_error, start, text_of, Server, Setup, MODEL, VOCAB};
use crosskv::engine::{EngineEvent, GenerateOptions, GenerateRequest};
use serde_json::{json, Value};
use std::collections::HashSet;

const C: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

/// Greedy ids for `prompt`, straight from the server's engine (the HTTP API returns text).
async fn engine_greedy(s: &Server, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let mut st = s
        .handle
        .submit(GenerateRequest {
            prompt_ids: prompt.to_vec(),
            options: GenerateOptions {
                max_tokens,
                ignore_eos: true,
                ..Default::default()
            },
        })
        .unwrap();
    let mut ids = Vec::new();
    loop {
        match st.next().await.expect("a request ends with Finished") {
            EngineEvent::Token { id, .. } => ids.push(id),
            EngineEvent::Finished { .. } => return ids,
            EngineEvent::Error(e) => panic!("{e}"),
            EngineEvent::PromptLogprobs(_) => {}
        }
    }
}

/// A greedy completion of `prompt` (token ids) with `extra` fields: its text and the
/// string of each generated token (from `logprobs: 0`).
async fn greedy(s: &Server, prompt: &[u32], max_tokens: usize, extra: Value) -> (String, Vec<String>) {
    let mut body = json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": true, "logprobs": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (st, r) = s.post(C, body).await;
    assert_eq!(st, 200, "{r}");
    let toks = r["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    (text_of(&r, 0), toks)
}

fn repeats(toks: &[String]) -> usize {
    toks.len() - toks.iter().collect::<HashSet<_>>().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_forces_and_bans_tokens() {
    let s = start(Setup::default()).await;
    let tok = s.handle.tokenizer().clone();
    let forced = tok.encode(" river", false).unwrap();
    assert_eq!(forced.len(), 1, "{forced:?}");
    let forced = forced[0];
    let want = tok.decode(&[forced; 6], false).unwrap();
    let bias = json!({ forced.to_string(): 100 });
    // +100 wins every pick, greedy or sampled, on both endpoints.
    for temperature in [0.0, 1.0] {
        let body = json!({"prompt": "Once upon a time", "max_tokens": 6, "temperature": temperature, "seed": 3,
            "ignore_eos": true, "logit_bias": bias});
        let (st, r) = s.post(C, body).await;
        assert_eq!(st, 200, "{r}");
        assert_eq!(text_of(&r, 0), want, "temperature {temperature}");
        let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
            "temperature": temperature, "seed": 3, "ignore_eos": true, "logit_bias": bias});
        let (st, r) = s.post(CHAT, body).await;
        assert_eq!(st, 200, "{r}");
        assert_eq!(
            r["choices"][0]["message"]["content"],
            want.as_str(),
            "chat, temperature {temperature}"
        );
    }
    // −100 bans the greedy pick: the output differs and never holds it.
    let prompt = tok.encode("The meaning of life is", true).unwrap();
    let base = engine_greedy(&s, &prompt, 8).await;
    let (text, _) = greedy(&s, &prompt, 8, json!({})).await;
    assert_eq!(text, tok.decode(&base, false).unwrap());
    let banned = base[0];
    let banned_str = tok.decode(&[banned], false).unwrap();
    let (text, toks) = greedy(&s, &prompt, 8, json!({"logit_bias": {banned.to_string(): -100}})).await;
    assert_ne!(text, tok.decode(&base, false).unwrap());
    assert!(!toks.contains(&banned_str), "{banned} ({banned_str:?}) in {toks:?}");
    // Logprobs stay the model's own: the forced token's reported log-prob is not ~0.
    let (st, r) = s
        .post(
            C,
            json!({"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1,
                "logit_bias": { forced.to_string(): 100 }}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(text_of(&r, 0), tok.decode(&[forced], false).unwrap());
    let lp = r["choices"][0]["logprobs"]["token_logprobs"][0].as_f64().unwrap();
    assert!(lp < -1.0, "raw log-prob expected, got {lp}");
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn penalties_break_a_repeating_greedy_continuation() {
    let s = start(Setup::default()).await;
    let tok = s.handle.tokenizer().clone();
    const N: usize = 32;
    // The tiny random model wanders rather than loops under greedy decoding, so the loop
    // is made: X, the greedy first pick, biased by the least B (to 1/4) that makes the
    // whole greedy continuation X. Then at some step after the first X falls behind by
    // more than B − 1/4, and any penalty of 1/4 or more on it breaks the loop there.
    let prompt = tok.encode("The meaning of life is", true).unwrap();
    let x = engine_greedy(&s, &prompt, 1).await[0];
    let xs = tok.decode(&[x], false).unwrap();
    let all_x = |toks: &[String]| toks.iter().all(|t| *t == xs);
    let biased = |b: f64, extra: Value| {
        let mut e = json!({"logit_bias": { x.to_string(): b }});
        for (k, v) in extra.as_object().unwrap() {
            e[k] = v.clone();
        }
        e
    };
    let (mut lo, mut hi) = (0.0f64, 64.0f64);
    let (_, toks) = greedy(&s, &prompt, N, biased(hi, json!({}))).await;
    assert!(all_x(&toks), "{toks:?}");
    while hi - lo > 0.25 {
        let mid = (lo + hi) / 2.0;
        let (_, toks) = greedy(&s, &prompt, N, biased(mid, json!({}))).await;
        if all_x(&toks) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let b = hi;
    let (_, base) = greedy(&s, &prompt, N, biased(b, json!({}))).await;
    assert!(all_x(&base) && repeats(&base) == N - 1, "{base:?}");
    for extra in [
        json!({"frequency_penalty": 2.0}),
        json!({"presence_penalty": 2.0}),
        json!({"presence_penalty": 0.5}),
        json!({"repetition_penalty": 2.0}),
        json!({"frequency_penalty": 1.0, "presence_penalty": 1.0, "repetition_penalty": 1.5}),
    ] {
        let (_, toks) = greedy(&s, &prompt, N, biased(b, extra.clone())).await;
        assert!(repeats(&toks) < N - 1, "{extra} with bias {b}: still a loop\n{toks:?}");
        assert_eq!(toks[0], xs, "{extra}: nothing to penalise before the first token");
    }
    // The frequency penalty grows with each repeat: X keeps losing ground.
    let (_, toks) = greedy(&s, &prompt, N, biased(b, json!({"frequency_penalty": 2.0}))).await;
    let count = toks.iter().filter(|t| **t == xs).count();
    assert!(count <= N / 2, "{count} × {xs:?} with bias {b}: {toks:?}");
    // A negative presence penalty rewards repeats: the loop holds at a lower bias.
    let (_, toks) = greedy(&s, &prompt, N, biased(b - 0.25, json!({"presence_penalty": -2.0}))).await;
    assert!(all_x(&toks), "{toks:?}");
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_p_and_seeds_are_honoured() {
    let s = start(Setup::default()).await;
    let body = |extra: Value| {
        let mut b = json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.5, "ignore_eos": true});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    // min_p 1 keeps only the most likely token: the greedy output at any temperature.
    let (st, greedy) = s.post(C, body(json!({"temperature": 0}))).await;
    assert_eq!(st, 200, "{greedy}");
    let (st, r) = s.post(C, body(json!({"min_p": 1.0, "seed": 5}))).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(text_of(&r, 0), text_of(&greedy, 0));
    // Negative (int64) seeds are accepted and reproducible, with every control on.
    let all = json!({"seed": -7, "min_p": 0.05, "top_p": 0.9, "presence_penalty": 0.5, "frequency_penalty": 0.3,
        "repetition_penalty": 1.2, "logit_bias": {"42": 3.5, "7": -2}});
    let (st, a) = s.post(C, body(all.clone())).await;
    assert_eq!(st, 200, "{a}");
    let (st, b) = s.post(C, body(all)).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(text_of(&a, 0), text_of(&b, 0));
    // Temperature 2 is the top of OpenAI's range, accepted.
    let (st, r) = s.post(C, body(json!({"temperature": 2}))).await;
    assert_eq!(st, 200, "{r}");
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_sampling_fields_are_400_naming_them() {
    let s = start(Setup::default()).await;
    let many: serde_json::Map<String, Value> = (0..1025).map(|i| (i.to_string(), json!(1))).collect();
    let cases: Vec<(&str, Value)> = vec![
        ("logit_bias", json!({"abc": 1})),
        ("logit_bias", json!({"1.5": 1})),
        ("logit_bias", json!({"-1": 1})),
        ("logit_bias", json!({ VOCAB.to_string(): 1 })),
        ("logit_bias", json!({"5": 100.5})),
        ("logit_bias", json!({"5": -101})),
        ("logit_bias", json!({"5": "high"})),
        ("logit_bias", json!({"5": null})),
        ("logit_bias", json!([1, 2])),
        ("logit_bias", json!("x")),
        ("logit_bias", Value::Object(many)),
        ("presence_penalty", json!(2.5)),
        ("presence_penalty", json!(-3)),
        ("presence_penalty", json!("1")),
        ("frequency_penalty", json!(-2.01)),
        ("frequency_penalty", json!(true)),
        ("repetition_penalty", json!(0)),
        ("repetition_penalty", json!(-1)),
        ("repetition_penalty", json!(1e300)),
        ("repetition_penalty", json!([1])),
        ("min_p", json!(-0.1)),
        ("min_p", json!(1.5)),
        ("min_p", json!({})),
        ("temperature", json!(2.5)),
        ("temperature", json!(-0.1)),
        ("seed", json!(1.5)),
        ("seed", json!(u64::MAX)),
    ];
    for path in [C, CHAT] {
        for (name, value) in &cases {
            let mut body = if path == C {
                json!({"prompt": "Hi", "max_tokens": 2})
            } else {
                json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
            };
            body[*name] = value.clone();
            let (st, r) = s.post(path, body.clone()).await;
            assert_error(st, &r, 400, Some(name), &format!("{path} {body}"));
        }
        // Every key that is no token id is named in the one error.
        let body = json!({"prompt": "Hi", "max_tokens": 2, "logit_bias": {"bad1": 50, "7": 1, "bad2": 20}});
        let (st, r) = s.post(C, body).await;
        assert_error(st, &r, 400, Some("logit_bias"), "two bad keys");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(msg.contains("`bad1`") && msg.contains("`bad2`"), "{msg}");
        // stream_options needs stream: true (OpenAI's check and message).
        for stream in [json!(false), Value::Null] {
            let mut body = if path == C {
                json!({"prompt": "Hi", "max_tokens": 2})
            } else {
                json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
            };
            body["stream_options"] = json!({"include_usage": true});
            if !stream.is_null() {
                body["stream"] = stream;
            }
            let (st, r) = s.post(path, body.clone()).await;
            assert_error(st, &r, 400, Some("stream_options"), &format!("{path} {body}"));
            assert!(
                r["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("The 'stream_options' parameter is only allowed when 'stream' is enabled."),
                "{r}"
            );
        }
    }
    // The bounds themselves are accepted.
    let (st, r) = s
        .post(
            C,
            json!({"prompt": "Hi", "max_tokens": 2, "presence_penalty": -2, "frequency_penalty": 2,
                "repetition_penalty": 0.01, "min_p": 1, "logit_bias": {"0": -100, " 17": 100}, "temperature": 0}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reports_cached_prompt_tokens() {
    let s = start(Setup::default()).await;
    let prompt: Vec<u32> = (0..100u32).map(|i| 1000 + i * 37).collect();
    let cached = |r: &Value| r["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    let body = json!({"prompt": prompt, "max_tokens": 2, "ignore_eos": true});
    let (st, first) = s.post(C, body.clone()).await;
    assert_eq!(st, 200, "{first}");
    assert_eq!(cached(&first), 0, "{first}");
    let (st, again) = s.post(C, body.clone()).await;
    assert_eq!(st, 200, "{again}");
    // Whole 16-token blocks of the prompt come from the cache.
    let hit = cached(&again);
    assert!((80..100).contains(&hit) && hit % 16 == 0, "{again}");
    let mut sb = body;
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let chunks = s.stream(C, sb).await;
    assert_eq!(cached(chunks.last().unwrap()), hit);
    // Chat, whole and streamed.
    let long = "word ".repeat(120);
    let chat = json!({"messages": [{"role": "user", "content": long}], "max_tokens": 2, "ignore_eos": true});
    let (st, first) = s.post(CHAT, chat.clone()).await;
    assert_eq!(st, 200, "{first}");
    assert_eq!(cached(&first), 0, "{first}");
    let (st, again) = s.post(CHAT, chat.clone()).await;
    assert_eq!(st, 200, "{again}");
    assert!(cached(&again) >= 96, "{again}");
    let mut sc = chat;
    sc["stream"] = json!(true);
    sc["stream_options"] = json!({"include_usage": true});
    let chunks = s.stream(CHAT, sc).await;
    assert_eq!(cached(chunks.last().unwrap()), cached(&again));
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_returns_token_strings_when_asked() {
    let s = start(Setup::default()).await;
    let (st, plain) = s.post("/tokenize", json!({"prompt": "Hello world"})).await;
    assert_eq!(st, 200, "{plain}");
    assert_eq!(plain.get("token_strs"), Some(&serde_json::Value::Null), "{plain}");
    let (st, r) = s
        .post("/tokenize", json!({"prompt": "Hello world", "return_token_strs": true}))
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["tokens"], plain["tokens"]);
    let strs = r["token_strs"].as_array().unwrap();
    assert_eq!(strs.len(), r["count"].as_u64().unwrap() as usize);
    let tok = s.handle.tokenizer();
    for (id, st) in r["tokens"].as_array().unwrap().iter().zip(strs) {
        let id = id.as_u64().unwrap() as u32;
        assert_eq!(st.as_str(), tok.inner().id_to_token(id).as_deref());
    }
}
