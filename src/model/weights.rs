//! Where a model's tensors come from: a HF safetensors directory (one file or sharded)
//! or a GGUF file. Names are always the Hugging Face ones (`model.layers.3.self_attn.q_proj.weight`);
//! the GGUF side maps them to llama.cpp's (`blk.3.attn_q.weight`).
//! Over 600 lines only with its tests (about 560 without).

use crate::config::ModelConfig;
use crate::ops::{dense_matmul, fixed_matmul, qmatmul, qmatmul_many, Isa, QFormat, QMatrix};
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Module, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("tensor `{name}` is missing from the checkpoint{hint}")]
    Missing { name: String, hint: String },
    #[error("tensor `{name}` has shape {got:?}, expected {want:?}")]
    Shape {
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("tensor `{name}`: {reason}")]
    Load { name: String, reason: String },
}

/// A linear layer's weight (`[out, in]`): dense or candle-quantized, or Q4_1/Q8_0
/// through our own kernels (`ops::qmatmul`: candle's Q4_1 dot product is scalar).
#[derive(Debug, Clone)]
enum LinearWeight {
    Candle(QMatMul),
    /// A dense weight stored transposed, `[in, out]` (CUDA serving, [`Linear::transposed`]):
    /// for some shapes cuBLAS runs `x · w` (its NN form) faster than `x · wᵀ` over the
    /// `[out, in]` checkpoint layout (TN), e.g. down_proj at a decode step's rows
    /// (`benches/blas_decode.py`; BENCHMARKS.md, "Measurements behind design choices").
    DenseT(Tensor),
    Quant(Arc<QMatrix>),
    /// A dense `[out, in]` weight multiplied by `ops::fixed_matmul` (the batch-invariant
    /// mode on CUDA, [`Linear::batch_invariant`]).
    Fixed(Tensor),
}

