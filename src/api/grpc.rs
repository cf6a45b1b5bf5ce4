//! The gRPC front end (tonic, `proto/crosskv.proto`): `crosskv.v1.Generation` and the
//! standard `grpc.health.v1.Health` service. Like the HTTP API it validates a request
//! once into an `engine::GenerateRequest`, within the same limits, and talks to the
//! engine only through its `EngineHandle`. A client that cancels a call drops the
//! request's `RequestStream`, which aborts it at the next engine step and frees its
//! blocks. With an API key every `Generation` method needs `authorization: Bearer
//! <key>` metadata; the health service stays open, like `/health`. Connections get the
//! HTTP port's bounds (`api::listener`).

use super::blocking;
use super::listener::{self, ConnectionLimits};
use super::openai::ChatMessageIn;
use super::structured;
use super::tool_calls::{self, HiddenMarkers, OutputMode, OutputPlan, StreamParser, StreamPiece, ToolCallParser};
use super::validate::{self, ValidationError};
use crate::engine::{self, EngineError, EngineEvent, EngineHandle, FinishReason, GenerateOptions};
use crate::runner::SamplingParams;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// The generated messages, server and client.
pub mod pb {
    tonic::include_proto!("crosskv.v1");
}

use pb::generation_server::{Generation, GenerationServer};

/// `max_tokens: 0` (unset in proto3) means this many, as in OpenAI's API.
pub const DEFAULT_MAX_TOKENS: usize = 16;

/// The gRPC server's own settings.
#[derive(Debug, Clone, Default)]
pub struct GrpcConfig {
    /// Bearer token every `Generation` method requires (`--api-key`).
    pub api_key: Option<String>,
    /// Longest prompt text (`None`: as the HTTP API's default).
    pub max_prompt_bytes: Option<usize>,
    pub connections: ConnectionLimits,
    /// The tool-call format read from outputs (`--tool-call-parser`).
    pub tool_call_parser: ToolCallParser,
}

/// Serves `Generation` and the health service on `addr` until `shutdown` resolves.
pub async fn serve(
    handle: EngineHandle,
    cfg: GrpcConfig,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the gRPC port {addr}: {e}"))?;
    serve_with_listener(handle, cfg, listener, shutdown).await
}

/// `serve` on a listener already bound (tests bind port 0 and read the port first).
pub async fn serve_with_listener(
    handle: EngineHandle,
    cfg: GrpcConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("gRPC listening on {addr}");
    }
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<GenerationServer<GrpcService>>().await;
    // Health follows the engine, as `/health` does: NOT_SERVING once its thread is gone.
    let watched = handle.clone();
    tokio::spawn(async move {
        while watched.is_alive() {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        reporter.set_not_serving::<GenerationServer<GrpcService>>().await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    });
    let key = cfg.api_key.clone();
    let generation = GenerationServer::with_interceptor(GrpcService::new(handle, &cfg), move |req: Request<()>| {
        check_api_key(key.as_deref(), &req)?;
        Ok(req)
    });
    let routes = tonic::service::Routes::new(health)
        .add_service(generation)
        .prepare()
        .into_axum_router();
    listener::serve(listener, routes, cfg.connections, shutdown).await?;
    Ok(())
}

/// `UNAUTHENTICATED` unless the call carries `authorization: Bearer <key>`.
fn check_api_key<T>(key: Option<&str>, req: &Request<T>) -> Result<(), Status> {
    let Some(key) = key else { return Ok(()) };
    let given = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
    if super::auth::bearer_matches(given, key) {
        Ok(())
    } else {
        Err(Status::unauthenticated(
            "a valid API key is required (metadata `authorization: Bearer <key>`)",
        ))
    }
}

/// The `Generation` service.
#[derive(Clone)]
pub struct GrpcService {
    handle: EngineHandle,
    max_prompt_bytes: usize,
    tool_call_parser: ToolCallParser,
}

impl GrpcService {
    pub fn new(handle: EngineHandle, cfg: &GrpcConfig) -> Self {
        let max_model_len = handle.config().max_model_len;
        GrpcService {
            handle,
            max_prompt_bytes: cfg
                .max_prompt_bytes
                .unwrap_or_else(|| validate::default_max_prompt_bytes(max_model_len)),
            tool_call_parser: cfg.tool_call_parser,
        }
    }

