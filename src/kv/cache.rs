//! The K/V storage: one pool of blocks, `[num_blocks, block_size, kv_heads, head_dim]`
//! for K and the same for V. A block belongs to one KV slot at a time (the manager's
//! tables say which); a consumer layer is handed its producer's table, so it reads the
//! producer's blocks in place, never a copy.

use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug)]
pub struct KvCache {
    k: Tensor,
    v: Tensor,
    block_size: usize,
}

impl KvCache {
    pub fn new(
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let shape = (num_blocks, block_size, kv_heads, head_dim);
        Ok(KvCache {
            k: Tensor::zeros(shape, dtype, dev)?,
            v: Tensor::zeros(shape, dtype, dev)?,
            block_size,
        })
    }
    pub fn k(&self) -> &Tensor {
        &self.k
    }
    pub fn v(&self) -> &Tensor {
        &self.v
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.k.dim(0).unwrap_or(0)
    }
    /// Bytes of K and V storage.
    pub fn bytes(&self) -> usize {
        2 * self.k.elem_count() * self.k.dtype().size_in_bytes()
    }
}
