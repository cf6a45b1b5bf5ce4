//! Tool calling: the `tools` / `tool_choice` / `parallel_tool_calls` fields checked into
//! a [`ToolPlan`], the JSON schema a forced call's output must follow, and the parsers
//! that find tool calls in what a model wrote, whole ([`parse_output`]) or while it
//! streams ([`StreamParser`]). Each model family writes calls its own way; the format is
//! chosen from the chat template (or `--tool-call-parser`).

use super::validate::{field, ValidationError};
use crate::engine::structured::StructuredOutputs;
use crate::engine::Constraint;
use crate::model::Tok;
use rand::distr::{Alphanumeric, SampleString};
use serde_json::{json, Value};

/// `--tool-call-parser`: which tool-call format to read from the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ToolCallParser {
    /// The format the model's chat template writes, if it is one of the known ones.
    #[default]
    Auto,
    Hermes,
    Llama3,
    Mistral,
    /// No parsing: `tool_choice: "auto"` is refused.
    None,
}

impl std::str::FromStr for ToolCallParser {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => ToolCallParser::Auto,
            "hermes" => ToolCallParser::Hermes,
            "llama3" | "llama3_json" => ToolCallParser::Llama3,
            "mistral" => ToolCallParser::Mistral,
            "none" => ToolCallParser::None,
            _ => return Err(format!("`{s}`: expected auto, hermes, llama3, mistral or none")),
        })
    }
}

/// A tool-call format a model writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Hermes / Qwen: `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, one or more.
    Hermes,
    /// Llama 3: the whole output is `{"name": …, "parameters": {…}}` (several joined by
    /// `;`), optionally after `<|python_tag|>`.
    Llama3,
    /// Mistral: `[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`.
    Mistral,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_MARKER: &str = "[TOOL_CALLS]";

impl ToolCallParser {
    /// The format to parse for a model with this chat template: the one named, or for
    /// `Auto` the one whose markers the template writes.
    pub fn resolve(self, template: Option<&str>) -> Option<Format> {
        match self {
            ToolCallParser::Hermes => Some(Format::Hermes),
            ToolCallParser::Llama3 => Some(Format::Llama3),
            ToolCallParser::Mistral => Some(Format::Mistral),
            ToolCallParser::None => None,
            ToolCallParser::Auto => {
                let t = template?;
                if t.contains(HERMES_OPEN) {
                    Some(Format::Hermes)
                } else if t.contains(MISTRAL_MARKER) {
                    Some(Format::Mistral)
                } else if t.contains(PYTHON_TAG) || (t.contains("<|start_header_id|>") && t.contains("tools")) {
                    Some(Format::Llama3)
                } else {
                    None
                }
            }
        }
    }
}

/// `tool_choice`, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    /// This function must be called.
    Named(String),
}

/// Schema definitions by where they sit (`$defs`, `definitions`), then by name.
type Definitions = std::collections::BTreeMap<&'static str, serde_json::Map<String, Value>>;

/// A checked `tools` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    /// Its arguments' JSON schema (an empty object schema when none was given).
    pub parameters: Value,
}

/// What a chat request asks of tool calling, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolPlan {
    pub tools: Vec<Tool>,
    /// The `tools` array as the chat template gets it (as sent).
    pub template_tools: Vec<Value>,
    pub choice: ToolChoice,
    pub parallel: bool,
    /// The format `auto` reads (resolved from the template or `--tool-call-parser`).
    pub format: Option<Format>,
}

/// How a choice's output is read.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputMode {
    /// Text with calls in the model's own format anywhere (or none).
    Auto(Format),
    /// The whole output is this function's arguments.
    Named(String),
    /// The whole output is a JSON array of `{"name", "parameters"}`.
    Required,
}

/// Tool calls of one choice: how the output is read and how ids are written.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputPlan {
    pub mode: OutputMode,
    /// Most calls returned (`parallel_tool_calls: false`: 1).
    pub max_calls: usize,
    /// Mistral's templates accept only 9-character alphanumeric call ids.
    pub short_ids: bool,
}

/// An OpenAI function name: letters, digits, `_` and `-`, at most 64.
fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `schema` with `additionalProperties: false` on every object schema that does not
/// say: a call's arguments hold the keys its function declares, as vLLM's default
/// grammar backend gives them, not keys (of any length) the model makes up.
fn closed_objects(mut schema: Value) -> Value {
    close(&mut schema);
    schema
}