    /// `validate` on the blocking pool (it may tokenize).
    async fn checked(&self, req: pb::GenerateRequest) -> Result<Checked, Status> {
        let (handle, max, parser) = (self.handle.clone(), self.max_prompt_bytes, self.tool_call_parser);
        blocking::run(move || validate(&handle, req, max, parser))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
    }
}

/// A checked request: what the engine runs and how its output is read for tool calls.
pub struct Checked {
    pub request: engine::GenerateRequest,
    pub tool_output: Option<OutputPlan>,
}

impl Checked {
    fn markers(&self, tok: &crate::model::Tok) -> HiddenMarkers {
        let format = match self.tool_output.as_ref().map(|t| &t.mode) {
            Some(OutputMode::Auto(f)) => Some(*f),
            _ => None,
        };
        HiddenMarkers::new(tok, format)
    }
}

/// `INVALID_ARGUMENT` whose message starts with the field, as the other checks here.
fn invalid(e: ValidationError) -> Status {
    match e {
        ValidationError::Field { param, message } => Status::invalid_argument(format!("{param}: {message}")),
        e => Status::invalid_argument(e.to_string()),
    }
}

/// The chat and tool check errors, their fields named as this API spells them.
fn invalid_chat(e: ValidationError) -> Status {
    match e {
        ValidationError::Field { param, message } => {
            let param = if let Some(rest) = param.strip_prefix("tools") {
                format!("tools_json{rest}")
            } else if let Some(rest) = param.strip_prefix("messages") {
                format!("messages_json{rest}")
            } else {
                param
            };
            Status::invalid_argument(format!("{param}: {message}"))
        }
        e => invalid(e),
    }
}

/// A JSON string field (empty: absent).
fn json_field(param: &str, s: &str) -> Result<Option<serde_json::Value>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(s)
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("{param}: not valid JSON: {e}")))
}

/// A chat request's prompt (its messages and tools through the chat template) and its
/// tool plan.
fn chat_prompt(
    handle: &EngineHandle,
    req: &pb::GenerateRequest,
    max_prompt_bytes: usize,
    parser: ToolCallParser,
) -> Result<(Vec<u32>, Option<tool_calls::ToolPlan>), Status> {
    if !req.prompt.is_empty() || !req.prompt_ids.is_empty() {
        return Err(Status::invalid_argument(
            "messages_json: give messages_json or a prompt (prompt, prompt_ids), not both",
        ));
    }
    let messages: Vec<ChatMessageIn> = serde_json::from_str(&req.messages_json)
        .map_err(|e| Status::invalid_argument(format!("messages_json: expected a JSON array of messages: {e}")))?;
    let tools = json_field("tools_json", &req.tools_json)?;
    let choice = match req.tool_choice.trim_start() {
        "" => None,
        c if c.starts_with('{') => json_field("tool_choice", c)?,
        c => Some(serde_json::Value::String(c.to_string())),
    };
    let tok = handle.tokenizer();
    let plan = tool_calls::check(
        tools.as_ref(),
        choice.as_ref(),
        req.parallel_tool_calls,
        tok.chat_template.as_deref(),
        parser,
    )
    .map_err(invalid_chat)?;
    let template_tools = plan.as_ref().map(|t| t.template_tools.as_slice());
    let tools_bytes = template_tools.map_or(0, validate::tools_json_bytes);
    validate::check_prompt_bytes("tools_json", tools_bytes, max_prompt_bytes).map_err(invalid)?;
    validate::check_chat_bytes(&messages, max_prompt_bytes - tools_bytes).map_err(invalid_chat)?;
    let ids = validate::chat_prompt(tok, &messages, template_tools, true, None).map_err(invalid_chat)?;
    if ids.is_empty() {
        return Err(Status::invalid_argument("messages_json: the rendered prompt is empty"));
    }
    validate::check_ids(&ids, handle.vocab_size(), "messages_json").map_err(invalid)?;
    Ok((ids, plan))
}

