//! The OpenAI-compatible HTTP API (axum): the router, its layers (API key, body limit,
//! request timeout, tracing) and the handlers. The port is served while the model loads
//! (`/health` answers 503 until `AppState::set_ready`, and again if the engine dies).
//! Parsing, tokenizing and detokenizing run on the blocking pool (`api::blocking`), never
//! on the few async workers that serve every connection.

use super::blocking;
use super::choices::{self, submit_all};
use super::error::ApiError;
use super::listener::{self, ConnectionLimits};
use super::openai::*;
use super::tool_calls::{self, ToolCallParser};
use super::validate::{self, Limits, ValidationError};
use crate::engine::EngineHandle;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The HTTP server's own settings (the engine has its own).
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub served_model_name: String,
    /// Bearer token required on every route but `/health` and `/metrics`.
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    /// Until the response starts (a stream runs as long as it runs).
    pub request_timeout: Duration,
    /// Longest prompt text accepted before tokenizing (`None`: `max_model_len` ×
    /// `validate::PROMPT_BYTES_PER_TOKEN`).
    pub max_prompt_bytes: Option<usize>,
    /// The tool-call format read from outputs (`--tool-call-parser`).
    pub tool_call_parser: ToolCallParser,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            served_model_name: "model".into(),
            api_key: None,
            max_body_bytes: 32 << 20,
            request_timeout: Duration::from_secs(600),
            max_prompt_bytes: None,
            tool_call_parser: ToolCallParser::Auto,
        }
    }
}

struct StateInner {
    engine: OnceLock<EngineHandle>,
    cfg: HttpConfig,
    created: u64,
}

/// Shared by every handler; the engine arrives once the model has loaded.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl AppState {
    /// A server still loading its model.
    pub fn loading(cfg: HttpConfig) -> Self {
        AppState {
            inner: Arc::new(StateInner {
                engine: OnceLock::new(),
                cfg,
                created: unix_now(),
            }),
        }
    }
    pub fn ready(cfg: HttpConfig, engine: EngineHandle) -> Self {
        let s = Self::loading(cfg);
        s.set_ready(engine);
        s
    }
    pub fn set_ready(&self, engine: EngineHandle) {
        let _ = self.inner.engine.set(engine);
    }
    pub fn engine(&self) -> Result<&EngineHandle, ApiError> {
        self.inner.engine.get().ok_or(ApiError::Loading)
    }
    pub fn config(&self) -> &HttpConfig {
        &self.inner.cfg
    }
    fn limits<'a>(&'a self, e: &'a EngineHandle) -> Limits<'a> {
        let max_model_len = e.config().max_model_len;
        Limits {
            tok: e.tokenizer(),
            served_model_name: &self.inner.cfg.served_model_name,
            vocab_size: e.vocab_size(),
            max_model_len,
            max_prompt_bytes: self
                .inner
                .cfg
                .max_prompt_bytes
                .unwrap_or_else(|| validate::default_max_prompt_bytes(max_model_len)),
            max_choices: e.config().max_queued_requests,
            structured: e.structured(),
            tool_call_parser: self.inner.cfg.tool_call_parser,
        }
    }
}

/// A JSON body whose rejections (bad JSON, wrong types, too large) are OpenAI errors
/// naming the field.
pub struct OaiJson<T>(pub T);

impl<T: DeserializeOwned + UndeclaredFields + Send + 'static> FromRequest<AppState> for OaiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(state.config().max_body_bytes)
            } else {
                ValidationError::Json {
                    param: None,
                    message: r.body_text(),
                }
                .into()
            }
        })?;
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ValidationError::Json {
                param: None,
                message: "the body must be a JSON object".into(),
            }
            .into());
        }
        blocking::run(move || parse_json(&bytes)).await?.map(OaiJson)
    }
}

