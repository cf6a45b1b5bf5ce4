//! A request is validated once, here, into a distinct type the handlers trust: token
//! ids, engine options, and the response options. Every error names the field.
//! Over 600 lines on purpose: the completion and chat checks share private helpers
//! (prompts, options, stop strings, lengths); split by endpoint they would be exported.

use super::openai::{ChatCompletionRequest, ChatMessageIn, CompletionRequest, StreamOptions};
use super::structured::ConstraintFields;
use super::tool_calls::{self, OutputPlan, ToolCallParser};
use crate::engine::structured::StructuredOutputs;
use crate::engine::{GenerateOptions, GenerateRequest};
use crate::model::{ChatMessage, Tok};
use crate::runner::SamplingParams;
use serde_json::Value;

/// Largest `n`, `logprobs` / `top_logprobs`, and number of stop strings accepted.
pub const MAX_N: u64 = 128;
pub const MAX_LOGPROBS: u64 = 20;
pub const MAX_STOP: usize = 16;
/// Longest stop string, in bytes: the held-back tail of every streamed output and the
/// matcher's tables grow with it.
pub const MAX_STOP_BYTES: usize = 1024;
/// Most `stop_token_ids`: each generated token is checked against all of them.
pub const MAX_STOP_TOKEN_IDS: usize = 1024;
/// Most `logit_bias` entries: each is added to every sampled row of the request.
pub const MAX_LOGIT_BIAS: usize = 1024;
/// Largest `temperature` (OpenAI's bound).
pub const MAX_TEMPERATURE: f32 = 2.0;
/// Bytes of prompt text allowed per token of `max_model_len` when no explicit limit is
/// set: far above any real tokenizer's average, so only text that cannot fit is refused
/// before the tokenizer spends time on it.
pub const PROMPT_BYTES_PER_TOKEN: usize = 64;

/// The default cap on one prompt's text (`--max-prompt-bytes`).
pub fn default_max_prompt_bytes(max_model_len: usize) -> usize {
    max_model_len.saturating_mul(PROMPT_BYTES_PER_TOKEN)
}

#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    /// The body is not JSON, or a field has the wrong JSON type.
    #[error("invalid request body: {message}")]
    Json { param: Option<String>, message: String },
    /// A field's value is out of range or malformed.
    #[error("`{param}`: {message}")]
    Field { param: String, message: String },
    /// The `model` field names a model this server does not serve (404).
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error(
        "This model's maximum context length is {max_model_len} tokens; the request has {prompt_tokens} prompt tokens and asks for {max_tokens} more"
    )]
    ContextLength {
        param: &'static str,
        max_model_len: usize,
        prompt_tokens: usize,
        max_tokens: usize,
    },
}

impl ValidationError {
    /// The request field at fault (OpenAI's `param`).
    pub fn param(&self) -> Option<String> {
        match self {
            ValidationError::Json { param, .. } => param.clone(),
            ValidationError::Field { param, .. } => Some(param.clone()),
            ValidationError::ModelNotFound(_) => Some("model".into()),
            ValidationError::ContextLength { param, .. } => Some(param.to_string()),
        }
    }
}

/// A request number as a `usize`, saturating (on 32-bit targets too).
fn to_usize(x: u64) -> usize {
    usize::try_from(x).unwrap_or(usize::MAX)
}

pub fn field(param: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError::Field {
        param: param.into(),
        message: message.into(),
    }
}

/// What validation needs to know about the server.
pub struct Limits<'a> {
    pub tok: &'a Tok,
    pub served_model_name: &'a str,
    pub vocab_size: usize,
    pub max_model_len: usize,
    /// Longest prompt text (a chat request: all message contents together), checked
    /// before tokenizing.
    pub max_prompt_bytes: usize,
    /// Most engine requests (prompts × `n`) one API request may become: the engine's
    /// queue bound, so a request that could never be admitted is a 400, not a 429.
    pub max_choices: usize,
    /// Compiles structured-output constraints (an invalid one is refused here).
    pub structured: &'a StructuredOutputs,
    /// The tool-call format `tool_choice: "auto"` reads (`--tool-call-parser`).
    pub tool_call_parser: ToolCallParser,
}

/// One prompt, tokenized, with the text `echo` returns.
#[derive(Debug, Clone)]
pub struct ValidPrompt {
    pub ids: Vec<u32>,
    pub text: String,
}

