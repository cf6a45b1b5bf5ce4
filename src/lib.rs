//! crosskv: an LLM inference engine built around Cross-Layer Attention (CLA).
//! Layers that share K/V share one paged KV cache slot, so a device holds
//! `layers / kv_layers` times more tokens. See docs/ for the contracts.

pub mod api;
pub mod cli;
pub mod config;
pub mod convert;
pub mod device;
pub mod engine;
pub mod env;
pub mod kv;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod runner;
pub mod tp;
pub mod train;
pub mod units;