/// A JSON body as `T`; errors name the field. A top-level field `T` does not declare is
/// refused unless `T` accepts it ([`UndeclaredFields`]).
fn parse_json<T: DeserializeOwned + UndeclaredFields>(bytes: &[u8]) -> Result<T, ApiError> {
    {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let mut undeclared: Vec<String> = Vec::new();
        // Undeclared keys of `stream_options`: refused whatever their value.
        let mut nested: Option<String> = None;
        let mut note = |path: serde_ignored::Path| {
            if let serde_ignored::Path::Map { parent, key } = path {
                match unwrapped(parent) {
                    serde_ignored::Path::Root => undeclared.push(key),
                    serde_ignored::Path::Map { parent, key: outer }
                        if outer == "stream_options" && matches!(unwrapped(parent), serde_ignored::Path::Root) =>
                    {
                        nested.get_or_insert(format!("stream_options.{key}"));
                    }
                    _ => {}
                }
            }
        };
        let value =
            serde_path_to_error::deserialize(serde_ignored::Deserializer::new(&mut de, &mut note)).map_err(|e| {
                let path = e.path().to_string();
                ValidationError::Json {
                    param: (path != ".").then_some(path),
                    message: e.inner().to_string(),
                }
            })?;
        de.end().map_err(|e| ValidationError::Json {
            param: None,
            message: e.to_string(),
        })?;
        if let Some(name) = nested {
            return Err(
                super::validate::field(name, "unrecognized stream option: this server does not honour it").into(),
            );
        }
        if !undeclared.is_empty() {
            // The undeclared fields' values, read again from the body (a router adds some
            // to every request): only theirs are built, the rest is skipped unread.
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let values = serde::de::DeserializeSeed::deserialize(FieldsNamed(&undeclared), &mut de).unwrap_or_default();
            if let Some((name, _)) = values.iter().find(|(k, v)| !T::accepts(k, v)) {
                return Err(super::validate::field(
                    name.as_str(),
                    "unrecognized request argument: this server does not honour it",
                )
                .into());
            }
        }
        Ok(value)
    }
}

/// The path past `Option` and newtype wrappers.
fn unwrapped<'a>(p: &'a serde_ignored::Path<'a>) -> &'a serde_ignored::Path<'a> {
    match p {
        serde_ignored::Path::Some { parent }
        | serde_ignored::Path::NewtypeStruct { parent }
        | serde_ignored::Path::NewtypeVariant { parent } => unwrapped(parent),
        p => p,
    }
}

/// The values of the named top-level fields of a JSON object, in body order; the other
/// fields are skipped without being built.
struct FieldsNamed<'a>(&'a [String]);

impl<'de> serde::de::DeserializeSeed<'de> for FieldsNamed<'_> {
    type Value = Vec<(String, serde_json::Value)>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for FieldsNamed<'_> {
    type Value = Vec<(String, serde_json::Value)>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if self.0.contains(&key) {
                found.push((key, map.next_value::<serde_json::Value>()?));
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// The router: open `/`, `/health` and `/metrics`, everything else behind the API key.
pub fn router(state: AppState) -> Router {
    let cfg = state.config().clone();
    let protected = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/kv", get(kv))
        .route("/server_info", get(server_info))
        .route("/model_info", get(model_info))
        .route("/tokenizer_info", get(tokenizer_info))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        .route_layer(middleware::from_fn_with_state(state.clone(), timeout));
    Router::new()
        .route("/", get(operators_page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(protected)
        .fallback(
            |req: Request| async move { ApiError::RouteNotFound(format!("{} {}", req.method(), req.uri().path())) },
        )
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::extract::DefaultBodyLimit::max(cfg.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), declared_length))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .with_state(state)
}

/// Serves the API on `listener` within the connection bounds until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    listener::serve(listener, router(state), limits, shutdown).await
}

async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.config().api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if !super::auth::bearer_matches(given, key) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// A body declared larger than the limit is refused before any of it is read.
async fn declared_length(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let max = st.config().max_body_bytes;
    if declared.is_some_and(|n| n > max as u64) {
        return ApiError::PayloadTooLarge(max).into_response();
    }
    next.run(req).await
}

