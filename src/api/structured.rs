//! The structured-output request fields read into the engine's [`Constraint`]:
//! OpenAI's `response_format`, vLLM's `structured_outputs` and its older `guided_json`,
//! `guided_regex`, `guided_choice` and `guided_grammar`. At most one may be set; each
//! is compiled here, so an invalid schema, regex or grammar is a 400 naming its field
//! with llguidance's account of what is wrong. A chat request's forced tool call sets
//! its own constraint, compiled the same way; it and these fields exclude each other.

use super::tool_calls::ToolPlan;
use super::validate::{field, ValidationError};
use crate::engine::structured::StructuredOutputs;
use crate::engine::Constraint;
use serde_json::Value;

/// The structured-output fields of one request, as sent.
pub struct ConstraintFields<'a> {
    pub response_format: Option<&'a Value>,
    pub structured_outputs: Option<&'a Value>,
    pub guided_json: Option<&'a Value>,
    pub guided_regex: Option<&'a Value>,
    pub guided_choice: Option<&'a Value>,
    pub guided_grammar: Option<&'a Value>,
}

impl ConstraintFields<'_> {
    /// The one constraint the fields ask for, checked by compiling it; `None` when
    /// none is set (absent, null, or `response_format` `{"type": "text"}`).
    pub fn constraint(&self, structured: &StructuredOutputs) -> Result<Option<Constraint>, ValidationError> {
        let Some((name, c)) = self.read()? else { return Ok(None) };
        structured.check(&c).map_err(|m| field(name, m))?;
        Ok(Some(c))
    }

    /// The constraint of a chat request: a forced tool call's or the fields'. A forced
    /// call's output is already held to the tool's `parameters` schema and cannot follow
    /// a second constraint, so vLLM's fields with one are a 400 naming the field.
    /// OpenAI's `response_format` is accepted (checked, as always): it shapes the
    /// message's content, and a forced call's answer has none, only the call, as with
    /// OpenAI and vLLM.
    pub fn with_tools(
        &self,
        tools: Option<&ToolPlan>,
        structured: &StructuredOutputs,
    ) -> Result<Option<Constraint>, ValidationError> {
        let forced = tools.is_some_and(|t| t.constraint().is_some());
        if !forced {
            return self.constraint(structured);
        }
        match self.read()? {
            Some(("response_format", c)) => structured.check(&c).map_err(|m| field("response_format", m))?,
            Some((name, _)) => return Err(field(name, FORCED_CALL_CONFLICT)),
            None => {}
        }
        tools.map_or(Ok(None), |t| t.checked_constraint(structured))
    }

    /// The set field's name and its constraint, not yet compiled.
    fn read(&self) -> Result<Option<(&'static str, Constraint)>, ValidationError> {
        let given = [
            ("response_format", self.response_format, response_format as Reader),
            ("structured_outputs", self.structured_outputs, structured_outputs),
            ("guided_json", self.guided_json, json_schema),
            ("guided_regex", self.guided_regex, regex),
            ("guided_choice", self.guided_choice, choice),
            ("guided_grammar", self.guided_grammar, grammar),
        ];
        let mut found: Option<(&'static str, Constraint)> = None;
        for (name, v, read) in given {
            let Some(v) = v.filter(|v| !v.is_null()) else { continue };
            let Some(c) = read(v).map_err(|m| field(name, m))? else {
                continue;
            };
            if let Some((first, _)) = &found {
                return Err(field(
                    name,
                    format!("only one structured-output constraint per request: `{first}` is set already"),
                ));
            }
            found = Some((name, c));
        }
        Ok(found)
    }
}

/// Why a structured-output constraint is refused next to a forced tool call.
pub const FORCED_CALL_CONFLICT: &str = "cannot be combined with a forced tool call (`tool_choice` \"required\" or a named function): the call's arguments follow the tool's `parameters` schema; leave one of them out";

/// Reads one field: `Ok(None)` when it asks for no constraint.
type Reader = fn(&Value) -> Result<Option<Constraint>, String>;

/// `{"type": "text"}`, `{"type": "json_object"}` or
/// `{"type": "json_schema", "json_schema": {"name": .., "schema": {..}, "strict": ..}}`.
fn response_format(v: &Value) -> Result<Option<Constraint>, String> {
    let kind = v.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonObject)),
        Some("json_schema") => {
            let schema = v
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or("`json_schema.schema` is required with type `json_schema`")?;
            json_schema(schema)
        }
        _ => Err("`type` must be `text`, `json_object` or `json_schema`".into()),
    }
}

/// vLLM's `{"json": .., "regex": .., "choice": [..], "grammar": .., "json_object": true}`:
/// exactly one key set.
fn structured_outputs(v: &Value) -> Result<Option<Constraint>, String> {
    let obj = v.as_object().ok_or("expected an object")?;
    let mut found: Option<(&str, Constraint)> = None;
    for (key, v) in obj.iter().filter(|(_, v)| !v.is_null()) {
        let c = match key.as_str() {
            "json" => json_schema(v)?,
            "regex" => regex(v)?,
            "choice" => choice(v)?,
            "grammar" => grammar(v)?,
            "json_object" => match v {
                Value::Bool(true) => Some(Constraint::JsonObject),
                Value::Bool(false) => None,
                _ => return Err("`json_object` must be a boolean".into()),
            },
            other => {
                return Err(format!(
                    "`{other}` is not supported by this server; set one of `json`, `regex`, `choice`, `grammar`, `json_object`"
                ))
            }
        };
        let Some(c) = c else { continue };
        if let Some((first, _)) = &found {
            return Err(format!(
                "set exactly one of its keys: `{first}` and `{key}` are both set"
            ));
        }
        found = Some((key, c));
    }
    match found {
        Some((_, c)) => Ok(Some(c)),
        None => Err("set exactly one of `json`, `regex`, `choice`, `grammar`, `json_object`".into()),
    }
}

/// A JSON Schema: an object or a boolean, or a string holding one.
fn json_schema(v: &Value) -> Result<Option<Constraint>, String> {
    let schema = match v {
        Value::String(s) => serde_json::from_str(s).map_err(|e| format!("the schema is not valid JSON: {e}"))?,
        Value::Object(_) | Value::Bool(_) => v.clone(),
        _ => return Err("expected a JSON Schema (an object, or a string holding one)".into()),
    };
    Ok(Some(Constraint::JsonSchema(schema)))
}

fn regex(v: &Value) -> Result<Option<Constraint>, String> {
    let rx = v.as_str().ok_or("expected a regular expression (a string)")?;
    Ok(Some(Constraint::Regex(rx.to_string())))
}

fn choice(v: &Value) -> Result<Option<Constraint>, String> {
    let items = v.as_array().ok_or("expected a list of strings")?;
    let choices: Vec<String> = items
        .iter()
        .map(|c| c.as_str().map(String::from))
        .collect::<Option<_>>()
        .ok_or("expected a list of strings")?;
    if choices.is_empty() || choices.iter().any(String::is_empty) {
        return Err("expected a non-empty list of non-empty strings".into());
    }
    Ok(Some(Constraint::Choice(choices)))
}

fn grammar(v: &Value) -> Result<Option<Constraint>, String> {
    let g = v.as_str().ok_or("expected a grammar (a string, in Lark syntax)")?;
    Ok(Some(Constraint::Grammar(g.to_string())))
}
