//! The front ends: the OpenAI-compatible HTTP API and the gRPC API. Both validate a
//! request once into an `engine::GenerateRequest` and talk to the engine only through
//! its `EngineHandle`.

pub mod auth;
pub mod blocking;
pub mod choices;
pub mod error;
pub mod grpc;
pub mod grpc_codec;
pub mod http;
pub mod listener;
pub mod openai;
pub mod structured;
pub mod tool_calls;
pub mod validate;
