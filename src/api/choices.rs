//! Turning each choice's engine events into OpenAI responses: whole (non-streaming) or
//! as SSE chunks ending `data: [DONE]`. Both paths hold the `RequestStream`s, so a
//! client that goes away (handler or body dropped) aborts its requests.

use super::error::ApiError;
use super::openai::*;
use super::tool_calls::{self, HiddenMarkers, OutputMode, OutputPlan, StreamParser, StreamPiece};
use super::validate::{ValidChat, ValidCompletion};
use crate::engine::{EngineEvent, EngineHandle, GenerateRequest, RequestStream, TokenLogprob};
use crate::model::Tok;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use std::convert::Infallible;
use std::sync::Arc;

/// What every response of one request shares.
pub struct Ctx {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub tok: Arc<Tok>,
}

/// Submits every request or none: on an error the ones already queued are dropped
/// (aborted).
pub fn submit_all(e: &EngineHandle, reqs: Vec<GenerateRequest>) -> Result<Vec<RequestStream>, ApiError> {
    reqs.into_iter().map(|r| e.submit(r).map_err(ApiError::from)).collect()
}

/// One stream of `(choice index, event)`; each choice ends with exactly one terminal
/// item: `Finished`, `Error`, or `None` (the engine dropped it).
fn merged(streams: Vec<RequestStream>) -> impl Stream<Item = (usize, Option<EngineEvent>)> + Send {
    stream::select_all(streams.into_iter().enumerate().map(|(i, rs)| {
        stream::unfold(Some(rs), move |rs| async move {
            let mut rs = rs?;
            let ev = rs.next().await;
            let done = matches!(
                ev,
                None | Some(EngineEvent::Finished { .. }) | Some(EngineEvent::Error(_))
            );
            Some(((i, ev), (!done).then_some(rs)))
        })
        .boxed()
    }))
}

pub fn sse<S: Stream<Item = Result<Event, Infallible>> + Send + 'static>(s: S) -> Response {
    Sse::new(s).into_response()
}

fn json_event<T: serde::Serialize>(v: &T) -> Result<Event, Infallible> {
    Ok(Event::default().data(serde_json::to_string(v).unwrap_or_default()))
}

