//! The llama-family model (llama, mistral, qwen2) with Cross-Layer Attention.
//! Producers compute K/V and write their slot of the paged cache; consumers have no
//! K/V projections and read their producer's slot through the same block table.
//! Over 600 lines on purpose: the forward paths (paged serving, tensor-parallel ranks,
//! dense training batches) share the private per-layer types; a split would expose them.

use super::rope::Rope;
use super::weights::{Linear, Part, Weights, WeightsError};
use crate::config::ModelConfig;
use crate::kv::{KvCache, KvDtype, KvLayout, KvScale};
use crate::ops::{
    add_rms_norm, fixed_paged_attention_run, paged_attention_run, reshape_and_cache_scaled, rms_norm, AttentionDims,
    PagedAttentionPlan, SeqSpan,
};
use crate::tp::{AllReduce, Shard};
use candle_core::{DType, Device, Result, Tensor};

/// The model's view of one batched step, built by the runner: flat tokens of all
/// sequences, their positions, where each KV slot writes them, and the slots' tables.
#[derive(Debug)]
pub struct StepInput {
    /// `[tokens]` u32.
    pub input_ids: Tensor,
    /// `[tokens]` u32, absolute positions.
    pub positions: Tensor,
    /// Per KV slot, `[tokens]` u32: the cache row (`block * block_size + offset`) of each token.
    pub cache_rows: Vec<Tensor>,
    pub seqs: Vec<SeqSpan>,
    /// Per KV slot, `[seqs.len() * max_blocks]` row-major block tables.
    pub block_tables: Vec<Vec<u32>>,
    pub max_blocks: usize,
    /// `[outputs]` u32: which token rows produce logits (the last of each sequence).
    pub logits_rows: Tensor,
}

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(w: &Weights, name: &str, size: usize, eps: f64) -> std::result::Result<Self, WeightsError> {
        Ok(RmsNorm {
            weight: w.tensor(name, &[size])?,
            eps: eps as f32,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.weight, self.eps)
    }
    /// `(x + residual, norm(x + residual))` in one pass: the residual stream and its norm.
    fn add_forward(&self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        add_rms_norm(x, residual, &self.weight, self.eps)
    }
}

#[derive(Debug, Clone)]
struct KvProj {
    k: Linear,
    v: Linear,
    /// The paper's separately learnt norm for the K/V input, when the checkpoint has one.
    norm: Option<RmsNorm>,
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    /// q, k and v stacked (`Model::fuse_projections`): one matmul for a producer.
    qkv: Option<Linear>,
    o: Linear,
    /// `Some` for producers only.
    kv: Option<KvProj>,
    slot: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    /// gate and up stacked (`Model::fuse_projections`).
    gate_up: Option<Linear>,
    down: Linear,
}

#[derive(Debug, Clone)]
pub struct Model {
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    layout: std::sync::Arc<KvLayout>,
    cfg: ModelConfig,
    dtype: DType,
    device: Device,
    shard: Shard,
    all_reduce: Option<std::sync::Arc<dyn AllReduce>>,
    /// Every row's result independent of the rest of the step (`set_batch_invariant`).
    batch_invariant: bool,
    /// What the KV cache stores (`set_kv_cache_dtype`; the model dtype by default).
    kv_dtype: KvDtype,
    /// Each KV slot's fp8 scales in use (1.0 unless the cache is fp8).
    kv_scales: Vec<KvScale>,
    /// Each KV slot's scales as the checkpoint gives them (`k_scale`/`v_scale` of the
    /// producer layer), if it does.
    checkpoint_kv_scales: Vec<Option<KvScale>>,
}

impl Layer {
    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(gate_up) = &self.gate_up {
            return self.down.forward(&crate::ops::swiglu_packed(&gate_up.forward(x)?)?);
        }
        if let Some(gu) = Linear::forward_stacked_variables(x, &[&self.gate, &self.up])? {
            return self.down.forward(&crate::ops::swiglu_packed(&gu)?);
        }
        let gu = Linear::forward_many(x, &[&self.gate, &self.up])?;
        // silu(gate) · up as one op (one kernel each way on CUDA).
        self.down.forward(&crate::ops::swiglu(&gu[0], &gu[1])?)
    }
}