fn close(v: &mut Value) {
    match v {
        Value::Object(o) => {
            if o.get("type").and_then(Value::as_str) == Some("object") && !o.contains_key("additionalProperties") {
                o.insert("additionalProperties".into(), Value::Bool(false));
            }
            // Values, not schemas, under these keys.
            for (k, sub) in o.iter_mut() {
                if !matches!(k.as_str(), "enum" | "const" | "default" | "examples") {
                    close(sub);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(close),
        _ => {}
    }
}

fn empty_object_schema() -> Value {
    json!({"type": "object", "properties": {}})
}

/// One `tools[i]` entry: `{"type": "function", "function": {"name", "description"?,
/// "parameters"?, "strict"?}}`.
fn tool(i: usize, v: &Value, forced: bool) -> Result<Tool, ValidationError> {
    let p = format!("tools[{i}]");
    let o = v.as_object().ok_or_else(|| field(&p, "expected an object"))?;
    match o.get("type").and_then(Value::as_str) {
        Some("function") => {}
        _ => return Err(field(format!("{p}.type"), "must be \"function\"")),
    }
    let f = o
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| field(format!("{p}.function"), "expected an object with the function's `name`"))?;
    let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
    if !valid_name(name) {
        return Err(field(
            format!("{p}.function.name"),
            "must be 1 to 64 letters, digits, underscores or dashes",
        ));
    }
    if let Some(d) = f.get("description") {
        if !(d.is_string() || d.is_null()) {
            return Err(field(format!("{p}.function.description"), "must be a string"));
        }
    }
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => empty_object_schema(),
        Some(s @ Value::Object(_)) => s.clone(),
        Some(_) => {
            return Err(field(
                format!("{p}.function.parameters"),
                "must be a JSON Schema object",
            ))
        }
    };
    match f.get("strict") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        // Only a forced call's output is held to the schema; `auto` output is the model's.
        Some(Value::Bool(true)) if forced => {}
        Some(Value::Bool(true)) => {
            return Err(field(
                format!("{p}.function.strict"),
                "`strict: true` is honoured only with `tool_choice` \"required\" or a named function (whose output follows the schema); leave it out for \"auto\"",
            ))
        }
        Some(_) => return Err(field(format!("{p}.function.strict"), "must be a boolean")),
    }
    Ok(Tool {
        name: name.to_string(),
        parameters,
    })
}

/// `tool_choice`: a keyword or `{"type": "function", "function": {"name": …}}`.
fn choice(v: &Value) -> Result<Option<ToolChoice>, ValidationError> {
    const SHAPE: &str =
        "expected \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}";
    Ok(Some(match v {
        Value::Null => return Ok(None),
        Value::String(s) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => return Err(field("tool_choice", SHAPE)),
        },
        Value::Object(o) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"));
            match name {
                Some(n) => ToolChoice::Named(n.to_string()),
                None => return Err(field("tool_choice", SHAPE)),
            }
        }
        _ => return Err(field("tool_choice", SHAPE)),
    }))
}

/// Checks the tool fields of a chat request against the model's chat template; `None`
/// when the request uses no tools.
pub fn check(
    tools: Option<&Value>,
    tool_choice: Option<&Value>,
    parallel_tool_calls: Option<bool>,
    template: Option<&str>,
    parser: ToolCallParser,
) -> Result<Option<ToolPlan>, ValidationError> {
    let given = tool_choice.map(choice).transpose()?.flatten();
    let forced = matches!(given, Some(ToolChoice::Required | ToolChoice::Named(_)));
    let template_tools = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(field("tools", "expected a list of tools")),
    };
    let mut checked: Vec<Tool> = Vec::with_capacity(template_tools.len());
    for (i, t) in template_tools.iter().enumerate() {
        let t = tool(i, t, forced)?;
        if checked.iter().any(|c| c.name == t.name) {
            return Err(field(
                format!("tools[{i}].function.name"),
                format!("`{}` names two tools", t.name),
            ));
        }
        checked.push(t);
    }
    let choice = given.clone().unwrap_or(if checked.is_empty() {
        ToolChoice::None
    } else {
        ToolChoice::Auto
    });
    if checked.is_empty() {
        return match choice {
            ToolChoice::None | ToolChoice::Auto => Ok(None),
            _ => Err(field("tool_choice", "needs `tools` (the request has none)")),
        };
    }
    if let ToolChoice::Named(n) = &choice {
        if !checked.iter().any(|t| &t.name == n) {
            return Err(field("tool_choice", format!("names `{n}`, which is not in `tools`")));
        }
    }
    // A template that never reads `tools` would drop them from the prompt silently.
    if !template.is_some_and(|t| t.contains("tools")) {
        return Err(field("tools", "this model's chat template does not render tools"));
    }
    let format = parser.resolve(template);
    if choice == ToolChoice::Auto && format.is_none() {
        return Err(field(
            if given.is_some() { "tool_choice" } else { "tools" },
            "`tool_choice: \"auto\"` needs a tool-call format to read, and none is known for this model's chat template (the server's --tool-call-parser); use \"required\", a named function or \"none\"",
        ));
    }
    Ok(Some(ToolPlan {
        tools: checked,
        template_tools,
        choice,
        parallel: parallel_tool_calls.unwrap_or(true),
        format,
    }))
}