/// A checked `/v1/completions` request.
#[derive(Debug, Clone)]
pub struct ValidCompletion {
    pub model: String,
    pub prompts: Vec<ValidPrompt>,
    /// Options of choice 0 of each prompt; choice `j` gets `seed + j`.
    pub options: GenerateOptions,
    /// The `max_tokens` asked for (0 with `echo`: the prompt is scored, nothing generated).
    pub max_tokens: usize,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub echo: bool,
    pub logprobs: Option<usize>,
}

impl ValidCompletion {
    /// The engine requests, prompt-major: choice index `prompt * n + j`.
    pub fn requests(&self) -> Vec<GenerateRequest> {
        let mut out = Vec::new();
        for p in &self.prompts {
            for j in 0..self.n {
                out.push(GenerateRequest {
                    prompt_ids: p.ids.clone(),
                    options: with_seed(&self.options, j),
                });
            }
        }
        out
    }
}

/// A checked `/v1/chat/completions` request.
#[derive(Debug, Clone)]
pub struct ValidChat {
    pub model: String,
    pub prompt_ids: Vec<u32>,
    pub options: GenerateOptions,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// `top_logprobs` when `logprobs` is true.
    pub logprobs: Option<usize>,
    /// How each choice's output is read for tool calls (`None`: plain text).
    pub tool_output: Option<OutputPlan>,
}

impl ValidChat {
    pub fn requests(&self) -> Vec<GenerateRequest> {
        (0..self.n)
            .map(|j| GenerateRequest {
                prompt_ids: self.prompt_ids.clone(),
                options: with_seed(&self.options, j),
            })
            .collect()
    }
}

fn with_seed(o: &GenerateOptions, j: usize) -> GenerateOptions {
    let mut o = o.clone();
    o.sampling.seed = o.sampling.seed.map(|s| s.wrapping_add(j as u64));
    o
}

pub fn check_model(model: Option<&str>, served: &str) -> Result<String, ValidationError> {
    match model {
        None | Some("") => Ok(served.to_string()),
        Some(m) if m == served => Ok(m.to_string()),
        Some(m) => Err(ValidationError::ModelNotFound(m.to_string())),
    }
}

pub fn check_ids(ids: &[u32], vocab: usize, param: &str) -> Result<(), ValidationError> {
    match ids.iter().find(|&&t| t as usize >= vocab) {
        Some(t) => Err(field(
            param,
            format!("token id {t} is outside the vocabulary (size {vocab})"),
        )),
        None => Ok(()),
    }
}

fn as_ids(v: &[Value]) -> Option<Vec<u32>> {
    v.iter()
        .map(|x| x.as_u64().and_then(|t| u32::try_from(t).ok()))
        .collect()
}

/// A prompt's text is at most `max` bytes (checked before it is tokenized).
pub fn check_prompt_bytes(param: &str, len: usize, max: usize) -> Result<(), ValidationError> {
    if len > max {
        return Err(field(
            param,
            format!("the prompt text is {len} bytes, more than the limit of {max} (--max-prompt-bytes)"),
        ));
    }
    Ok(())
}

/// How many prompts `prompt` holds, read from its JSON shape alone (nothing tokenized).
fn prompt_count(v: &Value) -> usize {
    match v {
        Value::Array(a) if !a.is_empty() && (a.iter().all(Value::is_string) || a.iter().all(Value::is_array)) => {
            a.len()
        }
        _ => 1,
    }
}

