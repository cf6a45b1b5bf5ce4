//! The training path (README.md, "Training"): text corpora packed into token windows,
//! held-out perplexity, the training loop (AdamW with saveable state) and resumable
//! checkpoints.

pub mod adamw;
pub mod checkpoint;
pub mod data;
pub mod eval;
mod files;
pub mod trainer;

pub use data::{pack_windows, Corpus, DataOrder};
pub use eval::{perplexity, Perplexity};
pub use trainer::{lr_at, StepLog, TrainOptions, Trainable, Trainer};
