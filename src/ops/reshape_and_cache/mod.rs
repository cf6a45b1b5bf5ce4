//! `reshape_and_cache`: writes one step's K (or V) rows into their cache positions.
//! The cache is `[num_blocks, block_size, kv_heads, head_dim]`; a position is
//! `block * block_size + offset`, so the cache is viewed as rows of `kv_heads * head_dim`.
//! Position [`SKIP_ROW`] writes nothing: the padding rows of a captured decode graph.
//! An fp8 cache (`u8` e4m3 codes, `ops::fp8`) is written `x / scale`, rounded to
//! nearest-even and saturated to ±448; a float cache of another type than the rows
//! (CPU only) takes them converted.

use super::{contiguous, fp8, u32_slice, Elem};
use candle_core::{CpuStorage, InplaceOp3, Layout, Result, Tensor};

#[cfg(feature = "cuda")]
mod cuda;

struct ReshapeAndCache {
    /// `1 / scale` of an fp8 cache (1.0 otherwise): the codes are `x × inv_scale`.
    inv_scale: f32,
}

/// A token row that is written nowhere (vLLM's slot -1): a decode graph's batch is
/// padded up to the size it was captured for, and the padding must not touch the cache.
pub const SKIP_ROW: u32 = u32::MAX;

fn write_rows<T: Elem>(cache: &mut [T], cl: &Layout, new: &[T], row: usize, pos: &[u32]) -> Result<()> {
    write_rows_as(cache, cl, new, row, pos, |x| x)
}

/// `write_rows` of rows converted into the cache's element type by `convert`.
fn write_rows_as<T: Copy, C>(
    cache: &mut [C],
    cl: &Layout,
    new: &[T],
    row: usize,
    pos: &[u32],
    convert: impl Fn(T) -> C,
) -> Result<()> {
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
        for (c, &x) in cache[p * row..(p + 1) * row]
            .iter_mut()
            .zip(&new[t * row..(t + 1) * row])
        {
            *c = convert(x);
        }
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
        let inv = self.inv_scale;
        // The rows of one element type into a cache of any: a copy when they match.
        macro_rules! rows_into {
            ($n:expr) => {{
                let n = contiguous($n, nl, self.name(), "new rows")?;
                match cache {
                    CpuStorage::U8(c) => write_rows_as(c, cl, n, row, pos, |x| fp8::quantize(x.to_f32(), inv)),
                    CpuStorage::F32(c) => write_rows_as(c, cl, n, row, pos, |x| Elem::from_f32(x.to_f32())),
                    CpuStorage::F16(c) => write_rows_as(c, cl, n, row, pos, |x| Elem::from_f32(x.to_f32())),
                    CpuStorage::BF16(c) => write_rows_as(c, cl, n, row, pos, |x| Elem::from_f32(x.to_f32())),
                    _ => candle_core::bail!("reshape_and_cache: the cache must be f32, f16, bf16 or fp8 (u8)"),
                }
            }};
        }
        match (&*cache, new) {
            (CpuStorage::F32(_), CpuStorage::F32(n)) => {
                let CpuStorage::F32(c) = cache else { unreachable!() };
                write_rows(c, cl, contiguous(n, nl, self.name(), "new rows")?, row, pos)
            }
            (CpuStorage::F16(_), CpuStorage::F16(n)) => {
                let CpuStorage::F16(c) = cache else { unreachable!() };
                write_rows(c, cl, contiguous(n, nl, self.name(), "new rows")?, row, pos)
            }
            (CpuStorage::BF16(_), CpuStorage::BF16(n)) => {
                let CpuStorage::BF16(c) = cache else { unreachable!() };
                write_rows(c, cl, contiguous(n, nl, self.name(), "new rows")?, row, pos)
            }
            (_, CpuStorage::F32(n)) => rows_into!(n),
            (_, CpuStorage::F16(n)) => rows_into!(n),
            (_, CpuStorage::BF16(n)) => rows_into!(n),
            _ => candle_core::bail!("reshape_and_cache: the rows must be f32, f16 or bf16"),
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
        cuda::reshape_and_cache(cache, cl, new, nl, pos, pl, self.inv_scale)
    }
}

/// Writes `new` (`[tokens, kv_heads, head_dim]`) into `cache` at `positions` (u32, `[tokens]`).
pub fn reshape_and_cache(cache: &Tensor, new: &Tensor, positions: &Tensor) -> Result<()> {
    reshape_and_cache_scaled(cache, new, positions, 1.0)
}

/// [`reshape_and_cache`] into a cache that may be fp8 (`u8` e4m3 codes), which stores
/// `new / scale`; a float cache ignores `scale`.
pub fn reshape_and_cache_scaled(cache: &Tensor, new: &Tensor, positions: &Tensor, scale: f32) -> Result<()> {
    if !(scale.is_finite() && scale > 0.0) {
        candle_core::bail!("reshape_and_cache: the fp8 scale must be positive and finite, not {scale}");
    }
    let (_, _, kv_heads, head_dim) = cache.dims4()?;
    let (_, nh, nd) = new.dims3()?;
    if (nh, nd) != (kv_heads, head_dim) {
        candle_core::bail!("reshape_and_cache: rows are [_, {nh}, {nd}], cache wants [_, {kv_heads}, {head_dim}]");
    }
    // CUDA reads rows any stride apart (K or V sliced from a fused projection); the CPU
    // reference wants them contiguous.
    #[cfg(feature = "cuda")]
    if new.device().is_cuda() && crate::ops::cuda::is_row_strided(new.layout()) {
        return cache.inplace_op3(new, positions, &ReshapeAndCache { inv_scale: 1.0 / scale });
    }
    let new = new.contiguous()?;
    cache.inplace_op3(&new, positions, &ReshapeAndCache { inv_scale: 1.0 / scale })
}