/// `prompts × n` engine requests fit what the server admits at once.
fn check_choices(prompts: usize, n: usize, max: usize) -> Result<(), ValidationError> {
    let total = prompts.saturating_mul(n);
    if total > max {
        return Err(field(
            if prompts > max { "prompt" } else { "n" },
            format!(
                "the request asks for {prompts} prompt(s) × n = {n}: {total} completions, more than this server admits at once ({max}, --max-queued-requests)"
            ),
        ));
    }
    Ok(())
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of id lists.
fn prompts(v: &Value, lim: &Limits, add_special: bool) -> Result<Vec<ValidPrompt>, ValidationError> {
    let text = |s: &str| -> Result<ValidPrompt, ValidationError> {
        check_prompt_bytes("prompt", s.len(), lim.max_prompt_bytes)?;
        let ids = lim
            .tok
            .encode(s, add_special)
            .map_err(|e| field("prompt", e.to_string()))?;
        // A tokenizer may know more (added) tokens than the model has rows for.
        check_ids(&ids, lim.vocab_size, "prompt")?;
        Ok(ValidPrompt {
            ids,
            text: s.to_string(),
        })
    };
    let ids = |ids: Vec<u32>| -> Result<ValidPrompt, ValidationError> {
        check_ids(&ids, lim.vocab_size, "prompt")?;
        let text = lim
            .tok
            .decode(&ids, false)
            .map_err(|e| field("prompt", e.to_string()))?;
        Ok(ValidPrompt { ids, text })
    };
    const SHAPE: &str = "expected a string, a list of strings, a list of token ids or a list of token-id lists";
    let out = match v {
        Value::Null => return Err(field("prompt", "is required")),
        Value::String(s) => vec![text(s)?],
        Value::Array(a) if a.is_empty() => return Err(field("prompt", "is empty")),
        Value::Array(a) if a.iter().all(Value::is_string) => a
            .iter()
            .map(|s| text(s.as_str().unwrap_or_default()))
            .collect::<Result<_, _>>()?,
        Value::Array(a) if a.iter().all(Value::is_number) => {
            vec![ids(
                as_ids(a).ok_or_else(|| field("prompt", "token ids must be integers ≥ 0"))?
            )?]
        }
        Value::Array(a) if a.iter().all(Value::is_array) => a
            .iter()
            .map(|x| {
                let l = x.as_array().map(Vec::as_slice).unwrap_or_default();
                ids(as_ids(l).ok_or_else(|| field("prompt", SHAPE))?)
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(field("prompt", SHAPE)),
    };
    if out.iter().any(|p| p.ids.is_empty()) {
        return Err(field("prompt", "a prompt is empty (no tokens)"));
    }
    Ok(out)
}

/// Stop strings within the count and length bounds (both front ends).
pub fn check_stop(stop: &[String]) -> Result<(), ValidationError> {
    if stop.len() > MAX_STOP {
        return Err(field("stop", format!("at most {MAX_STOP} stop strings")));
    }
    if let Some(s) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(field(
            "stop",
            format!(
                "a stop string is {} bytes, more than the limit of {MAX_STOP_BYTES}",
                s.len()
            ),
        ));
    }
    Ok(())
}

/// Stop token ids within the count bound and the vocabulary (both front ends).
pub fn check_stop_token_ids(ids: &[u32], vocab: usize) -> Result<(), ValidationError> {
    if ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(field(
            "stop_token_ids",
            format!("at most {MAX_STOP_TOKEN_IDS} stop token ids"),
        ));
    }
    check_ids(ids, vocab, "stop_token_ids")
}

/// Whether a field this server does not honour is at its neutral value (absent, null,
/// or the value that means "off").
fn is_neutral(name: &str, v: &Value) -> bool {
    match (name, v) {
        (_, Value::Null) => true,
        ("functions", Value::Array(a)) => a.is_empty(),
        ("function_call", Value::String(s)) => s == "none" || s == "auto",
        ("suffix", Value::String(s)) => s.is_empty(),
        _ => false,
    }
}

/// A 400 naming the first field set that this server does not honour: answering as if
/// it were absent would silently give the client something else than it asked for.
fn not_honoured(fields: &[(&'static str, &Option<Value>)]) -> Result<(), ValidationError> {
    for (name, v) in fields {
        if let Some(v) = v {
            if !is_neutral(name, v) {
                return Err(field(
                    *name,
                    format!("`{name}` is not supported by this server; leave it out (or at its neutral value)"),
                ));
            }
        }
    }
    Ok(())
}

/// The not-honoured fields of a request type.
macro_rules! not_honoured_fields {
    ($r:expr $(, $extra:ident)*) => {
        not_honoured(&[$((stringify!($extra), &$r.$extra),)*])
    };
}

/// The structured-output fields both request types carry.
macro_rules! constraint_fields {
    ($r:expr) => {
        ConstraintFields {
            response_format: $r.response_format.as_ref(),
            structured_outputs: $r.structured_outputs.as_ref(),
            guided_json: $r.guided_json.as_ref(),
            guided_regex: $r.guided_regex.as_ref(),
            guided_choice: $r.guided_choice.as_ref(),
            guided_grammar: $r.guided_grammar.as_ref(),
        }
    };
}

/// `stop`: absent, a string, or a list of strings.
fn stop_strings(v: &Value) -> Result<Vec<String>, ValidationError> {
    let out: Vec<String> = match v {
        Value::Null => Vec::new(),
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|s| s.as_str().map(String::from))
            .collect::<Option<_>>()
            .ok_or_else(|| field("stop", "expected a string or a list of strings"))?,
        _ => return Err(field("stop", "expected a string or a list of strings")),
    };
    check_stop(&out)?;
    Ok(out)
}

/// The fields completions and chat share.
struct Common<'a> {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_tokens: Option<u64>,
    seed: Option<i64>,
    stop: &'a Value,
    stop_token_ids: Option<&'a [u32]>,
    ignore_eos: Option<bool>,
    n: Option<u64>,
    logit_bias: Option<&'a Value>,
    presence_penalty: Option<&'a Value>,
    frequency_penalty: Option<&'a Value>,
    repetition_penalty: Option<&'a Value>,
    min_p: Option<&'a Value>,
}

/// Both request types carry the same sampling fields (serde's `flatten` would share the
/// struct but lose the field path in type errors, so they stay inline): one borrowed view.
macro_rules! common_view {
    ($($request:ty),*) => {$(
        impl $request {
            fn common(&self) -> Common<'_> {
                Common {
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    min_tokens: self.min_tokens,
                    seed: self.seed,
                    stop: &self.stop,
                    stop_token_ids: self.stop_token_ids.as_deref(),
                    ignore_eos: self.ignore_eos,
                    n: self.n,
                    logit_bias: self.logit_bias.as_ref(),
                    presence_penalty: self.presence_penalty.as_ref(),
                    frequency_penalty: self.frequency_penalty.as_ref(),
                    repetition_penalty: self.repetition_penalty.as_ref(),
                    min_p: self.min_p.as_ref(),
                }
            }
        }
    )*};
}
common_view!(CompletionRequest, ChatCompletionRequest);

