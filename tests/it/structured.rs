//! Structured outputs through the real HTTP server with the tiny random llama of
//! `http.rs`: its output is junk, so only the constraint can make it valid JSON, a
//! regex match or one of the choices. Each is checked on both endpoints, streamed and
//! not, greedy and sampled; every invalid constraint is a 400 naming its field.

use crate::http::{assert_error, start, Server, Setup, MODEL};
use crosskv::engine::{Constraint, EngineError, EngineEvent, FinishReason, GenerateOptions, GenerateRequest};
use serde_json::{json, Value};

const C: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

/// Nested objects, arrays, enums and bounded numbers; every string and array bounded
/// so that the grammar completes well within `max_tokens`.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 6},
                    "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}
                },
                "required": ["city", "zip"],
                "additionalProperties": false
            },
            "kind": {"enum": ["x", "y", 3]},
            "ok": {"type": "boolean"}
        },
        "required": ["name", "age", "score", "tags", "address", "kind", "ok"],
        "additionalProperties": false
    })
}

/// `v` is valid against [`person_schema`], checked by hand.
fn assert_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    let o = v.as_object().unwrap_or_else(|| panic!("not an object: {text}"));
    let keys: std::collections::BTreeSet<&str> = o.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["address", "age", "kind", "name", "ok", "score", "tags"].into(),
        "{text}"
    );
    let name = o["name"].as_str().unwrap();
    assert!((1..=8).contains(&name.chars().count()), "{text}");
    let age = o["age"]
        .as_i64()
        .unwrap_or_else(|| panic!("age not an integer: {text}"));
    assert!((0..=120).contains(&age), "{text}");
    let score = o["score"].as_f64().unwrap();
    assert!((-1.5..=2.5).contains(&score), "{text}");
    let tags = o["tags"].as_array().unwrap();
    assert!(tags.len() <= 3, "{text}");
    assert!(
        tags.iter().all(|t| ["a", "b", "c"].contains(&t.as_str().unwrap_or(""))),
        "{text}"
    );
    let addr = o["address"].as_object().unwrap();
    assert_eq!(addr.len(), 2, "{text}");
    assert!(addr["city"].as_str().unwrap().chars().count() <= 6, "{text}");
    assert!((10000..=99999).contains(&addr["zip"].as_i64().unwrap()), "{text}");
    assert!([json!("x"), json!("y"), json!(3)].contains(&o["kind"]), "{text}");
    assert!(o["ok"].is_boolean(), "{text}");
}