impl ToolPlan {
    /// The schema a forced call's output must follow (vLLM's): the function's
    /// `parameters` for a named one; for `required` a non-empty array of
    /// `{"name", "parameters"}`, one of the tools each. Objects are closed
    /// ([`closed_objects`]).
    pub fn constraint(&self) -> Option<Constraint> {
        match &self.choice {
            ToolChoice::None | ToolChoice::Auto => None,
            ToolChoice::Named(n) => self
                .tools
                .iter()
                .find(|t| &t.name == n)
                .map(|t| Constraint::JsonSchema(closed_objects(t.parameters.clone()))),
            ToolChoice::Required => {
                // A tool's `$ref: "#/$defs/…"` points at the root of the schema it is
                // compiled in: its definitions move to the root of the combined one.
                // (A clash is refused by `checked_constraint`; here they stay in place.)
                let (parameters, definitions) = self.split_definitions().unwrap_or_else(|_| {
                    let all = self.tools.iter().map(|t| t.parameters.clone()).collect();
                    (all, Definitions::new())
                });
                let any_of: Vec<Value> = self
                    .tools
                    .iter()
                    .zip(parameters)
                    .map(|(t, parameters)| {
                        json!({
                            "type": "object",
                            "properties": {
                                "name": {"type": "string", "enum": [t.name]},
                                "parameters": parameters,
                            },
                            "required": ["name", "parameters"],
                        })
                    })
                    .collect();
                let mut schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": any_of}});
                if !self.parallel {
                    schema["maxItems"] = json!(1);
                }
                for (key, defs) in definitions {
                    schema[key] = Value::Object(defs);
                }
                Some(Constraint::JsonSchema(closed_objects(schema)))
            }
        }
    }

    /// Each tool's `parameters` without its definitions (`$defs`, `definitions`), and
    /// all of them, by key. `Err`: the index of a tool that defines a name an earlier
    /// one defines otherwise, and the name.
    fn split_definitions(&self) -> Result<(Vec<Value>, Definitions), (usize, String)> {
        let mut all = Definitions::new();
        let mut stripped = Vec::with_capacity(self.tools.len());
        for (i, t) in self.tools.iter().enumerate() {
            let mut parameters = t.parameters.clone();
            for key in ["$defs", "definitions"] {
                let Some(Value::Object(own)) = parameters.as_object_mut().and_then(|p| p.remove(key)) else {
                    continue;
                };
                let merged = all.entry(key).or_default();
                for (name, def) in own {
                    match merged.get(&name) {
                        Some(d) if *d != def => return Err((i, format!("{key}/{name}"))),
                        _ => merged.insert(name, def),
                    };
                }
            }
            stripped.push(parameters);
        }
        Ok((stripped, all))
    }

    /// [`ToolPlan::constraint`] compiled, as the structured-output fields are: a tool
    /// whose `parameters` cannot be compiled is a 400 naming it, with the compiler's
    /// account of what is wrong.
    pub fn checked_constraint(&self, structured: &StructuredOutputs) -> Result<Option<Constraint>, ValidationError> {
        let Some(c) = self.constraint() else { return Ok(None) };
        if self.choice == ToolChoice::Required {
            if let Err((i, name)) = self.split_definitions() {
                return Err(field(
                    format!("tools[{i}].function.parameters"),
                    format!("defines `{name}` otherwise than an earlier tool; with `tool_choice` \"required\" the tools' definitions share one schema"),
                ));
            }
        }
        let Err(whole) = structured.check(&c) else {
            return Ok(Some(c));
        };
        // The tool at fault: the named one, or the first whose schema fails alone.
        for (i, t) in self.tools.iter().enumerate() {
            if matches!(&self.choice, ToolChoice::Named(n) if n != &t.name) {
                continue;
            }
            if let Err(m) = structured.check(&Constraint::JsonSchema(t.parameters.clone())) {
                return Err(field(format!("tools[{i}].function.parameters"), m));
            }
        }
        Err(field(
            "tools",
            format!("the tools' `parameters` schemas cannot be combined into the schema of `tool_choice` \"required\": {whole}"),
        ))
    }

    /// How each choice's output is read; `None`: as plain text.
    pub fn output(&self) -> Option<OutputPlan> {
        let mode = match &self.choice {
            ToolChoice::None => return None,
            ToolChoice::Auto => OutputMode::Auto(self.format?),
            ToolChoice::Named(n) => OutputMode::Named(n.clone()),
            ToolChoice::Required => OutputMode::Required,
        };
        Some(OutputPlan {
            mode,
            max_calls: if self.parallel { usize::MAX } else { 1 },
            short_ids: self.format == Some(Format::Mistral),
        })
    }
}

/// A tool call found in the output.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments as a JSON string (OpenAI's `function.arguments`).
    pub arguments: String,
}

/// An output read for tool calls: the text outside them (`None` when there is none) and
/// the calls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parsed {
    pub content: Option<String>,
    pub calls: Vec<ParsedCall>,
}

impl Parsed {
    fn text(t: &str) -> Parsed {
        Parsed {
            content: Some(t.to_string()),
            calls: Vec::new(),
        }
    }
}

/// `{"name": …, <args_key>: {…}}` (the arguments as an object, or a string holding one).
fn call_from(v: &Value) -> Option<ParsedCall> {
    let o = v.as_object()?;
    let name = o.get("name")?.as_str()?.to_string();
    let args = o.get("arguments").or_else(|| o.get("parameters"));
    let arguments = match args {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(s)) => serde_json::from_str::<Value>(s)
            .ok()
            .filter(Value::is_object)?
            .to_string(),
        Some(a @ Value::Object(_)) => a.to_string(),
        Some(_) => return None,
    };
    Some(ParsedCall { name, arguments })
}

