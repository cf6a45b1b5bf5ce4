//! The block tables a CUDA decode graph reads, in device buffers the runner owns (as
//! vLLM's model runner owns its block tables): a captured graph reads its spans and
//! every KV slot's table at fixed addresses, so each step rewrites their contents
//! instead of uploading new buffers. The attention op only reads them
//! ([`crate::ops::DeviceTables`]).

use crate::ops::{DeviceTables, SeqSpan};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PinnedHostSlice};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::Result;

/// Page-locked host memory for `len` values (cached, not write-combined: the host
/// writes it piecemeal).
pub(super) fn pinned(dev: &CudaDevice, len: usize) -> Result<PinnedHostSlice<u32>> {
    let ctx = dev.cuda_stream().context().clone();
    let mut p = unsafe { ctx.alloc_pinned_with_flags::<u32>(len.max(1), 0) }.w()?;
    p.as_mut_slice().w()?.fill(0);
    Ok(p)
}

/// Where a decode graph's step writes its block tables before
/// [`GraphBlockTables::refill`] copies them: slot `s`'s table of row `i` at
/// `[s * stride + i * max_blocks..][..max_blocks]`.
pub(super) struct TableStaging<'a> {
    pub tables: &'a mut [u32],
    pub stride: usize,
    pub max_blocks: usize,
}

/// A decode graph's spans and every KV slot's `[batch, max_blocks]` block table, each in
/// one device buffer (the tables slot after slot), so one copy refills each before a
/// graph launch. Both are staged in page-locked host memory: the copy is a DMA the host
/// does not wait for.
pub(super) struct GraphBlockTables {
    /// `[batch, 3]`: each sequence's `(q_start, q_len, ctx_len)`.
    seqs: CudaSlice<u32>,
    tables: CudaSlice<u32>,
    seqs_staged: PinnedHostSlice<u32>,
    tables_staged: PinnedHostSlice<u32>,
    batch: usize,
    /// `batch * max_blocks`: one slot's entries.
    stride: usize,
    max_blocks: usize,
    block_size: usize,
}

impl GraphBlockTables {
    /// Buffers for `batch` sequences of one token each, tables `max_blocks` wide for each
    /// of `slots` KV slots; the spans start at the longest context the tables hold.
    pub(super) fn new(
        dev: &CudaDevice,
        batch: usize,
        max_blocks: usize,
        slots: usize,
        block_size: usize,
    ) -> Result<Self> {
        let longest = (max_blocks * block_size) as u32;
        let flat: Vec<u32> = (0..batch as u32).flat_map(|i| [i, 1, longest]).collect();
        let flat = if flat.is_empty() { vec![0u32] } else { flat };
        let len = slots * batch * max_blocks;
        Ok(Self {
            seqs: dev.clone_htod(&flat)?,
            tables: dev.alloc_zeros::<u32>(len.max(1))?,
            seqs_staged: pinned(dev, 3 * batch)?,
            tables_staged: pinned(dev, len)?,
            batch,
            stride: batch * max_blocks,
            max_blocks,
            block_size,
        })
    }

    /// What the attention reads.
    pub(super) fn device_tables(&self) -> DeviceTables<'_> {
        DeviceTables {
            seqs: &self.seqs,
            tables: &self.tables,
            stride: self.stride,
        }
    }

    /// Refills the spans and block tables: `seqs` (one token each, as the graph was made
    /// for), and the tables `write_tables` stages (checked by it: block ids inside the
    /// cache); then one copy each on the stream, ordered after the previous launch that
    /// read them.
    pub(super) fn refill(
        &mut self,
        seqs: &[SeqSpan],
        write_tables: impl FnOnce(TableStaging<'_>) -> Result<()>,
    ) -> Result<()> {
        let batch = self.batch;
        if seqs.len() != batch {
            candle_core::bail!(
                "refill_decode_graph: {} spans for a graph of {batch} sequences",
                seqs.len()
            );
        }
        if let Some((i, s)) = seqs.iter().enumerate().find(|(i, s)| {
            s.q_start as usize != *i
                || s.q_len != 1
                || s.ctx_len == 0
                || s.ctx_len as usize > self.max_blocks * self.block_size
        }) {
            candle_core::bail!("refill_decode_graph: span {i} {s:?} does not fit the graph");
        }
        let flat = self.seqs_staged.as_mut_slice().w()?;
        for (dst, s) in flat.chunks_exact_mut(3).zip(seqs) {
            dst.copy_from_slice(&[s.q_start, s.q_len, s.ctx_len]);
        }
        write_tables(TableStaging {
            tables: self.tables_staged.as_mut_slice().w()?,
            stride: self.stride,
            max_blocks: self.max_blocks,
        })?;
        let stream = self.seqs.stream().clone();
        stream.memcpy_htod(&self.seqs_staged, &mut self.seqs).w()?;
        stream.memcpy_htod(&self.tables_staged, &mut self.tables).w()?;
        Ok(())
    }
}
