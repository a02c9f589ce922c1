//! The one Llama-family causal LM (Llama / SmolLM2 / TinyLlama / Llama-3.x, Mistral, Qwen2), used
//! for the frozen teacher (weights from memory-mapped safetensors) and the trainable student
//! (weights from a `VarMap`) alike, with Hugging Face tensor names.
//!
//! Unlike candle-transformers' llama, `forward` returns logits for every position, which is what
//! distillation needs; `forward_cached` serves generation with a KV cache.

use crate::config::{Arch, Config, RopeScaling};
use crate::ops;
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// The precision of a frozen model's products (the linear layers and the lm_head): f32, or bf16
/// inputs and weights summed in f32 on AMX tiles ([`ops::bf16`]), several times faster where the
/// CPU has them. Trained weights are always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            _ => Err(crate::Error::Msg(format!(
                "precision '{s}': expected f32 or bf16"
            ))),
        }
    }
}

/// `y = x Wᵀ + b` over the last dimension, flattening leading dimensions into one GEMM.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor, // (out, in)
    pub bias: Option<Tensor>,
    /// The frozen weight in bf16 AMX tiles ([`CausalLm::set_precision`]): products through
    /// [`ops::bf16::linear`] where it takes the input.
    pub bf16: Option<std::sync::Arc<ops::bf16::PackedBf16>>,
}

impl Linear {
    fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        // HF's `_init_weights`: normal(0, 0.02) for weights, zeros for biases. Ignored when the
        // VarBuilder reads existing weights.
        let init = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            bf16: None,
        })
    }

    fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            bf16: None,
        }
    }

    /// Sets the precision of this (frozen) weight's products: bf16 packs it into AMX tiles.
    fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.bf16 = match precision {
            Precision::F32 => None,
            Precision::Bf16 => {
                if self.weight.track_op() {
                    candle_core::bail!("bf16 products are for frozen weights; this one is trained")
                }
                Some(std::sync::Arc::new(ops::bf16::PackedBf16::from_tensor(
                    &self.weight,
                )?))
            }
        };
        Ok(())
    }

    /// `residual + self(x)`: one op on the CPU in f32 ([`ops::linear_add`]) without a bias.
    fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if let (None, Some(p)) = (&self.bias, &self.bf16) {
            if let Some(y) = ops::bf16::linear(x, p, Some(residual))? {
                return Ok(y);
            }
        }
        if self.bias.is_none() {
            if let Some(y) = ops::linear_add(x, &self.weight, residual)? {
                return Ok(y);
            }
        }
        residual + self.forward(x)?
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(p) = &self.bf16 {
            if let Some(y) = ops::bf16::linear(x, p, None)? {
                return match &self.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                };
            }
        }
        if self.bias.is_none() {
            if let Some(y) = ops::linear(x, &self.weight)? {
                return Ok(y);
            }
        }
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let y = match rows {
            1 => match ops::cpu_gemv(&x2, &self.weight)? {
                Some(y) => y,
                None => x2.matmul(&self.weight.t()?)?,
            },
            _ => x2.matmul(&self.weight.t()?)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.weight.dim(0)?;
        y.reshape(out)
    }
}

/// RMSNorm, `x / rms(x) · (offset + w)`: offset 0 for Llama, 1 for Gemma (whose checkpoints
/// store `w` centred on zero). `weight` is always the checkpoint's tensor.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    /// `offset + weight` when the weight is frozen, computed once.
    scale: Option<Tensor>,
    offset: f64,
    eps: f64,
}

impl RmsNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64, offset: f64) -> Result<Self> {
        // HF initialises the effective scale to 1: weight 1, or 0 under an offset of 1.
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0 - offset))?;
        let scale = if offset != 0.0 && !weight.track_op() {
            Some(weight.affine(1.0, offset)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            scale,
            offset,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match (&self.scale, self.offset) {
            (Some(scale), _) => ops::rms_norm(x, scale, self.eps),
            (None, 0.0) => ops::rms_norm(x, &self.weight, self.eps),
            // Trained under an offset: the sum is part of the graph, so the Var gets its gradient.
            (None, offset) => ops::rms_norm(x, &self.weight.affine(1.0, offset)?, self.eps),
        }
    }
}

