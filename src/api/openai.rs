//! The OpenAI wire types (serde): what clients send and what they get back. Fields whose
//! JSON type varies (`prompt`, `stop`, a message's `content`) stay `serde_json::Value`
//! here and are checked, with the field named, in `validate`.

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use std::marker::PhantomData;

/// A `T` read only from a JSON object: serde's derived structs also accept an array of
/// their fields in order (`["user", "hi"]` as a message), which is no OpenAI shape.
struct ObjectOnly<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(ObjectVisitor(PhantomData)).map(ObjectOnly)
    }
}

fn objects<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Ok(Vec::<ObjectOnly<T>>::deserialize(d)?.into_iter().map(|o| o.0).collect())
}

fn optional_objects<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Vec<T>>, D::Error> {
    Ok(Option::<Vec<ObjectOnly<T>>>::deserialize(d)?.map(|v| v.into_iter().map(|o| o.0).collect()))
}

fn optional_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Ok(Option::<ObjectOnly<T>>::deserialize(d)?.map(|o| o.0))
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
    /// vLLM's usage on every chunk: not honoured, so `true` is a 400.
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

/// How a request body treats a top-level field its type does not declare.
pub trait UndeclaredFields {
    /// Whether an undeclared top-level field `name` set to `value` is accepted, with no
    /// effect; otherwise the request is a 400 naming it. By default every one is.
    fn accepts(_name: &str, _value: &Value) -> bool {
        true
    }
}

/// The undeclared fields a generation request may carry: metadata about the caller, and
/// fields other servers define whose value asks for what this server does anyway (as a
/// router such as sglang-router sends them, at their defaults). Any other value, or any
/// other field, asks for something this server would not do, so it is refused rather
/// than ignored.
fn neutral_generation_field(name: &str, value: &Value) -> bool {
    let is = |v: Value| value.is_null() || *value == v;
    match name {
        "user" | "metadata" | "safety_identifier" | "prompt_cache_key" | "request_id" => true,
        "store" | "no_stop_trim" | "include_stop_str_in_output" | "return_hidden_states" | "continue_final_message" => {
            is(Value::Bool(false))
        }
        "skip_special_tokens" | "spaces_between_special_tokens" => is(Value::Bool(true)),
        // SGLang's: split reasoning out when a reasoning parser is set; there is none here.
        "separate_reasoning" | "stream_reasoning" => is(Value::Bool(true)),
        "service_tier" => is("auto".into()) || is("default".into()),
        "modalities" => is(serde_json::json!(["text"])),
        _ => false,
    }
}

/// `POST /v1/completions`. A top-level field it does not declare is a 400 naming it,
/// unless it is metadata or neutral (`neutral_generation_field`). The sampling `Value` fields (`logit_bias` to `min_p`) are checked, with the
/// field named, in `validate`; the `Value` fields after them are OpenAI/vLLM features
/// this server does not honour yet: read only so that setting one is a 400 naming it
/// (`validate::not_honoured`), never an answer that silently ignores it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: Value,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_tokens: Option<u64>,
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Value,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub n: Option<u64>,
    pub stream: Option<bool>,
    #[serde(default, deserialize_with = "optional_object")]
    pub stream_options: Option<StreamOptions>,
    pub echo: Option<bool>,
    pub logprobs: Option<u64>,
    pub add_special_tokens: Option<bool>,
    pub logit_bias: Option<Value>,
    pub presence_penalty: Option<Value>,
    pub frequency_penalty: Option<Value>,
    pub repetition_penalty: Option<Value>,
    pub min_p: Option<Value>,
    pub response_format: Option<Value>,
    pub structured_outputs: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    pub suffix: Option<Value>,
    pub best_of: Option<Value>,
}

impl UndeclaredFields for CompletionRequest {
    fn accepts(name: &str, value: &Value) -> bool {
        neutral_generation_field(name, value)
    }
}

