//! The paged KV cache: `layout` (kv_source → slots, accounting), `block_pool`,
//! `manager` (per-sequence block tables per slot) and `cache` (the storage).

pub mod block_pool;
pub mod cache;
pub mod layout;
pub mod manager;

pub use block_pool::{BlockId, BlockPool};
pub use cache::KvCache;
pub use layout::{CapacityReport, KvLayout};
pub use manager::{KvError, KvManager, SeqId};