/// `temperature` in 0..=2 (both front ends).
pub fn check_temperature(t: f32) -> Result<f32, ValidationError> {
    if !(0.0..=MAX_TEMPERATURE).contains(&t) {
        return Err(field(
            "temperature",
            format!("must be a number in [0, {MAX_TEMPERATURE}]; 0 is greedy"),
        ));
    }
    Ok(t)
}

/// The penalties and `min_p` (both front ends), each in its range: `presence_penalty`
/// and `frequency_penalty` in [-2, 2] (OpenAI), `repetition_penalty` finite and > 0
/// (vLLM), `min_p` in [0, 1].
pub fn check_penalties(presence: f32, frequency: f32, repetition: f32, min_p: f32) -> Result<(), ValidationError> {
    for (name, x) in [("presence_penalty", presence), ("frequency_penalty", frequency)] {
        if !(-2.0..=2.0).contains(&x) {
            return Err(field(name, "must be a number in [-2, 2]; 0 is off"));
        }
    }
    if !(repetition.is_finite() && repetition > 0.0) {
        return Err(field("repetition_penalty", "must be a finite number > 0; 1 is off"));
    }
    if !(0.0..=1.0).contains(&min_p) {
        return Err(field("min_p", "must be a number in [0, 1]; 0 is off"));
    }
    Ok(())
}

/// `logit_bias` entries (token id, bias): at most [`MAX_LOGIT_BIAS`], ids inside the
/// vocabulary, biases in [-100, 100]. A repeated id (`"5"` and `"05"`) keeps its last bias.
pub fn check_logit_bias(
    entries: impl IntoIterator<Item = (u32, f32)>,
    vocab: usize,
) -> Result<Vec<(u32, f32)>, ValidationError> {
    let mut out = std::collections::BTreeMap::new();
    for (i, (t, b)) in entries.into_iter().enumerate() {
        if i >= MAX_LOGIT_BIAS {
            return Err(field("logit_bias", format!("at most {MAX_LOGIT_BIAS} entries")));
        }
        if t as usize >= vocab {
            return Err(field(
                "logit_bias",
                format!("token id {t} is outside the vocabulary (size {vocab})"),
            ));
        }
        if !(-100.0..=100.0).contains(&b) {
            return Err(field(
                "logit_bias",
                format!("the bias of token {t} must be a number in [-100, 100]"),
            ));
        }
        out.insert(t, b);
    }
    // A zero bias changes nothing: dropped, so a neutral map keeps greedy picks on the device.
    Ok(out.into_iter().filter(|&(_, b)| b != 0.0).collect())
}