/// Precomputed rotary tables, (max_positions, head_dim / 2).
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(
        cfg: &Config,
        theta: f64,
        scaling: Option<&RopeScaling>,
        device: &Device,
    ) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let mut inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / cfg.head_dim as f64))
            .collect();
        match scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => {
                inv_freq.iter_mut().for_each(|f| *f /= factor);
            }
            // transformers' `_compute_llama3_parameters`.
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old_len = *original_max_position_embeddings as f64;
                let low_wavelen = old_len / low_freq_factor;
                let high_wavelen = old_len / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        let n = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv_freq {
                // f32 angles as transformers computes them (inv_freq and positions in f32).
                let angle = (p as f32) * (*f as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (n, half), device)?,
            sin: Tensor::from_vec(sin, (n, half), device)?,
        })
    }

    /// The (cos, sin) tables of positions `pos..pos+t`, each (t, head_dim / 2).
    fn tables(&self, pos: usize, t: usize) -> Result<(Tensor, Tensor)> {
        if pos + t > self.cos.dim(0)? {
            candle_core::bail!(
                "sequence of {} tokens exceeds max_position_embeddings {}",
                pos + t,
                self.cos.dim(0)?
            )
        }
        Ok((self.cos.narrow(0, pos, t)?, self.sin.narrow(0, pos, t)?))
    }

    /// `x` (B, H, T, D) at positions `pos..pos+T`, rotated and multiplied by `scale`.
    fn apply(&self, x: &Tensor, pos: usize, scale: f64) -> Result<Tensor> {
        let (cos, sin) = self.tables(pos, x.dim(2)?)?;
        ops::rope(x, &cos, &sin, scale)
    }
}

/// Input projections that read the same activations: kept apart while they are trained (the
/// student's Vars), concatenated into one wider matmul when frozen (teacher, eval), where one GEMM
/// with N = q + 2·kv (or 2·intermediate) runs closer to peak than three (or two) narrow ones.
#[derive(Debug, Clone)]
enum Projections {
    Separate(Vec<Linear>),
    Fused { proj: Linear, widths: Vec<usize> },
}

impl Projections {
    fn new(parts: Vec<Linear>) -> Result<Self> {
        let with_bias = parts.iter().filter(|p| p.bias.is_some()).count();
        let trainable = parts.iter().any(|p| p.weight.track_op());
        if trainable || (with_bias != 0 && with_bias != parts.len()) {
            return Ok(Projections::Separate(parts));
        }
        let widths = parts
            .iter()
            .map(|p| p.weight.dim(0))
            .collect::<Result<Vec<_>>>()?;
        let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
        let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
        let bias = if biases.is_empty() {
            None
        } else {
            Some(Tensor::cat(&biases, 0)?)
        };
        Ok(Projections::Fused {
            proj: Linear::new(Tensor::cat(&weights, 0)?, bias),
            widths,
        })
    }

    /// The projections' outputs side by side, (…, Σ widths), from one GEMM. Trained parts are
    /// concatenated at each call (a copy of the weights, small next to the product), so that
    /// the concatenation's backward hands each Var its slice of the weight gradient (a trained
    /// MLP's gate and up skip this: [`ops::swiglu_linear`] takes both weights).
    fn forward_packed(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Projections::Fused { proj, .. } => proj.forward(x),
            Projections::Separate(parts) => {
                let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
                let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
                let bias = match biases.len() {
                    0 => None,
                    n if n == parts.len() => Some(Tensor::cat(&biases, 0)?),
                    // Some parts with a bias, some without: one product each.
                    _ => return Tensor::cat(&self.forward(x)?, D::Minus1),
                };
                Linear::new(Tensor::cat(&weights, 0)?, bias).forward(x)
            }
        }
    }

    fn set_precision(&mut self, precision: Precision) -> Result<()> {
        match self {
            Projections::Fused { proj, .. } => proj.set_precision(precision),
            Projections::Separate(parts) => parts
                .iter_mut()
                .try_for_each(|p| p.set_precision(precision)),
        }
    }

    /// One output per projection, each (…, width).
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Projections::Separate(parts) => parts.iter().map(|p| p.forward(x)).collect(),
            Projections::Fused { proj, widths } => {
                let y = proj.forward(x)?;
                let mut start = 0;
                widths
                    .iter()
                    .map(|&w| {
                        let part = y.narrow(D::Minus1, start, w);
                        start += w;
                        part
                    })
                    .collect()
            }
        }
    }
}
#[derive(Debug, Clone)]
struct Attention {
    qkv: Projections,
    o_proj: Linear,
    /// RMSNorm over each head's query and key before the rotation (Gemma 3).
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// Multiplies the scores: `head_dim^-½`, or Gemma 3's `query_pre_attn_scalar^-½`.
    scale: f64,
    /// The most keys a position attends to (Gemma 3's sliding layers), itself included.
    window: Option<usize>,
}

