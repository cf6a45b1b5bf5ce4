//! `tool_choice: "auto"` through the real HTTP server, for each tool-call format a chat
//! template can write (Hermes / Qwen `<tool_call>`, Llama 3 JSON, Mistral
//! `[TOOL_CALLS]`): the format is read from the fixture template, and the tiny random
//! llama's output is held by a regex (`structured_outputs`, which `auto` allows) to
//! exactly the text a model of that family writes, so the answer must come back as
//! OpenAI tool calls, streamed or not, with the text around them as content.

use crate::http::{start, Server, Setup, MODEL};
use crate::tool_calls::{rendered, weather_tools, HERMES_TEMPLATE};
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";

/// A Llama 3.1-style template: JSON calls `{"name", "parameters"}` in the assistant
/// turn, results in `ipython` turns.
const LLAMA3_TEMPLATE: &str = r#"{%- if tools %}<|start_header_id|>system<|end_header_id|>

Environment: ipython
To call a function, respond with JSON: {"name": function name, "parameters": dictionary of its arguments}.

{% for t in tools %}{{ t | tojson }}

{% endfor %}<|eot_id|>
{%- endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls is defined %}<|start_header_id|>assistant<|end_header_id|>

{% for tc in message.tool_calls %}{"name": "{{ tc.function.name }}", "parameters": {{ tc.function.arguments | tojson }}}{% endfor %}<|eot_id|>
{%- elif message.role == "tool" %}<|start_header_id|>ipython<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"#;

/// A Mistral v3-style template: the tools before the last user turn, calls after
/// `[TOOL_CALLS]` as a JSON array with 9-character ids, results in `[TOOL_RESULTS]`.
const MISTRAL_TEMPLATE: &str = r#"{%- for message in messages %}
{%- if message.role == "user" %}
{%- if tools and loop.last %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST]{{ message.content }}[/INST]
{%- elif message.role == "assistant" and message.tool_calls is defined %}[TOOL_CALLS][{% for tc in message.tool_calls %}{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}, "id": "{{ tc.id }}"}{% if not loop.last %}, {% endif %}{% endfor %}]</s>
{%- elif message.role == "tool" %}[TOOL_RESULTS]{"call_id": "{{ message.tool_call_id }}", "content": {{ message.content | tojson }}}[/TOOL_RESULTS]
{%- else %}{{ message.content }}</s>
{%- endif %}
{%- endfor %}"#;

async fn start_with(template: &str) -> Server {
    start(Setup {
        chat_template: Some(template.into()),
        max_model_len: 1024,
        ..Default::default()
    })
    .await
}

/// `text` as a regex matching exactly it.
fn literal(text: &str) -> String {
    let mut r = String::new();
    for c in text.chars() {
        if "\\.^$|?*+()[]{}".contains(c) {
            r.push('\\');
        }
        r.push(c);
    }
    r
}

/// A chat request with the weather tools under `auto`, whose output is held to `text`.
fn forced_text(text: &str, extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": weather_tools(), "tool_choice": "auto", "max_tokens": 200, "temperature": 0,
        "structured_outputs": {"regex": literal(text)}});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// (name, arguments as JSON) of each call.
fn calls_of(calls: &[Value]) -> Vec<(String, Value)> {
    calls
        .iter()
        .map(|c| {
            assert_eq!(c["type"], "function", "{c}");
            let args = serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
            (c["function"]["name"].as_str().unwrap().to_string(), args)
        })
        .collect()
}

