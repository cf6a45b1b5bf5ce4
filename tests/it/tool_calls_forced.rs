//! Forced tool calls (`tool_choice: "required"` or a named function): the output is held
//! to a JSON schema, so even the tiny random llama answers with well-formed calls whose
//! arguments follow each tool's `parameters`: the engine masks every pick with the
//! schema's grammar (`GenerateOptions::constraint`), as it does for structured outputs.

use crate::http::{Server, MODEL};
use crate::tool_calls::{start_hermes, weather_tools};
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";

/// Whether `v` follows `schema` in the parts the weather tools use (`type`,
/// `properties`, `required`, `enum`, `maxLength`).
fn follows(v: &Value, schema: &Value) -> bool {
    let type_ok = match schema["type"].as_str() {
        Some("object") => v.is_object(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("array") => v.is_array(),
        _ => true,
    };
    let enum_ok = schema["enum"].as_array().is_none_or(|e| e.contains(v));
    let length_ok = schema["maxLength"]
        .as_u64()
        .is_none_or(|n| v.as_str().is_none_or(|s| s.chars().count() as u64 <= n));
    let required_ok = schema["required"]
        .as_array()
        .is_none_or(|r| r.iter().all(|k| v.get(k.as_str().unwrap()).is_some()));
    let props_ok = schema["properties"]
        .as_object()
        .is_none_or(|props| props.iter().all(|(k, s)| v.get(k).is_none_or(|x| follows(x, s))));
    type_ok && enum_ok && length_ok && required_ok && props_ok
}

fn parameters_of(name: &str) -> Value {
    weather_tools()
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["function"]["name"] == name)
        .map(|t| t["function"]["parameters"].clone())
        .unwrap_or_else(|| panic!("no tool {name}"))
}