impl Attention {
    fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.qkv.set_precision(precision)?;
        self.o_proj.set_precision(precision)
    }

    fn load(vb: VarBuilder, cfg: &Config, window: Option<usize>) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        Ok(Self {
            qkv: Projections::new(vec![
                Linear::load(
                    vb.pp("q_proj"),
                    h,
                    cfg.num_attention_heads * d,
                    cfg.qkv_bias,
                )?,
                Linear::load(
                    vb.pp("k_proj"),
                    h,
                    cfg.num_key_value_heads * d,
                    cfg.qkv_bias,
                )?,
                Linear::load(
                    vb.pp("v_proj"),
                    h,
                    cfg.num_key_value_heads * d,
                    cfg.qkv_bias,
                )?,
            ])?,
            o_proj: Linear::load(vb.pp("o_proj"), cfg.num_attention_heads * d, h, cfg.o_bias)?,
            qk_norm: match cfg.arch {
                Arch::Gemma3 => Some((
                    RmsNorm::load(vb.pp("q_norm"), d, cfg.rms_norm_eps, cfg.norm_offset())?,
                    RmsNorm::load(vb.pp("k_norm"), d, cfg.rms_norm_eps, cfg.norm_offset())?,
                )),
                _ => None,
            },
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: d,
            scale: match &cfg.gemma3 {
                Some(g) => 1.0 / g.query_pre_attn_scalar.sqrt(),
                None => 1.0 / (d as f64).sqrt(),
            },
            window,
        })
    }

    /// `x`: (B, T, hidden) at positions `pos..pos+T`; `mask`: additive (T, S) or None when T = 1.
    /// With a `residual`, `residual + attention`, the sum taken by the output projection
    /// ([`Linear::forward_add`]).
    fn forward(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        rope: &Rope,
        pos: usize,
        mask: Option<&Tensor>,
        cache: Option<&mut candle_nn::kv_cache::KvCache>,
    ) -> Result<Tensor> {
        let heads = self.attend(x, rope, pos, mask, cache)?;
        match residual {
            Some(r) => self.o_proj.forward_add(&heads, r),
            None => self.o_proj.forward(&heads),
        }
    }

    /// The heads' outputs before the output projection, (B, T, heads · head_dim), head-major.
    fn attend(
        &self,
        x: &Tensor,
        rope: &Rope,
        pos: usize,
        mask: Option<&Tensor>,
        cache: Option<&mut candle_nn::kv_cache::KvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous() // (B, n, T, D)
        };
        // A whole sequence from position 0 (training, the teacher's cache, eval, prefill without
        // a cache) on the CPU: one GEMM for q, k and v and one op from its output on.
        // The op builds its own mask, the plain causal one of `self.window`: that is the mask of
        // every cache-less forward from position 0 (`CausalLm::masks`); padded masks always come
        // with a cache (`forward_cached_padded`).
        let whole = cache.is_none() && pos == 0;
        let cpu = x.device().is_cpu() && x.dtype() == DType::F32;
        if whole && self.qk_norm.is_none() && cpu && d.is_multiple_of(2) {
            let (cos, sin) = rope.tables(0, t)?;
            let packed = self.qkv.forward_packed(x)?;
            let heads = (h, kvh);
            if let Some(y) =
                ops::attention_packed(&packed, &cos, &sin, self.scale, heads, self.window)?
            {
                return Ok(y);
            }
        }
        let qkv = self.qkv.forward(x)?;
        let q = heads(qkv[0].clone(), h)?;
        let k = heads(qkv[1].clone(), kvh)?;
        let v = heads(qkv[2].clone(), kvh)?;
        let (q, k) = match &self.qk_norm {
            Some((qn, kn)) => (qn.forward(&q)?, kn.forward(&k)?),
            None => (q, k),
        };
        // Scaling q before QKᵀ costs T·D multiplies per head instead of T·S (here, none: the
        // rotation's pass does it).
        let q = rope.apply(&q, pos, self.scale)?;
        let k = rope.apply(&k, pos, 1.0)?;
        // Gemma's normed heads: the attention alone as one op.
        if whole {
            if let Some(y) = ops::causal_attention(&q, &k, &v, self.window)? {
                return Ok(y);
            }
        }
        let (k, v) = match cache {
            Some(cache) => cache.append(&k, &v)?,
            None => (k, v),
        };
        let s = k.dim(2)?;
        // Grouped-query attention without copying K/V: the `rep` query heads that share a KV head
        // are stacked along the row dimension of one matmul. (B, kvh, rep·T, D) · (B, kvh, D, S).
        let rep = h / kvh;
        let q = q.reshape((b, kvh, rep * t, d))?;
        let att = q.matmul(&k.t()?)?; // (B, kvh, rep·T, S)
        let att = match mask {
            Some(mask) => match ops::masked_softmax(&att, mask)? {
                Some(att) => att,
                None => ops::softmax_last_dim(
                    &att.reshape((b, kvh, rep, t, s))?
                        .broadcast_add(mask)?
                        .reshape((b, kvh, rep * t, s))?,
                )?,
            },
            None => ops::softmax_last_dim(&att)?,
        };
        let y = att.matmul(&v.contiguous()?)?; // (B, kvh, rep·T, D)
        y.reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, h * d))
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_up: Projections,
    down_proj: Linear,
    /// GeGLU (`gelu_tanh(gate) · up`, Gemma) instead of SwiGLU.
    gelu: bool,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_up: Projections::new(vec![
                Linear::load(vb.pp("gate_proj"), h, i, cfg.mlp_bias)?,
                Linear::load(vb.pp("up_proj"), h, i, cfg.mlp_bias)?,
            ])?,
            down_proj: Linear::load(vb.pp("down_proj"), i, h, cfg.mlp_bias)?,
            gelu: cfg.arch == Arch::Gemma3,
        })
    }
}