/// Checks a request and turns it into the engine's form; the errors name the field.
pub fn validate(
    handle: &EngineHandle,
    req: pb::GenerateRequest,
    max_prompt_bytes: usize,
    tool_call_parser: ToolCallParser,
) -> Result<Checked, Status> {
    let vocab = handle.vocab_size();
    let mut tools = None;
    let prompt_ids = if !req.messages_json.is_empty() {
        let (ids, plan) = chat_prompt(handle, &req, max_prompt_bytes, tool_call_parser)?;
        tools = plan;
        ids
    } else if !req.tools_json.is_empty() || !req.tool_choice.is_empty() || req.parallel_tool_calls.is_some() {
        let param = if !req.tools_json.is_empty() {
            "tools_json"
        } else if !req.tool_choice.is_empty() {
            "tool_choice"
        } else {
            "parallel_tool_calls"
        };
        return Err(Status::invalid_argument(format!(
            "{param}: tools need a chat request (messages_json)"
        )));
    } else if !req.prompt_ids.is_empty() {
        if let Some((i, id)) = req.prompt_ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(Status::invalid_argument(format!(
                "prompt_ids[{i}]: token id {id} is outside the vocabulary (size {vocab})"
            )));
        }
        req.prompt_ids
    } else if !req.prompt.is_empty() {
        validate::check_prompt_bytes("prompt", req.prompt.len(), max_prompt_bytes).map_err(invalid)?;
        let ids = handle
            .tokenizer()
            .encode(&req.prompt, true)
            .map_err(|e| Status::invalid_argument(format!("prompt: cannot be tokenized: {e}")))?;
        if ids.is_empty() {
            return Err(Status::invalid_argument("prompt: tokenizes to no tokens"));
        }
        validate::check_ids(&ids, vocab, "prompt").map_err(invalid)?;
        ids
    } else {
        return Err(Status::invalid_argument(
            "prompt: empty; give a non-empty prompt or prompt_ids",
        ));
    };
    let max_tokens = match req.max_tokens {
        0 => DEFAULT_MAX_TOKENS,
        n => n as usize,
    };
    let max_model_len = handle.config().max_model_len;
    if prompt_ids.len().saturating_add(max_tokens) > max_model_len {
        return Err(Status::invalid_argument(format!(
            "max_tokens: the prompt ({} tokens) plus max_tokens ({max_tokens}) is more than max_model_len ({max_model_len})",
            prompt_ids.len()
        )));
    }
    validate::check_temperature(req.temperature).map_err(invalid)?;
    // proto3 cannot tell an unset float from 0; top_p 0 would keep nothing, so it
    // means unset (1.0).
    let top_p = if req.top_p == 0.0 { 1.0 } else { req.top_p };
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(Status::invalid_argument(format!(
            "top_p: {} must be in (0, 1]",
            req.top_p
        )));
    }
    validate::check_stop(&req.stop).map_err(invalid)?;
    let repetition_penalty = req.repetition_penalty.unwrap_or(1.0);
    validate::check_penalties(
        req.presence_penalty,
        req.frequency_penalty,
        repetition_penalty,
        req.min_p,
    )
    .map_err(invalid)?;
    let logit_bias = validate::check_logit_bias(req.logit_bias, vocab).map_err(invalid)?;
    // A forced tool call's constraint, or the request's own: not both.
    let forced = tools.as_ref().is_some_and(|t| t.constraint().is_some());
    let constraint = match req.constraint {
        Some(_) if forced => {
            return Err(Status::invalid_argument(format!(
                "constraint: {}",
                structured::FORCED_CALL_CONFLICT
            )))
        }
        Some(c) => Some(constraint(handle, c).map_err(|m| Status::invalid_argument(format!("constraint: {m}")))?),
        None => match &tools {
            Some(t) => t.checked_constraint(handle.structured()).map_err(invalid_chat)?,
            None => None,
        },
    };
    let request = engine::GenerateRequest {
        prompt_ids,
        options: GenerateOptions {
            max_tokens,
            sampling: SamplingParams {
                temperature: req.temperature,
                top_p,
                top_k: req.top_k as usize,
                min_p: req.min_p,
                seed: req.seed,
                logit_bias,
                presence_penalty: req.presence_penalty,
                frequency_penalty: req.frequency_penalty,
                repetition_penalty,
            },
            stop: req.stop,
            ignore_eos: req.ignore_eos,
            constraint,
            ..Default::default()
        },
    };
    Ok(Checked {
        request,
        tool_output: tools.as_ref().and_then(|t| t.output()),
    })
}