fn body(tool_choice: Value, extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": weather_tools(), "tool_choice": tool_choice, "max_tokens": 256, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// Checks one returned call: a fresh id, a known function, arguments following its schema.
fn check_call(call: &Value, want_name: Option<&str>) {
    assert_eq!(call["type"], "function", "{call}");
    assert!(call["id"].as_str().is_some_and(|id| id.starts_with("call_")), "{call}");
    let name = call["function"]["name"].as_str().unwrap();
    if let Some(w) = want_name {
        assert_eq!(name, w);
    }
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(
        follows(&args, &parameters_of(name)),
        "{args} does not follow {name}'s schema"
    );
}

/// The calls of a streamed answer, put together from their deltas, and its finish reason.
async fn streamed_calls(s: &Server, b: Value) -> (Vec<Value>, String) {
    let mut calls: Vec<Value> = Vec::new();
    let mut finish = String::new();
    for e in s.stream(CHAT, b).await {
        let c = &e["choices"][0];
        for d in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = d["index"].as_u64().unwrap() as usize;
            if d.get("id").is_some() {
                assert_eq!(i, calls.len());
                assert_eq!(d["function"]["arguments"], "");
                calls.push(json!({"id": d["id"], "type": d["type"], "function": {"name": d["function"]["name"], "arguments": ""}}));
            } else {
                let a = calls[i]["function"]["arguments"].as_str().unwrap().to_string();
                calls[i]["function"]["arguments"] = json!(a + d["function"]["arguments"].as_str().unwrap());
            }
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (calls, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_function_is_called_with_arguments_following_its_schema() {
    let s = start_hermes().await;
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let (st, r) = s.post(CHAT, body(named.clone(), json!({}))).await;
    assert_eq!(st, 200, "{r}");
    let m = &r["choices"][0]["message"];
    let calls = m["tool_calls"].as_array().unwrap_or_else(|| panic!("a tool call: {r}"));
    assert_eq!(calls.len(), 1, "{r}");
    check_call(&calls[0], Some("get_weather"));
    assert!(m["content"].is_null(), "{r}");
    // As OpenAI answers a named call.
    assert_eq!(r["choices"][0]["finish_reason"], "stop");

    let (calls, finish) = streamed_calls(&s, body(named, json!({"stream": true}))).await;
    assert_eq!(calls.len(), 1);
    check_call(&calls[0], Some("get_weather"));
    assert_eq!(finish, "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_call_cut_off_by_max_tokens_is_no_content() {
    let s = start_hermes().await;
    // A named call cut off: the call, its arguments as far as they got (as streamed).
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let (st, r) = s.post(CHAT, body(named, json!({"max_tokens": 3}))).await;
    assert_eq!(st, 200, "{r}");
    let c = &r["choices"][0];
    assert_eq!(c["finish_reason"], "length", "{r}");
    assert!(c["message"]["content"].is_null(), "{r}");
    let args = c["message"]["tool_calls"][0]["function"]["arguments"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"));
    assert!(args.trim_start().starts_with('{'), "{r}");
    assert!(
        serde_json::from_str::<Value>(args).is_err(),
        "three tokens close no arguments: {r}"
    );
    assert_eq!(c["message"]["tool_calls"][0]["function"]["name"], "get_weather");
    // `required` cut off: neither calls nor content.
    for stream in [false, true] {
        let b = body(json!("required"), json!({"max_tokens": 1, "stream": stream}));
        if stream {
            let (calls, finish) = streamed_calls(&s, b).await;
            assert!(calls.is_empty(), "{calls:?}");
            assert_eq!(finish, "length");
        } else {
            let (st, r) = s.post(CHAT, b).await;
            assert_eq!(st, 200, "{r}");
            let c = &r["choices"][0];
            assert_eq!(c["finish_reason"], "length", "{r}");
            assert!(
                c["message"]["content"].is_null() && c["message"]["tool_calls"].is_null(),
                "{r}"
            );
        }
    }
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_format_with_a_forced_call_answers_the_call() {
    // `response_format` shapes the content; a forced call's answer is the call.
    let s = start_hermes().await;
    let b = body(
        json!("required"),
        json!({"parallel_tool_calls": false, "response_format": {"type": "json_object"}}),
    );
    let (st, r) = s.post(CHAT, b).await;
    assert_eq!(st, 200, "{r}");
    let calls = r["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"));
    check_call(&calls[0], None);
    assert_eq!(r["choices"][0]["finish_reason"], "tool_calls");
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_calls_a_tool_with_valid_arguments() {
    // One call (`parallel_tool_calls: false`: the array holds one item), so the random
    // model's output is bounded by the schema.
    let s = start_hermes().await;
    let one = json!({"parallel_tool_calls": false});
    let (st, r) = s.post(CHAT, body(json!("required"), one)).await;
    assert_eq!(st, 200, "{r}");
    let calls = r["choices"][0]["message"]["tool_calls"]
        .as_array()
        .expect("a tool call");
    assert_eq!(calls.len(), 1, "{r}");
    check_call(&calls[0], None);
    assert!(r["choices"][0]["message"]["content"].is_null(), "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "tool_calls");

    let streamed = json!({"parallel_tool_calls": false, "stream": true});
    let (calls, finish) = streamed_calls(&s, body(json!("required"), streamed)).await;
    assert_eq!(calls.len(), 1);
    check_call(&calls[0], None);
    assert_eq!(finish, "tool_calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_resolves_each_tools_own_definitions() {
    // `$ref`s into a tool's `$defs` resolve inside the combined `required` schema.
    let s = start_hermes().await;
    let tools = json!([
        {"type": "function", "function": {"name": "paint", "parameters": {"type": "object",
            "properties": {"color": {"$ref": "#/$defs/color"}}, "required": ["color"],
            "$defs": {"color": {"type": "string", "enum": ["red", "blue"]}}}}},
        {"type": "function", "function": {"name": "get_time"}}
    ]);
    let b = json!({"model": MODEL, "messages": [{"role": "user", "content": "Paint it"}], "tools": tools,
        "tool_choice": "required", "parallel_tool_calls": false, "max_tokens": 64, "temperature": 0});
    let (st, r) = s.post(CHAT, b).await;
    assert_eq!(st, 200, "{r}");
    let calls = r["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("a tool call: {r}"));
    assert_eq!(calls.len(), 1, "{r}");
    let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    match calls[0]["function"]["name"].as_str().unwrap() {
        "paint" => assert!(
            args == json!({"color": "red"}) || args == json!({"color": "blue"}),
            "{args}"
        ),
        "get_time" => assert_eq!(args, json!({})),
        other => panic!("{other}"),
    }
}