impl Mlp {
    fn set_precision(&mut self, precision: Precision) -> Result<()> {
        self.gate_up.set_precision(precision)?;
        self.down_proj.set_precision(precision)
    }

    /// `residual + self.forward(x)`, the sum taken by the down projection.
    fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.down_proj.forward_add(&self.activations(x)?, residual)
    }

    /// The gated activations the down projection reads, (…, intermediate).
    fn activations(&self, x: &Tensor) -> Result<Tensor> {
        let width = self.down_proj.weight.dim(1)?;
        // Trained (separate) gate and up projections: one op from the input on.
        if let (false, Projections::Separate(parts)) = (self.gelu, &self.gate_up) {
            if let [gate, up] = parts.as_slice() {
                if gate.bias.is_none() && up.bias.is_none() {
                    if let Some(y) = ops::swiglu_linear(x, &gate.weight, &up.weight)? {
                        return Ok(y);
                    }
                }
            }
        }
        let packed = self.gate_up.forward_packed(x)?;
        if self.gelu {
            // transformers' gelu_pytorch_tanh is candle's `gelu` (the tanh approximation).
            let gate = packed.narrow(D::Minus1, 0, width)?;
            let up = packed.narrow(D::Minus1, width, width)?;
            return gate.gelu()? * up;
        }
        ops::swiglu_packed(&packed, width)
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down_proj.forward(&self.activations(x)?)
    }
}

/// One decoder layer. Llama: `x + attn(n₁(x))`, then `+ mlp(n₂(·))` with n₂ the
/// `post_attention_layernorm`. Gemma 3 ("sandwich" norms): `x + n₂(attn(n₁(x)))`, then
/// `+ n₄(mlp(n₃(·)))` with n₃, n₄ the `pre_`/`post_feedforward_layernorm`.
#[derive(Debug, Clone)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    /// Gemma 3: (pre_feedforward_layernorm, post_feedforward_layernorm).
    feedforward_norms: Option<(RmsNorm, RmsNorm)>,
    mlp: Mlp,
    /// Attends through `cfg.sliding_window` with the local rotary base (Gemma 3's sliding layers).
    local: bool,
    window: Option<usize>,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &Config, i: usize) -> Result<Self> {
        let norm = |name: &str| {
            RmsNorm::load(
                vb.pp(name),
                cfg.hidden_size,
                cfg.rms_norm_eps,
                cfg.norm_offset(),
            )
        };
        let window = cfg.layer_window(i);
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg, window)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            feedforward_norms: match cfg.arch {
                Arch::Gemma3 => Some((
                    norm("pre_feedforward_layernorm")?,
                    norm("post_feedforward_layernorm")?,
                )),
                _ => None,
            },
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
            // Gemma 3's windowed layers are its "local" ones, with their own rotary base.
            local: cfg.gemma3.is_some() && window.is_some(),
            window,
        })
    }

    /// The norm the MLP reads its input through.
    fn mlp_norm(&self) -> &RmsNorm {
        match &self.feedforward_norms {
            Some((pre, _)) => pre,
            None => &self.post_attention_layernorm,
        }
    }

    /// What the attention adds to the residual stream, from its output projection's result.
    fn attn_residual(&self, h: Tensor) -> Result<Tensor> {
        match &self.feedforward_norms {
            Some(_) => self.post_attention_layernorm.forward(&h),
            None => Ok(h),
        }
    }

    /// What the MLP adds to the residual stream, from its down projection's result.
    fn mlp_residual(&self, h: Tensor) -> Result<Tensor> {
        match &self.feedforward_norms {
            Some((_, post)) => post.forward(&h),
            None => Ok(h),
        }
    }
}

/// Per-layer key/value cache for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<candle_nn::kv_cache::KvCache>,
}

