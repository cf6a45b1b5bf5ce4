//! Integration tests, one binary (linking candle once keeps CI fast).

mod cli;
mod common;
mod config_errors;
mod dashboard;
mod default_model;
mod dtypes;
mod gguf;
mod golden;
mod grpc;
mod kv;
mod paged_vs_dense;
mod sources;
mod tokenizer;
mod engine;
mod scheduler;
mod http;
mod serve_binary;