fn token_str(tok: &Tok, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

/// Top alternatives as a dict, plus the chosen token when it is not among them (vLLM).
fn top_map(tok: &Tok, lp: &TokenLogprob) -> OrderedMap {
    let mut m: Vec<(String, f32)> = lp.top.iter().map(|&(t, x)| (token_str(tok, t), x)).collect();
    if !lp.top.iter().any(|&(t, _)| t == lp.token) {
        m.push((token_str(tok, lp.token), lp.logprob));
    }
    OrderedMap(m)
}

/// What one event adds to a choice.
#[derive(Default)]
struct Piece {
    text: String,
    logprobs: Option<CompletionLogprobs>,
    chat_logprobs: Option<ChatLogprobs>,
    finish: Option<&'static str>,
    /// (prompt, completion, cached prompt) tokens, with the finish.
    usage: Option<(usize, usize, usize)>,
}

impl Piece {
    fn is_empty(&self) -> bool {
        self.text.is_empty()
            && self.finish.is_none()
            && self.logprobs.as_ref().is_none_or(|l| l.tokens.is_empty())
            && self.chat_logprobs.as_ref().is_none_or(|l| l.content.is_empty())
    }
}

/// One completions choice.
struct CompletionState {
    prompt_ids: Vec<u32>,
    prompt_text: String,
    echo: bool,
    echoed: bool,
    logprobs: Option<usize>,
    /// `max_tokens: 0` with `echo`: the one token the engine generates is dropped.
    drop_generated: bool,
    /// Byte offset of the next token in the returned text.
    offset: usize,
}

impl CompletionState {
    fn new(v: &ValidCompletion, i: usize) -> Self {
        let p = &v.prompts[i / v.n];
        CompletionState {
            prompt_ids: p.ids.clone(),
            prompt_text: p.text.clone(),
            echo: v.echo,
            echoed: false,
            logprobs: v.logprobs,
            drop_generated: v.max_tokens == 0,
            offset: 0,
        }
    }

    fn push_logprob(&mut self, acc: &mut CompletionLogprobs, tok: &Tok, id: u32, lp: Option<&TokenLogprob>) {
        let s = token_str(tok, id);
        acc.text_offset.push(self.offset);
        self.offset += s.len();
        acc.tokens.push(s);
        acc.token_logprobs.push(lp.map(|l| l.logprob));
        acc.top_logprobs.push(lp.map(|l| top_map(tok, l)));
    }

    fn on(&mut self, tok: &Tok, ev: Option<EngineEvent>) -> Result<Piece, ApiError> {
        let mut p = Piece {
            logprobs: self.logprobs.map(|_| CompletionLogprobs::default()),
            ..Default::default()
        };
        if self.echo && !self.echoed {
            self.echoed = true;
            p.text.push_str(&self.prompt_text);
            if let Some(acc) = p.logprobs.as_mut() {
                // Prompt log-probs come first when asked for; a one-token prompt has none.
                let lps = match &ev {
                    Some(EngineEvent::PromptLogprobs(l)) => l.clone(),
                    _ => Vec::new(),
                };
                for (k, id) in self.prompt_ids.clone().into_iter().enumerate() {
                    self.push_logprob(acc, tok, id, lps.get(k).and_then(|x| x.as_ref()));
                }
            }
            self.offset = self.prompt_text.len();
        }
        match ev {
            Some(EngineEvent::PromptLogprobs(_)) => {}
            Some(EngineEvent::Token { id, text, logprob }) => {
                if !self.drop_generated {
                    p.text.push_str(&text);
                    if let Some(mut acc) = p.logprobs.take() {
                        let offset = self.offset;
                        self.push_logprob(&mut acc, tok, id, logprob.as_ref());
                        // The offsets follow the text actually returned.
                        self.offset = offset + text.len();
                        p.logprobs = Some(acc);
                    }
                }
            }
            Some(EngineEvent::Finished { reason, usage }) => {
                p.finish = Some(if self.drop_generated { "length" } else { reason.as_str() });
                let completion = if self.drop_generated {
                    0
                } else {
                    usage.completion_tokens
                };
                p.usage = Some((usage.prompt_tokens, completion, usage.cached_tokens));
            }
            Some(EngineEvent::Error(m)) => return Err(ApiError::Generation(m)),
            None => {
                p.finish = Some("abort");
                p.usage = Some((self.prompt_ids.len(), 0, 0));
            }
        }
        Ok(p)
    }
}

fn add_usage(usage: &mut UsageOut, i: usize, n: usize, u: (usize, usize, usize)) {
    // The prompt (and its cached part) counts once however many choices it has.
    let first = i.is_multiple_of(n);
    usage.add(if first { u.0 } else { 0 }, u.1, if first { u.2 } else { 0 });
}

pub async fn completion_response(
    ctx: Ctx,
    v: ValidCompletion,
    streams: Vec<RequestStream>,
) -> Result<CompletionResponse, ApiError> {
    let mut states: Vec<CompletionState> = (0..streams.len()).map(|i| CompletionState::new(&v, i)).collect();
    let mut choices: Vec<CompletionChoice> = (0..streams.len())
        .map(|index| CompletionChoice {
            index,
            text: String::new(),
            logprobs: v.logprobs.map(|_| CompletionLogprobs::default()),
            finish_reason: None,
        })
        .collect();
    let mut usage = UsageOut::default();
    let mut events = std::pin::pin!(merged(streams));
    while let Some((i, ev)) = events.next().await {
        let p = states[i].on(&ctx.tok, ev)?;
        let c = &mut choices[i];
        c.text.push_str(&p.text);
        if let (Some(acc), Some(l)) = (c.logprobs.as_mut(), p.logprobs) {
            acc.append(l);
        }
        if p.finish.is_some() {
            c.finish_reason = p.finish;
        }
        if let Some(u) = p.usage {
            add_usage(&mut usage, i, v.n, u);
        }
    }
    Ok(CompletionResponse {
        id: ctx.id,
        object: "text_completion",
        created: ctx.created,
        model: ctx.model,
        choices,
        usage: Some(usage),
    })
}

pub fn completion_stream(
    ctx: Ctx,
    v: ValidCompletion,
    streams: Vec<RequestStream>,
) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    async_stream::stream! {
        let mut states: Vec<CompletionState> = (0..streams.len()).map(|i| CompletionState::new(&v, i)).collect();
        let mut usage = UsageOut::default();
        let mut events = std::pin::pin!(merged(streams));
        while let Some((i, ev)) = events.next().await {
            match states[i].on(&ctx.tok, ev) {
                Ok(p) => {
                    if let Some(u) = p.usage {
                        add_usage(&mut usage, i, v.n, u);
                    }
                    if p.is_empty() {
                        continue;
                    }
                    yield json_event(&CompletionResponse {
                        id: ctx.id.clone(),
                        object: "text_completion",
                        created: ctx.created,
                        model: ctx.model.clone(),
                        choices: vec![CompletionChoice { index: i, text: p.text, logprobs: p.logprobs, finish_reason: p.finish }],
                        usage: None,
                    });
                }
                Err(e) => {
                    yield json_event(&e.body());
                    break;
                }
            }
        }
        if v.include_usage {
            yield json_event(&CompletionResponse {
                id: ctx.id.clone(),
                object: "text_completion",
                created: ctx.created,
                model: ctx.model.clone(),
                choices: Vec::new(),
                usage: Some(usage),
            });
        }
        yield Ok(Event::default().data("[DONE]"));
    }
}