/// A JSON `logit_bias`: an object from token-id strings to numbers.
fn logit_bias(v: Option<&Value>, vocab: usize) -> Result<Vec<(u32, f32)>, ValidationError> {
    let m = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(field(
                "logit_bias",
                "expected an object from token ids (strings) to biases",
            ))
        }
    };
    if m.len() > MAX_LOGIT_BIAS {
        return Err(field("logit_bias", format!("at most {MAX_LOGIT_BIAS} entries")));
    }
    // Every key that is no integer, named in one error.
    let bad: Vec<String> = m
        .keys()
        .filter(|k| k.trim().parse::<i64>().is_err())
        .map(|k| format!("`{k}`"))
        .collect();
    match bad.len() {
        0 => {}
        1 => return Err(field("logit_bias", format!("key {} is not a token id", bad[0]))),
        _ => {
            return Err(field(
                "logit_bias",
                format!("keys {} are not token ids", bad.join(", ")),
            ))
        }
    }
    let mut entries = Vec::with_capacity(m.len());
    for (k, b) in m {
        let t = k
            .trim()
            .parse::<i64>()
            .map_or(u32::MAX, |t| u32::try_from(t).unwrap_or(u32::MAX));
        let b = b.as_f64().ok_or_else(|| {
            field(
                "logit_bias",
                format!("the bias of token `{k}` must be a number in [-100, 100]"),
            )
        })?;
        // Beyond f32's range becomes infinite, still out of [-100, 100].
        entries.push((t, b as f32));
    }
    check_logit_bias(entries, vocab)
}

/// An optional JSON number (absent or null: `default`).
fn number(param: &str, v: Option<&Value>, default: f32) -> Result<f32, ValidationError> {
    match v {
        None | Some(Value::Null) => Ok(default),
        // Beyond f32's range becomes infinite, which every range check refuses.
        Some(x) => x
            .as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| field(param, "must be a number")),
    }
}

fn options(c: &Common, lim: &Limits, max_tokens: usize) -> Result<(GenerateOptions, usize), ValidationError> {
    let temperature = check_temperature(c.temperature.unwrap_or(1.0))?;
    let top_p = c.top_p.unwrap_or(1.0);
    if top_p.is_nan() || top_p <= 0.0 || top_p > 1.0 {
        return Err(field("top_p", "must be in (0, 1]"));
    }
    let top_k = match c.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => k as usize,
        _ => return Err(field("top_k", "must be -1 or 0 (no cut) or a positive integer")),
    };
    let min_tokens = to_usize(c.min_tokens.unwrap_or(0));
    if min_tokens > max_tokens {
        return Err(field("min_tokens", format!("must be ≤ max_tokens ({max_tokens})")));
    }
    let n = c.n.unwrap_or(1);
    if n == 0 || n > MAX_N {
        return Err(field("n", format!("must be in 1..={MAX_N}")));
    }
    let stop_token_ids = c.stop_token_ids.unwrap_or_default();
    check_stop_token_ids(stop_token_ids, lim.vocab_size)?;
    let stop_token_ids = stop_token_ids.to_vec();
    let presence_penalty = number("presence_penalty", c.presence_penalty, 0.0)?;
    let frequency_penalty = number("frequency_penalty", c.frequency_penalty, 0.0)?;
    let repetition_penalty = number("repetition_penalty", c.repetition_penalty, 1.0)?;
    let min_p = number("min_p", c.min_p, 0.0)?;
    check_penalties(presence_penalty, frequency_penalty, repetition_penalty, min_p)?;
    let logit_bias = logit_bias(c.logit_bias, lim.vocab_size)?;
    let o = GenerateOptions {
        max_tokens,
        min_tokens,
        sampling: SamplingParams {
            temperature,
            top_p,
            top_k,
            min_p,
            // vLLM's seeds are int64; the generator takes the same 64 bits.
            seed: c.seed.map(|s| s as u64),
            logit_bias,
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
        },
        stop: stop_strings(c.stop)?,
        stop_token_ids,
        ignore_eos: c.ignore_eos.unwrap_or(false),
        logprobs: None,
        prompt_logprobs: None,
        // Set by the caller: from the structured-output fields (`ConstraintFields`), or
        // a forced tool call's.
        constraint: None,
    };
    Ok((o, to_usize(n)))
}

