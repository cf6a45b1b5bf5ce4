//! The paged KV cache: `layout` (kv_source → slots, accounting), `block_pool`,
//! `manager` (per-sequence block tables per slot), `cache` (the storage) and `dtype`
//! (its element type, and the scales of an fp8 cache).

pub mod block_pool;
pub mod cache;
pub mod dtype;
pub mod layout;
pub mod manager;

pub use block_pool::{BlockId, BlockPool};
pub use cache::KvCache;
pub use dtype::{KvDtype, KvScale};
pub use layout::{CapacityReport, KvLayout};
pub use manager::{KvError, KvManager, SeqId};