impl KvCache {
    pub fn new(cfg: &Config) -> Self {
        // Grows by 512 positions at a time; dim 2 of (B, kvh, T, D).
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| candle_nn::kv_cache::KvCache::new(2, 512))
            .collect();
        Self { layers }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.current_seq_len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| l.reset());
    }
}

/// The causal language model.
#[derive(Debug, Clone)]
pub struct CausalLm {
    embed_tokens: Tensor, // (V, hidden)
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    /// The sliding layers' rotary tables, where their base differs (Gemma 3).
    rope_local: Option<Rope>,
    /// Embeddings are multiplied by this on the way in (Gemma: √hidden, rounded to f32).
    embed_scale: Option<f64>,
    cfg: Config,
    precision: Precision,
}

/// The additive masks of one forward, one per distinct attention window among the layers
/// (`None`: full causal attention); a mask is `None` where it would hide nothing.
struct Masks(Vec<(Option<usize>, Option<Tensor>)>);

impl Masks {
    fn get(&self, window: Option<usize>) -> Option<&Tensor> {
        self.0
            .iter()
            .find(|(w, _)| *w == window)
            .and_then(|(_, m)| m.as_ref())
    }
}

impl CausalLm {
    /// Builds the model from HF tensor names under `vb`: existing weights (mmap) or new ones (VarMap).
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let embed_tokens = vb.pp("model.embed_tokens").get_with_hints(
            (cfg.vocab_size, cfg.hidden_size),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        if let Some(g) = &cfg.gemma3 {
            if g.sliding_layers.len() != cfg.num_hidden_layers {
                candle_core::bail!(
                    "Gemma 3 config lists {} layer types for {} layers",
                    g.sliding_layers.len(),
                    cfg.num_hidden_layers
                )
            }
        }
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(vb.pp(format!("model.layers.{i}")), cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(
            vb.pp("model.norm"),
            cfg.hidden_size,
            cfg.rms_norm_eps,
            cfg.norm_offset(),
        )?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.clone(), None)
        } else {
            Linear::load(vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size, false)?
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg, cfg.rope_theta, cfg.rope_scaling.as_ref(), vb.device())?,
            rope_local: match &cfg.gemma3 {
                Some(g) => Some(Rope::new(cfg, g.rope_local_theta, None, vb.device())?),
                None => None,
            },
            // transformers: `embed * tensor(hidden ** 0.5)` in the weights' dtype (f32 here).
            embed_scale: match cfg.arch {
                Arch::Gemma3 => Some((cfg.hidden_size as f64).sqrt() as f32 as f64),
                _ => None,
            },
            cfg: cfg.clone(),
            precision: Precision::F32,
        })
    }

    /// A new model with HF's initialisation (weights ~ N(0, 0.02), norms 1, biases 0), seeded:
    /// the same seed gives the same weights on any machine (candle's CPU RNG cannot be seeded).
    /// Each tensor draws from its own stream keyed by (seed, name), so adding a tensor does not
    /// shift the others.
    pub fn init_seeded(
        cfg: &Config,
        seed: u64,
        device: &Device,
    ) -> Result<(Self, candle_nn::VarMap)> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let varmap = candle_nn::VarMap::new();
        let model = Self::load(VarBuilder::from_varmap(&varmap, DType::F32, device), cfg)?;
        let normal = rand_distr::Normal::new(0f32, 0.02).expect("0.02 is a valid std");
        for (name, var) in varmap.data().lock().expect("varmap lock poisoned").iter() {
            if name.ends_with("norm.weight") || name.ends_with(".bias") {
                continue; // constant init, already exact
            }
            let key = name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
            });
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(key);
            let n = var.as_tensor().elem_count();
            let values: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
            var.set(&Tensor::from_vec(values, var.as_tensor().shape(), device)?)?;
        }
        Ok((model, varmap))
    }

    /// Sets the precision of every linear layer's and the lm_head's products. bf16 needs a CPU
    /// with AMX-BF16 and frozen weights (a teacher); it keeps the f32 weights (the embedding
    /// lookup, and f32 products wherever the AMX path declines an input) and adds a bf16 copy
    /// of each, half their size.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        if precision == Precision::Bf16 {
            ops::bf16::require(self.device())?;
        }
        // On a copy (the tensors are shared), so an error leaves this model as it was.
        let mut next = self.clone();
        for layer in &mut next.layers {
            layer.self_attn.set_precision(precision)?;
            layer.mlp.set_precision(precision)?;
        }
        next.lm_head.set_precision(precision)?;
        next.precision = precision;
        *self = next;
        Ok(())
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// Logits for every position: (B, T) token ids → (B, T, V).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let hidden = self.forward_hidden(ids, 0, None)?;
        self.lm_head.forward(&hidden)
    }

    /// Final-norm hidden states for every position (as [`hidden_states`](Self::hidden_states))
    /// and the residual stream after each of the blocks `taps` (layer indices, in any order): one
    /// (B, T, hidden) per tap, in `taps`' order. For hidden-state losses, which match a student's
    /// layers to its teacher's; [`logits`](Self::logits) finishes the forward.
    pub fn forward_with_hidden(
        &self,
        ids: &Tensor,
        taps: &[usize],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        if let Some(&bad) = taps.iter().find(|&&l| l >= self.layers.len()) {
            candle_core::bail!(
                "layer {bad} requested, the model has {} layers",
                self.layers.len()
            );
        }
        let masks = self.masks(ids.dim(1)?, 0, ids.device())?;
        let mut x = self.embed(ids)?;
        let mut out: Vec<Option<Tensor>> = vec![None; taps.len()];
        for (i, layer) in self.layers.iter().enumerate() {
            x = self.block(layer, &x, 0, masks.get(layer.window), None)?;
            for (k, _) in taps.iter().enumerate().filter(|(_, &l)| l == i) {
                out[k] = Some(x.clone());
            }
        }
        let hidden = self.norm.forward(&x)?;
        Ok((
            hidden,
            out.into_iter()
                .map(|t| t.expect("every tap checked"))
                .collect(),
        ))
    }

    /// Logits from final-norm hidden states: (…, hidden) → (…, V).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// Final-norm hidden states for every position: (B, T) → (B, T, hidden). Losses that fuse the
    /// output projection with the softmax start from here.
    pub fn hidden_states(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_hidden(ids, 0, None)
    }

    /// The output projection (lm_head, or the tied embedding).
    pub fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head.weight
    }

    /// Incremental forward for generation: feeds `ids` (B, T) after the `cache.len()` positions
    /// already in `cache` and returns the logits of the last new position, (B, V).
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let pos = cache.len();
        let hidden = self.forward_hidden(ids, pos, Some(cache))?;
        let t = hidden.dim(1)?;
        self.lm_head
            .forward(&hidden.narrow(1, t - 1, 1)?.squeeze(1)?)
    }

    /// [`forward_cached`](Self::forward_cached) for a batch of left-padded rows: row `b` starts
    /// with `left_pad[b]` padding positions (any id) that no real position attends to. Rotary
    /// embeddings depend only on relative positions, so each row's logits equal those of the row
    /// run alone without its padding. Returns the logits of the last new position, (B, V).
    pub fn forward_cached_padded(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        left_pad: &[usize],
    ) -> Result<Tensor> {
        let pos = cache.len();
        let (b, t) = ids.dims2()?;
        if left_pad.len() != b {
            candle_core::bail!(
                "forward_cached_padded: {} padding lengths for a batch of {b}",
                left_pad.len()
            );
        }
        let masks = Masks(
            self.windows()
                .into_iter()
                .map(|w| {
                    Ok((
                        w,
                        Some(padded_causal_mask(t, pos, left_pad, w, ids.device())?),
                    ))
                })
                .collect::<Result<_>>()?,
        );
        let hidden = self.forward_hidden_masked(ids, pos, Some(cache), &masks)?;
        self.lm_head
            .forward(&hidden.narrow(1, t - 1, 1)?.squeeze(1)?)
    }

    fn forward_hidden(
        &self,
        ids: &Tensor,
        pos: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let masks = self.masks(ids.dim(1)?, pos, ids.device())?;
        self.forward_hidden_masked(ids, pos, cache, &masks)
    }

    /// The distinct attention windows of the layers, `None` for full attention.
    fn windows(&self) -> Vec<Option<usize>> {
        let mut out: Vec<Option<usize>> = Vec::new();
        for layer in &self.layers {
            if !out.contains(&layer.window) {
                out.push(layer.window);
            }
        }
        out
    }

    /// Causal masks for `t` new positions after `pos` cached ones, per window. A single new
    /// position needs none unless a window hides some of the cache from it.
    fn masks(&self, t: usize, pos: usize, device: &Device) -> Result<Masks> {
        let masks = self
            .windows()
            .into_iter()
            .map(|w| {
                let hides_nothing = t == 1 && w.is_none_or(|w| pos < w);
                let mask = if hides_nothing {
                    None
                } else {
                    Some(causal_mask(t, pos, w, device)?)
                };
                Ok((w, mask))
            })
            .collect::<Result<_>>()?;
        Ok(Masks(masks))
    }

    /// Each mask additive, broadcastable to (B, 1, 1, T, S), or None for no masking.
    fn forward_hidden_masked(
        &self,
        ids: &Tensor,
        pos: usize,
        mut cache: Option<&mut KvCache>,
        masks: &Masks,
    ) -> Result<Tensor> {
        let mut x = self.embed(ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = self.block(layer, &x, pos, masks.get(layer.window), layer_cache)?;
        }
        self.norm.forward(&x)
    }

    /// Token embeddings, (B, T) → (B, T, hidden).
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let x = self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?;
        match self.embed_scale {
            Some(scale) => x.affine(scale, 0.0),
            None => Ok(x),
        }
    }

    /// The rotary tables layer `layer` uses.
    fn rope_of(&self, layer: &Block) -> &Rope {
        match (&self.rope_local, layer.local) {
            (Some(local), true) => local,
            _ => &self.rope,
        }
    }

    /// One decoder layer on the residual stream: x + attn(norm(x)), then + mlp(norm(·)).
    fn block(
        &self,
        layer: &Block,
        x: &Tensor,
        pos: usize,
        mask: Option<&Tensor>,
        cache: Option<&mut candle_nn::kv_cache::KvCache>,
    ) -> Result<Tensor> {
        let h = layer.input_layernorm.forward(x)?;
        let rope = self.rope_of(layer);
        if layer.feedforward_norms.is_none() {
            // Llama: the projections add their outputs to the residual stream themselves.
            let x = layer
                .self_attn
                .forward(&h, Some(x), rope, pos, mask, cache)?;
            return layer.mlp.forward_add(&layer.mlp_norm().forward(&x)?, &x);
        }
        let h = layer.self_attn.forward(&h, None, rope, pos, mask, cache)?;
        let x = (x + layer.attn_residual(h)?)?;
        let h = layer.mlp.forward(&layer.mlp_norm().forward(&x)?)?;
        x + layer.mlp_residual(h)?
    }
}

