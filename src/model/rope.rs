//! Rotary position embeddings: `rope_theta`, llama3 and linear `rope_scaling`.
//! Positions are gathered per token, so one batch can mix sequences at any position.

use crate::config::{ModelConfig, RopeScaling};
use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// llama.cpp's GGUF llama checkpoints permute Q/K for interleaved pairs;
    /// Hugging Face checkpoints rotate the two halves.
    interleaved: bool,
    max_positions: usize,
}

fn inv_freqs(cfg: &ModelConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / d as f64))
        .collect();
    match &cfg.rope_scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl Rope {
    pub fn new(cfg: &ModelConfig, max_positions: usize, interleaved: bool, dtype: DType, dev: &Device) -> Result<Self> {
        let inv = inv_freqs(cfg);
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (max_positions, half), dev)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (max_positions, half), dev)?.to_dtype(dtype)?,
            interleaved,
            max_positions,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The tables: cos and sin of every position's angles, `[max_positions, head_dim/2]`
    /// in the model's dtype.
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    pub fn interleaved(&self) -> bool {
        self.interleaved
    }

    /// Rotates `q` (`[tokens, heads, head_dim]`) and `k` (`[tokens, kv_heads, head_dim]`,
    /// if any) by the angles of `positions` (u32 `[tokens]`), in one op.
    pub fn rotate(&self, q: &Tensor, k: Option<&Tensor>, positions: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        crate::ops::rope(q, k, positions, &self.cos, &self.sin, self.interleaved)
    }

    /// A producer's packed `[tokens, q_heads + 2 kv_heads, head_dim]` projection: Q
    /// rotated and returned, K rotated and V written to `rows` of the caches
    /// (`ops::rope_and_cache`: one launch on CUDA).
    pub fn rotate_and_cache(
        &self,
        qkv: &Tensor,
        positions: &Tensor,
        q_heads: usize,
        cache: &crate::kv::KvCache,
        rows: &Tensor,
    ) -> Result<Tensor> {
        crate::ops::rope_and_cache(
            qkv,
            positions,
            &self.cos,
            &self.sin,
            self.interleaved,
            q_heads,
            cache.k(),
            cache.v(),
            rows,
        )
    }

    /// A packed `[tokens, heads, head_dim]` with its first `rot_heads` heads rotated and
    /// the rest copied (`ops::rope_packed`).
    pub fn rotate_packed(&self, x: &Tensor, positions: &Tensor, rot_heads: usize) -> Result<Tensor> {
        crate::ops::rope_packed(x, positions, &self.cos, &self.sin, self.interleaved, rot_heads)
    }
}
