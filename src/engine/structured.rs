//! Structured outputs: a request's [`Constraint`] compiled by llguidance into a matcher
//! that says, before each pick, which tokens keep the output valid, and is advanced by
//! the token picked.
//!
//! llguidance needs every token's bytes in a trie; that view of the tokenizer is built
//! once per model, on the first constrained request (it walks the whole vocabulary),
//! and shared. Compiled grammars are kept for the last few constraints seen, since
//! clients tend to send the same schema with every request; each request gets its own
//! deep copy of the parser, so the engine computes different requests' masks in
//! parallel without their sharing a lock.

use super::Constraint;
use crate::model::Tok;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex, OnceLock};

/// How many compiled constraints are kept for reuse.
const COMPILED_KEPT: usize = 16;

/// The model's structured-output compiler: the tokenizer's trie (built on first use)
/// and the constraints compiled last.
pub struct StructuredOutputs {
    tokenizer: Arc<Tok>,
    /// The model's logits row length: masks have one entry per row position.
    vocab_size: usize,
    factory: OnceLock<Result<ParserFactory, String>>,
    /// Most recently used last.
    compiled: Mutex<Vec<(Constraint, TokenParser)>>,
}

impl StructuredOutputs {
    pub fn new(tokenizer: Arc<Tok>, vocab_size: usize) -> Self {
        StructuredOutputs {
            tokenizer,
            vocab_size,
            factory: OnceLock::new(),
            compiled: Mutex::new(Vec::new()),
        }
    }

    fn factory(&self) -> Result<&ParserFactory, String> {
        self.factory
            .get_or_init(|| {
                let env = token_env(&self.tokenizer, self.vocab_size)?;
                let mut f = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                // Grammar warnings go to the request's error, not to the server's stderr.
                f.quiet();
                Ok(f)
            })
            .as_ref()
            .map_err(|e| format!("structured outputs are not available for this model's tokenizer: {e}"))
    }

    /// Compiles `c` and computes its first mask: `Err` is llguidance's account of what
    /// is wrong with it (an invalid schema, regex or grammar).
    pub fn check(&self, c: &Constraint) -> Result<(), String> {
        self.matcher(c)?.mask().map(|_| ())
    }

    /// A fresh matcher for one request's output.
    pub fn matcher(&self, c: &Constraint) -> Result<ConstraintMatcher, String> {
        let parser = self.parser(c)?;
        let matcher = Matcher::new(Ok(parser.deep_clone()));
        match matcher.get_error() {
            Some(e) => Err(e),
            None => Ok(ConstraintMatcher { matcher }),
        }
    }

    /// `c` compiled, from the kept ones or compiled now (outside the lock: a large
    /// schema takes a while, and other requests' lookups need not wait for it).
    fn parser(&self, c: &Constraint) -> Result<TokenParser, String> {
        if let Ok(mut kept) = self.compiled.lock() {
            if let Some(i) = kept.iter().position(|(k, _)| k == c) {
                let hit = kept.remove(i);
                let parser = hit.1.clone();
                kept.push(hit);
                return Ok(parser);
            }
        }
        let factory = self.factory()?;
        let grammar = grammar(c)?;
        let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| factory.create_parser(grammar)))
            .map_err(|_| "the grammar could not be compiled".to_string())?
            .map_err(|e| e.to_string())?;
        if let Ok(mut kept) = self.compiled.lock() {
            if kept.len() >= COMPILED_KEPT {
                kept.remove(0);
            }
            kept.push((c.clone(), parser.clone()));
        }
        Ok(parser)
    }
}

