//! Model configuration: `HfConfig` mirrors a Hugging Face `config.json` as transformers 4.x and 5.x
//! write it (unknown fields ignored, HF's defaults); `Config` is what the model runs on.

use crate::error::{Error, FileContext, Result};
use crate::fsio::read_text;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The architectures the one model implementation covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    /// Gemma 3's text model: Llama's layout with q/k norms, norms before and after both
    /// sublayers, `(1 + w)` norm weights, a GeGLU MLP, embeddings scaled by √hidden, and
    /// sliding-window layers with their own rotary base between full-attention ones.
    Gemma3,
}

impl Arch {
    pub const SUPPORTED: &'static str =
        "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Gemma3ForCausalLM";

    pub fn from_architecture(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Arch::Llama),
            "MistralForCausalLM" => Some(Arch::Mistral),
            "Qwen2ForCausalLM" => Some(Arch::Qwen2),
            "Gemma3ForCausalLM" => Some(Arch::Gemma3),
            _ => None,
        }
    }

    pub fn architecture(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3_text",
        }
    }
}

/// `eos_token_id` is an int or a list of ints in HF configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// `rope_scaling` (4.x) or `rope_parameters` (5.x); only the fields distill uses.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfRopeParams {
    pub rope_type: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
    /// Gemma 3 under transformers 5: one set per layer type.
    pub full_attention: Option<Box<HfRopeParams>>,
    pub sliding_attention: Option<Box<HfRopeParams>>,
}

/// A Hugging Face `config.json`, as written by transformers for the supported architectures.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub hidden_act: Option<String>,
    /// Gemma's name for `hidden_act`.
    pub hidden_activation: Option<String>,
    pub query_pre_attn_scalar: Option<f64>,
    pub layer_types: Option<Vec<String>>,
    pub sliding_window_pattern: Option<usize>,
    pub rope_local_base_freq: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    pub use_bidirectional_attention: Option<bool>,
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<HfRopeParams>,
    pub rope_parameters: Option<HfRopeParams>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<u32>,
    pub torch_dtype: Option<String>,
    pub dtype: Option<String>,
}

/// Rotary embedding frequency scaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Llama-3.1's piecewise frequency scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor`.
    Linear { factor: f64 },
}

/// What Gemma 3 adds to the shared fields (`rope_theta` and `rope_scaling` are its full-attention
/// layers'; `sliding_window` its sliding layers' window).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gemma3 {
    /// Attention scores are scaled by `query_pre_attn_scalar^-½`, not `head_dim^-½`.
    pub query_pre_attn_scalar: f64,
    /// Per layer: true for sliding-window ("local") attention, false for full attention.
    pub sliding_layers: Vec<bool>,
    /// The rotary base of the sliding layers.
    pub rope_local_theta: f64,
}

impl Gemma3 {
    /// Gemma 3's own layout for `n` layers: every sixth layer full, the others sliding.
    pub fn default_layers(n: usize) -> Vec<bool> {
        (0..n).map(|i| (i + 1) % 6 != 0).collect()
    }
}

/// The runtime configuration the model is built from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Attention only looks this many tokens back (Mistral; Gemma 3's sliding layers).
    pub sliding_window: Option<usize>,
    /// Gemma 3's extra parameters; `Some` exactly when `arch` is [`Arch::Gemma3`].
    pub gemma3: Option<Gemma3>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The dtype the weights are stored in (`float32`, `bfloat16`, `float16`).
    pub torch_dtype: String,
}

