//! The engine (docs/architecture.md): one thread owns the model, the KV cache, the scheduler
//! and the KV manager, and runs steps synchronously: schedule → execute → update
//! (`core/`). Front ends talk to it only through a cloneable `EngineHandle`
//! (`handle.rs`): commands in, and per request an output channel. A request whose
//! receiver is dropped (client gone) is aborted at the next step and its blocks are
//! freed. Here: how the engine is sized and checked, its errors and its status.

mod core;
mod handle;
mod outbox;
pub mod output;
pub mod request;
pub mod scheduler;
pub mod structured;

/// Moved to the sampler; kept here for callers of the old path.
pub use crate::runner::sampler::token_logprob;
pub use handle::{EngineHandle, RequestStream};
pub use request::{
    Constraint, EngineEvent, FinishReason, GenerateOptions, GenerateRequest, RequestId, TokenLogprob, Usage,
};
pub use scheduler::{AdmitError, Scheduled, Scheduler, SchedulerConfig};

use crate::kv::CapacityReport;
use crate::model::Model;
use serde::Serialize;

/// How the engine is sized (the server's flags).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub kv_cache_bytes: u64,
    pub block_size: usize,
    pub max_model_len: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_queued_requests: usize,
    pub prefix_caching: bool,
    /// CUDA: decode steps as captured graphs (`Runner::set_cuda_graphs`).
    pub cuda_graphs: bool,
    /// CUDA graphs: a decode step is launched before the previous one's picks are read
    /// (async scheduling, `--async-scheduling`), so the host's work of a step overlaps
    /// the device's.
    pub async_scheduling: bool,
}

impl EngineConfig {
    /// The start-up checks of this config against the model it is to serve (refused
    /// here rather than as a failed step for every request): a head_dim the CUDA paged
    /// attention is built for, and a KV budget that holds one `max_model_len` sequence.
    /// Returns the cache's layout and capacity at this budget.
    pub fn validate(&self, model: &Model) -> Result<CapacityReport, EngineConfigError> {
        let head_dim = model.config().head_dim;
        if model.device().is_cuda() && !crate::ops::paged_attention::CUDA_HEAD_DIMS.contains(&head_dim) {
            return Err(EngineConfigError::HeadDimNotOnCuda {
                head_dim,
                supported: crate::ops::paged_attention::CUDA_HEAD_DIMS.to_vec(),
            });
        }
        let kv = model.kv_cache_dtype();
        if model.device().is_cuda() {
            // The CUDA kernels read a cache of q's own type, or fp8; the CPU reads any.
            if !kv.is_fp8() && kv != crate::kv::KvDtype::of_model(model.dtype()) {
                return Err(EngineConfigError::KvDtypeNotOnCuda {
                    kv_dtype: kv.name(),
                    missing: format!(
                        "CUDA kernels for a {} cache under a {:?} model (use auto, fp8, or --dtype {})",
                        kv.name(),
                        model.dtype(),
                        kv.name()
                    ),
                });
            }
            if kv.is_fp8() && model.batch_invariant() {
                return Err(EngineConfigError::KvDtypeNotOnCuda {
                    kv_dtype: kv.name(),
                    missing: "an fp8 reader in the batch-invariant attention kernel (drop --batch-invariant)".into(),
                });
            }
        }
        let layout = model.layout();
        let cap = layout.capacity(self.kv_cache_bytes, self.block_size, self.max_model_len);
        let need_blocks = self.max_model_len.div_ceil(self.block_size) * layout.kv_layers();
        if cap.num_blocks < need_blocks {
            return Err(EngineConfigError::MaxModelLenDoesNotFit {
                max_model_len: self.max_model_len,
                need_blocks,
                have_blocks: cap.num_blocks,
                need_bytes: (need_blocks * cap.block_bytes) as u64,
                have_bytes: self.kv_cache_bytes,
            });
        }
        Ok(cap)
    }
}

/// What [`EngineConfig::validate`] refuses.
#[derive(Debug, thiserror::Error)]
pub enum EngineConfigError {
    #[error("head_dim {head_dim} is not supported on CUDA (paged attention is built for {supported:?}); serve this model on the CPU")]
    HeadDimNotOnCuda { head_dim: usize, supported: Vec<usize> },
    #[error("--kv-cache-dtype {kv_dtype} is not supported on CUDA here: missing {missing}")]
    KvDtypeNotOnCuda { kv_dtype: &'static str, missing: String },
    #[error(
        "max_model_len {max_model_len} needs {need_bytes} bytes of KV cache ({need_blocks} blocks), but the budget of {have_bytes} bytes holds {have_blocks} blocks; raise --kv-cache-memory or lower --max-model-len"
    )]
    MaxModelLenDoesNotFit {
        max_model_len: usize,
        need_blocks: usize,
        have_blocks: usize,
        need_bytes: u64,
        have_bytes: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] EngineConfigError),
    #[error("the engine is shutting down")]
    ShutDown,
    #[error("too many requests queued ({0}); retry later")]
    QueueFull(usize),
    #[error("{0}")]
    Start(String),
    /// The request's constraint does not compile (llguidance's message).
    #[error("invalid constraint: {0}")]
    Constraint(String),
}

/// The live state front ends can read without asking the engine thread.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineStatus {
    pub num_running: usize,
    pub num_waiting: usize,
    pub blocks_used: usize,
    pub blocks_free: usize,
    /// Blocks in use per KV slot (distinct blocks: shared prefix blocks count once).
    pub blocks_used_per_slot: Vec<usize>,
}

/// Faults a test can make the engine thread meet in its next step, to check that the
/// server survives them (`EngineHandle::inject_fault`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// The next step panics after scheduling, before its forward.
    PanicInStep,
    /// The next step sleeps this long after scheduling (a long prefill's stand-in).
    StallStep(std::time::Duration),
}

/// Requests in a step longer than this many prompt tokens, that need logits at every
/// position (prompt log-probs), are computed in chunks of it: each computed position
/// makes a full-vocabulary row of logits.
pub const MAX_SCORED_CHUNK: usize = 256;