/// The engine's constraint for `constraint`, compiled to check it.
fn constraint(handle: &EngineHandle, c: pb::OutputConstraint) -> Result<engine::Constraint, String> {
    use pb::output_constraint::Kind;
    let c = match c
        .kind
        .ok_or("set one of json_schema, json_object, regex, choice, grammar")?
    {
        Kind::JsonSchema(s) => engine::Constraint::JsonSchema(
            serde_json::from_str(&s).map_err(|e| format!("json_schema is not valid JSON: {e}"))?,
        ),
        Kind::JsonObject(true) => engine::Constraint::JsonObject,
        Kind::JsonObject(false) => return Err("json_object must be true when set".into()),
        Kind::Regex(r) => engine::Constraint::Regex(r),
        Kind::Choice(c) if c.choices.is_empty() => return Err("choice needs at least one string".into()),
        Kind::Choice(c) => engine::Constraint::Choice(c.choices),
        Kind::Grammar(g) => engine::Constraint::Grammar(g),
    };
    handle.structured().check(&c)?;
    Ok(c)
}

/// Streamed tool-call pieces as one response's text and calls.
fn add_pieces(out: &mut pb::GenerateResponse, pieces: Vec<StreamPiece>) {
    for piece in pieces {
        match piece {
            StreamPiece::Content(c) => out.text.push_str(&c),
            StreamPiece::CallStart { index, id, name } => out.tool_calls.push(pb::ToolCall {
                index: index as u32,
                id,
                name,
                arguments: String::new(),
            }),
            StreamPiece::Arguments { index, fragment } => out.tool_calls.push(pb::ToolCall {
                index: index as u32,
                arguments: fragment,
                ..Default::default()
            }),
        }
    }
}