impl HfConfig {
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        serde_json::from_str(text)
    }

    /// Checks the fields and resolves the version differences into a runtime `Config`.
    pub fn into_config(self) -> std::result::Result<Config, String> {
        let arch_name = self
            .architectures
            .first()
            .cloned()
            .or_else(|| {
                // Some configs omit `architectures`; the model type is enough.
                self.model_type.as_deref().and_then(|t| match t {
                    "llama" => Some("LlamaForCausalLM".to_string()),
                    "mistral" => Some("MistralForCausalLM".to_string()),
                    "qwen2" => Some("Qwen2ForCausalLM".to_string()),
                    "gemma3_text" => Some("Gemma3ForCausalLM".to_string()),
                    _ => None,
                })
            })
            .ok_or("no `architectures` or known `model_type`")?;
        let arch = Arch::from_architecture(&arch_name).ok_or_else(|| {
            format!(
                "unsupported architecture {arch_name} (supported: {})",
                Arch::SUPPORTED
            )
        })?;
        let gemma = arch == Arch::Gemma3;
        // Gemma's configs carry `hidden_activation` (and a `hidden_act` transformers ignores).
        let act = if gemma {
            self.hidden_activation.as_ref().or(self.hidden_act.as_ref())
        } else {
            self.hidden_act.as_ref()
        };
        let want_act = if gemma { "gelu_pytorch_tanh" } else { "silu" };
        if let Some(act) = act {
            if act != want_act {
                return Err(format!(
                    "unsupported hidden_act {act} (only {want_act} for {arch_name})"
                ));
            }
        }
        for (name, v) in [
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
        ] {
            if v.is_some() {
                return Err(format!("unsupported {name} (only null)"));
            }
        }
        if self.use_bidirectional_attention == Some(true) {
            return Err("unsupported use_bidirectional_attention (only causal)".into());
        }
        if self.num_attention_heads == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return Err("hidden_size, num_attention_heads and vocab_size must be > 0".into());
        }
        let num_kv = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if num_kv == 0 || !self.num_attention_heads.is_multiple_of(num_kv) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {num_kv}",
                self.num_attention_heads
            ));
        }
        // Gemma 3's own defaults where its config leaves a key out (transformers' Gemma3TextConfig).
        let head_dim = self.head_dim.unwrap_or(if gemma {
            256
        } else {
            self.hidden_size / self.num_attention_heads
        });
        if !head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {head_dim} must be even for rotary embeddings"
            ));
        }
        // 5.x moves rope_theta and the scaling into `rope_parameters`. Gemma 3 keeps one set per
        // layer type there (4.x: the full layers' in `rope_theta`/`rope_scaling`, the sliding
        // layers' base in `rope_local_base_freq`).
        let sliding_rope = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.sliding_attention.as_deref())
            .cloned();
        if let Some(kind) = sliding_rope
            .as_ref()
            .and_then(|r| r.rope_type.as_deref().or(r.kind.as_deref()))
        {
            if kind != "default" {
                return Err(format!(
                    "unsupported rope type {kind} on sliding layers (only default)"
                ));
            }
        }
        let rope = match self.rope_parameters.or(self.rope_scaling) {
            Some(r) if r.full_attention.is_some() => r.full_attention.map(|b| *b),
            other => other,
        };
        let rope_theta = self
            .rope_theta
            .or_else(|| rope.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(if gemma { 1_000_000.0 } else { 10_000.0 });
        let max_pos = self.max_position_embeddings.unwrap_or(2048);
        let rope_scaling = match rope {
            None => None,
            Some(r) => {
                let kind = r.rope_type.clone().or(r.kind.clone());
                match kind.as_deref() {
                    None | Some("default") => None,
                    Some("llama3") => Some(RopeScaling::Llama3 {
                        factor: r.factor.ok_or("rope llama3 without factor")?,
                        low_freq_factor: r.low_freq_factor.unwrap_or(1.0),
                        high_freq_factor: r.high_freq_factor.unwrap_or(4.0),
                        original_max_position_embeddings: r
                            .original_max_position_embeddings
                            .unwrap_or(8192),
                    }),
                    Some("linear") => Some(RopeScaling::Linear {
                        factor: r.factor.ok_or("rope linear without factor")?,
                    }),
                    Some(other) => {
                        return Err(format!(
                            "unsupported rope type {other} (supported: default, llama3, linear)"
                        ))
                    }
                }
            }
        };
        let attention_bias = self.attention_bias.unwrap_or(false);
        let sliding_window = match arch {
            Arch::Mistral => self.sliding_window,
            Arch::Qwen2 if self.use_sliding_window.unwrap_or(false) => self.sliding_window,
            Arch::Gemma3 => Some(self.sliding_window.unwrap_or(4096)),
            _ => None,
        };
        let gemma3 = if gemma {
            let layer_types = match &self.layer_types {
                Some(types) => types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => Err(format!("unsupported layer type {other}")),
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?,
                None => {
                    let pattern = self.sliding_window_pattern.unwrap_or(6).max(1);
                    (0..self.num_hidden_layers)
                        .map(|i| (i + 1) % pattern != 0)
                        .collect()
                }
            };
            if layer_types.len() != self.num_hidden_layers {
                return Err(format!(
                    "layer_types lists {} layers, num_hidden_layers is {}",
                    layer_types.len(),
                    self.num_hidden_layers
                ));
            }
            Some(Gemma3 {
                query_pre_attn_scalar: self.query_pre_attn_scalar.unwrap_or(256.0),
                sliding_layers: layer_types,
                rope_local_theta: sliding_rope
                    .and_then(|r| r.rope_theta)
                    .or(self.rope_local_base_freq)
                    .unwrap_or(10_000.0),
            })
        } else {
            None
        };
        let torch_dtype = self
            .torch_dtype
            .or(self.dtype)
            .unwrap_or_else(|| "float32".to_string());
        Ok(Config {
            arch,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: num_kv,
            head_dim,
            max_position_embeddings: max_pos,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            // transformers' default: untied for Llama, Mistral and Qwen2, tied for Gemma 3 (whose
            // configs saved by transformers 4.x leave the key out).
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(gemma),
            qkv_bias: matches!(arch, Arch::Qwen2) || attention_bias,
            o_bias: matches!(arch, Arch::Llama) && attention_bias,
            mlp_bias: matches!(arch, Arch::Llama) && self.mlp_bias.unwrap_or(false),
            sliding_window,
            gemma3,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_id.map(|e| e.to_vec()).unwrap_or_default(),
            pad_token_id: self.pad_token_id,
            torch_dtype,
        })
    }
}

