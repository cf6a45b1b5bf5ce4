//! Integration tests, one binary (linking candle once keeps CI fast).

mod cli;
mod common;
mod config_errors;
mod dashboard;
mod default_model;
mod dtypes;
mod engine;
mod eval;
mod flash_attention;
mod fused_ops;
mod gguf;
mod golden;
mod gradients;
mod grpc;
mod http;
mod kv;
mod paged_vs_dense;
mod random_weights;
mod scheduler;
mod serve_binary;
mod sources;
mod tensor_parallel;
mod tokenizer;
mod training;
mod training_batch;