/// One chat choice.
struct ChatState {
    logprobs: Option<usize>,
    prompt_len: usize,
    /// With tool calls read from the output: marker tokens the detokenizer hides.
    markers: HiddenMarkers,
}

impl ChatState {
    fn new(tok: &Tok, v: &ValidChat) -> Self {
        let format = match v.tool_output.as_ref().map(|t| &t.mode) {
            Some(OutputMode::Auto(f)) => Some(*f),
            _ => None,
        };
        ChatState {
            logprobs: v.logprobs,
            prompt_len: v.prompt_ids.len(),
            markers: HiddenMarkers::new(tok, format),
        }
    }

    fn on(&mut self, tok: &Tok, ev: Option<EngineEvent>) -> Result<Piece, ApiError> {
        let mut p = Piece {
            chat_logprobs: self.logprobs.map(|_| ChatLogprobs::default()),
            ..Default::default()
        };
        match ev {
            Some(EngineEvent::PromptLogprobs(_)) => {}
            Some(EngineEvent::Token { id, text, logprob }) => {
                p.text = self.markers.visible(id, &text);
                if let (Some(acc), Some(lp), Some(k)) = (p.chat_logprobs.as_mut(), logprob, self.logprobs) {
                    let entry = |t: u32, x: f32| {
                        let s = token_str(tok, t);
                        TopLogprob {
                            bytes: s.as_bytes().to_vec(),
                            token: s,
                            logprob: x,
                        }
                    };
                    let chosen = entry(id, lp.logprob);
                    acc.content.push(ChatTokenLogprob {
                        top_logprobs: lp.top.iter().take(k).map(|&(t, x)| entry(t, x)).collect(),
                        token: chosen.token,
                        logprob: chosen.logprob,
                        bytes: chosen.bytes,
                    });
                }
            }
            Some(EngineEvent::Finished { reason, usage }) => {
                p.finish = Some(reason.as_str());
                p.usage = Some((usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens));
            }
            Some(EngineEvent::Error(m)) => return Err(ApiError::Generation(m)),
            None => {
                p.finish = Some("abort");
                p.usage = Some((self.prompt_len, 0, 0));
            }
        }
        Ok(p)
    }
}

pub async fn chat_response(
    ctx: Ctx,
    v: ValidChat,
    streams: Vec<RequestStream>,
) -> Result<ChatCompletionResponse, ApiError> {
    let n = streams.len();
    let mut states: Vec<ChatState> = (0..n).map(|_| ChatState::new(&ctx.tok, &v)).collect();
    let mut texts = vec![String::new(); n];
    let mut choices: Vec<ChatChoice> = (0..n)
        .map(|index| ChatChoice {
            index,
            message: ChatMessageOut {
                role: "assistant",
                content: None,
                tool_calls: None,
            },
            logprobs: v.logprobs.map(|_| ChatLogprobs::default()),
            finish_reason: None,
        })
        .collect();
    let mut usage = UsageOut::default();
    let mut events = std::pin::pin!(merged(streams));
    while let Some((i, ev)) = events.next().await {
        let p = states[i].on(&ctx.tok, ev)?;
        let c = &mut choices[i];
        texts[i].push_str(&p.text);
        if let (Some(acc), Some(mut l)) = (c.logprobs.as_mut(), p.chat_logprobs) {
            acc.content.append(&mut l.content);
        }
        if p.finish.is_some() {
            c.finish_reason = p.finish;
        }
        if let Some(u) = p.usage {
            add_usage(&mut usage, i, v.n, u);
        }
    }
    for (c, text) in choices.iter_mut().zip(texts) {
        match &v.tool_output {
            None => c.message.content = Some(text),
            Some(plan) => read_tool_calls(plan, c, &text),
        }
    }
    Ok(ChatCompletionResponse {
        id: ctx.id,
        object: "chat.completion",
        created: ctx.created,
        model: ctx.model,
        choices,
        usage,
    })
}