impl Config {
    /// Reads and resolves `config.json`; errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = read_text(path)?;
        let hf = HfConfig::from_json(&text).with_file(path)?;
        hf.into_config().map_err(|msg| {
            if msg.starts_with("unsupported") {
                Error::Unsupported(format!("{}: {msg}", path.display()))
            } else {
                Error::file(path, msg)
            }
        })
    }

    /// A tiny Llama for tests: 2 layers, hidden 32, 4 heads / 2 kv heads, vocab 64.
    pub fn tiny() -> Self {
        Config {
            arch: Arch::Llama,
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            max_position_embeddings: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            tie_word_embeddings: true,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            sliding_window: None,
            gemma3: None,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            pad_token_id: None,
            torch_dtype: "float32".to_string(),
        }
    }

    /// The tiny preset as a Qwen2 (q/k/v biases, untied embeddings).
    pub fn tiny_qwen2() -> Self {
        Config {
            arch: Arch::Qwen2,
            tie_word_embeddings: false,
            qkv_bias: true,
            ..Config::tiny()
        }
    }

    /// The tiny preset as a Gemma 3: 3 layers (sliding, sliding, full) with a window of 4, head_dim
    /// 16 ≠ hidden / heads, tied embeddings.
    pub fn tiny_gemma3() -> Self {
        Config {
            arch: Arch::Gemma3,
            num_hidden_layers: 3,
            head_dim: 16,
            rms_norm_eps: 1e-6,
            sliding_window: Some(4),
            gemma3: Some(Gemma3 {
                query_pre_attn_scalar: 16.0,
                sliding_layers: vec![true, true, false],
                rope_local_theta: 10_000.0,
            }),
            rope_theta: 1_000_000.0,
            ..Config::tiny()
        }
    }

    /// Layer `i` attends through a sliding window (every layer of Mistral with a window, Gemma 3's
    /// sliding layers).
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        match &self.gemma3 {
            Some(g) if !g.sliding_layers.get(i).copied().unwrap_or(true) => None,
            _ => self.sliding_window,
        }
    }

    /// What RMSNorm adds to its stored weight: 1 for Gemma (weights centred on 0), else 0.
    pub fn norm_offset(&self) -> f64 {
        if self.arch == Arch::Gemma3 {
            1.0
        } else {
            0.0
        }
    }

    /// Number of query heads sharing one key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Parameters in the model (embeddings counted once when tied).
    pub fn num_params(&self) -> usize {
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let q = self.num_attention_heads * d;
        let kv = self.num_key_value_heads * d;
        let mut attn = h * q + 2 * h * kv + q * h;
        if self.qkv_bias {
            attn += q + 2 * kv;
        }
        if self.o_bias {
            attn += h;
        }
        let mut mlp = 3 * h * i;
        if self.mlp_bias {
            mlp += 2 * i + h;
        }
        let mut layer = attn + mlp + 2 * h;
        if self.arch == Arch::Gemma3 {
            layer += 2 * h + 2 * d; // norms after both sublayers, and on q and k
        }
        let emb = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        emb + head + self.num_hidden_layers * layer + h
    }

    /// Parameters outside the embedding and output matrices.
    pub fn num_non_embedding_params(&self) -> usize {
        let emb = self.vocab_size * self.hidden_size;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        self.num_params() - emb - head
    }

    /// The `config.json` transformers reads back as the same model.
    pub fn to_hf_json(&self) -> serde_json::Value {
        use serde_json::json;
        let mut v = json!({
            "architectures": [self.arch.architecture()],
            "model_type": self.arch.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": 0.02,
            "use_cache": true,
            "torch_dtype": self.torch_dtype,
        });
        let obj = v.as_object_mut().expect("json! of an object is an object");
        match &self.rope_scaling {
            None => {
                obj.insert("rope_scaling".into(), serde_json::Value::Null);
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                obj.insert(
                    "rope_scaling".into(),
                    json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                           "high_freq_factor": high_freq_factor,
                           "original_max_position_embeddings": original_max_position_embeddings}),
                );
            }
            Some(RopeScaling::Linear { factor }) => {
                obj.insert(
                    "rope_scaling".into(),
                    json!({"rope_type": "linear", "factor": factor}),
                );
            }
        }
        match self.arch {
            Arch::Llama => {
                obj.insert("attention_bias".into(), json!(self.qkv_bias));
                obj.insert("mlp_bias".into(), json!(self.mlp_bias));
            }
            Arch::Mistral => {
                obj.insert("sliding_window".into(), json!(self.sliding_window));
            }
            Arch::Qwen2 => {
                obj.insert(
                    "use_sliding_window".into(),
                    json!(self.sliding_window.is_some()),
                );
                obj.insert("sliding_window".into(), json!(self.sliding_window));
            }
            Arch::Gemma3 => {
                let g = self
                    .gemma3
                    .as_ref()
                    .expect("a Gemma 3 config carries its Gemma3 fields");
                obj.remove("hidden_act");
                obj.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
                obj.insert("attention_bias".into(), json!(false));
                // transformers 5 types it as an int.
                let scalar = g.query_pre_attn_scalar;
                let scalar = if scalar.fract() == 0.0 && scalar >= 0.0 {
                    json!(scalar as u64)
                } else {
                    json!(scalar)
                };
                obj.insert("query_pre_attn_scalar".into(), scalar);
                obj.insert("sliding_window".into(), json!(self.sliding_window));
                let types: Vec<&str> = g
                    .sliding_layers
                    .iter()
                    .map(|&s| {
                        if s {
                            "sliding_attention"
                        } else {
                            "full_attention"
                        }
                    })
                    .collect();
                obj.insert("layer_types".into(), json!(types));
                // 4.x reads these two; 5.x the per-type `rope_parameters`.
                obj.insert("rope_local_base_freq".into(), json!(g.rope_local_theta));
                let mut full = obj
                    .get("rope_scaling")
                    .cloned()
                    .filter(|v| !v.is_null())
                    .unwrap_or_else(|| json!({"rope_type": "default"}));
                full["rope_theta"] = json!(self.rope_theta);
                obj.insert(
                    "rope_parameters".into(),
                    json!({"full_attention": full,
                           "sliding_attention": {"rope_type": "default", "rope_theta": g.rope_local_theta}}),
                );
                obj.insert("final_logit_softcapping".into(), serde_json::Value::Null);
                obj.insert("attn_logit_softcapping".into(), serde_json::Value::Null);
                obj.insert("use_bidirectional_attention".into(), json!(false));
            }
        }
        if let Some(b) = self.bos_token_id {
            obj.insert("bos_token_id".into(), json!(b));
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                obj.insert("eos_token_id".into(), json!(one));
            }
            many => {
                obj.insert("eos_token_id".into(), json!(many));
            }
        }
        if let Some(p) = self.pad_token_id {
            obj.insert("pad_token_id".into(), json!(p));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 1,
      "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "intermediate_size": 1536,
      "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 9,
      "num_hidden_layers": 30, "num_key_value_heads": 3, "rms_norm_eps": 1e-05,
      "rope_scaling": null, "rope_theta": 100000, "tie_word_embeddings": true,
      "torch_dtype": "bfloat16", "transformers_version": "4.42.3", "vocab_size": 49152,
      "pretraining_tp": 1, "some_future_field": {"x": 1}
    }"#;

    #[test]
    fn reads_transformers_4_llama() {
        let cfg = HfConfig::from_json(SMOLLM2).unwrap().into_config().unwrap();
        assert_eq!(cfg.arch, Arch::Llama);
        assert_eq!(cfg.head_dim, 64);
        assert_eq!(cfg.kv_groups(), 3);
        assert_eq!(cfg.rope_theta, 100_000.0);
        assert!(cfg.tie_word_embeddings);
        assert_eq!(cfg.torch_dtype, "bfloat16");
        assert_eq!(cfg.eos_token_ids, vec![2]);
        // SmolLM2-135M has 134,515,008 parameters.
        assert_eq!(cfg.num_params(), 134_515_008);
    }

    #[test]
    fn reads_transformers_5_rope_parameters_and_llama3_scaling() {
        let text = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048,
          "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
          "num_key_value_heads": 8, "dtype": "bfloat16", "eos_token_id": [128001, 128008, 128009],
          "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
             "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#;
        let cfg = HfConfig::from_json(text).unwrap().into_config().unwrap();
        assert_eq!(cfg.rope_theta, 500_000.0);
        assert_eq!(cfg.torch_dtype, "bfloat16");
        assert_eq!(cfg.eos_token_ids, vec![128001, 128008, 128009]);
        assert!(
            matches!(cfg.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 32.0)
        );
    }

    #[test]
    fn qwen2_has_qkv_bias_and_refuses_unknown_arch() {
        let text = r#"{"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 896,
          "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
          "num_key_value_heads": 2, "tie_word_embeddings": true, "sliding_window": 32768,
          "use_sliding_window": false, "rope_theta": 1000000.0}"#;
        let cfg = HfConfig::from_json(text).unwrap().into_config().unwrap();
        assert!(cfg.qkv_bias && !cfg.o_bias);
        assert_eq!(cfg.sliding_window, None);
        let bad = text.replace("Qwen2ForCausalLM", "GPT2LMHeadModel");
        let err = HfConfig::from_json(&bad)
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(
            err.contains("unsupported architecture GPT2LMHeadModel"),
            "{err}"
        );
    }

    /// Gemma 3 270M's config as transformers 5.24 writes it (from the GGUF, `save_pretrained`),
    /// and the same model as a 4.x config: per-layer types and rotary bases either way.
    #[test]
    fn reads_gemma3_in_both_transformers_forms() {
        let v5 = r#"{"_sliding_window_pattern": 6, "architectures": ["Gemma3ForCausalLM"],
          "attention_bias": false, "attn_logit_softcapping": null, "bos_token_id": 2, "dtype": "float32",
          "eos_token_id": 1, "final_logit_softcapping": null, "head_dim": 256,
          "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640, "intermediate_size": 2048,
          "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention",
            "sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "sliding_attention",
            "sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
            "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
          "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
          "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
          "rms_norm_eps": 1e-06, "rope_parameters": {"full_attention": {"rope_theta": 1000000.0,
          "rope_type": "default"}, "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
          "sliding_window": 512, "tie_word_embeddings": true, "use_bidirectional_attention": false,
          "vocab_size": 262144}"#;
        let cfg = HfConfig::from_json(v5).unwrap().into_config().unwrap();
        assert_eq!(cfg.arch, Arch::Gemma3);
        assert_eq!((cfg.head_dim, cfg.rope_theta), (256, 1_000_000.0));
        let g = cfg.gemma3.as_ref().unwrap();
        assert_eq!(g.sliding_layers, Gemma3::default_layers(18));
        assert_eq!(
            (g.rope_local_theta, g.query_pre_attn_scalar),
            (10_000.0, 256.0)
        );
        assert_eq!(
            (cfg.layer_window(0), cfg.layer_window(5)),
            (Some(512), None)
        );
        // The safetensors transformers writes for it hold 268,098,176 values.
        assert_eq!(cfg.num_params(), 268_098_176);
        let mut v4: serde_json::Value = serde_json::from_str(v5).unwrap();
        let obj = v4.as_object_mut().unwrap();
        for k in ["rope_parameters", "layer_types"] {
            obj.remove(k);
        }
        obj.insert("rope_theta".into(), 1_000_000.0.into());
        obj.remove("tie_word_embeddings"); // 4.x leaves Gemma's default (tied) out
        obj.insert("rope_local_base_freq".into(), 10_000.0.into());
        let cfg4 = HfConfig::from_json(&v4.to_string())
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(cfg4, cfg);
        for (field, value) in [
            ("final_logit_softcapping", "30.0"),
            ("hidden_activation", "\"silu\""),
            ("use_bidirectional_attention", "true"),
        ] {
            let mut bad: serde_json::Value = serde_json::from_str(v5).unwrap();
            bad[field] = serde_json::from_str(value).unwrap();
            let err = HfConfig::from_json(&bad.to_string())
                .unwrap()
                .into_config()
                .unwrap_err();
            assert!(err.starts_with("unsupported"), "{field}: {err}");
        }
    }

    #[test]
    fn hf_json_round_trips() {
        for cfg in [Config::tiny(), Config::tiny_qwen2(), Config::tiny_gemma3()] {
            let json = cfg.to_hf_json().to_string();
            let back = HfConfig::from_json(&json).unwrap().into_config().unwrap();
            assert_eq!(back, cfg);
        }
    }
}
