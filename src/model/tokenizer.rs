//! Tokenizer and chat template: from `tokenizer.json` + `tokenizer_config.json`, or
//! built from GGUF metadata (gpt2 byte-level BPE, llama sentencepiece). Chat templates
//! render with minijinja (with Python string methods, as HF templates expect).

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;
use tokenizers::decoders::{byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence as DecSeq, strip::Strip};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{prepend::Prepend, replace::Replace, Sequence as NormSeq};
use tokenizers::pre_tokenizers::{byte_level::ByteLevel, digits::Digits, sequence::Sequence as PreSeq};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer: {0}")]
    Load(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("tokenizer: {0}")]
    Encode(String),
}

fn load_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Load(e.to_string())
}

/// One message as the chat template reads it (the keys transformers passes: absent
/// ones stay undefined, as templates test them with `is defined` / `in message`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant message's calls: `{"id", "type": "function", "function": {"name",
    /// "arguments"}}` with the arguments as an object, as templates index them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
    /// A `tool` message: the call it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            ..Default::default()
        }
    }
}

pub struct Tok {
    tokenizer: Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Every token id that ends generation.
    pub eos_ids: HashSet<u32>,
    pub chat_template: Option<String>,
}

fn token_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

fn gguf_str(ct: &gguf_file::Content, key: &str) -> Option<String> {
    ct.metadata.get(key).and_then(|v| v.to_string().ok()).cloned()
}
fn gguf_u32(ct: &gguf_file::Content, key: &str) -> Option<u32> {
    ct.metadata
        .get(key)
        .and_then(|v| v.to_u32().ok().or_else(|| v.to_i32().ok().map(|x| x as u32)))
}