/// The JSON values at the start of `s`, separated by whitespace or `sep`, and what
/// follows them (`None` when no value parses).
fn json_values(s: &str, sep: Option<char>) -> (Vec<Value>, &str) {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        let t = rest.trim_start();
        let mut it = serde_json::Deserializer::from_str(t).into_iter::<Value>();
        match it.next() {
            Some(Ok(v)) => {
                out.push(v);
                rest = &t[it.byte_offset()..];
                let after = rest.trim_start();
                match sep {
                    Some(c) if after.starts_with(c) => rest = &after[c.len_utf8()..],
                    _ => return (out, rest),
                }
            }
            _ => return (out, rest),
        }
    }
}

fn joined(parts: &[&str]) -> Option<String> {
    let s: String = parts.concat();
    (!s.trim().is_empty()).then_some(s)
}

fn parse_hermes(text: &str) -> Parsed {
    let mut content = Vec::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(HERMES_OPEN) {
        content.push(&rest[..start]);
        let after = &rest[start + HERMES_OPEN.len()..];
        // A call cut off by the end of the output (EOS right after the JSON) still counts.
        let (body, next) = match after.find(HERMES_CLOSE) {
            Some(e) => (&after[..e], &after[e + HERMES_CLOSE.len()..]),
            None => (after, ""),
        };
        match serde_json::from_str::<Value>(body.trim())
            .ok()
            .as_ref()
            .and_then(call_from)
        {
            Some(c) => calls.push(c),
            None => return Parsed::text(text),
        }
        rest = next;
    }
    content.push(rest);
    Parsed {
        content: joined(&content),
        calls,
    }
}

fn parse_llama3(text: &str) -> Parsed {
    let t = text.trim_start();
    let t = t.strip_prefix(PYTHON_TAG).unwrap_or(t);
    if !t.trim_start().starts_with('{') {
        return Parsed::text(text);
    }
    let (values, rest) = json_values(t, Some(';'));
    let calls: Option<Vec<ParsedCall>> = values.iter().map(call_from).collect();
    match calls {
        Some(calls) if !calls.is_empty() => Parsed {
            content: joined(&[rest]),
            calls,
        },
        _ => Parsed::text(text),
    }
}

fn parse_mistral(text: &str) -> Parsed {
    let Some(at) = text.find(MISTRAL_MARKER) else {
        return Parsed::text(text);
    };
    let (values, rest) = json_values(&text[at + MISTRAL_MARKER.len()..], None);
    let items: Vec<&Value> = match values.first() {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(v @ Value::Object(_)) => vec![v],
        _ => return Parsed::text(text),
    };
    match items.into_iter().map(call_from).collect::<Option<Vec<_>>>() {
        Some(calls) if !calls.is_empty() => Parsed {
            content: joined(&[&text[..at], rest]),
            calls,
        },
        _ => Parsed::text(text),
    }
}

/// A forced call's output: the arguments object of `name`. Output cut off before the
/// object closes (`max_tokens`) is still the call, its arguments as far as they got,
/// as they stream and as vLLM answers it.
fn parse_named(name: &str, text: &str) -> Parsed {
    if text.trim().is_empty() {
        return Parsed::default();
    }
    let arguments = match serde_json::from_str::<Value>(text.trim()) {
        Ok(v @ Value::Object(_)) => v.to_string(),
        _ => text.to_string(),
    };
    Parsed {
        content: None,
        calls: vec![ParsedCall {
            name: name.to_string(),
            arguments,
        }],
    }
}

/// `required` output: `[{"name": …, "parameters": {…}}, …]`.
fn parse_required(text: &str) -> Parsed {
    let calls = match serde_json::from_str::<Value>(text.trim()) {
        Ok(Value::Array(a)) if !a.is_empty() => a.iter().map(call_from).collect::<Option<Vec<_>>>(),
        _ => None,
    };
    // Output that is no list of calls was cut off (`max_tokens`) before the list closed:
    // neither calls nor content, as OpenAI and vLLM answer it.
    Parsed {
        content: None,
        calls: calls.unwrap_or_default(),
    }
}

/// Reads a whole output for tool calls. Output that is not in the expected shape (a
/// forced call whose constraint was not met, a malformed call) is returned as content.
pub fn parse_output(plan: &OutputPlan, text: &str) -> Parsed {
    let mut p = match &plan.mode {
        OutputMode::Auto(Format::Hermes) => parse_hermes(text),
        OutputMode::Auto(Format::Llama3) => parse_llama3(text),
        OutputMode::Auto(Format::Mistral) => parse_mistral(text),
        OutputMode::Named(n) => parse_named(n, text),
        OutputMode::Required => parse_required(text),
    };
    p.calls.truncate(plan.max_calls);
    p
}

/// A fresh call id: `call_` and 24 letters or digits, or 9 of them where the template
/// demands it (Mistral).
pub fn call_id(short: bool) -> String {
    let mut rng = rand::rng();
    if short {
        Alphanumeric.sample_string(&mut rng, 9)
    } else {
        format!("call_{}", Alphanumeric.sample_string(&mut rng, 24))
    }
}

