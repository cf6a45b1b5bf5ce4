//! The training path (issue 5, DESIGN.md §7): text corpora packed into token windows,
//! and held-out perplexity. Training and fine-tuning build on these.

pub mod adamw;
pub mod data;
pub mod eval;
pub mod trainer;

pub use data::{pack_windows, Corpus, DataOrder};
pub use eval::{perplexity, Perplexity};
pub use trainer::{lr_at, train, StepLog, TrainOptions, Trainable};