/// Activation statistics gathered by [`CausalLm::forward_probed`], summed over every token seen
/// (divide by `tokens` for means). Layer-indexed vectors follow the model's own layers.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    /// Tokens accumulated.
    pub tokens: usize,
    /// Per layer: Σ cos(input, output) of the residual stream across the block.
    pub layer_cos: Vec<f64>,
    /// Per layer, per query head: Σ ‖the head's contribution to the residual stream‖₂ (its output
    /// through its slice of the output projection).
    pub head_norm: Vec<Vec<f64>>,
    /// Per layer, per MLP channel: Σ ‖the channel's contribution‖₂ = |silu(gate) · up| times the
    /// norm of its down-projection column.
    pub mlp_act: Vec<Vec<f64>>,
    /// Per hidden channel: Σ |RMSNorm output| over both norms of every layer and the final norm.
    pub hidden_act: Vec<f64>,
}

impl Probe {
    pub fn new(cfg: &Config) -> Self {
        let l = cfg.num_hidden_layers;
        Self {
            tokens: 0,
            layer_cos: vec![0.0; l],
            head_norm: vec![vec![0.0; cfg.num_attention_heads]; l],
            mlp_act: vec![vec![0.0; cfg.intermediate_size]; l],
            hidden_act: vec![0.0; cfg.hidden_size],
        }
    }
}

