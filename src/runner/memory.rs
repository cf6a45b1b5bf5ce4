//! How much device memory a forward takes, measured before the KV cache is sized (the
//! GPU default of `serve`): one dummy prefill through the model with a scratch cache,
//! read from the device's memory pool; and the KV budget `serve` derives from it.

#[cfg(feature = "cuda")]
use super::{Runner, SeqStep};
#[cfg(feature = "cuda")]
use crate::device::{pool_attr, set_pool_attr};
#[cfg(feature = "cuda")]
use crate::kv::KvManager;
#[cfg(feature = "cuda")]
use crate::units::format_bytes;
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::WrapErr;
#[cfg(feature = "cuda")]
use candle_core::Result;

/// What [`profile_forward_peak`] measured, in bytes.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone)]
pub struct ForwardProfile {
    /// The device's memory.
    pub total: u64,
    /// In use by this process and others after loading the weights and running the forward
    /// (CUDA context, weights, cuBLAS workspaces), the scratch cache freed.
    pub in_use_after_load: u64,
    /// The most memory one forward held at once beyond that (activations), the scratch
    /// cache not counted.
    pub activation_peak: u64,
    /// How the peak was read.
    pub how: &'static str,
}

/// One device's memory pool around the profiled forward.
#[cfg(feature = "cuda")]
struct PoolWatch {
    stream: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    pool: Option<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool>,
    free0: usize,
    total: usize,
    used_before: u64,
}

#[cfg(feature = "cuda")]
impl PoolWatch {
    /// Trims the device's default pool and resets its high-water mark.
    fn start(model: &crate::model::Model) -> Result<Self> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let stream = model.device().as_cuda_device()?.cuda_stream();
        let ctx = stream.context().clone();
        stream.synchronize().w()?;
        let pool = if ctx.has_async_alloc() {
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
                .result()
                .w()?;
            unsafe { sys::cuMemPoolTrimTo(pool, 0) }.result().w()?;
            Some(pool)
        } else {
            None
        };
        let (free0, total) = ctx.mem_get_info().w()?;
        let used_before = match pool {
            Some(pool) => {
                let v = pool_attr(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
                set_pool_attr(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)?;
                v
            }
            None => 0,
        };
        Ok(PoolWatch {
            stream,
            pool,
            free0,
            total,
            used_before,
        })
    }

    /// After the forward (its outputs still held): free memory and the pool's peak.
    fn peak(&self) -> Result<(usize, u64)> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        self.stream.synchronize().w()?;
        let (free_fwd, _) = self.stream.context().mem_get_info().w()?;
        let high = match self.pool {
            Some(pool) => pool_attr(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            None => 0,
        };
        Ok((free_fwd, high))
    }

    /// After everything the forward made is dropped: the profile, `scratch` (the
    /// scratch cache's bytes) not counted.
    fn finish(&self, (free_fwd, high): (usize, u64), scratch: u64) -> Result<ForwardProfile> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        self.stream.synchronize().w()?;
        if let Some(pool) = self.pool {
            unsafe { sys::cuMemPoolTrimTo(pool, 0) }.result().w()?;
        }
        let (free1, _) = self.stream.context().mem_get_info().w()?;
        let (activation_peak, how) = match self.pool {
            Some(_) => (
                high.saturating_sub(self.used_before + scratch),
                "memory-pool high-water mark",
            ),
            None => (
                (self.free0 as u64).saturating_sub(free_fwd as u64 + scratch),
                "free memory after the forward (no memory pool: a lower bound)",
            ),
        };
        Ok(ForwardProfile {
            total: self.total as u64,
            in_use_after_load: (self.total - free1.min(self.total)) as u64,
            activation_peak,
            how,
        })
    }
}