/// Drops the handler (and so its engine requests) when it runs past the limit.
async fn timeout(State(st): State<AppState>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(st.config().request_timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

/// The operators' page (docs/serving.md): static, self-contained HTML whose script reads
/// `/v1/kv` and `/metrics`. It holds no data, so it is open; its content security policy
/// lets it reach this server only.
async fn operators_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
            ),
        ],
        include_str!("operators.html"),
    )
        .into_response()
}

async fn health(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    if !st.engine()?.is_alive() {
        return Err(ApiError::EngineDead);
    }
    Ok(Json(serde_json::json!({"status": "ok"})))
}

async fn metrics(State(st): State<AppState>) -> Result<Response, ApiError> {
    let text = st.engine()?.metrics().render();
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response())
}

async fn models(State(st): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let e = st.engine()?;
    let name = st.config().served_model_name.clone();
    Ok(Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: name.clone(),
            object: "model",
            created: st.inner.created,
            owned_by: "crosskv",
            root: name,
            max_model_len: e.config().max_model_len,
        }],
    }))
}

#[derive(Serialize)]
struct KvInfo<'a> {
    #[serde(flatten)]
    capacity: &'a crate::kv::CapacityReport,
    max_model_len: usize,
    #[serde(flatten)]
    status: crate::engine::EngineStatus,
    kv_cache_usage_perc: f64,
}

async fn kv(State(st): State<AppState>) -> Result<Response, ApiError> {
    let e = st.engine()?;
    let capacity = e.capacity();
    let status = e.status();
    let usage = status.blocks_used as f64 / capacity.num_blocks.max(1) as f64;
    Ok(Json(KvInfo {
        capacity,
        max_model_len: e.config().max_model_len,
        status,
        kv_cache_usage_perc: usage,
    })
    .into_response())
}

/// What a cache-aware router (sglang-router) reads when it registers this server as a
/// worker: the model name it routes by and the engine's sizes, under SGLang's field
/// names. Every figure is this server's own; fields it has no counterpart for are left
/// out rather than guessed.
async fn server_info(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let e = st.engine()?;
    let c = e.config();
    Ok(Json(serde_json::json!({
        "served_model_name": st.config().served_model_name,
        "version": env!("CARGO_PKG_VERSION"),
        "max_model_len": c.max_model_len,
        "max_running_requests": c.max_num_seqs,
        "max_prefill_tokens": c.max_num_batched_tokens,
        "max_total_tokens": e.capacity().capacity_tokens,
        "prefix_caching": c.prefix_caching,
    })))
}

/// The model facts a router reads next to `/server_info`: crosskv serves generative
/// models only.
async fn model_info(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    st.engine()?;
    Ok(Json(serde_json::json!({
        "served_model_name": st.config().served_model_name,
        "is_generation": true,
    })))
}

async fn tokenizer_info(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let e = st.engine()?;
    let t = e.tokenizer();
    let mut eos: Vec<u32> = t.eos_ids.iter().copied().collect();
    eos.sort();
    Ok(Json(serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model": st.config().served_model_name,
        "vocab_size": e.vocab_size(),
        "model_max_length": e.config().max_model_len,
        "max_model_len": e.config().max_model_len,
        "bos_token": t.bos_token,
        "eos_token": t.eos_token,
        "eos_token_ids": eos,
        "chat_template": t.chat_template,
    })))
}