impl UndeclaredFields for ChatCompletionRequest {
    fn accepts(name: &str, value: &Value) -> bool {
        neutral_generation_field(name, value)
    }
}

/// One chat message as sent; `content` is a string, a list of text parts, or null.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Value,
    /// An assistant message's tool calls (history).
    #[serde(default, deserialize_with = "optional_objects")]
    pub tool_calls: Option<Vec<ToolCallIn>>,
    /// A `tool` message: the id of the call it answers.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

/// A tool call in the history: `{"id", "type": "function", "function": {"name",
/// "arguments"}}`; `arguments` is a JSON string (OpenAI) or an object.
#[derive(Debug, Clone, Deserialize)]
pub struct ToolCallIn {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[serde(deserialize_with = "object")]
    pub function: FunctionCallIn,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FunctionCallIn {
    pub name: String,
    #[serde(default)]
    pub arguments: Value,
}

fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(ObjectOnly::<T>::deserialize(d)?.0)
}

/// `POST /v1/chat/completions` (the `Value` fields after `min_p`, and undeclared fields:
/// as for completions, refused unless neutral).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    #[serde(default, deserialize_with = "objects")]
    pub messages: Vec<ChatMessageIn>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_tokens: Option<u64>,
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Value,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub n: Option<u64>,
    pub stream: Option<bool>,
    #[serde(default, deserialize_with = "optional_object")]
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u64>,
    pub logit_bias: Option<Value>,
    pub presence_penalty: Option<Value>,
    pub frequency_penalty: Option<Value>,
    pub repetition_penalty: Option<Value>,
    pub min_p: Option<Value>,
    pub response_format: Option<Value>,
    pub structured_outputs: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// More variables for the chat template (vLLM's field), e.g. `enable_thinking`.
    pub chat_template_kwargs: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct UsageOut {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache (not computed again).
    pub cached_tokens: usize,
}

impl UsageOut {
    pub fn add(&mut self, prompt: usize, completion: usize, cached: usize) {
        self.prompt_tokens += prompt;
        self.completion_tokens += completion;
        self.total_tokens += prompt + completion;
        self.prompt_tokens_details.cached_tokens += cached;
    }
}

/// A JSON object whose keys keep their order (`top_logprobs` dicts, best first).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OrderedMap(pub Vec<(String, f32)>);

impl Serialize for OrderedMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// The completions `logprobs` object: one entry per token.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<OrderedMap>>,
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    pub fn append(&mut self, mut other: CompletionLogprobs) {
        self.tokens.append(&mut other.tokens);
        self.token_logprobs.append(&mut other.token_logprobs);
        self.top_logprobs.append(&mut other.top_logprobs);
        self.text_offset.append(&mut other.text_offset);
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// A completions response, and (`object: "text_completion"` too) each streamed chunk.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
}

/// The answer: `content` is null when the model only called tools.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ToolCallOut {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionOut,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FunctionOut {
    pub name: String,
    /// The arguments as a JSON string.
    pub arguments: String,
}

/// A streamed piece of a tool call: the first one of a call carries `id`, `type` and
/// `function.name` (with empty arguments), the next ones more of `function.arguments`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: UsageOut,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub root: String,
    pub max_model_len: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// `POST /tokenize` (vLLM's shape): a prompt, or chat messages through the template.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    #[serde(default, deserialize_with = "optional_objects")]
    pub messages: Option<Vec<ChatMessageIn>>,
    /// Rendered into the prompt as for a chat request.
    pub tools: Option<Value>,
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    /// As for a chat request.
    pub chat_template_kwargs: Option<Value>,
    /// Also return each token's vocabulary string (`token_strs`).
    pub return_token_strs: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    /// With `return_token_strs`: the tokenizer's string of each token (as vLLM's
    /// `convert_ids_to_tokens`: vocabulary entries, not decoded text); `null` without it,
    /// as vLLM answers.
    pub token_strs: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

impl UndeclaredFields for TokenizeRequest {}
impl UndeclaredFields for DetokenizeRequest {}