fn submit_status(e: EngineError) -> Status {
    match e {
        EngineError::QueueFull(_) => Status::resource_exhausted(e.to_string()),
        EngineError::ShutDown => Status::unavailable(e.to_string()),
        EngineError::Constraint(_) => Status::invalid_argument(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn finish_reason(r: FinishReason) -> String {
    r.as_str().to_string()
}

fn engine_gone() -> Status {
    Status::unavailable("the engine stopped before the request finished")
}

type GenerateStreamOut = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Generation for GrpcService {
    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        let checked = self.checked(request.into_inner()).await?;
        let markers = checked.markers(self.handle.tokenizer());
        // Dropped with this future when the client cancels: the request is aborted.
        let mut stream = self.handle.submit(checked.request).map_err(submit_status)?;
        let mut out = pb::GenerateResponse::default();
        loop {
            match stream.next().await {
                Some(EngineEvent::Token { id, text, .. }) => {
                    out.token_ids.push(id);
                    out.text.push_str(&markers.visible(id, &text));
                }
                Some(EngineEvent::Finished { reason, .. }) => {
                    out.finish_reason = finish_reason(reason);
                    if let Some(plan) = &checked.tool_output {
                        let parsed = tool_calls::parse_output(plan, &out.text);
                        out.finish_reason =
                            tool_calls::finish_reason(plan, parsed.calls.len(), reason.as_str()).to_string();
                        out.text = parsed.content.unwrap_or_default();
                        out.tool_calls = parsed
                            .calls
                            .into_iter()
                            .enumerate()
                            .map(|(index, c)| pb::ToolCall {
                                index: index as u32,
                                id: tool_calls::call_id(plan.short_ids),
                                name: c.name,
                                arguments: c.arguments,
                            })
                            .collect();
                    }
                    return Ok(Response::new(out));
                }
                Some(EngineEvent::Error(msg)) => return Err(Status::internal(msg)),
                Some(EngineEvent::PromptLogprobs(_)) => {}
                None => return Err(engine_gone()),
            }
        }
    }

    type GenerateStreamStream = GenerateStreamOut;

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let checked = self.checked(request.into_inner()).await?;
        let markers = checked.markers(self.handle.tokenizer());
        let mut parser = checked.tool_output.map(StreamParser::new);
        let mut stream = self.handle.submit(checked.request).map_err(submit_status)?;
        let (tx, rx) = mpsc::channel::<Result<pb::GenerateResponse, Status>>(64);
        tokio::spawn(async move {
            // Token ids whose text is not out yet (partial UTF-8, a held-back stop prefix).
            let mut ids = Vec::new();
            loop {
                let event = tokio::select! {
                    // The client went away: dropping `stream` aborts the request.
                    _ = tx.closed() => return,
                    e = stream.next() => e,
                };
                let msg = match event {
                    Some(EngineEvent::Token { id, text, .. }) => {
                        ids.push(id);
                        let mut out = pb::GenerateResponse::default();
                        match parser.as_mut() {
                            Some(p) => add_pieces(&mut out, p.push(&markers.visible(id, &text))),
                            None => out.text = text,
                        }
                        if out.text.is_empty() && out.tool_calls.is_empty() {
                            continue;
                        }
                        out.token_ids = std::mem::take(&mut ids);
                        Ok(out)
                    }
                    Some(EngineEvent::Finished { reason, .. }) => {
                        let mut out = pb::GenerateResponse {
                            token_ids: std::mem::take(&mut ids),
                            finish_reason: finish_reason(reason),
                            ..Default::default()
                        };
                        if let Some(p) = parser.as_mut() {
                            add_pieces(&mut out, p.finish());
                            out.finish_reason =
                                tool_calls::finish_reason(p.plan(), p.calls(), reason.as_str()).to_string();
                        }
                        Ok(out)
                    }
                    Some(EngineEvent::Error(msg)) => Err(Status::internal(msg)),
                    Some(EngineEvent::PromptLogprobs(_)) => continue,
                    None => Err(engine_gone()),
                };
                let last = !matches!(&msg, Ok(m) if m.finish_reason.is_empty());
                if tx.send(msg).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn tokenize(&self, request: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let req = request.into_inner();
        validate::check_prompt_bytes("text", req.text.len(), self.max_prompt_bytes).map_err(invalid)?;
        let handle = self.handle.clone();
        let token_ids = blocking::run(move || handle.tokenizer().encode(&req.text, req.add_special_tokens))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::invalid_argument(format!("text: cannot be tokenized: {e}")))?;
        Ok(Response::new(pb::TokenizeResponse {
            count: token_ids.len() as u32,
            token_ids,
        }))
    }

    async fn kv_status(&self, _: Request<pb::KvStatusRequest>) -> Result<Response<pb::KvStatusResponse>, Status> {
        let c = self.handle.capacity();
        let s = self.handle.status();
        Ok(Response::new(pb::KvStatusResponse {
            layers: c.layers as u32,
            kv_layers: c.kv_layers as u32,
            kv_source: c.kv_source.iter().map(|&x| x as u32).collect(),
            kv_bytes_per_token: c.kv_bytes_per_token as u64,
            non_cla_kv_bytes_per_token: c.non_cla_kv_bytes_per_token as u64,
            block_size: c.block_size as u32,
            num_blocks: c.num_blocks as u64,
            capacity_tokens: c.capacity_tokens as u64,
            max_concurrency: c.max_concurrency as u64,
            non_cla_capacity_tokens: c.non_cla_capacity_tokens as u64,
            non_cla_max_concurrency: c.non_cla_max_concurrency as u64,
            blocks_used: s.blocks_used as u64,
            blocks_free: s.blocks_free as u64,
            // Empty until the engine's first step: then nothing is in use in any slot.
            blocks_used_per_slot: if s.blocks_used_per_slot.is_empty() {
                vec![0; c.kv_layers]
            } else {
                s.blocks_used_per_slot.iter().map(|&x| x as u64).collect()
            },
            num_running: s.num_running as u32,
            num_waiting: s.num_waiting as u32,
        }))
    }
}