/// What a streamed answer put together from its deltas: content, calls and the
/// finish reason.
async fn streamed(s: &Server, b: Value) -> (String, Vec<Value>, String) {
    let (mut content, mut calls, mut finish) = (String::new(), Vec::<Value>::new(), String::new());
    for e in s.stream(CHAT, b).await {
        let c = &e["choices"][0];
        if let Some(t) = c["delta"]["content"].as_str() {
            content.push_str(t);
        }
        for d in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = d["index"].as_u64().unwrap() as usize;
            if d.get("id").is_some() {
                // OpenAI's first delta of a call: its index, id, type and name.
                assert_eq!(i, calls.len(), "{e}");
                calls.push(json!({"id": d["id"], "type": d["type"],
                    "function": {"name": d["function"]["name"], "arguments": d["function"]["arguments"]}}));
            } else {
                let a = calls[i]["function"]["arguments"].as_str().unwrap().to_string();
                calls[i]["function"]["arguments"] = json!(a + d["function"]["arguments"].as_str().unwrap());
            }
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (content, calls, finish)
}

/// Sends `text` as the model's output under `auto`, whole and streamed, and checks both
/// answers give `content` (None: null) and `want` calls with `tool_calls` as the finish
/// reason; returns the non-streamed calls.
async fn check_auto(s: &Server, text: &str, extra: Value, content: Option<&str>, want: &[(&str, Value)]) -> Vec<Value> {
    let want: Vec<(String, Value)> = want.iter().map(|(n, a)| (n.to_string(), a.clone())).collect();
    let (st, r) = s.post(CHAT, forced_text(text, extra.clone())).await;
    assert_eq!(st, 200, "{r}");
    let m = &r["choices"][0]["message"];
    let calls = m["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("tool calls in {r}"))
        .clone();
    assert_eq!(calls_of(&calls), want, "{r}");
    assert_eq!(m["content"].as_str().map(str::trim), content, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "tool_calls", "{r}");

    let mut stream_extra = extra;
    stream_extra["stream"] = json!(true);
    let (streamed_content, streamed_calls, finish) = streamed(s, forced_text(text, stream_extra)).await;
    assert_eq!(calls_of(&streamed_calls), want);
    assert_eq!(streamed_content.trim(), content.unwrap_or(""));
    assert_eq!(finish, "tool_calls");
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hermes_calls_are_read_from_the_output() {
    let s = start_with(HERMES_TEMPLATE).await;
    let weather = ("get_weather", json!({"city": "Oslo", "unit": "C"}));
    let one = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"unit\": \"C\"}}\n</tool_call>";
    let calls = check_auto(
        &s,
        one,
        json!({}),
        Some("Let me check."),
        std::slice::from_ref(&weather),
    )
    .await;
    let id = calls[0]["id"].as_str().unwrap();
    assert!(id.starts_with("call_") && id.len() == 29, "{id}");

    // Two calls in one answer; with `parallel_tool_calls: false`, only the first.
    let two = format!("{one}\n<tool_call>\n{{\"name\": \"get_time\", \"arguments\": {{}}}}\n</tool_call>");
    let time = ("get_time", json!({}));
    check_auto(&s, &two, json!({}), Some("Let me check."), &[weather.clone(), time]).await;
    check_auto(
        &s,
        &two,
        json!({"parallel_tool_calls": false}),
        Some("Let me check."),
        &[weather],
    )
    .await;

    // Without a call the answer is text, finished by `stop`.
    let (st, r) = s.post(CHAT, forced_text("Sunny, 18 degrees.", json!({}))).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["choices"][0]["message"]["content"], "Sunny, 18 degrees.", "{r}");
    assert!(r["choices"][0]["message"]["tool_calls"].is_null(), "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama3_json_calls_are_read_from_the_output() {
    let s = start_with(LLAMA3_TEMPLATE).await;
    let weather = ("get_weather", json!({"city": "Oslo"}));
    let call = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}";
    check_auto(&s, call, json!({}), None, std::slice::from_ref(&weather)).await;
    check_auto(
        &s,
        &format!("<|python_tag|>{call}"),
        json!({}),
        None,
        std::slice::from_ref(&weather),
    )
    .await;
    // Several calls are joined by `;`.
    let two = format!("{call}; {{\"name\": \"get_time\", \"parameters\": {{}}}}");
    check_auto(&s, &two, json!({}), None, &[weather, ("get_time", json!({}))]).await;

    // A history of calls and results reaches the template in its own form.
    let history = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}
    ]);
    let (text, _) = rendered(&s, json!({"messages": history, "tools": weather_tools()})).await;
    assert!(
        text.contains("{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|>"),
        "{text}"
    );
    assert!(
        text.contains("<|start_header_id|>ipython<|end_header_id|>\n\n18 degrees, sunny"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistral_calls_are_read_from_the_output() {
    let s = start_with(MISTRAL_TEMPLATE).await;
    let text = "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}, {\"name\": \"get_time\", \"arguments\": {}}]";
    let want = [("get_weather", json!({"city": "Oslo"})), ("get_time", json!({}))];
    let calls = check_auto(&s, text, json!({}), None, &want).await;
    // Mistral's templates accept only 9-character alphanumeric call ids.
    for c in &calls {
        let id = c["id"].as_str().unwrap();
        assert!(id.len() == 9 && id.chars().all(|c| c.is_ascii_alphanumeric()), "{id}");
    }

    // Those ids go back through the template with the results.
    let history = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": calls[0]["id"], "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "18 degrees, sunny"},
        {"role": "user", "content": "And tomorrow?"}
    ]);
    let (prompt, _) = rendered(&s, json!({"messages": history, "tools": weather_tools()})).await;
    let id = calls[0]["id"].as_str().unwrap();
    assert!(
        prompt.contains(&format!(
            "[TOOL_CALLS][{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"Paris\"}}, \"id\": \"{id}\"}}]"
        )),
        "{prompt}"
    );
    assert!(
        prompt.contains(&format!(
            "[TOOL_RESULTS]{{\"call_id\": \"{id}\", \"content\": \"18 degrees, sunny\"}}[/TOOL_RESULTS]"
        )),
        "{prompt}"
    );
    // The tools come before the last user turn only.
    assert!(
        prompt.contains("[AVAILABLE_TOOLS]") && prompt.ends_with("[INST]And tomorrow?[/INST]"),
        "{prompt}"
    );
}