/// The output text and finish reason of one request, streamed or not, on either endpoint.
async fn generate(s: &Server, chat: bool, stream: bool, extra: Value) -> (String, String) {
    let mut body = if chat {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Describe someone."}], "max_tokens": 160})
    } else {
        json!({"model": MODEL, "prompt": "Describe someone:", "max_tokens": 160})
    };
    body["temperature"] = json!(0);
    body["stream"] = json!(stream);
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (path, part) = if chat { (CHAT, "/delta/content") } else { (C, "/text") };
    if stream {
        let events = s.stream(path, body).await;
        let mut text = String::new();
        let mut finish = String::new();
        for e in &events {
            for c in e["choices"].as_array().unwrap() {
                text += c.pointer(part).and_then(Value::as_str).unwrap_or("");
                if let Some(f) = c["finish_reason"].as_str() {
                    finish = f.to_string();
                }
            }
        }
        (text, finish)
    } else {
        let (st, r) = s.post(path, body).await;
        assert_eq!(st, 200, "{r}");
        let c = &r["choices"][0];
        let part = if chat { "/message/content" } else { "/text" };
        (
            c.pointer(part).and_then(Value::as_str).unwrap().to_string(),
            c["finish_reason"].as_str().unwrap().to_string(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_output_is_valid_on_both_endpoints_streamed_and_not() {
    let s = start(Setup::default()).await;
    let schema = person_schema();
    let forms = [
        json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": true}}}),
        json!({"structured_outputs": {"json": schema}}),
        json!({"guided_json": schema.to_string()}),
    ];
    for chat in [false, true] {
        for stream in [false, true] {
            for form in &forms {
                let (text, finish) = generate(&s, chat, stream, form.clone()).await;
                assert_eq!(finish, "stop", "chat {chat} stream {stream} {form}: {text}");
                assert_person(&text);
            }
        }
    }
    // Sampled picks are masked too.
    for seed in 0..4 {
        let extra = json!({"temperature": 1.0, "seed": seed, "structured_outputs": {"json": schema}});
        let (text, finish) = generate(&s, true, false, extra).await;
        assert_eq!(finish, "stop", "seed {seed}: {text}");
        assert_person(&text);
    }
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_object_regex_choice_and_grammar_outputs_follow_their_constraint() {
    let s = start(Setup::default()).await;
    let rx = r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)";
    let full = regex::Regex::new(&format!("^(?:{rx})$")).unwrap();
    let choices = ["red", "green", "blue sky"];
    let grammar = "start: (\"yes\" | \"no\") \" \" NUM\nNUM: /[0-9]{1,3}/";
    let grammar_rx = regex::Regex::new("^(yes|no) [0-9]{1,3}$").unwrap();
    for chat in [false, true] {
        for stream in [false, true] {
            let what = format!("chat {chat} stream {stream}");
            let (text, finish) = generate(&s, chat, stream, json!({"response_format": {"type": "json_object"}})).await;
            if finish == "stop" {
                let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}: {text:?}"));
                assert!(v.is_object(), "{what}: {text}");
            } else {
                // Any object may be longer than max_tokens: still an object's prefix.
                assert_eq!(finish, "length", "{what}");
                assert!(text.starts_with('{'), "{what}: {text}");
            }
            for extra in [
                json!({"guided_regex": rx}),
                json!({"structured_outputs": {"regex": rx}}),
            ] {
                let (text, finish) = generate(&s, chat, stream, extra).await;
                assert_eq!(finish, "stop", "{what}: {text}");
                assert!(full.is_match(&text), "{what}: {text:?} does not match {rx}");
            }
            for extra in [
                json!({"guided_choice": choices}),
                json!({"structured_outputs": {"choice": choices}}),
            ] {
                let (text, finish) = generate(&s, chat, stream, extra).await;
                assert_eq!(finish, "stop", "{what}: {text}");
                assert!(choices.contains(&text.as_str()), "{what}: {text:?}");
            }
            for extra in [
                json!({"guided_grammar": grammar}),
                json!({"structured_outputs": {"grammar": grammar}}),
            ] {
                let (text, finish) = generate(&s, chat, stream, extra).await;
                assert_eq!(finish, "stop", "{what}: {text}");
                assert!(grammar_rx.is_match(&text), "{what}: {text:?}");
            }
        }
    }
    // `{"type": "text"}` and nulls are no constraint: the output is the unconstrained one.
    let (plain, _) = generate(&s, false, false, json!({"max_tokens": 12, "ignore_eos": true})).await;
    let (text, _) = generate(
        &s,
        false,
        false,
        json!({"max_tokens": 12, "ignore_eos": true, "response_format": {"type": "text"}, "guided_json": null}),
    )
    .await;
    assert_eq!(text, plain);
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconstrained_requests_batched_with_constrained_ones_are_unchanged() {
    let s = start(Setup::default()).await;
    let prompts = ["Once upon a time", "The river", "In the beginning", "A cat sat"];
    let plain = |p: &str| json!({"model": MODEL, "prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": true});
    let mut alone = Vec::new();
    for p in prompts {
        let (st, r) = s.post(C, plain(p)).await;
        assert_eq!(st, 200, "{r}");
        alone.push(r["choices"][0]["text"].clone());
    }
    let schema = person_schema();
    let mixed = prompts.iter().enumerate().map(|(i, p)| {
        let s = &s;
        let body = plain(p);
        let constrained = json!({"model": MODEL, "prompt": p, "max_tokens": 160, "temperature": 0,
            "structured_outputs": {"json": schema}, "n": 1 + i % 2});
        async move {
            let (a, b) = tokio::join!(s.post(C, body), s.post(C, constrained));
            assert_eq!(a.0, 200, "{}", a.1);
            assert_eq!(b.0, 200, "{}", b.1);
            for c in b.1["choices"].as_array().unwrap() {
                assert_person(c["text"].as_str().unwrap());
            }
            a.1["choices"][0]["text"].clone()
        }
    });
    let together = futures_util::future::join_all(mixed).await;
    assert_eq!(together, alone);
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_constraint_is_a_400_naming_its_field() {
    let s = start(Setup::default()).await;
    let cases = [
        (json!({"response_format": {"type": "yaml"}}), "response_format"),
        (json!({"response_format": {"type": "json_schema"}}), "response_format"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}),
            "response_format",
        ),
        (
            json!({"structured_outputs": {"json": "{not json"}}),
            "structured_outputs",
        ),
        (
            json!({"structured_outputs": {"regex": "a", "choice": ["a"]}}),
            "structured_outputs",
        ),
        (json!({"structured_outputs": {}}), "structured_outputs"),
        (
            json!({"structured_outputs": {"structural_tag": "x"}}),
            "structured_outputs",
        ),
        (
            json!({"structured_outputs": {"regex": "(unclosed"}}),
            "structured_outputs",
        ),
        (
            json!({"guided_json": {"type": "object", "properties": 3}}),
            "guided_json",
        ),
        (json!({"guided_json": 7}), "guided_json"),
        (json!({"guided_regex": "[z-a]"}), "guided_regex"),
        (json!({"guided_choice": []}), "guided_choice"),
        (json!({"guided_choice": ["a", 1]}), "guided_choice"),
        (json!({"guided_grammar": "start: undefined_rule"}), "guided_grammar"),
        (json!({"guided_grammar": "start: ("}), "guided_grammar"),
        (
            json!({"response_format": {"type": "json_object"}, "guided_regex": "a+"}),
            "guided_regex",
        ),
        (
            json!({"guided_json": {"type": "object"}, "guided_choice": ["a"]}),
            "guided_choice",
        ),
    ];
    for chat in [false, true] {
        for (extra, param) in &cases {
            let mut body = if chat {
                json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
            } else {
                json!({"prompt": "Hi", "max_tokens": 8})
            };
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let (st, r) = s.post(if chat { CHAT } else { C }, body).await;
            assert_error(st, &r, 400, Some(param), &format!("chat {chat}: {extra}"));
        }
    }
    // llguidance's own message reaches the client.
    let (_, r) = s
        .post(C, json!({"prompt": "Hi", "guided_grammar": "start: undefined_rule"}))
        .await;
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("undefined_rule"), "{msg}");
    assert!(s.handle.is_alive());
    s.wait_idle().await;
}

/// The engine's own interface, as a forced tool call uses it: a constraint set on the
/// options, no HTTP fields involved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_constraint_set_on_the_options_is_enforced_by_the_engine() {
    let s = start(Setup::default()).await;
    let prompt = s.handle.tokenizer().encode("Call the tool:", false).unwrap();
    let submit = |constraint: Constraint, ignore_eos: bool| {
        s.handle.submit(GenerateRequest {
            prompt_ids: prompt.clone(),
            options: GenerateOptions {
                max_tokens: 160,
                ignore_eos,
                constraint: Some(constraint),
                ..Default::default()
            },
        })
    };
    // ignore_eos does not carry a constrained request past its grammar's end.
    for ignore_eos in [false, true] {
        let mut st = submit(Constraint::JsonSchema(person_schema()), ignore_eos).unwrap();
        let mut text = String::new();
        let reason = loop {
            match st.next().await.expect("a request ends with Finished") {
                EngineEvent::Token { text: t, .. } => text += &t,
                EngineEvent::Finished { reason, .. } => break reason,
                EngineEvent::Error(e) => panic!("{e}"),
                EngineEvent::PromptLogprobs(_) => {}
            }
        };
        assert_eq!(reason, FinishReason::Stop, "{text}");
        assert_person(&text);
    }
    match submit(Constraint::Regex("(".into()), false) {
        Err(EngineError::Constraint(m)) => assert!(!m.is_empty()),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("an invalid regex was accepted"),
    }
    s.wait_idle().await;
}

/// The host time structured outputs add to a step: 64 requests decoding together, half
/// of them held to a JSON schema, against the same 64 unconstrained. The unconstrained
/// requests outlive the constrained ones, so every step that computes masks is a batch
/// of 64 with 32 masks; the masks phase (the engine's own counter) is divided by those
/// steps (the longest constrained output). Prints its figures:
/// `cargo test --release --test it structured_mask_cost -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints figures, asserts none"]
async fn structured_mask_cost_at_batch_64() {
    let s = start(Setup {
        kv_cache_bytes: 64 << 20,
        max_model_len: 512,
        ..Setup::default()
    })
    .await;
    let phase = |p: &'static str| format!("crosskv_engine_step_phase_seconds_total{{phase=\"{p}\"}}");
    let schema = person_schema();
    // Twice each, alternating: the shared machine's load moves between runs.
    for constrained in [0usize, 32, 0, 32] {
        let steps0 = s.metric("crosskv_engine_steps_total").await;
        let masks0 = s.metric(&phase("masks")).await;
        let step_sum0 = s.metric("crosskv_engine_step_duration_seconds_sum").await;
        let reqs = (0..64).map(|i| {
            let mut body = json!({"model": MODEL, "prompt": format!("Request {i}:"), "max_tokens": 200,
                "temperature": 0, "ignore_eos": true});
            if i < constrained {
                body["ignore_eos"] = json!(false);
                body["structured_outputs"] = json!({"json": schema});
            }
            let s = &s;
            async move {
                let (st, r) = s.post(C, body).await;
                assert_eq!(st, 200, "{r}");
                (i < constrained).then(|| r["usage"]["completion_tokens"].as_u64().unwrap())
            }
        });
        let lens: Vec<u64> = futures_util::future::join_all(reqs)
            .await
            .into_iter()
            .flatten()
            .collect();
        let steps = s.metric("crosskv_engine_steps_total").await - steps0;
        let masks = s.metric(&phase("masks")).await - masks0;
        let step_sum = s.metric("crosskv_engine_step_duration_seconds_sum").await - step_sum0;
        let masked_steps = lens.iter().max().copied().unwrap_or(0);
        print!(
            "batch 64, {constrained} constrained: {steps} steps, {:.2} ms/step",
            1e3 * step_sum / steps
        );
        if masked_steps > 0 {
            print!(
                "; masks {:.1} ms in all, {:.2} ms a step over the {masked_steps} steps with 32 masks",
                1e3 * masks,
                1e3 * masks / masked_steps as f64
            );
        }
        println!();
        s.wait_idle().await;
    }
}
