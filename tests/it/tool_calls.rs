//! Tool calling through the real HTTP and gRPC servers, with the tiny random llama and a
//! Hermes-style fixture chat template: the tools and a history of calls and results
//! reach the prompt, `auto` answers that hold no call are plain text (streamed or not),
//! and every malformed tool field is a 400 naming it. The parsers of each model format
//! are tested on text in `api::tool_calls`; forced calls in `tool_calls_forced`.

use crate::http::{assert_error, start, Server, Setup, MODEL};
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";

/// A chat template in the Hermes / Qwen style: the tools in a system turn, calls as
/// `<tool_call>` blocks, results as `<tool_response>` blocks.
pub(crate) const HERMES_TEMPLATE: &str = r#"{%- if tools %}<|im_start|>system
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Return each call as <tool_call>{"name": <name>, "arguments": <args>}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls is defined %}<|im_start|>assistant
{{ message.content }}{% for tc in message.tool_calls %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response id="{{ message.tool_call_id }}">
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;

pub(crate) fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"type": "string", "enum": ["C", "F"]}},
                "required": ["city"]
            }
        }},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    ])
}

pub(crate) async fn start_hermes() -> Server {
    start(Setup {
        chat_template: Some(HERMES_TEMPLATE.into()),
        max_model_len: 1024,
        ..Default::default()
    })
    .await
}

fn history() -> Value {
    json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"C\"}"}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}
    ])
}