async fn tokenize(
    State(st): State<AppState>,
    OaiJson(r): OaiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let e = st.engine()?.clone();
    validate::check_model(r.model.as_deref(), &st.config().served_model_name)?;
    let max_model_len = e.config().max_model_len;
    let want_strs = r.return_token_strs.unwrap_or(false);
    let (tokens, token_strs) = blocking::run(move || -> Result<_, ValidationError> {
        let lim = st.limits(&e);
        let tok = e.tokenizer();
        // What only a chat template reads.
        for (name, v) in [("tools", &r.tools), ("chat_template_kwargs", &r.chat_template_kwargs)] {
            if r.prompt.is_some() && v.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(validate::field(name, "only with `messages`"));
            }
        }
        let tokens = match (&r.prompt, &r.messages) {
            (Some(p), None) => {
                validate::check_prompt_bytes("prompt", p.len(), lim.max_prompt_bytes)?;
                tok.encode(p, r.add_special_tokens.unwrap_or(true))
                    .map_err(|e| validate::field("prompt", e.to_string()))
            }
            (None, Some(m)) => {
                // The tools are checked as for a chat request, none of them called.
                let none = serde_json::json!("none");
                let tools = tool_calls::check(
                    r.tools.as_ref(),
                    Some(&none),
                    None,
                    tok.chat_template.as_deref(),
                    lim.tool_call_parser,
                )?
                .map(|t| t.template_tools)
                .unwrap_or_default();
                let tools_bytes = validate::tools_json_bytes(&tools);
                let (kwargs, kwargs_bytes) = validate::template_kwargs(r.chat_template_kwargs.as_ref())?;
                validate::check_chat_input_bytes(m, tools_bytes, kwargs_bytes, lim.max_prompt_bytes)?;
                let tools = (!tools.is_empty()).then_some(tools.as_slice());
                validate::chat_prompt(tok, m, tools, r.add_generation_prompt.unwrap_or(true), kwargs)
            }
            _ => Err(validate::field("prompt", "give exactly one of `prompt` and `messages`")),
        }?;
        let strs = want_strs.then(|| {
            tokens
                .iter()
                .map(|&t| tok.inner().id_to_token(t).unwrap_or_default())
                .collect::<Vec<String>>()
        });
        Ok((tokens, strs))
    })
    .await??;
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len,
        tokens,
        token_strs,
    }))
}

async fn detokenize(
    State(st): State<AppState>,
    OaiJson(r): OaiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let e = st.engine()?.clone();
    validate::check_model(r.model.as_deref(), &st.config().served_model_name)?;
    validate::check_ids(&r.tokens, e.vocab_size(), "tokens")?;
    let prompt = blocking::run(move || e.tokenizer().decode(&r.tokens, false))
        .await?
        .map_err(|e| validate::field("tokens", e.to_string()))?;
    Ok(Json(DetokenizeResponse { prompt }))
}

async fn completions(State(st): State<AppState>, OaiJson(r): OaiJson<CompletionRequest>) -> Result<Response, ApiError> {
    let e = st.engine()?;
    let v = {
        let (st, e) = (st.clone(), e.clone());
        blocking::run(move || validate::completion(&r, &st.limits(&e))).await??
    };
    let streams = submit_all(e, v.requests())?;
    let ctx = choices::Ctx {
        id: format!("cmpl-{:016x}", rand::random::<u64>()),
        created: unix_now(),
        model: v.model.clone(),
        tok: e.tokenizer().clone(),
    };
    if v.stream {
        Ok(choices::sse(choices::completion_stream(ctx, v, streams)))
    } else {
        Ok(Json(choices::completion_response(ctx, v, streams).await?).into_response())
    }
}

async fn chat_completions(
    State(st): State<AppState>,
    OaiJson(r): OaiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let e = st.engine()?;
    let v = {
        let (st, e) = (st.clone(), e.clone());
        blocking::run(move || validate::chat(&r, &st.limits(&e))).await??
    };
    let streams = submit_all(e, v.requests())?;
    let ctx = choices::Ctx {
        id: format!("chatcmpl-{:016x}", rand::random::<u64>()),
        created: unix_now(),
        model: v.model.clone(),
        tok: e.tokenizer().clone(),
    };
    if v.stream {
        Ok(choices::sse(choices::chat_stream(ctx, v, streams)))
    } else {
        Ok(Json(choices::chat_response(ctx, v, streams).await?).into_response())
    }
}
