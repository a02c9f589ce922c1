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
}

impl Arch {
    pub const SUPPORTED: &'static str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";

    pub fn from_architecture(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Arch::Llama),
            "MistralForCausalLM" => Some(Arch::Mistral),
            "Qwen2ForCausalLM" => Some(Arch::Qwen2),
            _ => None,
        }
    }

    pub fn architecture(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
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
    /// Attention only looks this many tokens back (Mistral).
    pub sliding_window: Option<usize>,
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
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(format!("unsupported hidden_act {act} (only silu)"));
            }
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
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads);
        if !head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {head_dim} must be even for rotary embeddings"
            ));
        }
        // 5.x moves rope_theta and the scaling into `rope_parameters`.
        let rope = self.rope_parameters.or(self.rope_scaling);
        let rope_theta = self
            .rope_theta
            .or_else(|| rope.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(10_000.0);
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
            _ => None,
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
            // transformers' default is untied for all three architectures.
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias: matches!(arch, Arch::Qwen2) || attention_bias,
            o_bias: matches!(arch, Arch::Llama) && attention_bias,
            mlp_bias: matches!(arch, Arch::Llama) && self.mlp_bias.unwrap_or(false),
            sliding_window,
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
        let layer = attn + mlp + 2 * h;
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

    #[test]
    fn hf_json_round_trips() {
        for cfg in [Config::tiny(), Config::tiny_qwen2()] {
            let json = cfg.to_hf_json().to_string();
            let back = HfConfig::from_json(&json).unwrap().into_config().unwrap();
            assert_eq!(back, cfg);
        }
    }
}