/// Σ over all leading dimensions of `x` (…, n) → n values.
fn sum_rows(x: &Tensor) -> Result<Vec<f64>> {
    let n = x.dim(D::Minus1)?;
    let v = x
        .to_dtype(DType::F32)?
        .reshape(((), n))?
        .sum(0)?
        .to_vec1::<f32>()?;
    Ok(v.into_iter().map(f64::from).collect())
}

fn add_into(acc: &mut [f64], v: &[f64]) {
    acc.iter_mut().zip(v).for_each(|(a, b)| *a += b);
}

impl CausalLm {
    /// The residual stream at the input of every layer, and after the last: L + 1 tensors of
    /// (B, T, hidden). With [`forward_from`](Self::forward_from), a layer's removal can be scored
    /// by running only the layers after it.
    pub fn residual_stream(&self, ids: &Tensor) -> Result<Vec<Tensor>> {
        let masks = self.masks(ids.dim(1)?, 0, ids.device())?;
        let mut x = self.embed(ids)?;
        let mut out = Vec::with_capacity(self.layers.len() + 1);
        for layer in &self.layers {
            out.push(x.clone());
            x = self.block(layer, &x, 0, masks.get(layer.window), None)?;
        }
        out.push(x);
        Ok(out)
    }

    /// Logits (B, T, V) from the residual stream `x` entering layer `from`: layers `from..`, the
    /// final norm and the output projection.
    pub fn forward_from(&self, x: &Tensor, from: usize) -> Result<Tensor> {
        let masks = self.masks(x.dim(1)?, 0, x.device())?;
        let mut x = x.clone();
        for layer in &self.layers[from.min(self.layers.len())..] {
            x = self.block(layer, &x, 0, masks.get(layer.window), None)?;
        }
        self.lm_head.forward(&self.norm.forward(&x)?)
    }