/// `stream_options` only with `stream: true` (OpenAI's rule and wording).
/// vLLM's `continuous_usage_stats` (usage on every chunk) is not honoured: `true` is a 400.
fn check_stream_options(stream: Option<bool>, options: Option<&StreamOptions>) -> Result<(), ValidationError> {
    let Some(options) = options else { return Ok(()) };
    if !stream.unwrap_or(false) {
        return Err(field(
            "stream_options",
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
        ));
    }
    if options.continuous_usage_stats == Some(true) {
        return Err(field(
            "stream_options.continuous_usage_stats",
            "usage on every chunk is not supported; `include_usage` sends it once, after the last chunk",
        ));
    }
    Ok(())
}

/// `prompt + max_tokens ≤ max_model_len`, without overflow for any request numbers.
pub fn check_length(
    prompt_param: &'static str,
    max_param: &'static str,
    prompt: usize,
    max_tokens: usize,
    max_model_len: usize,
) -> Result<(), ValidationError> {
    if prompt.saturating_add(max_tokens) > max_model_len {
        return Err(ValidationError::ContextLength {
            param: if prompt >= max_model_len {
                prompt_param
            } else {
                max_param
            },
            max_model_len,
            prompt_tokens: prompt,
            max_tokens,
        });
    }
    Ok(())
}

pub fn completion(r: &CompletionRequest, lim: &Limits) -> Result<ValidCompletion, ValidationError> {
    let model = check_model(r.model.as_deref(), lim.served_model_name)?;
    not_honoured_fields!(r, suffix)?;
    // best_of = n (or 1) is plain sampling; more candidates than returned is not done.
    if let Some(b) = &r.best_of {
        let n = r.n.unwrap_or(1);
        if !(b.is_null() || b.as_u64() == Some(n) || b.as_u64() == Some(1)) {
            return Err(field(
                "best_of",
                "`best_of` other than 1 or n is not supported by this server",
            ));
        }
    }
    let echo = r.echo.unwrap_or(false);
    let max_tokens = to_usize(r.max_tokens.unwrap_or(16));
    if max_tokens == 0 && !echo {
        return Err(field("max_tokens", "must be at least 1 (0 only with `echo`)"));
    }
    let logprobs = r.logprobs;
    if logprobs.is_some_and(|k| k > MAX_LOGPROBS) {
        return Err(field("logprobs", format!("must be in 0..={MAX_LOGPROBS}")));
    }
    let (mut options, n) = options(&r.common(), lim, max_tokens)?;
    check_choices(prompt_count(&r.prompt), n, lim.max_choices)?;
    let prompts = prompts(&r.prompt, lim, r.add_special_tokens.unwrap_or(true))?;
    for p in &prompts {
        check_length("prompt", "max_tokens", p.ids.len(), max_tokens, lim.max_model_len)?;
    }
    let logprobs = logprobs.map(|k| k as usize);
    options.logprobs = logprobs;
    if echo {
        options.prompt_logprobs = logprobs;
    }
    // max_tokens 0 (echo only): the engine generates one token that is dropped.
    options.max_tokens = max_tokens.max(1);
    options.constraint = constraint_fields!(r).constraint(lim.structured)?;
    check_stream_options(r.stream, r.stream_options.as_ref())?;
    let stream_options = r.stream_options.clone().unwrap_or_default();
    Ok(ValidCompletion {
        model,
        prompts,
        options,
        max_tokens,
        n,
        stream: r.stream.unwrap_or(false),
        include_usage: stream_options.include_usage.unwrap_or(false),
        echo,
        logprobs,
    })
}