/// The llguidance grammar of a constraint. JSON is compact (no whitespace between
/// tokens) unless the schema sets llguidance's own `x-guidance` options: with free
/// whitespace a model can pad its output with blanks until `max_tokens`.
fn grammar(c: &Constraint) -> Result<TopLevelGrammar, String> {
    let compact = |mut schema: Value| {
        if let Value::Object(m) = &mut schema {
            m.entry("x-guidance")
                .or_insert_with(|| json!({"whitespace_flexible": false}));
        }
        TopLevelGrammar::from_json_schema(schema)
    };
    Ok(match c {
        Constraint::JsonObject => compact(json!({"type": "object"})),
        Constraint::JsonSchema(schema) => compact(schema.clone()),
        Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
        Constraint::Choice(choices) => {
            if choices.is_empty() {
                return Err("needs at least one choice".into());
            }
            // Lark string literals are JSON strings.
            let alternatives: Vec<String> = choices.iter().map(|s| Value::from(s.as_str()).to_string()).collect();
            TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
        }
        Constraint::Grammar(lark) => TopLevelGrammar::from_lark(lark.clone()),
    })
}

/// The tokenizer as llguidance sees it: every token's bytes (special tokens marked),
/// padded with never-allowed entries up to the model's logits row, and the EOS tokens.
fn token_env(tok: &Tok, vocab_size: usize) -> Result<TokEnv, String> {
    let text = tok.inner().to_string(false).map_err(|e| e.to_string())?;
    let json: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let mut words = std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
        .map_err(|_| "a token's bytes could not be read".to_string())?
        .map_err(|e| e.to_string())?;
    if words.len() > vocab_size {
        return Err(format!(
            "the tokenizer has {} tokens, more than the model's {vocab_size} logits",
            words.len()
        ));
    }
    // Ids past the tokenizer's (a padded embedding) are special tokens no grammar names.
    while words.len() < vocab_size {
        let mut w = format!(".<[{}]>", words.len()).into_bytes();
        w[0] = TokTrie::SPECIAL_TOKEN_MARKER;
        words.push(w);
    }
    let mut eos: Vec<TokenId> = tok
        .eos_ids
        .iter()
        .copied()
        .filter(|&t| (t as usize) < vocab_size)
        .collect();
    eos.sort_unstable();
    let Some(&first) = eos.first() else {
        return Err("the tokenizer has no end-of-sequence token".into());
    };
    let mut trie = TokTrie::from(&TokRxInfo::new(vocab_size as u32, first), &words);
    if eos.len() > 1 {
        trie = trie.with_eos_tokens(&eos);
    }
    Ok(Arc::new(VocabEnv { trie }))
}

/// The trie llguidance walks. Its own greedy tokenization stands in for the
/// tokenizer's: llguidance tokenizes text only for forced tokens and prompt healing,
/// which the engine does not use (it masks every pick instead).
struct VocabEnv {
    trie: TokTrie,
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }
}

/// One request's position in its grammar.
pub struct ConstraintMatcher {
    matcher: Matcher,
}

impl ConstraintMatcher {
    /// The tokens allowed next (only EOS once the grammar is complete). `Err`: the
    /// matcher failed (llguidance's message); the request cannot go on.
    pub fn mask(&mut self) -> Result<TokenMask, String> {
        self.matcher
            .compute_mask_or_eos()
            .map(TokenMask)
            .map_err(|e| e.to_string())
    }

    /// Advances past the token picked.
    pub fn accept(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// The output is complete: the grammar allows nothing more (not even optional
    /// text), so the request ends here.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped() && !self.matcher.is_error()
    }
}

/// The tokens one pick may take.
pub struct TokenMask(SimpleVob);

impl TokenMask {
    pub fn allows(&self, token: u32) -> bool {
        (token as usize) < self.0.len() && self.0.is_allowed(token)
    }

    /// Sets every disallowed token's logit to −∞.
    pub fn apply(&self, logits: &mut [f32]) {
        let len = self.0.len().min(logits.len());
        self.0.iter_unset_entries(|i| {
            if i < len {
                logits[i] = f32::NEG_INFINITY;
            }
        });
        for x in logits.iter_mut().skip(len) {
            *x = f32::NEG_INFINITY;
        }
    }
}
