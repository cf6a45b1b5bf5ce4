//! `reshape_and_cache`: writes one step's K (or V) rows into their cache positions.
//! The cache is `[num_blocks, block_size, kv_heads, head_dim]`; a position is
//! `block * block_size + offset`, so the cache is viewed as rows of `kv_heads * head_dim`.
//! Position [`SKIP_ROW`] writes nothing: the padding rows of a captured decode graph.

use super::{contiguous, u32_slice, Elem};
use candle_core::{CpuStorage, InplaceOp3, Layout, Result, Tensor};

#[cfg(feature = "cuda")]
mod cuda;

struct ReshapeAndCache;

/// A token row that is written nowhere (vLLM's slot -1): a decode graph's batch is
/// padded up to the size it was captured for, and the padding must not touch the cache.
pub const SKIP_ROW: u32 = u32::MAX;

fn write_rows<T: Elem>(cache: &mut [T], cl: &Layout, new: &[T], row: usize, pos: &[u32]) -> Result<()> {
    let (start, end) = cl
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("reshape_and_cache: the cache must be contiguous".into()))?;
    let cache = &mut cache[start..end];
    let rows = cache.len() / row;
    for (t, &p) in pos.iter().enumerate().filter(|(_, &p)| p != SKIP_ROW) {
        let p = p as usize;
        if p >= rows {
            candle_core::bail!("reshape_and_cache: position {p} is outside the cache ({rows} rows)");
        }
        cache[p * row..(p + 1) * row].copy_from_slice(&new[t * row..(t + 1) * row]);
    }
    Ok(())
}

impl InplaceOp3 for ReshapeAndCache {
    fn name(&self) -> &'static str {
        "reshape_and_cache"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cl: &Layout,
        new: &CpuStorage,
        nl: &Layout,
        pos: &CpuStorage,
        pl: &Layout,
    ) -> Result<()> {
        let dims = nl.dims();
        let row: usize = dims[1..].iter().product();
        let pos = u32_slice(pos, pl, self.name(), "positions")?;
        if pos.len() != dims[0] {
            candle_core::bail!("reshape_and_cache: {} positions for {} rows", pos.len(), dims[0]);
        }
        match (cache, new) {
            (CpuStorage::F32(c), CpuStorage::F32(n)) => {
                write_rows(c, cl, contiguous(n, nl, self.name(), "new rows")?, row, pos)
            }
            (CpuStorage::F16(c), CpuStorage::F16(n)) => {
                write_rows(c, cl, contiguous(n, nl, self.name(), "new rows")?, row, pos)
            }
            (CpuStorage::BF16(c), CpuStorage::BF16(n)) => {
                write_rows(c, cl, contiguous(n, nl, self.name(), "new rows")?, row, pos)
            }
            _ => candle_core::bail!("reshape_and_cache: cache and rows must share one of f32/f16/bf16"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cl: &Layout,
        new: &candle_core::CudaStorage,
        nl: &Layout,
        pos: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> Result<()> {
        cuda::reshape_and_cache(cache, cl, new, nl, pos, pl)
    }
}

/// Writes `new` (`[tokens, kv_heads, head_dim]`) into `cache` at `positions` (u32, `[tokens]`).
pub fn reshape_and_cache(cache: &Tensor, new: &Tensor, positions: &Tensor) -> Result<()> {
    let (_, _, kv_heads, head_dim) = cache.dims4()?;
    let (_, nh, nd) = new.dims3()?;
    if (nh, nd) != (kv_heads, head_dim) {
        candle_core::bail!("reshape_and_cache: rows are [_, {nh}, {nd}], cache wants [_, {kv_heads}, {head_dim}]");
    }
    // CUDA reads rows any stride apart (K or V sliced from a fused projection); the CPU
    // reference wants them contiguous.
    #[cfg(feature = "cuda")]
    if new.device().is_cuda() && crate::ops::cuda::is_row_strided(new.layout()) {
        return cache.inplace_op3(new, positions, &ReshapeAndCache);
    }
    let new = new.contiguous()?;
    cache.inplace_op3(&new, positions, &ReshapeAndCache)
}