/// A llama (sentencepiece) tokenizer from GGUF vocab and scores: byte-fallback BPE whose
/// merges are derived from the vocabulary, ranked by the merged piece's score, as
/// Hugging Face's converter does.
fn spm_from_gguf(ct: &gguf_file::Content) -> Result<Tokenizer, TokenizerError> {
    let tokens: Vec<String> = ct
        .metadata
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .ok_or_else(|| load_err("GGUF has no tokenizer.ggml.tokens"))?
        .iter()
        .map(|v| v.to_string().cloned().unwrap_or_default())
        .collect();
    let scores: Vec<f32> = match ct.metadata.get("tokenizer.ggml.scores").and_then(|v| v.to_vec().ok()) {
        Some(s) => s.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
        None => vec![0.0; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut merges: Vec<(f32, u32, String, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        let chars: Vec<(usize, char)> = piece.char_indices().collect();
        for &(split, _) in chars.iter().skip(1) {
            let (l, r) = piece.split_at(split);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                merges.push((
                    scores.get(id).copied().unwrap_or(0.0),
                    id as u32,
                    l.to_string(),
                    r.to_string(),
                ));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let unk = gguf_u32(ct, "tokenizer.ggml.unknown_token_id").and_then(|i| tokens.get(i as usize).cloned());
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges.into_iter().map(|m| (m.2, m.3)).collect::<Vec<_>>())
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(u) = unk {
        builder = builder.unk_token(u);
    }
    let mut tk = Tokenizer::new(builder.build().map_err(load_err)?);
    tk.with_normalizer(Some(NormSeq::new(vec![
        Prepend::new("▁".into()).into(),
        Replace::new(" ", "▁").map_err(load_err)?.into(),
    ])))
    .map_err(load_err)?;
    tk.with_decoder(Some(DecSeq::new(vec![
        Replace::new("▁", " ").map_err(load_err)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ])));
    let bos = gguf_u32(ct, "tokenizer.ggml.bos_token_id").and_then(|i| tokens.get(i as usize).map(|t| (t.clone(), i)));
    let add_bos = ct
        .metadata
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    if let (Some((bos, id)), true) = (bos, add_bos) {
        let tp = TemplateProcessing::builder()
            .try_single(format!("{bos} $0"))
            .map_err(load_err)?
            .special_tokens(vec![(bos.clone(), id)])
            .build()
            .map_err(load_err)?;
        tk.with_post_processor(Some(tp));
    }
    let specials: Vec<AddedToken> = [
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
    ]
    .iter()
    .filter_map(|k| gguf_u32(ct, k))
    .filter_map(|i| tokens.get(i as usize))
    .map(|t| AddedToken::from(t.clone(), true))
    .collect();
    tk.add_special_tokens(specials).map_err(load_err)?;
    Ok(tk)
}

impl Tok {
    /// From a HF directory: `tokenizer.json`, plus `tokenizer_config.json` and
    /// `generation_config.json` when present.
    pub fn from_dir(dir: &Path, config_eos: &[u32]) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| load_err(format!("{}: {e}", path.display())))?;
        let tc: Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null);
        let chat_template = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take the default one.
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| a.first())
                .and_then(|t| t.get("template")?.as_str().map(String::from)),
            _ => None,
        }
        .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        let mut eos_ids: HashSet<u32> = config_eos.iter().copied().collect();
        let gen: Value = std::fs::read_to_string(dir.join("generation_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null);
        match gen.get("eos_token_id") {
            Some(Value::Number(n)) => eos_ids.extend(n.as_u64().map(|x| x as u32)),
            Some(Value::Array(a)) => eos_ids.extend(a.iter().filter_map(|x| x.as_u64().map(|x| x as u32))),
            _ => {}
        }
        let eos_token = tc.get("eos_token").and_then(token_str);
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            eos_ids.insert(id);
        }
        Ok(Tok {
            bos_token: tc.get("bos_token").and_then(token_str),
            eos_token,
            eos_ids,
            chat_template,
            tokenizer,
        })
    }

    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self, TokenizerError> {
        let kind = gguf_str(ct, "tokenizer.ggml.model").unwrap_or_default();
        let mut tokenizer = match kind.as_str() {
            "gpt2" => {
                let mut tk = Tokenizer::from_gguf(ct).map_err(load_err)?;
                // candle does not know SmolLM's pre-tokenizer: digits split one by one,
                // then byte-level with no prefix space (as its tokenizer.json says).
                if gguf_str(ct, "tokenizer.ggml.pre").as_deref() == Some("smollm") {
                    tk.with_pre_tokenizer(Some(PreSeq::new(vec![
                        Digits::new(true).into(),
                        ByteLevel::new(false, true, true).into(),
                    ])));
                }
                tk
            }
            "llama" => spm_from_gguf(ct)?,
            other => {
                return Err(load_err(format!(
                    "GGUF tokenizer model `{other}` is not supported (gpt2, llama)"
                )))
            }
        };
        let _ = &mut tokenizer;
        let id_tok = |key: &str| gguf_u32(ct, key).and_then(|i| tokenizer.id_to_token(i));
        let mut eos_ids = HashSet::new();
        eos_ids.extend(gguf_u32(ct, "tokenizer.ggml.eos_token_id"));
        eos_ids.extend(gguf_u32(ct, "tokenizer.ggml.eot_token_id"));
        Ok(Tok {
            bos_token: id_tok("tokenizer.ggml.bos_token_id"),
            eos_token: id_tok("tokenizer.ggml.eos_token_id"),
            eos_ids,
            chat_template: gguf_str(ct, "tokenizer.chat_template"),
            tokenizer,
        })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        self.tokenizer
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Renders `messages` through the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        self.apply_chat_template_with_tools(messages, None, add_generation_prompt, None)
    }

    /// Renders `messages` and the `tools` the model may call (OpenAI's list of
    /// `{"type": "function", "function": {…}}`, as transformers passes it; `none` when
    /// absent). `extra`: more variables for the template (a request's
    /// `chat_template_kwargs`, e.g. `enable_thinking`); the ones set here win over them.
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
        extra: Option<&serde_json::Map<String, Value>>,
    ) -> Result<String, TokenizerError> {
        let tpl = self
            .chat_template
            .as_deref()
            .ok_or_else(|| TokenizerError::Template("the model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_filter("tojson", python_tojson);
        // Jinja2's `iterable` is `iter(x)` succeeding: false for none. minijinja iterates
        // none as empty, which breaks templates that guard `tools | length` with
        // `tools is iterable` when a request has no tools.
        env.add_test("iterable", |v: minijinja::Value| {
            !v.is_none() && !v.is_undefined() && v.try_iter().is_ok()
        });
        env.add_template("chat", tpl)
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        env.get_template("chat")
            .and_then(|t| {
                let own = minijinja::context! {
                    messages => messages,
                    tools => tools,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos_token.clone().unwrap_or_default(),
                    eos_token => self.eos_token.clone().unwrap_or_default(),
                };
                match extra {
                    Some(extra) => t.render(minijinja::value::merge_maps([
                        own,
                        minijinja::Value::from_serialize(extra),
                    ])),
                    None => t.render(own),
                }
            })
            .map_err(|e| TokenizerError::Template(e.to_string()))
    }
}

/// The `tojson` filter as transformers defines it for chat templates: Python's
/// `json.dumps` (`", "` and `": "` separators, keys in their order, no HTML escaping,
/// `indent` as a keyword or the first argument), so a prompt shows tools and arguments
/// the way the model was trained on them.
fn python_tojson(
    v: minijinja::Value,
    indent: Option<minijinja::Value>,
    kwargs: minijinja::value::Kwargs,
) -> Result<minijinja::Value, minijinja::Error> {
    let indent = match kwargs.get::<Option<minijinja::Value>>("indent")?.or(indent) {
        Some(i) if i.is_none() => None,
        Some(i) => Some(usize::try_from(i)?),
        None => None,
    };
    // Accepted as transformers accepts them; only their Python defaults are written.
    for k in ["ensure_ascii", "separators", "sort_keys"] {
        let _ = kwargs.get::<Option<minijinja::Value>>(k)?;
    }
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&v)
        .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::BadSerialization, e.to_string()))?;
    let mut out = String::new();
    write_python_json(&mut out, &json, indent, 0);
    Ok(minijinja::Value::from_safe_string(out))
}