/// A whole choice's output read for tool calls: the calls, the text outside them, and
/// the finish reason they make.
fn read_tool_calls(plan: &OutputPlan, c: &mut ChatChoice, text: &str) {
    let parsed = tool_calls::parse_output(plan, text);
    let calls: Vec<ToolCallOut> = parsed
        .calls
        .into_iter()
        .map(|call| ToolCallOut {
            id: tool_calls::call_id(plan.short_ids),
            kind: "function",
            function: FunctionOut {
                name: call.name,
                arguments: call.arguments,
            },
        })
        .collect();
    if let Some(f) = c.finish_reason {
        c.finish_reason = Some(tool_calls::finish_reason(plan, calls.len(), f));
    }
    c.message.content = parsed.content;
    c.message.tool_calls = (!calls.is_empty()).then_some(calls);
}

/// A streamed piece as OpenAI's delta.
fn piece_delta(piece: StreamPiece) -> ChatDelta {
    match piece {
        StreamPiece::Content(c) => ChatDelta {
            content: Some(c),
            ..Default::default()
        },
        StreamPiece::CallStart { index, id, name } => ChatDelta {
            tool_calls: Some(vec![ToolCallDelta {
                index,
                id: Some(id),
                kind: Some("function"),
                function: FunctionDelta {
                    name: Some(name),
                    arguments: String::new(),
                },
            }]),
            ..Default::default()
        },
        StreamPiece::Arguments { index, fragment } => ChatDelta {
            tool_calls: Some(vec![ToolCallDelta {
                index,
                id: None,
                kind: None,
                function: FunctionDelta {
                    name: None,
                    arguments: fragment,
                },
            }]),
            ..Default::default()
        },
    }
}

pub fn chat_stream(
    ctx: Ctx,
    v: ValidChat,
    streams: Vec<RequestStream>,
) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    async_stream::stream! {
        let n = streams.len();
        let chunk = |choices: Vec<ChatChunkChoice>, usage: Option<UsageOut>| ChatCompletionChunk {
            id: ctx.id.clone(),
            object: "chat.completion.chunk",
            created: ctx.created,
            model: ctx.model.clone(),
            choices,
            usage,
        };
        for index in 0..n {
            let delta = ChatDelta { role: Some("assistant"), content: Some(String::new()), tool_calls: None };
            yield json_event(&chunk(vec![ChatChunkChoice { index, delta, logprobs: None, finish_reason: None }], None));
        }
        let mut states: Vec<ChatState> = (0..n).map(|_| ChatState::new(&ctx.tok, &v)).collect();
        let mut parsers: Vec<Option<StreamParser>> = (0..n).map(|_| v.tool_output.clone().map(StreamParser::new)).collect();
        let mut usage = UsageOut::default();
        let mut events = std::pin::pin!(merged(streams));
        while let Some((i, ev)) = events.next().await {
            match states[i].on(&ctx.tok, ev) {
                Ok(p) => {
                    if let Some(u) = p.usage {
                        add_usage(&mut usage, i, v.n, u);
                    }
                    if p.is_empty() {
                        continue;
                    }
                    let Some(parser) = parsers[i].as_mut() else {
                        let delta = ChatDelta { content: (!p.text.is_empty()).then_some(p.text), ..Default::default() };
                        let c = ChatChunkChoice { index: i, delta, logprobs: p.chat_logprobs, finish_reason: p.finish };
                        yield json_event(&chunk(vec![c], None));
                        continue;
                    };
                    let mut pieces = parser.push(&p.text);
                    let mut finish = p.finish;
                    if let Some(f) = finish {
                        pieces.extend(parser.finish());
                        finish = Some(tool_calls::finish_reason(parser.plan(), parser.calls(), f));
                    }
                    // The log-probs and the finish ride on the last chunk of this event.
                    let mut deltas: Vec<ChatDelta> = pieces.into_iter().map(piece_delta).collect();
                    if deltas.is_empty() {
                        if finish.is_none() && p.chat_logprobs.as_ref().is_none_or(|l| l.content.is_empty()) {
                            continue;
                        }
                        deltas.push(ChatDelta::default());
                    }
                    let last = deltas.len() - 1;
                    let mut logprobs = p.chat_logprobs;
                    for (k, delta) in deltas.into_iter().enumerate() {
                        let end = k == last;
                        let c = ChatChunkChoice {
                            index: i,
                            delta,
                            logprobs: if end { logprobs.take() } else { None },
                            finish_reason: if end { finish } else { None },
                        };
                        yield json_event(&chunk(vec![c], None));
                    }
                }
                Err(e) => {
                    yield json_event(&e.body());
                    break;
                }
            }
        }
        if v.include_usage {
            yield json_event(&chunk(Vec::new(), Some(usage)));
        }
        yield Ok(Event::default().data("[DONE]"));
    }
}