/// A linear layer: weight and optional bias.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            // Serving on the CPU: one fixed arithmetic per output element, so a token's
            // result does not depend on the batch (`ops::dense_matmul`). Training keeps
            // candle's matmul, which has a backward.
            LinearWeight::Candle(QMatMul::Tensor(w))
                if x.device().is_cpu() && x.dtype() == w.dtype() && !x.track_op() && !w.track_op() =>
            {
                dense_matmul(x, w)?
            }
            LinearWeight::Candle(w) => w.forward(x)?,
            LinearWeight::DenseT(wt) => x.broadcast_matmul(wt)?,
            LinearWeight::Quant(w) => qmatmul(x, w, Isa::best())?,
            LinearWeight::Fixed(w) => fixed_matmul(x, w)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
    /// Applies several linears to one input (q/k/v, gate/up). Our quantized weights share one
    /// activation quantization and one parallel region; others run one by one.
    pub fn forward_many(x: &Tensor, ls: &[&Linear]) -> candle_core::Result<Vec<Tensor>> {
        let quant: Option<Vec<&QMatrix>> = ls
            .iter()
            .map(|l| match &l.weight {
                LinearWeight::Quant(w) => Some(w.as_ref()),
                LinearWeight::Candle(_) | LinearWeight::DenseT(_) | LinearWeight::Fixed(_) => None,
            })
            .collect();
        match quant {
            Some(ws) if ls.len() > 1 && x.dtype() == DType::F32 => qmatmul_many(x, &ws)?
                .into_iter()
                .zip(ls)
                .map(|(y, l)| match &l.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                })
                .collect(),
            _ => ls.iter().map(|l| l.forward(x)).collect(),
        }
    }

    /// One linear computing `ls`' outputs side by side (their weights stacked by rows:
    /// one matmul instead of several), and each of `ls` again as a view of the stacked
    /// weight (no second copy). `None` unless every weight is a dense tensor that is not a
    /// training variable (autograd must keep reaching the variables), and all or none
    /// have a bias.
    pub fn fused(ls: &[&Linear]) -> candle_core::Result<Option<(Linear, Vec<Linear>)>> {
        let dense: Option<Vec<&Tensor>> = ls
            .iter()
            .map(|l| match &l.weight {
                LinearWeight::Candle(QMatMul::Tensor(t)) if !t.is_variable() => Some(t),
                _ => None,
            })
            .collect();
        let Some(ws) = dense else { return Ok(None) };
        let biases: Option<Vec<&Tensor>> = ls.iter().map(|l| l.bias.as_ref()).collect();
        if ws.is_empty() || (biases.is_none() && ls.iter().any(|l| l.bias.is_some())) {
            return Ok(None);
        }
        let stacked = Tensor::cat(&ws, 0)?;
        let stacked_bias = biases.map(|b| Tensor::cat(&b, 0)).transpose()?;
        let mut parts = Vec::with_capacity(ls.len());
        let mut row = 0;
        for w in &ws {
            let n = w.dim(0)?;
            parts.push(Linear {
                weight: LinearWeight::Candle(QMatMul::Tensor(stacked.narrow(0, row, n)?)),
                bias: stacked_bias.as_ref().map(|b| b.narrow(0, row, n)).transpose()?,
            });
            row += n;
        }
        let fused = Linear {
            weight: LinearWeight::Candle(QMatMul::Tensor(stacked)),
            bias: stacked_bias,
        };
        Ok(Some((fused, parts)))
    }

    /// The layer with its dense weight stored transposed (`[in, out]`, contiguous) for CUDA
    /// serving, where cuBLAS multiplies by it faster for some shapes (see
    /// `LinearWeight::DenseT`); unchanged when the weight is not a dense tensor or is a
    /// training variable. The `[out, in]` tensor is released unless something else holds it.
    pub fn transposed(self) -> candle_core::Result<Linear> {
        match &self.weight {
            LinearWeight::Candle(QMatMul::Tensor(t)) if !t.is_variable() => Ok(Linear {
                weight: LinearWeight::DenseT(t.t()?.contiguous()?),
                bias: self.bias,
            }),
            _ => Ok(self),
        }
    }

    /// The layer for the batch-invariant mode on CUDA: its weight dense (`[out, in]`, in
    /// `dtype` when it was quantized) and multiplied by `ops::fixed_matmul`, whose result
    /// for a row does not depend on the other rows. Unchanged off CUDA, where the default
    /// matmuls already are, and for training variables.
    pub fn batch_invariant(self, dtype: DType) -> candle_core::Result<Linear> {
        let weight = match &self.weight {
            LinearWeight::Candle(QMatMul::Tensor(t)) if t.is_variable() => return Ok(self),
            LinearWeight::Fixed(_) => return Ok(self),
            _ if !self.dense_weight()?.device().is_cuda() => return Ok(self),
            LinearWeight::Candle(QMatMul::Tensor(t)) => t.contiguous()?,
            _ => self.dense_weight()?.to_dtype(dtype)?.contiguous()?,
        };
        Ok(Linear {
            weight: LinearWeight::Fixed(weight),
            bias: self.bias,
        })
    }

    /// Training: `ls` (dense training variables, no biases) applied to `x` as one matmul
    /// over their weights stacked by rows, outputs side by side. The stacking is part of
    /// the graph (a copy of the weights each step, small beside the activations), so each
    /// variable still gets its gradient, and the backward takes one matmul for the input's
    /// gradient instead of one per linear plus the sums of their results. `None` when any
    /// weight is not such a variable (serving stacks its weights once, `Linear::fused`).
    pub fn forward_stacked_variables(x: &Tensor, ls: &[&Linear]) -> candle_core::Result<Option<Tensor>> {
        let vars: Option<Vec<&Tensor>> = ls
            .iter()
            .map(|l| match (&l.weight, &l.bias) {
                (LinearWeight::Candle(QMatMul::Tensor(t)), None) if t.is_variable() => Some(t),
                _ => None,
            })
            .collect();
        match vars {
            Some(ws) if ws.len() > 1 => {
                let stacked = Tensor::cat(&ws, 0)?;
                candle_nn::Linear::new(stacked, None).forward(x).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The weight as a dense tensor (for `convert`).
    pub fn dense_weight(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            LinearWeight::Candle(QMatMul::QTensor(q)) => q.dequantize(&q.device()),
            LinearWeight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => Ok(t.clone()),
            LinearWeight::DenseT(wt) => wt.t()?.contiguous(),
            LinearWeight::Quant(w) => w.dequantize(),
            LinearWeight::Fixed(w) => Ok(w.clone()),
        }
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// Which share of a `[out, in]` tensor a tensor-parallel rank loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Whole,
    /// Output rows (column-parallel: q/k/v, gate/up).
    Rows(std::ops::Range<usize>),
    /// Input columns (row-parallel: o, down).
    Cols(std::ops::Range<usize>),
}

pub enum Weights {
    Safetensors {
        st: MmapedSafetensors,
        dtype: DType,
        device: Device,
    },
    Gguf {
        content: gguf_file::Content,
        path: PathBuf,
        dtype: DType,
        device: Device,
        /// Keep quantized linears quantized (f32 runs only); `false` dequantizes them.
        keep_quantized: bool,
    },
    /// Tensors already in memory, by HF name: built in code, e.g. [`Weights::random`].
    Tensors {
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: Device,
    },
}

/// llama.cpp's name for a Hugging Face tensor name.
pub fn gguf_name(hf: &str) -> String {
    let top = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = top.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        let (layer, rest) = rest.split_once('.').unwrap_or((rest, ""));
        let map = [
            ("input_layernorm.", "attn_norm."),
            ("post_attention_layernorm.", "ffn_norm."),
            ("self_attn.q_proj.", "attn_q."),
            ("self_attn.k_proj.", "attn_k."),
            ("self_attn.v_proj.", "attn_v."),
            ("self_attn.o_proj.", "attn_output."),
            ("self_attn.kv_layernorm.", "attn_kv_norm."),
            ("mlp.gate_proj.", "ffn_gate."),
            ("mlp.up_proj.", "ffn_up."),
            ("mlp.down_proj.", "ffn_down."),
        ];
        for (h, g) in map {
            if let Some(suffix) = rest.strip_prefix(h) {
                return format!("blk.{layer}.{g}{suffix}");
            }
        }
    }
    hf.to_string()
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> WeightsError {
    WeightsError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

impl Weights {
    pub fn safetensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self, WeightsError> {
        for f in files {
            // Validate each file's header and length up front, for an error that names the file.
            let bytes = std::fs::File::open(f).map_err(|e| file_err(f, e))?;
            let mmap = unsafe { memmap2::Mmap::map(&bytes) }.map_err(|e| file_err(f, e))?;
            safetensors::SafeTensors::deserialize(&mmap)
                .map_err(|e| file_err(f, format!("not a valid safetensors file (truncated or corrupt?): {e}")))?;
        }
        let st = unsafe { MmapedSafetensors::multi(files) }
            .map_err(|e| file_err(files.first().map(|p| p.as_path()).unwrap_or(Path::new("?")), e))?;
        Ok(Weights::Safetensors {
            st,
            dtype,
            device: device.clone(),
        })
    }

    pub fn gguf(path: &Path, dtype: DType, device: &Device) -> Result<Self, WeightsError> {
        let mut f = std::fs::File::open(path).map_err(|e| file_err(path, e))?;
        let content = gguf_file::Content::read(&mut f)
            .map_err(|e| file_err(path, format!("not a valid GGUF file (truncated or corrupt?): {e}")))?;
        let file_len = f.metadata().map_err(|e| file_err(path, e))?.len();
        for (name, info) in &content.tensor_infos {
            let elems: usize = info.shape.elem_count();
            let bytes = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > file_len {
                return Err(file_err(
                    path,
                    format!("truncated: tensor `{name}` ends at byte {end} but the file has {file_len} bytes"),
                ));
            }
        }
        Ok(Weights::Gguf {
            keep_quantized: true,
            content,
            path: path.to_path_buf(),
            dtype,
            device: device.clone(),
        })
    }

    /// Linears load as dense tensors in the model dtype: exact f32 arithmetic, for
    /// comparisons against the quantized path (activation quantization drifts).
    pub fn dequantized(mut self) -> Self {
        if let Weights::Gguf { keep_quantized, .. } = &mut self {
            *keep_quantized = false;
        }
        self
    }

    pub fn gguf_content(&self) -> Option<&gguf_file::Content> {
        match self {
            Weights::Gguf { content, .. } => Some(content),
            _ => None,
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Weights::Safetensors { dtype, .. } | Weights::Gguf { dtype, .. } | Weights::Tensors { dtype, .. } => *dtype,
        }
    }
    pub fn device(&self) -> &Device {
        match self {
            Weights::Safetensors { device, .. } | Weights::Gguf { device, .. } | Weights::Tensors { device, .. } => {
                device
            }
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            Weights::Safetensors { st, .. } => st.get(name).is_ok(),
            Weights::Gguf { content, .. } => content.tensor_infos.contains_key(&gguf_name(name)),
            Weights::Tensors { tensors, .. } => tensors.contains_key(name),
        }
    }

    /// Every tensor a llama-family model of `cfg` loads, by HF name, with its shape:
    /// norms, embedding, `lm_head` (unless tied), q/o and gate/up/down of every layer,
    /// k/v only for K/V producers (a CLA consumer has none), and the biases `cfg` asks for.
    pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        let (h, d, ffn) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (q_out, kv_out) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, h])];
        let linear = |out: &mut Vec<(String, Vec<usize>)>, name: String, o: usize, i: usize, bias: bool| {
            out.push((format!("{name}.weight"), vec![o, i]));
            if bias {
                out.push((format!("{name}.bias"), vec![o]));
            }
        };
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            linear(&mut out, format!("{p}.self_attn.q_proj"), q_out, h, cfg.attention_bias);
            if cfg.kv_source[i] == i {
                linear(&mut out, format!("{p}.self_attn.k_proj"), kv_out, h, cfg.attention_bias);
                linear(&mut out, format!("{p}.self_attn.v_proj"), kv_out, h, cfg.attention_bias);
            }
            linear(&mut out, format!("{p}.self_attn.o_proj"), h, q_out, cfg.o_proj_bias);
            linear(&mut out, format!("{p}.mlp.gate_proj"), ffn, h, cfg.mlp_bias);
            linear(&mut out, format!("{p}.mlp.up_proj"), ffn, h, cfg.mlp_bias);
            linear(&mut out, format!("{p}.mlp.down_proj"), h, ffn, cfg.mlp_bias);
        }
        out.push(("model.norm.weight".into(), vec![h]));
        if !cfg.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
        }
        out
    }

    /// Random weights for `cfg`, made directly on `device` (no files): norms are ones,
    /// biases zeros, every other tensor uniform with standard deviation 0.02. The same
    /// `seed` gives the same weights on the same device (on CUDA it reseeds the device's
    /// generator). For benchmarks and tests, where only shapes and speed matter.
    pub fn random(cfg: &ModelConfig, dtype: DType, device: &Device, seed: u64) -> candle_core::Result<Self> {
        use rand::{Rng, SeedableRng};
        let a = 0.02f32 * 3f32.sqrt();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        if !device.is_cpu() {
            device.set_seed(seed)?;
        }
        let mut tensors = HashMap::new();
        for (name, shape) in Self::expected_tensors(cfg) {
            let t = if name.ends_with("norm.weight") {
                Tensor::ones(shape, dtype, device)?
            } else if name.ends_with(".bias") {
                Tensor::zeros(shape, dtype, device)?
            } else if device.is_cpu() {
                let n = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|_| rng.random_range(-a..a)).collect();
                Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?
            } else {
                Tensor::rand(-a, a, shape, device)?.to_dtype(dtype)?
            };
            tensors.insert(name, t);
        }
        Ok(Weights::Tensors {
            tensors,
            dtype,
            device: device.clone(),
        })
    }

    fn check_shape(name: &str, got: &[usize], want: &[usize]) -> Result<(), WeightsError> {
        if got != want {
            return Err(WeightsError::Shape {
                name: name.into(),
                got: got.to_vec(),
                want: want.to_vec(),
            });
        }
        Ok(())
    }

    fn missing(name: &str) -> WeightsError {
        WeightsError::Missing {
            name: name.into(),
            hint: String::new(),
        }
    }

    fn qtensor(&self, name: &str) -> Result<QTensor, WeightsError> {
        let Weights::Gguf {
            content, path, device, ..
        } = self
        else {
            unreachable!()
        };
        let gname = gguf_name(name);
        if !content.tensor_infos.contains_key(&gname) {
            return Err(Self::missing(name));
        }
        let mut f = std::fs::File::open(path).map_err(|e| file_err(path, e))?;
        content.tensor(&mut f, &gname, device).map_err(|e| WeightsError::Load {
            name: name.into(),
            reason: e.to_string(),
        })
    }

    /// A one-element tensor (shape `[]` or `[1]`) as f32, not rounded to the model dtype
    /// (fp8 KV scales); `None` when the checkpoint has no tensor `name`.
    pub fn scalar_f32(&self, name: &str) -> Result<Option<f32>, WeightsError> {
        if !self.contains(name) {
            return Ok(None);
        }
        let load = |e: candle_core::Error| WeightsError::Load {
            name: name.into(),
            reason: e.to_string(),
        };
        let t = match self {
            Weights::Safetensors { st, .. } => st.load(name, &Device::Cpu).map_err(load)?,
            Weights::Gguf { .. } => self.qtensor(name)?.dequantize(&Device::Cpu).map_err(load)?,
            Weights::Tensors { tensors, .. } => tensors.get(name).ok_or_else(|| Self::missing(name))?.clone(),
        };
        if t.elem_count() != 1 {
            return Err(WeightsError::Load {
                name: name.into(),
                reason: format!("expected one value, found shape {:?}", t.dims()),
            });
        }
        let v = t
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(load)?[0];
        Ok(Some(v))
    }

    /// A dense tensor in the model dtype. GGUF stores dims reversed (ggml order);
    /// candle's reader already gives them in row-major order.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor, WeightsError> {
        let load = |e: candle_core::Error| WeightsError::Load {
            name: name.into(),
            reason: e.to_string(),
        };
        let t = match self {
            Weights::Safetensors { st, dtype, device } => {
                if st.get(name).is_err() {
                    return Err(Self::missing(name));
                }
                st.load(name, device).and_then(|t| t.to_dtype(*dtype)).map_err(load)?
            }
            Weights::Gguf { dtype, device, .. } => self
                .qtensor(name)?
                .dequantize(device)
                .and_then(|t| t.to_dtype(*dtype))
                .map_err(load)?,
            Weights::Tensors { tensors, dtype, device } => tensors
                .get(name)
                .ok_or_else(|| Self::missing(name))?
                .to_device(device)
                .and_then(|t| t.to_dtype(*dtype))
                .map_err(load)?,
        };
        Self::check_shape(name, t.dims(), shape)?;
        Ok(t)
    }

    /// Rows or columns `part` of the dense tensor `name` of full shape `shape`
    /// (tensor parallelism). Safetensors are cut on the host first, so a rank's device
    /// never holds more than its share.
    pub fn tensor_part(&self, name: &str, shape: &[usize], part: &Part) -> Result<Tensor, WeightsError> {
        let (dim, range) = match part {
            Part::Whole => return self.tensor(name, shape),
            Part::Rows(r) => (0, r.clone()),
            Part::Cols(r) => (1, r.clone()),
        };
        let load = |e: candle_core::Error| WeightsError::Load {
            name: name.into(),
            reason: e.to_string(),
        };
        let cut = |t: Tensor| t.narrow(dim, range.start, range.len()).and_then(|t| t.contiguous());
        match self {
            Weights::Safetensors { st, dtype, device } => {
                if st.get(name).is_err() {
                    return Err(Self::missing(name));
                }
                let t = st.load(name, &Device::Cpu).map_err(load)?;
                Self::check_shape(name, t.dims(), shape)?;
                cut(t)
                    .and_then(|t| t.to_device(device))
                    .and_then(|t| t.to_dtype(*dtype))
                    .map_err(load)
            }
            _ => cut(self.tensor(name, shape)?).map_err(load),
        }
    }

    /// `linear` cut for tensor parallelism: `Part::Rows` keeps those output rows (and
    /// bias entries), `Part::Cols` those input columns (a row-parallel layer's bias is
    /// added once, so callers ask for it on one rank only). Always dense.
    pub fn linear_part(
        &self,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
        with_bias: bool,
        part: &Part,
    ) -> Result<Linear, WeightsError> {
        if *part == Part::Whole {
            return self.linear(prefix, out_dim, in_dim, with_bias);
        }
        let weight = self.tensor_part(&format!("{prefix}.weight"), &[out_dim, in_dim], part)?;
        let bname = format!("{prefix}.bias");
        let bias = match (with_bias, part) {
            (false, _) => None,
            (true, Part::Rows(r)) => Some(self.tensor_part(&bname, &[out_dim], &Part::Rows(r.clone()))?),
            (true, _) => Some(self.tensor(&bname, &[out_dim])?),
        };
        Ok(Linear {
            weight: LinearWeight::Candle(QMatMul::Tensor(weight)),
            bias,
        })
    }

    /// A linear layer `[out, in]` with an optional bias `name.bias`. GGUF quantized
    /// weights stay quantized when the model runs in f32.
    pub fn linear(&self, prefix: &str, out_dim: usize, in_dim: usize, with_bias: bool) -> Result<Linear, WeightsError> {
        let wname = format!("{prefix}.weight");
        let weight = match self {
            Weights::Gguf {
                dtype: DType::F32,
                keep_quantized: true,
                ..
            } => {
                let q = self.qtensor(&wname)?;
                Self::check_shape(&wname, q.shape().dims(), &[out_dim, in_dim])?;
                let load = |e: candle_core::Error| WeightsError::Load {
                    name: wname.clone(),
                    reason: e.to_string(),
                };
                let format = match q.dtype() {
                    GgmlDType::Q4_1 => Some(QFormat::Q4_1),
                    GgmlDType::Q8_0 => Some(QFormat::Q8_0),
                    _ => None,
                };
                if let (Some(format), true) = (format, self.device().is_cpu() && in_dim.is_multiple_of(32)) {
                    let bytes = q.data().map_err(load)?.to_vec();
                    LinearWeight::Quant(Arc::new(
                        QMatrix::from_bytes(format, bytes, out_dim, in_dim).map_err(load)?,
                    ))
                } else {
                    LinearWeight::Candle(QMatMul::from_arc(Arc::new(q)).map_err(load)?)
                }
            }
            _ => LinearWeight::Candle(QMatMul::Tensor(self.tensor(&wname, &[out_dim, in_dim])?)),
        };
        let bname = format!("{prefix}.bias");
        let bias = if with_bias {
            Some(self.tensor(&bname, &[out_dim])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(t: &Tensor) -> Linear {
        Linear {
            weight: LinearWeight::Candle(QMatMul::Tensor(t.clone())),
            bias: None,
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The transposed layout computes what the checkpoint layout does, on 2-D and 3-D
    /// inputs, and gives the `[out, in]` weight back for `convert`.
    #[test]
    fn transposed_linears_compute_the_same_outputs() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w1 = Tensor::randn(0f32, 1.0, (5, 8), &dev)?;
        let w2 = Tensor::randn(0f32, 1.0, (3, 8), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (4, 8), &dev)?;
        let x3 = Tensor::randn(0f32, 1.0, (2, 4, 8), &dev)?;
        let (l1, l2) = (dense(&w1), dense(&w2));
        let t1 = l1.clone().transposed()?;
        assert!(max_diff(&t1.forward(&x)?, &l1.forward(&x)?) < 1e-5);
        assert!(max_diff(&t1.forward(&x3)?, &l1.forward(&x3)?) < 1e-5);
        assert_eq!(t1.dense_weight()?.to_vec2::<f32>()?, w1.to_vec2::<f32>()?);
        let t2 = l2.clone().transposed()?;
        assert!(max_diff(&t2.forward(&x)?, &l2.forward(&x)?) < 1e-5);
        // Transposing again changes nothing.
        assert_eq!(
            t1.clone().transposed()?.dense_weight()?.to_vec2::<f32>()?,
            w1.to_vec2::<f32>()?
        );
        Ok(())
    }
}
