//! What a front end hands the engine and what it gets back. A request is validated
//! once (front end) into a `GenerateRequest`; its outputs arrive on its own channel as
//! `EngineEvent`s. Dropping the receiver aborts the request at the next step.

use crate::runner::SamplingParams;
use serde::Serialize;

pub type RequestId = u64;

/// Per-request generation options, already validated.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    /// EOS and stop tokens are ignored until this many tokens were generated.
    pub min_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop strings: matched across token boundaries, never included in the output.
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Log-probs of each generated token, with this many top alternatives.
    pub logprobs: Option<usize>,
    /// Log-probs of the prompt tokens (for `echo`), with this many top alternatives.
    pub prompt_logprobs: Option<usize>,
    /// A grammar the output must follow: each step's pick is masked to the tokens that
    /// keep it valid.
    pub constraint: Option<Constraint>,
}

/// What a constrained request's output must be (OpenAI's `response_format`, vLLM's
/// `structured_outputs`, a forced tool call's arguments).
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Any JSON object.
    JsonObject,
    /// JSON valid against this JSON Schema.
    JsonSchema(serde_json::Value),
    /// Text matching this regular expression in full.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text of this grammar (Lark syntax, or GBNF as llama.cpp writes it).
    Grammar(String),
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 16,
            min_tokens: 0,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
            constraint: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub options: GenerateOptions,
}

/// Why a request ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the model's context.
    Length,
    /// Cancelled (client gone, shutdown).
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Made by the sampler ([`crate::runner::sampler::token_logprob`]).
pub use crate::runner::sampler::TokenLogprob;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// Once, before any token, when `prompt_logprobs` was asked for: one entry per
    /// prompt token, the first `None` (nothing precedes it).
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    /// One generated token and the text it made printable (may be empty: partial
    /// UTF-8, or text held back while it could still be the start of a stop string).
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// The last event of a request.
    Finished { reason: FinishReason, usage: Usage },
    /// The request failed; nothing follows.
    Error(String),
}

/// What the engine thread sends a request's stream: token ids, not text. The stream
/// ([`super::RequestStream`]) detokenizes and matches stop strings on the caller's
/// thread, so that work grows with the caller's requests, not with the engine's batch.
#[derive(Debug)]
pub(super) enum EngineOutput {
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    Token {
        id: u32,
        logprob: Option<TokenLogprob>,
        /// False for EOS and stop tokens, whose text is never shown.
        decode: bool,
        /// The engine ends the request with this token (EOS, a stop token, a length
        /// limit): text held back as a possible stop-string start goes out with it.
        last: bool,
        /// Prompt tokens served from the prefix cache.
        cached_tokens: usize,
    },
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
    Error(String),
}