impl Layer {
    /// On CUDA a decode step's small matmuls cost more in launches than in bytes: a
    /// producer's q/k/v (without the paper's separate K/V norm) and the MLP's gate/up
    /// become one stacked matmul each, the separate linears views of it (no extra
    /// memory). Quantized weights and training variables stay apart.
    ///
    /// o_proj and down_proj are then stored transposed (`Linear::transposed`): cuBLAS
    /// runs them faster in that layout both for a decode step's few rows and for 1024-row
    /// prefill chunks. The stacked q/k/v and gate/up stay as they are: transposed, they
    /// gain little at a decode step's rows and lose at 1024 (`benches/blas_decode.py`;
    /// BENCHMARKS.md, "Measurements behind design choices").
    ///
    /// In the batch-invariant mode every linear is instead multiplied by
    /// `ops::fixed_matmul` (its `[out, in]` layout), which computes each row alike for
    /// any number of rows.
    fn fuse_projections(&mut self, batch_invariant: Option<DType>) -> Result<()> {
        if let Some(kv) = self.attn.kv.as_mut().filter(|kv| kv.norm.is_none()) {
            if let Some((qkv, parts)) = Linear::fused(&[&self.attn.q, &kv.k, &kv.v])? {
                let [q, k, v]: [Linear; 3] = parts.try_into().expect("three parts");
                (self.attn.q, kv.k, kv.v) = (q, k, v);
                self.attn.qkv = Some(qkv);
            }
        }
        if let Some((gate_up, parts)) = Linear::fused(&[&self.gate, &self.up])? {
            let [gate, up]: [Linear; 2] = parts.try_into().expect("two parts");
            (self.gate, self.up) = (gate, up);
            self.gate_up = Some(gate_up);
        }
        if let Some(dtype) = batch_invariant {
            let fixed = |l: &mut Linear| -> Result<()> {
                *l = l.clone().batch_invariant(dtype)?;
                Ok(())
            };
            let kv = self.attn.kv.as_mut();
            for l in [
                &mut self.attn.q,
                &mut self.attn.o,
                &mut self.gate,
                &mut self.up,
                &mut self.down,
            ]
            .into_iter()
            .chain(self.attn.qkv.as_mut())
            .chain(self.gate_up.as_mut())
            .chain(kv.into_iter().flat_map(|kv| [&mut kv.k, &mut kv.v]))
            {
                fixed(l)?;
            }
            return Ok(());
        }
        self.attn.o = self.attn.o.clone().transposed()?;
        self.down = self.down.clone().transposed()?;
        Ok(())
    }
}

impl Attention {
    /// Training: a producer's Q, K and V as one matmul over its stacked weight variables,
    /// Q and K rotated, V copied: `[tokens, heads + 2·kv_heads, head_dim]`, which
    /// `causal_attention_packed` reads in place and whose gradient comes back in one
    /// piece (one matmul backward instead of three and the sum of their input
    /// gradients). `None` for consumers, the paper's separate K/V norm, and weights that
    /// are not variables (serving, which stacks its own in `fuse_projections`).
    fn project_packed(&self, normed: &Tensor, rope: &Rope, positions: &Tensor) -> Result<Option<Tensor>> {
        let Some(kv) = self.kv.as_ref().filter(|kv| kv.norm.is_none()) else {
            return Ok(None);
        };
        let Some(y) = Linear::forward_stacked_variables(normed, &[&self.q, &kv.k, &kv.v])? else {
            return Ok(None);
        };
        let y = y.reshape((normed.dim(0)?, self.heads + 2 * self.kv_heads, self.head_dim))?;
        rope.rotate_packed(&y, positions, self.heads + self.kv_heads).map(Some)
    }

    /// A producer with stacked q/k/v (CUDA serving): one matmul, then Q rotated and
    /// returned while K (rotated) and V go straight to `rows` of the slot's cache, in
    /// one launch. `None` for the other layers, which [`Attention::project`] serves.
    fn project_into_cache(
        &self,
        normed: &Tensor,
        rope: &Rope,
        positions: &Tensor,
        cache: &KvCache,
        rows: &Tensor,
    ) -> Result<Option<Tensor>> {
        let Some(qkv) = &self.qkv else {
            return Ok(None);
        };
        let y = qkv
            .forward(normed)?
            .reshape((normed.dim(0)?, self.heads + 2 * self.kv_heads, self.head_dim))?;
        rope.rotate_and_cache(&y, positions, self.heads, cache, rows).map(Some)
    }