fn write_python_json(out: &mut String, v: &Value, indent: Option<usize>, depth: usize) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    // Python's separator after an item: "," before a newline, ", " on one line.
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_python_json(out, x, indent, depth + 1);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(m) if !m.is_empty() => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_python_json(out, x, indent, depth + 1);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// What `now` adds after `before`'s length. A decoder may rewrite earlier text (a
/// cleanup of spaces, a replacement character resolved), so `before.len()` need not fall
/// on a character boundary of `now`: the piece starts at the next one.
fn new_suffix<'a>(before: &str, now: &'a str) -> &'a str {
    let mut cut = before.len().min(now.len());
    while !now.is_char_boundary(cut) {
        cut += 1;
    }
    &now[cut..]
}

/// Turns a growing list of token ids into text pieces as they become printable: a
/// piece is emitted only once it no longer ends in a partial UTF-8 character.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl StreamDecoder {
    pub fn push(&mut self, tok: &Tok, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tok.decode(&self.ids[self.prefix..], true)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            let piece = new_suffix(&before, &now).to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod stream_tests {
    #[test]
    fn the_new_piece_starts_on_a_character_boundary_even_when_earlier_text_changed() {
        assert_eq!(super::new_suffix("ab", "abcd"), "cd");
        // "é" is two bytes: a cut at 2 would fall inside it.
        assert_eq!(super::new_suffix("xy", "aéz"), "z");
        assert_eq!(super::new_suffix("xyz", "a"), "");
        assert_eq!(super::new_suffix("", "é"), "é");
    }
}

#[cfg(test)]
mod tojson_tests {
    fn render(tpl: &str, value: serde_json::Value) -> String {
        let mut env = minijinja::Environment::new();
        env.add_filter("tojson", super::python_tojson);
        env.add_template("t", tpl).unwrap();
        env.get_template("t")
            .unwrap()
            .render(minijinja::context! { v => value })
            .unwrap()
    }

    #[test]
    fn tojson_writes_as_python_json_dumps() {
        let v = serde_json::json!({"name": "f", "arguments": {"b": [1, 2.5], "a": "<é>"}, "e": {}});
        // Keys in their order, ", " and ": ", no HTML escaping, non-ASCII as is.
        let want = r#"{"name": "f", "arguments": {"b": [1, 2.5], "a": "<é>"}, "e": {}}"#;
        assert_eq!(render("{{ v | tojson }}", v.clone()), want);
        assert_eq!(
            render("{{ v.arguments | tojson(indent=2) }}", v.clone()),
            "{\n  \"b\": [\n    1,\n    2.5\n  ],\n  \"a\": \"<é>\"\n}"
        );
        assert_eq!(render("{{ v.e | tojson(2) }}", v), "{}");
    }
}
