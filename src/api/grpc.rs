//! The gRPC front end (tonic, `proto/crosskv.proto`): `crosskv.v1.Generation` and the
//! standard `grpc.health.v1.Health` service. Like the HTTP API it validates a request
//! once into an `engine::GenerateRequest` and talks to the engine only through its
//! `EngineHandle`. A client that cancels a call drops the request's `RequestStream`,
//! which aborts it at the next engine step and frees its blocks.

use crate::engine::{self, EngineError, EngineEvent, EngineHandle, FinishReason, GenerateOptions};
use crate::runner::SamplingParams;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// The generated messages, server and client.
pub mod pb {
    tonic::include_proto!("crosskv.v1");
}

use pb::generation_server::{Generation, GenerationServer};

/// `max_tokens: 0` (unset in proto3) means this many, as in OpenAI's API.
pub const DEFAULT_MAX_TOKENS: usize = 16;

/// Serves `Generation` and the health service on `addr` until `shutdown` resolves.
pub async fn serve(
    handle: EngineHandle,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the gRPC port {addr}: {e}"))?;
    serve_with_listener(handle, listener, shutdown).await
}

/// `serve` on a listener already bound (tests bind port 0 and read the port first).
pub async fn serve_with_listener(
    handle: EngineHandle,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("gRPC listening on {addr}");
    }
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<GenerationServer<GrpcService>>().await;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(GenerationServer::new(GrpcService { handle }))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// The `Generation` service.
#[derive(Clone)]
pub struct GrpcService {
    handle: EngineHandle,
}

impl GrpcService {
    pub fn new(handle: EngineHandle) -> Self {
        GrpcService { handle }
    }
}

/// Checks a request and turns it into the engine's form; the errors name the field.
pub fn validate(handle: &EngineHandle, req: pb::GenerateRequest) -> Result<engine::GenerateRequest, Status> {
    let prompt_ids = if !req.prompt_ids.is_empty() {
        let vocab = handle.vocab_size();
        if let Some((i, id)) = req.prompt_ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(Status::invalid_argument(format!(
                "prompt_ids[{i}]: token id {id} is outside the vocabulary (size {vocab})"
            )));
        }
        req.prompt_ids
    } else if !req.prompt.is_empty() {
        let ids = handle
            .tokenizer()
            .encode(&req.prompt, true)
            .map_err(|e| Status::invalid_argument(format!("prompt: cannot be tokenized: {e}")))?;
        if ids.is_empty() {
            return Err(Status::invalid_argument("prompt: tokenizes to no tokens"));
        }
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
    if prompt_ids.len() + max_tokens > max_model_len {
        return Err(Status::invalid_argument(format!(
            "max_tokens: the prompt ({} tokens) plus max_tokens ({max_tokens}) is more than max_model_len ({max_model_len})",
            prompt_ids.len()
        )));
    }
    if !req.temperature.is_finite() || req.temperature < 0.0 {
        return Err(Status::invalid_argument(format!(
            "temperature: {} must be a number >= 0",
            req.temperature
        )));
    }
    // proto3 cannot tell an unset float from 0; top_p 0 would keep nothing, so it
    // means unset (1.0).
    let top_p = if req.top_p == 0.0 { 1.0 } else { req.top_p };
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(Status::invalid_argument(format!(
            "top_p: {} must be in (0, 1]",
            req.top_p
        )));
    }
    Ok(engine::GenerateRequest {
        prompt_ids,
        options: GenerateOptions {
            max_tokens,
            sampling: SamplingParams {
                temperature: req.temperature,
                top_p,
                top_k: req.top_k as usize,
                seed: req.seed,
            },
            stop: req.stop,
            ignore_eos: req.ignore_eos,
            ..Default::default()
        },
    })
}

fn submit_status(e: EngineError) -> Status {
    match e {
        EngineError::QueueFull(_) => Status::resource_exhausted(e.to_string()),
        EngineError::ShutDown => Status::unavailable(e.to_string()),
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
        let req = validate(&self.handle, request.into_inner())?;
        // Dropped with this future when the client cancels: the request is aborted.
        let mut stream = self.handle.submit(req).map_err(submit_status)?;
        let mut out = pb::GenerateResponse::default();
        loop {
            match stream.next().await {
                Some(EngineEvent::Token { id, text, .. }) => {
                    out.token_ids.push(id);
                    out.text.push_str(&text);
                }
                Some(EngineEvent::Finished { reason, .. }) => {
                    out.finish_reason = finish_reason(reason);
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
        let req = validate(&self.handle, request.into_inner())?;
        let mut stream = self.handle.submit(req).map_err(submit_status)?;
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
                        if text.is_empty() {
                            continue;
                        }
                        Ok(pb::GenerateResponse {
                            text,
                            token_ids: std::mem::take(&mut ids),
                            finish_reason: String::new(),
                        })
                    }
                    Some(EngineEvent::Finished { reason, .. }) => Ok(pb::GenerateResponse {
                        text: String::new(),
                        token_ids: std::mem::take(&mut ids),
                        finish_reason: finish_reason(reason),
                    }),
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
        let token_ids = self
            .handle
            .tokenizer()
            .encode(&req.text, req.add_special_tokens)
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