    /// Q, and for producers K and V, `[tokens, heads, head_dim]`; Q and K rotated for
    /// `positions` (u32 `[tokens]`).
    fn project(
        &self,
        normed: &Tensor,
        residual: &Tensor,
        rope: &Rope,
        positions: &Tensor,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let t = normed.dim(0)?;
        if let Some(qkv) = &self.qkv {
            // One matmul; Q, K and V are column slices of its rows, which RoPE and the
            // cache write read in place.
            let y = qkv
                .forward(normed)?
                .reshape((t, self.heads + 2 * self.kv_heads, self.head_dim))?;
            let q = y.narrow(1, 0, self.heads)?;
            let k = y.narrow(1, self.heads, self.kv_heads)?;
            let v = y.narrow(1, self.heads + self.kv_heads, self.kv_heads)?;
            let (q, k) = rope.rotate(&q, Some(&k), positions)?;
            return Ok((q, Some((k.expect("rotate returns k when given k"), v))));
        }
        let (q, kv) = match &self.kv {
            None => (self.q.forward(normed)?, None),
            // Q, K and V from one input: one fused call.
            Some(p) if p.norm.is_none() => {
                let mut qkv = Linear::forward_many(normed, &[&self.q, &p.k, &p.v])?.into_iter();
                let (q, k, v) = (qkv.next(), qkv.next(), qkv.next());
                (
                    q.expect("three outputs"),
                    Some((k.expect("three outputs"), v.expect("three outputs"))),
                )
            }
            // The paper's separate K/V norm: K/V come from the residual normed with it.
            Some(p) => {
                let kv_in = p.norm.as_ref().expect("matched above").forward(residual)?;
                let kv = Linear::forward_many(&kv_in, &[&p.k, &p.v])?;
                (self.q.forward(normed)?, Some((kv[0].clone(), kv[1].clone())))
            }
        };
        let q = q.reshape((t, self.heads, self.head_dim))?;
        match kv {
            None => Ok((rope.rotate(&q, None, positions)?.0, None)),
            Some((k, v)) => {
                let k = k.reshape((t, self.kv_heads, self.head_dim))?;
                let (q, k) = rope.rotate(&q, Some(&k), positions)?;
                let k = k.expect("rotate returns k when given k");
                Ok((q, Some((k, v.reshape((t, self.kv_heads, self.head_dim))?))))
            }
        }
    }
}

/// A producer's fp8 KV scales from the checkpoint, under the names vLLM reads:
/// `<attn>.k_scale` / `<attn>.v_scale`, `<attn>.attn.k_scale` / `…v_scale`, or one
/// `<attn>.kv_scale` for both. `None` when it has neither.
fn checkpoint_kv_scale(w: &Weights, attn: &str) -> std::result::Result<Option<KvScale>, WeightsError> {
    for prefix in [attn.to_string(), format!("{attn}.attn")] {
        let k = w.scalar_f32(&format!("{prefix}.k_scale"))?;
        let v = w.scalar_f32(&format!("{prefix}.v_scale"))?;
        if k.is_some() || v.is_some() {
            let scale = KvScale {
                k: k.unwrap_or(1.0),
                v: v.unwrap_or(1.0),
            };
            return check_kv_scale(&prefix, scale).map(Some);
        }
    }
    match w.scalar_f32(&format!("{attn}.kv_scale"))? {
        Some(s) => check_kv_scale(attn, KvScale { k: s, v: s }).map(Some),
        None => Ok(None),
    }
}

fn check_kv_scale(prefix: &str, s: KvScale) -> std::result::Result<KvScale, WeightsError> {
    if [s.k, s.v].iter().all(|x| x.is_finite() && *x > 0.0) {
        return Ok(s);
    }
    Err(WeightsError::Load {
        name: format!("{prefix}.k_scale/v_scale"),
        reason: format!("fp8 KV scales must be positive and finite, found k {} v {}", s.k, s.v),
    })
}