    /// Logits for every position, (B, T, V), with the activation statistics that pruning ranks
    /// by added into `probe`. Slower than [`forward`](Self::forward); for calibration.
    pub fn forward_probed(&self, ids: &Tensor, probe: &mut Probe) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let masks = self.masks(t, 0, ids.device())?;
        let mut x = self.embed(ids)?;
        let (nh, d) = (self.cfg.num_attention_heads, self.cfg.head_dim);
        for (i, layer) in self.layers.iter().enumerate() {
            let x_in = x.clone();
            let n1 = layer.input_layernorm.forward(&x)?;
            let heads = layer.self_attn.attend(
                &n1,
                self.rope_of(layer),
                0,
                masks.get(layer.window),
                None,
            )?;
            x = (x + layer.attn_residual(layer.self_attn.o_proj.forward(&heads)?)?)?;
            let n2 = layer.mlp_norm().forward(&x)?;
            let act = layer.mlp.activations(&n2)?;
            x = (&x + layer.mlp_residual(layer.mlp.down_proj.forward(&act)?)?)?;
            let dot = (&x_in * &x)?.sum(D::Minus1)?;
            let norms = (x_in.sqr()?.sum(D::Minus1)? * x.sqr()?.sum(D::Minus1)?)?.sqrt()?;
            let cos = (dot / (norms + 1e-12)?)?;
            probe.layer_cos[i] += cos.sum_all()?.to_scalar::<f32>()? as f64;
            // Each head's output through its own slice of o_proj: (nh, B·T, d) · (nh, d, hidden).
            let per_head = heads
                .reshape((b * t, nh, d))?
                .transpose(0, 1)?
                .contiguous()?;
            let hidden = self.cfg.hidden_size;
            let wo = layer
                .self_attn
                .o_proj
                .weight
                .reshape((hidden, nh, d))?
                .permute((1, 2, 0))?
                .contiguous()?;
            let norms = per_head.matmul(&wo)?.sqr()?.sum(D::Minus1)?.sqrt()?; // (nh, B·T)
            let per_head_sum = norms.sum(1)?.to_vec1::<f32>()?;
            for (acc, v) in probe.head_norm[i].iter_mut().zip(per_head_sum) {
                *acc += v as f64;
            }
            let col_norms = layer
                .mlp
                .down_proj
                .weight
                .sqr()?
                .sum(0)?
                .sqrt()?
                .to_vec1::<f32>()?;
            let act_sum = sum_rows(&act.abs()?)?;
            for (acc, (a, c)) in probe.mlp_act[i]
                .iter_mut()
                .zip(act_sum.iter().zip(&col_norms))
            {
                *acc += a * *c as f64;
            }
            add_into(&mut probe.hidden_act, &sum_rows(&n1.abs()?)?);
            add_into(&mut probe.hidden_act, &sum_rows(&n2.abs()?)?);
        }
        let x = self.norm.forward(&x)?;
        add_into(&mut probe.hidden_act, &sum_rows(&x.abs()?)?);
        probe.tokens += b * t;
        self.lm_head.forward(&x)
    }
}

/// Additive causal mask (T, pos+T): 0 where query `pos+i` may see key `j`, −∞ elsewhere; with a
/// sliding window, keys more than `window − 1` positions back are hidden too (HF Mistral).
pub fn causal_mask(t: usize, pos: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let s = pos + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            let q = pos + i;
            (0..s).map(move |j| {
                let visible = j <= q && window.is_none_or(|w| q - j < w);
                if visible {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (t, s), device)
}

/// Additive mask (B, 1, 1, T, pos+T) for left-padded rows: the causal mask, and row `b`'s first
/// `left_pad[b]` keys hidden from its real positions. A padding position sees itself only, so
/// that its softmax stays finite (its output is never read).
pub fn padded_causal_mask(
    t: usize,
    pos: usize,
    left_pad: &[usize],
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let s = pos + t;
    let mut mask = Vec::with_capacity(left_pad.len() * t * s);
    for &pad in left_pad {
        for i in 0..t {
            let q = pos + i;
            for j in 0..s {
                let visible = if q < pad {
                    j == q
                } else {
                    j >= pad && j <= q && window.is_none_or(|w| q - j < w)
                };
                mask.push(if visible { 0.0 } else { f32::NEG_INFINITY });
            }
        }
    }
    Tensor::from_vec(mask, (left_pad.len(), 1, 1, t, s), device)
}

/// Log-softmax over the vocabulary, f32 (B, T, V).
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    candle_nn::ops::log_softmax(&logits, D::Minus1)
}