/// Runs one dummy prefill of `tokens` tokens through `model` with a scratch cache and
/// measures memory as vLLM does before sizing its KV cache: free memory from
/// `cuMemGetInfo` after loading, and the forward's peak from the stream-ordered memory
/// pool's high-water mark (cudarc allocates from the device's default pool), or, without
/// one, from free memory just after the forward.
#[cfg(feature = "cuda")]
pub fn profile_forward_peak(model: &crate::model::Model, block_size: usize, tokens: usize) -> Result<ForwardProfile> {
    profile_forward_peak_ranks(std::slice::from_ref(model), block_size, tokens)
}

/// [`profile_forward_peak`] for the ranks of a tensor-parallel model (they run the
/// dummy step together): the tightest rank's figures (least total memory, most in use,
/// largest peak), since every rank gets the same number of blocks.
#[cfg(feature = "cuda")]
pub fn profile_forward_peak_ranks(
    ranks: &[crate::model::Model],
    block_size: usize,
    tokens: usize,
) -> Result<ForwardProfile> {
    let first = ranks
        .first()
        .ok_or_else(|| candle_core::Error::Msg("no model to profile".into()))?;
    let watches = ranks.iter().map(PoolWatch::start).collect::<Result<Vec<_>>>()?;
    let tokens = tokens.min(first.max_positions()).max(1);
    let layout = first.layout().clone();
    let blocks = tokens.div_ceil(block_size) * layout.kv_layers();
    let runner = Runner::tensor_parallel(ranks.to_vec(), blocks, block_size)?;
    let scratch = runner.cache().bytes() as u64;
    let mut mgr = KvManager::new(layout, blocks, block_size);
    mgr.allocate(0, tokens)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let step = SeqStep {
        seq: 0,
        tokens: vec![0; tokens],
        start_pos: 0,
        all_logits: false,
    };
    let logits = runner.step(&mgr, &[step])?;
    let peaks = watches.iter().map(PoolWatch::peak).collect::<Result<Vec<_>>>()?;
    drop(logits);
    drop(runner);
    let mut worst: Option<ForwardProfile> = None;
    for (w, p) in watches.iter().zip(peaks) {
        let f = w.finish(p, scratch)?;
        worst = Some(match worst {
            None => f,
            Some(b) => ForwardProfile {
                total: b.total.min(f.total),
                in_use_after_load: b.in_use_after_load.max(f.in_use_after_load),
                activation_peak: b.activation_peak.max(f.activation_peak),
                how: f.how,
            },
        });
    }
    Ok(worst.expect("at least one rank"))
}

/// The KV budget on a GPU, as vLLM sizes it: `fraction` × total device memory, less
/// what is in use after loading the weights and the activation peak of one forward of
/// `tokens` tokens (one dummy prefill run with a scratch cache).
#[cfg(feature = "cuda")]
pub fn gpu_kv_budget(
    ranks: &[crate::model::Model],
    fraction: f64,
    block_size: usize,
    tokens: usize,
) -> anyhow::Result<u64> {
    let p = profile_forward_peak_ranks(ranks, block_size, tokens)?;
    let budget = (fraction * p.total as f64) as i128 - p.in_use_after_load as i128 - p.activation_peak as i128;
    tracing::info!(
        "GPU memory: total {}, in use after loading {}, forward peak for {tokens} tokens {} ({}); KV budget at {fraction}: {}",
        format_bytes(p.total),
        format_bytes(p.in_use_after_load),
        format_bytes(p.activation_peak),
        p.how,
        format_bytes(budget.max(0) as u64),
    );
    if budget <= 0 {
        anyhow::bail!(
            "--gpu-memory-utilization {fraction}: nothing left for the KV cache ({} in use after loading, forward peak {} of {} total)",
            format_bytes(p.in_use_after_load),
            format_bytes(p.activation_peak),
            format_bytes(p.total)
        );
    }
    Ok(budget as u64)
}

#[cfg(not(feature = "cuda"))]
pub fn gpu_kv_budget(_: &[crate::model::Model], _: f64, _: usize, _: usize) -> anyhow::Result<u64> {
    anyhow::bail!("GPU memory profiling needs the `cuda` build feature")
}