impl Model {
    pub fn load(cfg: &ModelConfig, w: &Weights, rope_interleaved: bool) -> std::result::Result<Self, WeightsError> {
        Self::load_shard(cfg, w, rope_interleaved, Shard::single())
    }

    /// Rank `shard.rank`'s share of the model for tensor parallelism (`crate::tp`): its
    /// query heads, their KV heads and its slice of the MLP; the rest replicated. Its
    /// forward must run alongside the other ranks', with [`Model::set_all_reduce`] set.
    pub fn load_shard(
        cfg: &ModelConfig,
        w: &Weights,
        rope_interleaved: bool,
        shard: Shard,
    ) -> std::result::Result<Self, WeightsError> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let split = shard
            .split(nh, nkv, cfg.intermediate_size)
            .map_err(|reason| WeightsError::Load {
                name: format!("tensor-parallel rank {}", shard.rank),
                reason,
            })?;
        let (heads, kv_heads) = (split.heads.len(), split.kv_heads.len());
        let rows = |r: &std::ops::Range<usize>, per: usize| r.start * per..r.end * per;
        let (q_part, kv_part, o_part, up_part, down_part) = if shard.is_single() {
            (Part::Whole, Part::Whole, Part::Whole, Part::Whole, Part::Whole)
        } else {
            (
                Part::Rows(rows(&split.heads, d)),
                Part::Rows(rows(&split.kv_heads, d)),
                Part::Cols(rows(&split.heads, d)),
                Part::Rows(split.ffn.clone()),
                Part::Cols(split.ffn.clone()),
            )
        };
        // A row-parallel layer's bias is added once, after the all-reduce: rank 0 holds it.
        let partial_bias = |bias: bool| bias && shard.rank == 0;
        let layout = std::sync::Arc::new(KvLayout::new(
            cfg.kv_source.clone(),
            kv_heads,
            d,
            w.dtype().size_in_bytes(),
        ));
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let mut checkpoint_kv_scales = Vec::with_capacity(layout.kv_layers());
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            if layout.is_producer(i) {
                checkpoint_kv_scales.push(checkpoint_kv_scale(w, &a)?);
            }
            let kv = if layout.is_producer(i) {
                let missing = |e: WeightsError| match e {
                    WeightsError::Missing { name, .. } => WeightsError::Missing {
                        name,
                        hint: format!(" (layer {i} is a K/V producer under this sharing, so it needs k_proj/v_proj)"),
                    },
                    e => e,
                };
                let knorm = format!("{a}.kv_layernorm.weight");
                Some(KvProj {
                    k: w.linear_part(&format!("{a}.k_proj"), nkv * d, h, cfg.attention_bias, &kv_part)
                        .map_err(missing)?,
                    v: w.linear_part(&format!("{a}.v_proj"), nkv * d, h, cfg.attention_bias, &kv_part)
                        .map_err(missing)?,
                    norm: if w.contains(&knorm) {
                        Some(RmsNorm::load(w, &knorm, h, cfg.rms_norm_eps)?)
                    } else {
                        None
                    },
                })
            } else {
                None
            };
            layers.push(Layer {
                input_norm: RmsNorm::load(w, &format!("{p}.input_layernorm.weight"), h, cfg.rms_norm_eps)?,
                attn: Attention {
                    q: w.linear_part(&format!("{a}.q_proj"), nh * d, h, cfg.attention_bias, &q_part)?,
                    qkv: None,
                    o: w.linear_part(
                        &format!("{a}.o_proj"),
                        h,
                        nh * d,
                        partial_bias(cfg.o_proj_bias),
                        &o_part,
                    )?,
                    kv,
                    slot: layout.slot_of_layer(i),
                    heads,
                    kv_heads,
                    head_dim: d,
                },
                post_norm: RmsNorm::load(w, &format!("{p}.post_attention_layernorm.weight"), h, cfg.rms_norm_eps)?,
                gate: w.linear_part(
                    &format!("{p}.mlp.gate_proj"),
                    cfg.intermediate_size,
                    h,
                    cfg.mlp_bias,
                    &up_part,
                )?,
                up: w.linear_part(
                    &format!("{p}.mlp.up_proj"),
                    cfg.intermediate_size,
                    h,
                    cfg.mlp_bias,
                    &up_part,
                )?,
                gate_up: None,
                down: w.linear_part(
                    &format!("{p}.mlp.down_proj"),
                    h,
                    cfg.intermediate_size,
                    partial_bias(cfg.mlp_bias),
                    &down_part,
                )?,
            });
        }
        // Tied embeddings: checkpoints that tie them usually store no lm_head.
        let lm_head = if w.contains("lm_head.weight") {
            w.linear("lm_head", cfg.vocab_size, h, false)?
        } else {
            w.linear("model.embed_tokens", cfg.vocab_size, h, false)?
        };
        let rope = Rope::new(
            cfg,
            cfg.max_position_embeddings,
            rope_interleaved,
            w.dtype(),
            w.device(),
        )
        .map_err(|e| WeightsError::Load {
            name: "rope".into(),
            reason: e.to_string(),
        })?;
        Ok(Model {
            embed: w.tensor("model.embed_tokens.weight", &[cfg.vocab_size, h])?,
            layers,
            norm: RmsNorm::load(w, "model.norm.weight", h, cfg.rms_norm_eps)?,
            lm_head,
            rope,
            layout,
            cfg: cfg.clone(),
            dtype: w.dtype(),
            device: w.device().clone(),
            shard,
            all_reduce: None,
            batch_invariant: false,
            kv_dtype: KvDtype::of_model(w.dtype()),
            kv_scales: vec![KvScale::default(); checkpoint_kv_scales.len()],
            checkpoint_kv_scales,
        })
    }

    /// The KV cache's element type (`--kv-cache-dtype`); set it before the runner is
    /// made. The layout's accounting follows it. An fp8 cache takes each slot's scales
    /// from the checkpoint; slots it has none for get 1.0, and their names are returned
    /// (the caller warns).
    pub fn set_kv_cache_dtype(&mut self, dtype: KvDtype) -> Vec<usize> {
        self.kv_dtype = dtype;
        self.layout = std::sync::Arc::new((*self.layout).clone().with_dtype(dtype));
        let mut defaulted = Vec::new();
        self.kv_scales = self
            .checkpoint_kv_scales
            .iter()
            .enumerate()
            .map(|(slot, s)| match (dtype.is_fp8(), s) {
                (false, _) => KvScale::default(),
                (true, Some(s)) => *s,
                (true, None) => {
                    defaulted.push(slot);
                    KvScale::default()
                }
            })
            .collect();
        defaulted
    }
    pub fn kv_cache_dtype(&self) -> KvDtype {
        self.kv_dtype
    }
    /// Each KV slot's fp8 scales (1.0 for a float cache).
    pub fn kv_scales(&self) -> &[KvScale] {
        &self.kv_scales
    }

    /// For serving on CUDA (the runner calls it; a no-op elsewhere): a producer's q/k/v
    /// and every MLP's gate/up become one stacked matmul each ([`Linear::fused`]). Not
    /// for training: its bf16 model is rebuilt from the f32 variables every step, and
    /// stacking would copy every weight again each time.
    pub fn fuse_projections(&mut self) -> Result<()> {
        if self.device.is_cuda() {
            let fixed = self.batch_invariant.then_some(self.dtype);
            for l in self.layers.iter_mut() {
                l.fuse_projections(fixed)?;
            }
            if fixed.is_some() {
                self.lm_head = self.lm_head.clone().batch_invariant(self.dtype)?;
            }
        }
        Ok(())
    }

    /// The batch-invariant mode: a request's tokens and log-probs do not depend on what
    /// else the step holds (other sequences, how its prompt was chunked, a recompute
    /// after preemption). The CPU ops always are; on CUDA the mode swaps cuBLAS and the
    /// split-KV attention kernels for `ops::fixed_matmul` and `ops::fixed_paged_attention`,
    /// which are slower. Set it before the runner is made (`fuse_projections` applies it).
    pub fn set_batch_invariant(&mut self, on: bool) {
        self.batch_invariant = on;
    }
    pub fn batch_invariant(&self) -> bool {
        self.batch_invariant
    }

    /// The transport that completes this rank's partial sums (tensor parallelism only).
    pub fn set_all_reduce(&mut self, comm: std::sync::Arc<dyn AllReduce>) {
        self.all_reduce = Some(comm);
    }
    /// This rank failed mid-step: its peers must not wait for it in an all-reduce.
    pub fn abort_all_reduce(&self) {
        if let Some(c) = &self.all_reduce {
            c.abort();
        }
    }
    pub fn shard(&self) -> Shard {
        self.shard
    }
    /// KV heads this rank's cache holds (all of them without tensor parallelism).
    pub fn kv_heads(&self) -> usize {
        self.layout.num_kv_heads
    }

    /// A row-parallel layer's output: this rank's partial sum, completed over the ranks.
    fn reduce(&self, partial: Tensor) -> Result<Tensor> {
        match (&self.all_reduce, self.shard.is_single()) {
            (Some(c), _) => c.all_reduce_sum(&partial),
            (None, true) => Ok(partial),
            (None, false) => candle_core::bail!(
                "tensor-parallel rank {} of {} has no all-reduce transport",
                self.shard.rank,
                self.shard.world
            ),
        }
    }

    /// Whether RoPE rotates adjacent pairs (GGUF llama checkpoints, whose Q/K rows
    /// llama.cpp permuted) rather than HF's halves.
    pub fn rope_interleaved(&self) -> bool {
        self.rope.interleaved()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    pub fn layout(&self) -> &std::sync::Arc<KvLayout> {
        &self.layout
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// The norm that reads the residual stream before layer `i` (the final norm after the last).
    fn norm_before(&self, i: usize) -> &RmsNorm {
        self.layers.get(i).map_or(&self.norm, |l| &l.input_norm)
    }

    /// One layer's residual updates after its attention output `attn` (`[tokens,
    /// heads * head_dim]`): `x + o(attn)`, the MLP on its post-attention norm, and the next
    /// layer's (or the final) norm fused with each add. Returns the new residual stream
    /// and its norm for what comes next.
    fn finish_layer(&self, i: usize, x: &Tensor, attn: &Tensor) -> Result<(Tensor, Tensor)> {
        let layer = &self.layers[i];
        let (x, h) = layer
            .post_norm
            .add_forward(x, &self.reduce(layer.attn.o.forward(attn)?)?)?;
        self.norm_before(i + 1).add_forward(&x, &self.reduce(layer.mlp(&h)?)?)
    }

    /// f32 logits of rows already through the final norm.
    fn logits(&self, normed: &Tensor) -> Result<Tensor> {
        crate::ops::widen_f32(&self.lm_head.forward(normed)?)
    }

    /// One batched step through the paged cache. Returns f32 logits `[outputs, vocab]`.
    pub fn forward(&self, step: &StepInput, cache: &KvCache) -> Result<Tensor> {
        self.forward_rank(step, cache, true)?
            .ok_or_else(|| candle_core::Error::Msg("no logits".into()))
    }

    /// [`Model::forward`] for one tensor-parallel rank: only the rank whose logits are
    /// used (`logits`) runs the `lm_head`.
    pub fn forward_rank(&self, step: &StepInput, cache: &KvCache, logits: bool) -> Result<Option<Tensor>> {
        let plan = self.attention_plan(step, cache)?;
        self.forward_planned(step, cache, &plan, logits)
    }

    /// The step's paged-attention plan, made once before the layers run: layers reading
    /// one slot share its checks and (CUDA) launch this step. The batch-invariant mode's
    /// kernel needs no launch plan, only the plan's per-step uploads.
    pub fn attention_plan<'a>(&self, step: &'a StepInput, cache: &KvCache) -> Result<PagedAttentionPlan<'a>> {
        let scale = self.attention_scale();
        if self.batch_invariant {
            return Ok(
                PagedAttentionPlan::unplanned(&step.seqs, &step.block_tables, step.max_blocks, scale)
                    .with_kv_scales(self.kv_scales.clone()),
            );
        }
        let (_, block_size, kv_heads, head_dim) = cache.k().dims4()?;
        let dims = AttentionDims {
            tokens: step.input_ids.dim(0)?,
            heads: self.layers.first().map_or(0, |l| l.attn.heads),
            kv_heads,
            head_dim,
            block_size,
            dtype: self.dtype,
            fp8_cache: cache.dtype().is_fp8(),
        };
        Ok(PagedAttentionPlan::new(
            &self.device,
            &step.seqs,
            &step.block_tables,
            step.max_blocks,
            scale,
            dims,
        )?
        .with_kv_scales(self.kv_scales.clone()))
    }

    /// 1/√head_dim, the attention scale.
    pub fn attention_scale(&self) -> f32 {
        1.0 / (self.cfg.head_dim as f32).sqrt()
    }

    /// [`Model::forward_rank`] with the step's attention plan made by the caller
    /// ([`Model::attention_plan`]; a CUDA decode graph brings one over the runner's
    /// device tables).
    pub fn forward_planned(
        &self,
        step: &StepInput,
        cache: &KvCache,
        plan: &PagedAttentionPlan<'_>,
        logits: bool,
    ) -> Result<Option<Tensor>> {
        let mut x = self.embed.index_select(&step.input_ids, 0)?;
        let mut normed = self.norm_before(0).forward(&x)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let a = &layer.attn;
            let rows = &step.cache_rows[a.slot];
            // The fused RoPE-and-write kernel writes float caches only: an fp8 cache is
            // written by `reshape_and_cache`, which quantizes.
            let fused = if cache.dtype().is_fp8() {
                None
            } else {
                a.project_into_cache(&normed, &self.rope, &step.positions, cache, rows)?
            };
            let q = match fused {
                Some(q) => q,
                None => {
                    let (q, kv) = a.project(&normed, &x, &self.rope, &step.positions)?;
                    if let Some((k, v)) = kv {
                        let s = self.kv_scales.get(a.slot).copied().unwrap_or_default();
                        reshape_and_cache_scaled(cache.k(), &k, rows, s.k)?;
                        reshape_and_cache_scaled(cache.v(), &v, rows, s.v)?;
                    }
                    q
                }
            };
            let o = if self.batch_invariant {
                fixed_paged_attention_run(plan, a.slot, &q, cache.k(), cache.v())?
            } else {
                paged_attention_run(plan, a.slot, &q, cache.k(), cache.v())?
            };
            let t = o.dim(0)?;
            (x, normed) = self.finish_layer(i, &x, &o.reshape((t, a.heads * a.head_dim))?)?;
        }
        if !logits {
            return Ok(None);
        }
        self.logits(&normed.index_select(&step.logits_rows, 0)?).map(Some)
    }

    /// The reference path: one full causal forward of one sequence with no cache.
    /// Consumers use the K/V their producer computed in this same pass. f32 logits `[tokens, vocab]`.
    pub fn forward_dense(&self, tokens: &[u32]) -> Result<Tensor> {
        self.forward_dense_batch(&[tokens])
    }

    /// [`Model::forward_dense`] of `b` sequences of one length `t` in one graph (the
    /// training step's batch): every projection, norm and the MLP run once on the flat
    /// `[b·t, …]` rows (positions `0..t` repeated per sequence), attention on
    /// `[b, t, heads, d]`. f32 logits `[b·t, vocab]`, sequence by sequence.
    pub fn forward_dense_batch(&self, seqs: &[&[u32]]) -> Result<Tensor> {
        self.forward_dense_batch_in_dtype(seqs)?.to_dtype(DType::F32)
    }

    /// [`Model::forward_dense_batch`] with the logits left in the model's dtype: the
    /// training loss reads bf16 logits directly (its kernel computes in f32), sparing a
    /// cast of the `[b·t, vocab]` logits each way (5 % of a step).
    pub fn forward_dense_batch_in_dtype(&self, seqs: &[&[u32]]) -> Result<Tensor> {
        let (b, t) = (seqs.len(), seqs.first().map_or(0, |s| s.len()));
        if b == 0 {
            candle_core::bail!("forward_dense_batch: no sequences");
        }
        if let Some(s) = seqs.iter().find(|s| s.len() != t) {
            candle_core::bail!(
                "forward_dense_batch: sequences of {} and {t} tokens (one length needed)",
                s.len()
            );
        }
        let flat: Vec<u32> = seqs.concat();
        let ids = Tensor::new(flat.as_slice(), &self.device)?;
        let pos: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
        let positions = Tensor::new(pos.as_slice(), &self.device)?;
        // The custom op's backward scatters with atomics; candle's (index_add) is very slow on CUDA.
        let mut x = crate::ops::embedding(&self.embed, &ids)?;
        let mut normed = self.norm_before(0).forward(&x)?;
        let mut produced: Vec<Option<(Tensor, Tensor)>> = vec![None; self.layers.len()];
        // Training: producers' packed, rotated Q/K/V `[b, t, heads + 2·kv_heads, d]`.
        let mut packed: Vec<Option<Tensor>> = vec![None; self.layers.len()];
        let scale = |a: &Attention| 1.0 / (a.head_dim as f32).sqrt();
        for (i, layer) in self.layers.iter().enumerate() {
            let a = &layer.attn;
            let source = self.layout.producer_of_slot(a.slot);
            let o = if let Some(qkv) = a.project_packed(&normed, &self.rope, &positions)? {
                let qkv = qkv.reshape((b, t, a.heads + 2 * a.kv_heads, a.head_dim))?;
                let o = crate::ops::causal_attention_packed(&qkv, a.heads, a.kv_heads, scale(a))?;
                packed[i] = Some(qkv);
                Some(o)
            } else if let (None, Some(src)) = (&a.kv, &packed[source]) {
                // A consumer of a packed producer: K and V read from its packed tensor,
                // whose gradient they add to in one piece.
                let q = a.q.forward(&normed)?.reshape((b * t, a.heads, a.head_dim))?;
                let q = self.rope.rotate(&q, None, &positions)?.0;
                let q = q.reshape((b, t, a.heads, a.head_dim))?;
                let kv_head = src.dim(2)? - 2 * a.kv_heads;
                Some(crate::ops::causal_attention_shared_kv(
                    &q,
                    src,
                    kv_head,
                    a.kv_heads,
                    scale(a),
                )?)
            } else {
                None
            };
            if let Some(o) = o {
                let o = o.reshape((b * t, a.heads * a.head_dim))?;
                (x, normed) = self.finish_layer(i, &x, &o)?;
                continue;
            }
            let (q, kv) = a.project(&normed, &x, &self.rope, &positions)?;
            if kv.is_some() {
                produced[i] = kv;
            }
            let (k, v) = produced[source].as_ref().expect("producers run before their consumers");
            // Fused causal attention (differentiable; f32 inside on the CPU, the flash
            // kernels on CUDA in f16/bf16). The flat rows are sequence-major, so
            // `[b·t, heads, d]` → `[b, t, heads, d]` is a free reshape.
            let batched = |m: &Tensor, heads: usize| m.reshape((b, t, heads, a.head_dim));
            let o = crate::ops::causal_attention(
                &batched(&q, a.heads)?,
                &batched(k, a.kv_heads)?,
                &batched(v, a.kv_heads)?,
                scale(a),
            )?
            .reshape((b * t, a.heads * a.head_dim))?
            .to_dtype(self.dtype)?;
            (x, normed) = self.finish_layer(i, &x, &o)?;
        }
        self.lm_head.forward(&normed)
    }

    /// Dense weights of every tensor, by HF name, for `convert` (consumers' K/V dropped).
    pub fn named_linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let a = format!("model.layers.{i}.self_attn");
            out.push((format!("{a}.q_proj"), &l.attn.q));
            out.push((format!("{a}.o_proj"), &l.attn.o));
            if let Some(kv) = &l.attn.kv {
                out.push((format!("{a}.k_proj"), &kv.k));
                out.push((format!("{a}.v_proj"), &kv.v));
            }
            let m = format!("model.layers.{i}.mlp");
            out.push((format!("{m}.gate_proj"), &l.gate));
            out.push((format!("{m}.up_proj"), &l.up));
            out.push((format!("{m}.down_proj"), &l.down));
        }
        out.push(("lm_head".into(), &self.lm_head));
        out
    }

    /// Every non-linear tensor (norms, embedding), by HF name, for `convert`.
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), &self.embed),
            ("model.norm.weight".into(), &self.norm.weight),
        ];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), &l.input_norm.weight));
            out.push((format!("{p}.post_attention_layernorm.weight"), &l.post_norm.weight));
            if let Some(n) = l.attn.kv.as_ref().and_then(|kv| kv.norm.as_ref()) {
                out.push((format!("{p}.self_attn.kv_layernorm.weight"), &n.weight));
            }
        }
        out
    }
}