/// A message's content: a string, or a list of `{"type": "text", "text": ...}` parts.
fn content(i: usize, m: &ChatMessageIn) -> Result<String, ValidationError> {
    let param = format!("messages[{i}].content");
    match &m.content {
        Value::String(s) => Ok(s.clone()),
        // An assistant turn that only called tools has none.
        Value::Null if m.role == "assistant" => Ok(String::new()),
        Value::Null => Err(field(param, "is required")),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => {
                        return Err(field(
                            param,
                            "only text parts ({\"type\": \"text\", \"text\": ...}) are supported",
                        ))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(field(param, "expected a string or a list of text parts")),
    }
}

pub fn chat_messages(messages: &[ChatMessageIn]) -> Result<Vec<ChatMessage>, ValidationError> {
    if messages.is_empty() {
        return Err(field("messages", "must hold at least one message"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !["system", "user", "assistant", "tool", "developer"].contains(&m.role.as_str()) {
                return Err(field(
                    format!("messages[{i}].role"),
                    format!("unknown role `{}`", m.role),
                ));
            }
            let tool_calls = match &m.tool_calls {
                None => None,
                Some(_) if m.role != "assistant" => {
                    return Err(field(
                        format!("messages[{i}].tool_calls"),
                        "only `assistant` messages carry tool calls",
                    ))
                }
                Some(calls) => Some(history_tool_calls(i, calls)?),
            };
            Ok(ChatMessage {
                role: m.role.clone(),
                content: content(i, m)?,
                tool_calls,
                tool_call_id: m.tool_call_id.clone(),
                name: m.name.clone(),
            })
        })
        .collect()
}

/// An assistant message's tool calls as templates read them (as vLLM passes them): the
/// arguments JSON string parsed into an object.
fn history_tool_calls(i: usize, calls: &[super::openai::ToolCallIn]) -> Result<Vec<Value>, ValidationError> {
    calls
        .iter()
        .enumerate()
        .map(|(j, c)| {
            let p = format!("messages[{i}].tool_calls[{j}]");
            if c.kind.as_deref().is_some_and(|k| k != "function") {
                return Err(field(format!("{p}.type"), "must be \"function\""));
            }
            let arguments = match &c.function.arguments {
                Value::Null => Value::Object(Default::default()),
                Value::String(s) => serde_json::from_str::<Value>(s)
                    .ok()
                    .filter(Value::is_object)
                    .ok_or_else(|| field(format!("{p}.function.arguments"), "must be a JSON object (as a string)"))?,
                v @ Value::Object(_) => v.clone(),
                _ => {
                    return Err(field(
                        format!("{p}.function.arguments"),
                        "must be a JSON object (as a string)",
                    ))
                }
            };
            let mut call = serde_json::json!({
                "type": "function",
                "function": {"name": c.function.name, "arguments": arguments},
            });
            if let Some(id) = &c.id {
                call["id"] = Value::String(id.clone());
            }
            Ok(call)
        })
        .collect()
}

/// The messages' text together is at most `max` bytes (before templating: the template
/// adds a bounded amount per message).
pub fn check_chat_bytes(messages: &[ChatMessageIn], max: usize) -> Result<(), ValidationError> {
    let text_bytes = |v: &Value| match v {
        Value::String(s) => s.len(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(str::len)
            .sum(),
        _ => 0,
    };
    let call_bytes = |m: &ChatMessageIn| {
        m.tool_calls.iter().flatten().fold(0usize, |n, c| {
            let args = match &c.function.arguments {
                Value::String(s) => s.len(),
                v => v.to_string().len(),
            };
            n.saturating_add(c.function.name.len()).saturating_add(args)
        })
    };
    let total = messages
        .iter()
        .map(|m| {
            text_bytes(&m.content)
                .saturating_add(m.role.len())
                .saturating_add(call_bytes(m))
        })
        .fold(0usize, usize::saturating_add);
    check_prompt_bytes("messages", total, max)
}

/// The bytes of the tools' JSON: they go into the prompt with the messages, so they
/// count against the same limit.
pub fn tools_json_bytes(tools: &[Value]) -> usize {
    tools
        .iter()
        .map(|t| t.to_string().len())
        .fold(0usize, usize::saturating_add)
}

/// The variables a template gets from the request itself, which
/// `chat_template_kwargs` may not set.
const TEMPLATE_OWN_VARIABLES: [&str; 5] = ["messages", "tools", "add_generation_prompt", "bos_token", "eos_token"];

/// More template variables, by name.
pub type TemplateKwargs = serde_json::Map<String, Value>;

/// `chat_template_kwargs`: an object of more template variables (`null`: none). Its
/// JSON is counted against the prompt limit with the messages; returns its bytes.
pub fn template_kwargs(v: Option<&Value>) -> Result<(Option<&TemplateKwargs>, usize), ValidationError> {
    const PARAM: &str = "chat_template_kwargs";
    let map = match v {
        None | Some(Value::Null) => return Ok((None, 0)),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(field(PARAM, "must be an object of template variables")),
    };
    if let Some(k) = map.keys().find(|k| TEMPLATE_OWN_VARIABLES.contains(&k.as_str())) {
        return Err(field(
            format!("{PARAM}.{k}"),
            "is set by the request itself, not by chat_template_kwargs",
        ));
    }
    Ok((Some(map), serde_json::to_string(map).map_or(0, |j| j.len())))
}

/// The prompt-size limit over all a chat prompt is rendered from: the tools' JSON, the
/// template variables' JSON, then the messages in what is left, each error naming its
/// own field.
pub fn check_chat_input_bytes(
    messages: &[ChatMessageIn],
    tools_bytes: usize,
    kwargs_bytes: usize,
    max: usize,
) -> Result<(), ValidationError> {
    check_prompt_bytes("tools", tools_bytes, max)?;
    check_prompt_bytes("chat_template_kwargs", kwargs_bytes, max - tools_bytes)?;
    check_chat_bytes(messages, max - tools_bytes - kwargs_bytes)
}

/// Renders chat messages (and the tools the model may call) through the template and
/// tokenizes them (the template writes the special tokens itself). `extra`: the
/// request's `chat_template_kwargs` ([`template_kwargs`]).
pub fn chat_prompt(
    tok: &Tok,
    messages: &[ChatMessageIn],
    tools: Option<&[Value]>,
    add_generation_prompt: bool,
    extra: Option<&TemplateKwargs>,
) -> Result<Vec<u32>, ValidationError> {
    let msgs = chat_messages(messages)?;
    let text = tok
        .apply_chat_template_with_tools(&msgs, tools, add_generation_prompt, extra)
        .map_err(|e| field("messages", e.to_string()))?;
    tok.encode(&text, false).map_err(|e| field("messages", e.to_string()))
}

pub fn chat(r: &ChatCompletionRequest, lim: &Limits) -> Result<ValidChat, ValidationError> {
    let model = check_model(r.model.as_deref(), lim.served_model_name)?;
    not_honoured_fields!(r, functions, function_call)?;
    check_choices(1, to_usize(r.n.unwrap_or(1)), lim.max_choices)?;
    let tools = tool_calls::check(
        r.tools.as_ref(),
        r.tool_choice.as_ref(),
        r.parallel_tool_calls,
        lim.tok.chat_template.as_deref(),
        lim.tool_call_parser,
    )?;
    let tools_bytes = tools.as_ref().map_or(0, |t| tools_json_bytes(&t.template_tools));
    let (kwargs, kwargs_bytes) = template_kwargs(r.chat_template_kwargs.as_ref())?;
    check_chat_input_bytes(&r.messages, tools_bytes, kwargs_bytes, lim.max_prompt_bytes)?;
    let template_tools = tools.as_ref().map(|t| t.template_tools.as_slice());
    let prompt_ids = chat_prompt(lim.tok, &r.messages, template_tools, true, kwargs)?;
    if prompt_ids.is_empty() {
        return Err(field("messages", "the rendered prompt is empty"));
    }
    check_ids(&prompt_ids, lim.vocab_size, "messages")?;
    let (param, asked) = match (r.max_completion_tokens, r.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    let max_tokens = match asked {
        Some(0) => return Err(field(param, "must be at least 1")),
        Some(m) => to_usize(m),
        None => lim.max_model_len.saturating_sub(prompt_ids.len()).max(1),
    };
    let top_logprobs = r.top_logprobs.unwrap_or(0);
    if top_logprobs > MAX_LOGPROBS {
        return Err(field("top_logprobs", format!("must be in 0..={MAX_LOGPROBS}")));
    }
    if r.top_logprobs.is_some() && !r.logprobs.unwrap_or(false) {
        return Err(field("top_logprobs", "needs `logprobs: true`"));
    }
    let (mut options, n) = options(&r.common(), lim, max_tokens)?;
    check_length("messages", param, prompt_ids.len(), max_tokens, lim.max_model_len)?;
    let logprobs = r.logprobs.unwrap_or(false).then_some(top_logprobs as usize);
    options.logprobs = logprobs;
    options.constraint = constraint_fields!(r).with_tools(tools.as_ref(), lim.structured)?;
    check_stream_options(r.stream, r.stream_options.as_ref())?;
    let stream_options = r.stream_options.clone().unwrap_or_default();
    Ok(ValidChat {
        tool_output: tools.as_ref().and_then(|t| t.output()),
        model,
        prompt_ids,
        options,
        n,
        stream: r.stream.unwrap_or(false),
        include_usage: stream_options.include_usage.unwrap_or(false),
        logprobs,
    })
}