/// The prompt text the server renders for `body` (`/tokenize`, then `/detokenize`).
pub(crate) async fn rendered(s: &Server, body: Value) -> (String, usize) {
    let (st, t) = s.post("/tokenize", body).await;
    assert_eq!(st, 200, "{t}");
    let (st, d) = s.post("/detokenize", json!({"tokens": t["tokens"]})).await;
    assert_eq!(st, 200, "{d}");
    (
        d["prompt"].as_str().unwrap().to_string(),
        t["count"].as_u64().unwrap() as usize,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_and_a_history_of_calls_reach_the_chat_template() {
    let s = start_hermes().await;
    let (text, count) = rendered(&s, json!({"messages": history(), "tools": weather_tools()})).await;
    // Each tool as transformers' `tojson` writes it: keys in the order sent, ", " / ": ".
    assert!(
        text.contains(r#"{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"type": "string", "enum": ["C", "F"]}}, "required": ["city"]}}}"#),
        "{text}"
    );
    assert!(text.contains(r#""name": "get_time""#), "{text}");
    // The call's arguments (a JSON string on the wire) reach the template as an object.
    assert!(
        text.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"C\"}}\n</tool_call>"),
        "{text}"
    );
    assert!(
        text.contains("<tool_response id=\"call_1\">\n18 degrees, sunny\n</tool_response>"),
        "{text}"
    );
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");

    // A chat request renders the same prompt: its usage counts it.
    let body =
        json!({"model": MODEL, "messages": history(), "tools": weather_tools(), "max_tokens": 2, "temperature": 0});
    let (st, r) = s.post(CHAT, body).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["usage"]["prompt_tokens"], count, "{r}");
    let (without, _) = rendered(&s, json!({"messages": history()})).await;
    assert!(
        !without.contains("get_time") && !without.contains("<tools>"),
        "{without}"
    );
    let (st, r) = s
        .post(CHAT, json!({"messages": history(), "max_tokens": 2, "temperature": 0}))
        .await;
    assert_eq!(st, 200, "{r}");
    assert!(r["usage"]["prompt_tokens"].as_u64().unwrap() < count as u64, "{r}");
}

/// A greedy chat answer to one question with the weather tools and `extra` fields.
fn ask(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": weather_tools(), "max_tokens": 12, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_answers_without_a_call_are_text_streamed_or_not() {
    let s = start_hermes().await;
    // "none" renders the same prompt and reads nothing: the reference text.
    let (st, none) = s.post(CHAT, ask(json!({"tool_choice": "none"}))).await;
    assert_eq!(st, 200, "{none}");
    let want = none["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!want.is_empty());
    assert!(!want.contains("<tool_call>"), "the random model wrote a call: {want}");
    for choice in [json!(null), json!("auto")] {
        let (st, r) = s.post(CHAT, ask(json!({"tool_choice": choice}))).await;
        assert_eq!(st, 200, "{r}");
        let m = &r["choices"][0]["message"];
        assert_eq!(m["content"], want.as_str(), "{r}");
        assert!(m.get("tool_calls").is_none(), "{r}");
        assert_eq!(r["choices"][0]["finish_reason"], none["choices"][0]["finish_reason"]);
        assert_eq!(r["usage"]["prompt_tokens"], none["usage"]["prompt_tokens"]);
    }
    let events = s
        .stream(CHAT, ask(json!({"stream": true, "parallel_tool_calls": false})))
        .await;
    let mut content = String::new();
    let mut finish = Vec::new();
    for e in &events {
        let c = &e["choices"][0];
        assert!(c["delta"].get("tool_calls").is_none(), "{e}");
        content.push_str(c["delta"]["content"].as_str().unwrap_or(""));
        if !c["finish_reason"].is_null() {
            finish.push(c["finish_reason"].clone());
        }
    }
    assert_eq!(content, want);
    assert_eq!(finish, vec![none["choices"][0]["finish_reason"].clone()]);
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_calls_answer_well_formed_streamed_or_not() {
    // Whatever the model writes, a forced call's reply is well formed: the call, or,
    // for a `required` list cut off by `max_tokens`, neither calls nor content.
    let s = start_hermes().await;
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    for choice in [named, json!("required")] {
        for stream in [false, true] {
            let body = ask(json!({"tool_choice": choice, "stream": stream}));
            if stream {
                let events = s.stream(CHAT, body).await;
                assert!(
                    events.iter().any(|e| !e["choices"][0]["finish_reason"].is_null()),
                    "{events:?}"
                );
            } else {
                let (st, r) = s.post(CHAT, body).await;
                assert_eq!(st, 200, "{r}");
                let m = &r["choices"][0]["message"];
                let cut = r["choices"][0]["finish_reason"] == "length";
                assert!(m["tool_calls"].is_array() || (cut && m["content"].is_null()), "{r}");
            }
        }
    }
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_tool_fields_are_400_naming_them() {
    let s = start_hermes().await;
    let user = json!([{"role": "user", "content": "hi"}]);
    let f = |name: &str| json!({"type": "function", "function": {"name": name}});
    let unresolved = json!({"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}});
    // Tools whose `$defs` name one definition two ways.
    let defines = |name: &str, ty: &str| {
        json!({"type": "function", "function": {"name": name, "parameters": {"type": "object",
            "properties": {"x": {"$ref": "#/$defs/x"}}, "$defs": {"x": {"type": ty}}}}})
    };
    let cases: Vec<(Value, &str)> = vec![
        (json!({"tools": {"type": "function"}}), "tools"),
        (json!({"tools": [f("a b")]}), "tools[0].function.name"),
        (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
        (json!({"tools": [{"type": "function"}]}), "tools[0].function"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "a", "parameters": []}}]}),
            "tools[0].function.parameters",
        ),
        (json!({"tools": [f("a"), f("a")]}), "tools[1].function.name"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "a", "strict": true}}]}),
            "tools[0].function.strict",
        ),
        (json!({"tools": [f("a")], "tool_choice": f("b")}), "tool_choice"),
        (json!({"tools": [f("a")], "tool_choice": "always"}), "tool_choice"),
        (
            json!({"tools": [f("a")], "tool_choice": {"type": "function"}}),
            "tool_choice",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"tool_choice": f("a")}), "tool_choice"),
        (
            json!({"tools": [f("a")], "parallel_tool_calls": "yes"}),
            "parallel_tool_calls",
        ),
        // A forced call's schema is compiled: one that cannot be is named.
        (
            json!({"tools": [{"type": "function", "function": {"name": "a", "parameters": unresolved}}],
                "tool_choice": "required"}),
            "tools[0].function.parameters",
        ),
        (
            json!({"tools": [f("a"), {"type": "function", "function": {"name": "b", "parameters": unresolved}}],
                "tool_choice": f("b")}),
            "tools[1].function.parameters",
        ),
        (
            json!({"tools": [defines("a", "string"), defines("b", "integer")], "tool_choice": "required"}),
            "tools[1].function.parameters",
        ),
        // A forced call and a structured-output field: the output cannot follow both.
        // `response_format` is accepted with one, but still checked.
        (
            json!({"tools": [f("a")], "tool_choice": "required", "response_format": {"type": "xml"}}),
            "response_format",
        ),
        (
            json!({"tools": [f("a")], "tool_choice": f("a"), "structured_outputs": {"regex": "a+"}}),
            "structured_outputs",
        ),
        (json!({"functions": [{"name": "a"}]}), "functions"),
        (json!({"function_call": {"name": "a"}}), "function_call"),
        (
            json!({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}),
            "messages[0].tool_calls",
        ),
        (
            json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "a", "arguments": "{not json"}}]}]}),
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            json!({"messages": [{"role": "assistant", "tool_calls": [
                {"id": "c", "type": "code", "function": {"name": "a", "arguments": "{}"}}]}]}),
            "messages[0].tool_calls[0].type",
        ),
        (
            json!({"messages": [{"role": "tool", "tool_call_id": 5, "content": "x"}]}),
            "messages[0].tool_call_id",
        ),
    ];
    for (extra, param) in cases {
        let mut body = json!({"model": MODEL, "messages": user, "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (st, r) = s.post(CHAT, body.clone()).await;
        assert_error(st, &r, 400, Some(param), &body.to_string());
    }
    // `/tokenize` checks its tools too.
    let (st, r) = s
        .post("/tokenize", json!({"messages": user, "tools": [f("a b")]}))
        .await;
    assert_error(st, &r, 400, Some("tools[0].function.name"), "tokenize");
    let (st, r) = s.post("/tokenize", json!({"prompt": "x", "tools": [f("a")]})).await;
    assert_error(st, &r, 400, Some("tools"), "tokenize with a prompt");
    s.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_without_tools_or_a_known_format_refuses_them() {
    // The default model's template renders no tools: they would be dropped silently.
    let s = start(Setup::default()).await;
    let body = ask(json!({}));
    let (st, r) = s.post(CHAT, body).await;
    assert_error(st, &r, 400, Some("tools"), "a template without tools");
    drop(s);
    // A template that renders tools in no known format: `auto` cannot be read, a forced
    // call can.
    let s = start(Setup {
        chat_template: Some("{{ tools | tojson }}{% for m in messages %}{{ m.content }}{% endfor %}".into()),
        ..Default::default()
    })
    .await;
    let (st, r) = s.post(CHAT, ask(json!({"tool_choice": "auto"}))).await;
    assert_error(st, &r, 400, Some("tool_choice"), "auto without a format");
    let (st, r) = s.post(CHAT, ask(json!({"tool_choice": "required"}))).await;
    assert_eq!(st, 200, "{r}");
    drop(s);
    // Named on the command line, the format makes `auto` usable.
    let s = start(Setup {
        chat_template: Some("{{ tools | tojson }}{% for m in messages %}{{ m.content }}{% endfor %}".into()),
        tool_call_parser: "llama3".parse().unwrap(),
        ..Default::default()
    })
    .await;
    let (st, r) = s.post(CHAT, ask(json!({}))).await;
    assert_eq!(st, 200, "{r}");
}

mod grpc {
    use super::{weather_tools, HERMES_TEMPLATE};
    use crate::http::tokenizer;
    use crosskv::api::grpc::{self, pb, pb::generation_client::GenerationClient};
    use crosskv::engine::{EngineConfig, EngineHandle};
    use serde_json::json;

    async fn start() -> (
        EngineHandle,
        GenerationClient<tonic::transport::Channel>,
        crate::common::Checkpoint,
    ) {
        let ck = crate::http::tiny_checkpoint(crate::http::VOCAB);
        let mut tok = tokenizer();
        tok.chat_template = Some(HERMES_TEMPLATE.into());
        let handle = EngineHandle::start(
            ck.load(),
            tok,
            EngineConfig {
                kv_cache_bytes: 4 << 20,
                block_size: 16,
                max_model_len: 256,
                max_num_seqs: 8,
                max_num_batched_tokens: 512,
                max_queued_requests: 64,
                prefix_caching: true,
                cuda_graphs: false,
                async_scheduling: false,
            },
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(grpc::serve_with_listener(
            handle.clone(),
            grpc::GrpcConfig::default(),
            listener,
            std::future::pending(),
        ));
        let client = GenerationClient::connect(format!("http://{addr}")).await.unwrap();
        (handle, client, ck)
    }

    fn chat(tool_choice: &str) -> pb::GenerateRequest {
        pb::GenerateRequest {
            messages_json: json!([{"role": "user", "content": "Weather in Oslo?"}]).to_string(),
            tools_json: weather_tools().to_string(),
            tool_choice: tool_choice.into(),
            max_tokens: 8,
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grpc_chat_with_tools_and_its_errors() {
        let (handle, mut c, _ck) = start().await;
        let none = c.generate(chat("none")).await.unwrap().into_inner();
        assert!(!none.text.is_empty() && none.tool_calls.is_empty());
        // The tools are in the prompt: more prompt tokens than the messages alone.
        let mut bare = chat("");
        bare.tools_json.clear();
        let bare = c.generate(bare).await.unwrap().into_inner();
        assert_ne!(bare.token_ids, none.token_ids, "the tools should change the prompt");
        // `auto` without a call in the output: the same text as `none`, streamed or not.
        let auto = c.generate(chat("auto")).await.unwrap().into_inner();
        assert_eq!(auto.text, none.text);
        assert!(auto.tool_calls.is_empty());
        let mut s = c.generate_stream(chat("")).await.unwrap().into_inner();
        let mut text = String::new();
        let mut finish = String::new();
        while let Some(m) = s.message().await.unwrap() {
            text.push_str(&m.text);
            finish = m.finish_reason;
        }
        assert_eq!(text, none.text);
        assert_eq!(finish, none.finish_reason);
        // A forced call follows its function's schema: `get_time` takes no arguments.
        let named = c
            .generate(chat(r#"{"type": "function", "function": {"name": "get_time"}}"#))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(named.tool_calls.len(), 1, "{named:?}");
        assert_eq!(named.tool_calls[0].name, "get_time");
        assert_eq!(named.tool_calls[0].arguments, "{}");
        assert_eq!(named.finish_reason, "stop");
        let unresolved = json!([{"type": "function", "function": {"name": "a",
            "parameters": {"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}}}]);
        for (req, field) in [
            (
                chat(r#"{"type": "function", "function": {"name": "nope"}}"#),
                "tool_choice",
            ),
            (chat("sometimes"), "tool_choice"),
            (
                pb::GenerateRequest {
                    tools_json: unresolved.to_string(),
                    ..chat("required")
                },
                "tools_json[0].function.parameters",
            ),
            (
                pb::GenerateRequest {
                    constraint: Some(pb::OutputConstraint {
                        kind: Some(pb::output_constraint::Kind::Regex("a+".into())),
                    }),
                    ..chat("required")
                },
                "constraint",
            ),
            (
                pb::GenerateRequest {
                    tools_json: "[1]".into(),
                    ..chat("")
                },
                "tools_json[0]",
            ),
            (
                pb::GenerateRequest {
                    tools_json: "[".into(),
                    ..chat("")
                },
                "tools_json",
            ),
            (
                pb::GenerateRequest {
                    messages_json: "{}".into(),
                    ..chat("")
                },
                "messages_json",
            ),
            (
                pb::GenerateRequest {
                    prompt: "hi".into(),
                    ..chat("")
                },
                "messages_json",
            ),
            (
                pb::GenerateRequest {
                    prompt: "hi".into(),
                    tools_json: weather_tools().to_string(),
                    ..Default::default()
                },
                "tools_json",
            ),
        ] {
            let e = c.generate(req).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{field}: {e:?}");
            assert!(
                e.message().starts_with(&format!("{field}:")),
                "{field}: {}",
                e.message()
            );
        }
        handle.shutdown();
    }
}

/// A template guarding its tools as vLLM's Hermes example does, and reading a variable
/// the request sets through `chat_template_kwargs`.
const KWARGS_TEMPLATE: &str =
    "{%- if tools is iterable and tools | length > 0 %}[{{ tools | length }} tools]{% endif %}\
{%- for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}\
{%- if enable_thinking is defined and enable_thinking is false %}<no-think>{% endif %}\
{%- if add_generation_prompt %}<assistant>{% endif %}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_see_jinja2_tests_and_the_requests_template_kwargs() {
    let s = start(Setup {
        chat_template: Some(KWARGS_TEMPLATE.into()),
        ..Default::default()
    })
    .await;
    let user = json!([{"role": "user", "content": "hi"}]);
    // No tools: `none is iterable` is false, as in Jinja2, so the guard holds.
    let (text, _) = rendered(&s, json!({"messages": user})).await;
    assert_eq!(text, "<user>hi<assistant>");
    let (text, _) = rendered(
        &s,
        json!({"messages": user, "chat_template_kwargs": {"enable_thinking": false}}),
    )
    .await;
    assert_eq!(text, "<user>hi<no-think><assistant>");
    let (text, _) = rendered(
        &s,
        json!({"messages": user, "chat_template_kwargs": {"enable_thinking": true}}),
    )
    .await;
    assert_eq!(text, "<user>hi<assistant>");
    // A chat request renders the same prompt: its usage counts the extra tokens.
    let chat =
        |kwargs: Value| json!({"model": MODEL, "messages": user, "max_tokens": 1, "chat_template_kwargs": kwargs});
    let (st, plain) = s.post(CHAT, chat(Value::Null)).await;
    assert_eq!(st, 200, "{plain}");
    let (st, r) = s.post(CHAT, chat(json!({"enable_thinking": false}))).await;
    assert_eq!(st, 200, "{r}");
    let prompt = |r: &Value| r["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt(&r) > prompt(&plain), "{r} {plain}");
    // Not an object, or setting what the request itself sets: a 400 naming it.
    for (kwargs, param) in [
        (json!("enable_thinking"), "chat_template_kwargs"),
        (json!({"messages": []}), "chat_template_kwargs.messages"),
        (
            json!({"add_generation_prompt": false}),
            "chat_template_kwargs.add_generation_prompt",
        ),
    ] {
        let (st, r) = s.post(CHAT, chat(kwargs)).await;
        assert_error(st, &r, 400, Some(param), "chat_template_kwargs");
    }
    let (st, r) = s
        .post("/tokenize", json!({"prompt": "x", "chat_template_kwargs": {"a": 1}}))
        .await;
    assert_error(st, &r, 400, Some("chat_template_kwargs"), "tokenize with a prompt");
    s.wait_idle().await;
}