/// The finish reason of a choice whose output held `calls` tool calls: `tool_calls` when
/// the model stopped by itself after calling (a length cut stays `length`). A named
/// call ends with `stop`, as OpenAI and vLLM answer it.
pub fn finish_reason(plan: &OutputPlan, calls: usize, engine: &'static str) -> &'static str {
    if calls > 0 && engine == "stop" && !matches!(plan.mode, OutputMode::Named(_)) {
        "tool_calls"
    } else {
        engine
    }
}

/// Marker tokens the detokenizer drops as special (`<|python_tag|>`, `[TOOL_CALLS]` in
/// some vocabularies) but the parser must see: their text is put back.
#[derive(Debug, Clone, Default)]
pub struct HiddenMarkers(Vec<(u32, &'static str)>);

impl HiddenMarkers {
    pub fn new(tok: &Tok, format: Option<Format>) -> Self {
        let marker = match format {
            Some(Format::Llama3) => PYTHON_TAG,
            Some(Format::Mistral) => MISTRAL_MARKER,
            _ => return HiddenMarkers::default(),
        };
        let hidden = tok.inner().token_to_id(marker).filter(|&id| {
            tok.decode(&[id], true).is_ok_and(|s| s.is_empty()) && tok.decode(&[id], false).is_ok_and(|s| s == marker)
        });
        HiddenMarkers(hidden.map(|id| (id, marker)).into_iter().collect())
    }

    /// The text token `id` adds for the parser: `text` (what the detokenizer released,
    /// which precedes the token) and the marker when the token is one.
    pub fn visible(&self, id: u32, text: &str) -> String {
        match self.0.iter().find(|(m, _)| *m == id) {
            Some((_, marker)) => format!("{text}{marker}"),
            None => text.to_string(),
        }
    }
}

/// What streaming adds to a choice: text, or a piece of a tool call.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamPiece {
    Content(String),
    /// A call begins (OpenAI's first delta: id, type, name, empty arguments).
    CallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// More of the arguments of call `index`.
    Arguments {
        index: usize,
        fragment: String,
    },
}

/// Reads one choice's output for tool calls as it streams. Text before a call streams as
/// content; from a call's marker on, the text is held until the call can be read whole
/// (Hermes: at `</tool_call>`; Llama 3, Mistral and `required`: at the end), then the
/// call goes out. A named call's arguments stream as they are generated.
#[derive(Debug)]
pub struct StreamParser {
    plan: OutputPlan,
    /// Text not sent yet: a possible start of a marker, or a call being read.
    held: String,
    /// A call's marker was seen (Auto) or the output is the calls (Required).
    in_call: bool,
    /// Llama 3: only the start of an output can be a call; false once text went out.
    at_start: bool,
    calls: usize,
}

/// The longest end of `s` that begins `marker` (text that must wait for more).
fn marker_prefix_len(s: &str, marker: &str) -> usize {
    (1..marker.len().min(s.len() + 1))
        .rev()
        .find(|&k| s.is_char_boundary(s.len() - k) && marker.starts_with(&s[s.len() - k..]))
        .unwrap_or(0)
}

impl StreamParser {
    pub fn new(plan: OutputPlan) -> Self {
        let in_call = plan.mode == OutputMode::Required;
        StreamParser {
            plan,
            held: String::new(),
            in_call,
            at_start: true,
            calls: 0,
        }
    }

    /// Tool calls sent so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    pub fn plan(&self) -> &OutputPlan {
        &self.plan
    }

    fn emit_calls(&mut self, calls: Vec<ParsedCall>, out: &mut Vec<StreamPiece>) {
        for c in calls {
            if self.calls >= self.plan.max_calls {
                return;
            }
            let index = self.calls;
            self.calls += 1;
            out.push(StreamPiece::CallStart {
                index,
                id: call_id(self.plan.short_ids),
                name: c.name,
            });
            out.push(StreamPiece::Arguments {
                index,
                fragment: c.arguments,
            });
        }
    }

    fn emit_parsed(&mut self, p: Parsed, out: &mut Vec<StreamPiece>) {
        if let Some(c) = p.content {
            out.push(StreamPiece::Content(c));
        }
        self.emit_calls(p.calls, out);
    }

    /// The pieces `text` (the next output text) completes.
    pub fn push(&mut self, text: &str) -> Vec<StreamPiece> {
        let mut out = Vec::new();
        if text.is_empty() {
            return out;
        }
        match self.plan.mode.clone() {
            OutputMode::Named(name) => {
                if self.calls == 0 {
                    self.calls = 1;
                    out.push(StreamPiece::CallStart {
                        index: 0,
                        id: call_id(self.plan.short_ids),
                        name,
                    });
                }
                out.push(StreamPiece::Arguments {
                    index: 0,
                    fragment: text.to_string(),
                });
            }
            OutputMode::Required => self.held.push_str(text),
            OutputMode::Auto(Format::Hermes) => {
                self.held.push_str(text);
                self.hermes_drain(&mut out);
            }
            OutputMode::Auto(Format::Mistral) => {
                self.held.push_str(text);
                if !self.in_call {
                    if let Some(at) = self.held.find(MISTRAL_MARKER) {
                        let before: String = self.held.drain(..at).collect();
                        if !before.is_empty() {
                            out.push(StreamPiece::Content(before));
                        }
                        self.in_call = true;
                    } else {
                        self.release_before_marker(MISTRAL_MARKER, &mut out);
                    }
                }
            }
            OutputMode::Auto(Format::Llama3) => {
                self.held.push_str(text);
                if self.at_start && !self.in_call {
                    let t = self.held.trim_start();
                    if t.starts_with('{') || t.starts_with(PYTHON_TAG) {
                        self.in_call = true;
                    } else if !t.is_empty() && !PYTHON_TAG.starts_with(t) {
                        self.at_start = false;
                    }
                }
                if !self.at_start {
                    out.push(StreamPiece::Content(std::mem::take(&mut self.held)));
                }
            }
        }
        out
    }

    /// Sends the held text except an end that may begin `marker`.
    fn release_before_marker(&mut self, marker: &str, out: &mut Vec<StreamPiece>) {
        let keep = marker_prefix_len(&self.held, marker);
        let send: String = self.held.drain(..self.held.len() - keep).collect();
        if !send.is_empty() {
            out.push(StreamPiece::Content(send));
        }
    }

    /// Hermes: sends text up to each `<tool_call>` and each call once closed.
    fn hermes_drain(&mut self, out: &mut Vec<StreamPiece>) {
        loop {
            if self.in_call {
                let Some(end) = self.held.find(HERMES_CLOSE) else {
                    return;
                };
                let block: String = self.held.drain(..end + HERMES_CLOSE.len()).collect();
                self.in_call = false;
                let p = parse_hermes(&block);
                self.emit_parsed(p, out);
            } else if let Some(at) = self.held.find(HERMES_OPEN) {
                let before: String = self.held.drain(..at).collect();
                if !before.is_empty() {
                    out.push(StreamPiece::Content(before));
                }
                self.in_call = true;
            } else {
                self.release_before_marker(HERMES_OPEN, out);
                return;
            }
        }
    }

    /// The pieces still held when the output ends.
    pub fn finish(&mut self) -> Vec<StreamPiece> {
        let mut out = Vec::new();
        let held = std::mem::take(&mut self.held);
        if held.is_empty() {
            return out;
        }
        if self.in_call || self.plan.mode == OutputMode::Required {
            let p = parse_output(&self.plan, &held);
            self.emit_parsed(p, &mut out);
        } else {
            out.push(StreamPiece::Content(held));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(mode: OutputMode) -> OutputPlan {
        OutputPlan {
            mode,
            max_calls: usize::MAX,
            short_ids: false,
        }
    }

    fn call(name: &str, args: &str) -> ParsedCall {
        ParsedCall {
            name: name.into(),
            arguments: args.into(),
        }
    }

    #[test]
    fn hermes_calls_and_the_text_around_them() {
        let p = plan(OutputMode::Auto(Format::Hermes));
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        let r = parse_output(&p, text);
        assert_eq!(
            r.calls,
            vec![call("get_weather", r#"{"city":"Paris"}"#), call("get_time", "{}")]
        );
        assert_eq!(r.content.as_deref(), Some("Let me check.\n\n"));
        // No call: all content; a malformed call: the whole text is content.
        assert_eq!(parse_output(&p, "hello").content.as_deref(), Some("hello"));
        let bad = "<tool_call>{\"name\": 3}</tool_call>";
        assert_eq!(parse_output(&p, bad), Parsed::text(bad));
        // Cut off before the closing tag (EOS right after the JSON).
        let open = "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": 1}}";
        assert_eq!(parse_output(&p, open).calls, vec![call("f", r#"{"a":1}"#)]);
        assert_eq!(parse_output(&p, open).content, None);
    }

    #[test]
    fn llama3_json_calls_with_and_without_the_python_tag() {
        let p = plan(OutputMode::Auto(Format::Llama3));
        let r = parse_output(&p, "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}");
        assert_eq!(r.calls, vec![call("get_weather", r#"{"city":"Oslo"}"#)]);
        assert_eq!(r.content, None);
        let r = parse_output(
            &p,
            "<|python_tag|>{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"arguments\": {\"x\": [1]}}",
        );
        assert_eq!(r.calls, vec![call("a", "{}"), call("b", r#"{"x":[1]}"#)]);
        for text in ["The answer is 4.", "{not json", "{\"no_name\": 1}", "[1, 2]"] {
            assert_eq!(parse_output(&p, text), Parsed::text(text), "{text}");
        }
    }

    #[test]
    fn mistral_calls_after_the_marker() {
        let p = plan(OutputMode::Auto(Format::Mistral));
        let r = parse_output(
            &p,
            "Sure. [TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"q\": \"x\"}}, {\"name\": \"g\", \"arguments\": \"{\\\"n\\\": 2}\"}]",
        );
        assert_eq!(r.calls, vec![call("f", r#"{"q":"x"}"#), call("g", r#"{"n":2}"#)]);
        assert_eq!(r.content.as_deref(), Some("Sure. "));
        let bad = "[TOOL_CALLS] [oops";
        assert_eq!(parse_output(&p, bad), Parsed::text(bad));
        assert_eq!(parse_output(&p, "no calls").calls, vec![]);
    }

    #[test]
    fn forced_outputs_parse_and_keep_a_cut_off_call() {
        let named = plan(OutputMode::Named("f".into()));
        assert_eq!(
            parse_output(&named, " {\"a\": 1} ").calls,
            vec![call("f", r#"{"a":1}"#)]
        );
        // Cut off by max_tokens: the call so far, not content.
        let cut = parse_output(&named, "{\"a\": ");
        assert_eq!((cut.content, cut.calls), (None, vec![call("f", "{\"a\": ")]));
        let req = plan(OutputMode::Required);
        let r = parse_output(
            &req,
            "[{\"name\": \"f\", \"parameters\": {\"a\": 1}}, {\"name\": \"g\", \"parameters\": {}}]",
        );
        assert_eq!(r.calls, vec![call("f", r#"{"a":1}"#), call("g", "{}")]);
        for text in [
            "[]",
            "[{\"name\": \"f\", \"param",
            "[{\"name\": 1}]",
            "{\"name\": \"f\"}",
        ] {
            assert_eq!(parse_output(&req, text), Parsed::default(), "{text}");
        }
        let one = OutputPlan { max_calls: 1, ..req };
        assert_eq!(
            parse_output(
                &one,
                "[{\"name\": \"f\", \"parameters\": {}}, {\"name\": \"g\", \"parameters\": {}}]"
            )
            .calls
            .len(),
            1
        );
    }

    /// Feeds `text` in pieces of `step` bytes (on char boundaries) and joins what comes out.
    fn stream(p: OutputPlan, text: &str, step: usize) -> (String, Vec<(String, String)>, usize) {
        let mut sp = StreamParser::new(p);
        let mut pieces = Vec::new();
        let mut i = 0;
        while i < text.len() {
            let mut j = (i + step).min(text.len());
            while !text.is_char_boundary(j) {
                j += 1;
            }
            pieces.extend(sp.push(&text[i..j]));
            i = j;
        }
        pieces.extend(sp.finish());
        let mut content = String::new();
        let mut calls: Vec<(String, String)> = Vec::new();
        for piece in pieces {
            match piece {
                StreamPiece::Content(c) => content.push_str(&c),
                StreamPiece::CallStart { index, id, name } => {
                    assert_eq!(index, calls.len());
                    assert!(id.starts_with("call_") && id.len() == 29, "{id}");
                    calls.push((name, String::new()));
                }
                StreamPiece::Arguments { index, fragment } => calls[index].1.push_str(&fragment),
            }
        }
        (content, calls, sp.calls())
    }

    #[test]
    fn streaming_gives_what_the_whole_parse_gives() {
        let cases = [
            (
                OutputMode::Auto(Format::Hermes),
                "Checking <tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": \"<b>\"}}\n</tool_call> done <tool_ca",
            ),
            (
                OutputMode::Auto(Format::Hermes),
                "plain text with < and <tool but no call",
            ),
            (
                OutputMode::Auto(Format::Llama3),
                "  <|python_tag|>{\"name\": \"f\", \"parameters\": {\"x\": 1}}",
            ),
            (OutputMode::Auto(Format::Llama3), "<|pythonic is not a tag"),
            (
                OutputMode::Auto(Format::Mistral),
                "Über [TOOL_CALLS][{\"name\": \"f\", \"arguments\": {}}]",
            ),
            (
                OutputMode::Required,
                "[{\"name\": \"g\", \"parameters\": {\"y\": true}}]",
            ),
            (OutputMode::Named("h".into()), "{\"z\": [1, 2]}"),
        ];
        for (mode, text) in cases {
            let whole = parse_output(&plan(mode.clone()), text);
            for step in [1, 3, 7, 1000] {
                let (content, calls, n) = stream(plan(mode.clone()), text, step);
                assert_eq!(n, whole.calls.len(), "{text} / {step}");
                assert_eq!(content, whole.content.clone().unwrap_or_default(), "{text} / {step}");
                for (got, want) in calls.iter().zip(&whole.calls) {
                    assert_eq!(got.0, want.name);
                    // The named call's arguments stream raw; the others are re-serialised.
                    let parsed: Value = serde_json::from_str(&got.1).unwrap();
                    assert_eq!(parsed, serde_json::from_str::<Value>(&want.arguments).unwrap());
                }
            }
        }
    }

    #[test]
    fn tool_fields_are_checked_naming_the_field() {
        let tpl = Some("{% for t in tools %}{{ t }}{% endfor %}<tool_call>");
        let f = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
        let ok =
            |tools: &Value, choice: Option<Value>| check(Some(tools), choice.as_ref(), None, tpl, ToolCallParser::Auto);
        let plan = ok(&f, None).unwrap().unwrap();
        assert_eq!(plan.choice, ToolChoice::Auto);
        assert_eq!(plan.format, Some(Format::Hermes));
        assert_eq!(plan.constraint(), None);
        let named = ok(
            &f,
            Some(json!({"type": "function", "function": {"name": "get_weather"}})),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            named.constraint(),
            Some(Constraint::JsonSchema(
                json!({"type": "object", "additionalProperties": false})
            ))
        );
        let param = |r: Result<Option<ToolPlan>, ValidationError>| r.unwrap_err().param().unwrap();
        assert_eq!(
            param(ok(&f, Some(json!({"type": "function", "function": {"name": "nope"}})))),
            "tool_choice"
        );
        assert_eq!(param(ok(&f, Some(json!("sometimes")))), "tool_choice");
        assert_eq!(param(ok(&json!([]), Some(json!("required")))), "tool_choice");
        assert_eq!(param(ok(&json!({"a": 1}), None)), "tools");
        assert_eq!(param(ok(&json!([{"type": "code"}]), None)), "tools[0].type");
        assert_eq!(
            param(ok(&json!([{"type": "function", "function": {"name": "a b"}}]), None)),
            "tools[0].function.name"
        );
        assert_eq!(
            param(ok(
                &json!([{"type": "function", "function": {"name": "a", "parameters": 3}}]),
                None
            )),
            "tools[0].function.parameters"
        );
        let twice =
            json!([{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}]);
        assert_eq!(param(ok(&twice, None)), "tools[1].function.name");
        let strict = json!([{"type": "function", "function": {"name": "a", "strict": true}}]);
        assert_eq!(param(ok(&strict, None)), "tools[0].function.strict");
        assert!(ok(&strict, Some(json!("required"))).is_ok());
        // No parser for the template: auto is refused, forced calls are not.
        let plain = Some("{{ tools }}");
        assert_eq!(param(check(Some(&f), None, None, plain, ToolCallParser::Auto)), "tools");
        assert!(check(Some(&f), Some(&json!("required")), None, plain, ToolCallParser::Auto).is_ok());
        assert!(check(Some(&f), None, None, plain, ToolCallParser::Llama3).is_ok());
        // A template that ignores tools.
        assert_eq!(
            param(check(
                Some(&f),
                None,
                None,
                Some("{{ messages }}"),
                ToolCallParser::Hermes
            )),
            "tools"
        );
        // No tools and a neutral choice: nothing to do.
        assert_eq!(ok(&json!([]), Some(json!("auto"))).unwrap(), None);
    }

    #[test]
    fn required_schema_lists_each_tool() {
        let tools = json!([
            {"type": "function", "function": {"name": "a", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}},
            {"type": "function", "function": {"name": "b"}}
        ]);
        let plan = check(
            Some(&tools),
            Some(&json!("required")),
            Some(false),
            Some("{{tools}}"),
            ToolCallParser::None,
        )
        .unwrap()
        .unwrap();
        let Some(Constraint::JsonSchema(s)) = plan.constraint() else {
            panic!()
        };
        assert_eq!(s["minItems"], 1);
        assert_eq!(s["maxItems"], 1);
        let any = s["items"]["anyOf"].as_array().unwrap();
        assert_eq!(any[0]["properties"]["name"]["enum"], json!(["a"]));
        assert_eq!(any[0]["properties"]["parameters"]["properties"]["x"]["type"], "integer");
        assert_eq!(
            any[1]["properties"]["parameters"],
            json!({"type": "object", "properties": {}, "additionalProperties": false})
        );
        assert_eq!(any[0]["additionalProperties"], false);
        assert_eq!(plan.output().unwrap().max_calls, 1);
    }

    proptest::proptest! {
        /// Any output, cut anywhere: no panic, and every call's arguments are a JSON object.
        #[test]
        fn any_output_reads_without_panic(
            parts in proptest::collection::vec(0usize..20, 0..40),
            step in 1usize..9,
            mode in 0usize..5,
        ) {
            const BITS: [&str; 20] = ["<tool_call>", "</tool_call>", "{", "}", "\"name\"", ":", "\"f\"", ",",
                "\"arguments\"", "[TOOL_CALLS]", "<|python_tag|>", "[", "]", " ", "é", "x", ";", "<", "<tool", "\"parameters\""];
            let text: String = parts.iter().map(|&i| BITS[i]).collect();
            let mode = [
                OutputMode::Auto(Format::Hermes),
                OutputMode::Auto(Format::Llama3),
                OutputMode::Auto(Format::Mistral),
                OutputMode::Required,
                OutputMode::Named("f".into()),
            ][mode].clone();
            let named = matches!(mode, OutputMode::Named(_));
            let whole = parse_output(&plan(mode.clone()), &text);
            for c in &whole.calls {
                // A named call cut off keeps its arguments as far as they got.
                if !named {
                    proptest::prop_assert!(serde_json::from_str::<Value>(&c.arguments).is_ok_and(|v| v.is_object()));
                }
            }
            let (_, calls, _) = stream(plan(mode), &text, step);
            for (_, args) in calls {
                // A named call's arguments stream raw, before they can be checked.
                if !named {
                    proptest::prop_assert!(serde_json::from_str::<Value>(&args).is_ok_and(|v| v.is_object()));
                }
            }
        }
    }

    #[test]
    fn parser_follows_the_template() {
        let r = |t: &str| ToolCallParser::Auto.resolve(Some(t));
        assert_eq!(r("{{ '<tool_call>' }}"), Some(Format::Hermes));
        assert_eq!(r("[TOOL_CALLS]"), Some(Format::Mistral));
        assert_eq!(r("<|start_header_id|>{% if tools %}"), Some(Format::Llama3));
        assert_eq!(r("<|im_start|>"), None);
        assert_eq!(ToolCallParser::None.resolve(Some("<tool_call>")), None);
        assert_eq!("llama3".parse::<ToolCallParser>(), Ok(ToolCallParser::Llama3));
        assert!("x".parse::<ToolCallParser>().is_err());
        assert_eq!(call_id(true).len(), 9);
    }
}
