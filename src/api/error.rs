//! Every error the HTTP API returns, and the one function (`ApiError::parts`) that maps
//! each kind to its status code and OpenAI body `{"error": {message, type, param, code}}`.

use super::validate::ValidationError;
use crate::engine::EngineError;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("no route for {0}")]
    RouteNotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("a valid API key is required (header `Authorization: Bearer <key>`)")]
    Unauthorized,
    #[error("the model is still loading")]
    Loading,
    #[error("the engine has stopped; this server cannot serve requests")]
    EngineDead,
    #[error("the request timed out")]
    Timeout,
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The engine failed a request it had accepted.
    #[error("{0}")]
    Generation(String),
    #[error(transparent)]
    Internal(#[from] super::blocking::JobPanicked),
}

/// The body's `error` object.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// The one mapping of error kinds to status code, OpenAI `type`, `param` and `code`.
    pub fn parts(&self) -> (StatusCode, &'static str, Option<String>, Option<&'static str>) {
        use StatusCode as S;
        let invalid = "invalid_request_error";
        match self {
            ApiError::Invalid(ValidationError::ModelNotFound(_)) => {
                (S::NOT_FOUND, invalid, Some("model".into()), Some("model_not_found"))
            }
            ApiError::Invalid(e @ ValidationError::ContextLength { .. }) => {
                (S::BAD_REQUEST, invalid, e.param(), Some("context_length_exceeded"))
            }
            ApiError::Invalid(e) => (S::BAD_REQUEST, invalid, e.param(), None),
            ApiError::RouteNotFound(_) => (S::NOT_FOUND, invalid, None, Some("not_found")),
            ApiError::MethodNotAllowed => (S::METHOD_NOT_ALLOWED, invalid, None, None),
            ApiError::PayloadTooLarge(_) => (S::PAYLOAD_TOO_LARGE, invalid, None, Some("payload_too_large")),
            ApiError::Unauthorized => (S::UNAUTHORIZED, invalid, None, Some("invalid_api_key")),
            ApiError::Loading => (S::SERVICE_UNAVAILABLE, "server_error", None, Some("loading")),
            ApiError::EngineDead => (S::SERVICE_UNAVAILABLE, "server_error", None, Some("engine_dead")),
            ApiError::Timeout => (S::REQUEST_TIMEOUT, "timeout_error", None, Some("timeout")),
            ApiError::Engine(EngineError::QueueFull(_)) => {
                (S::TOO_MANY_REQUESTS, "rate_limit_error", None, Some("queue_full"))
            }
            ApiError::Engine(EngineError::Constraint(_)) => (S::BAD_REQUEST, invalid, None, None),
            ApiError::Engine(EngineError::ShutDown) => (S::SERVICE_UNAVAILABLE, "server_error", None, Some("shutdown")),
            ApiError::Engine(_) | ApiError::Generation(_) | ApiError::Internal(_) => {
                (S::INTERNAL_SERVER_ERROR, "server_error", None, None)
            }
        }
    }

    pub fn body(&self) -> serde_json::Value {
        let (_, kind, param, code) = self.parts();
        serde_json::json!({ "error": ErrorBody { message: self.to_string(), kind, param, code } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, ..) = self.parts();
        let mut resp = (status, axum::Json(self.body())).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        // Busy or not up yet: when to come back.
        if matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }
}
