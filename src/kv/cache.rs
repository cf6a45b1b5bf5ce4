//! The K/V storage: one pool of blocks, `[num_blocks, block_size, kv_heads, head_dim]`
//! for K and the same for V. A block belongs to one KV slot at a time (the manager's
//! tables say which); a consumer layer is handed its producer's table, so it reads the
//! producer's blocks in place, never a copy. An fp8 cache holds e4m3 codes as `u8`.

use super::KvDtype;
use candle_core::{Device, Result, Tensor};

#[derive(Debug)]
pub struct KvCache {
    k: Tensor,
    v: Tensor,
    block_size: usize,
    dtype: KvDtype,
}

impl KvCache {
    pub fn new(
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: KvDtype,
        dev: &Device,
    ) -> Result<Self> {
        let shape = (num_blocks, block_size, kv_heads, head_dim);
        let storage = || -> Result<Tensor> {
            let zeros = Tensor::zeros(shape, dtype.storage(), dev)?;
            if dev.is_cpu() {
                // Zeroed host memory is only mapped when first written: the cache would
                // grow the process's memory block by block as it is used, so memory
                // use would tell neither the cache's size nor a leak. Writing it here
                // commits the whole budget at start, as a GPU allocation does.
                return zeros.affine(1.0, 0.0);
            }
            Ok(zeros)
        };
        Ok(KvCache {
            k: storage()?,
            v: storage()?,
            block_size,
            dtype,
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
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }
    pub fn num_blocks(&self) -> usize {
        self.k.dim(0).unwrap_or(0)
    }
    /// Bytes of K and V storage.
    pub fn bytes(&self) -> usize {
        2 * self.k.elem_count() * self.k.dtype().size_in_bytes()
    }
}
