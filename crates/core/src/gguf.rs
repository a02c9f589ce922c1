//! Reading llama.cpp's GGUF files: the hyper-parameters as a `Config`, the tokenizer from the
//! metadata, and every tensor dequantized to f32 under its Hugging Face name and layout.

use crate::config::{Arch, Config};
use crate::error::{Error, Result};
use crate::tokenizer::{byte_level_bpe_json, SpecialTokens, Tokenizer};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use std::fs::File;
use std::path::{Path, PathBuf};

pub struct Gguf {
    path: PathBuf,
    file: File,
    content: Content,
}

impl Gguf {
    /// Opens a GGUF file and reads its header; a file that is not GGUF is refused by name.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut file).map_err(|e| {
            Error::file(
                path,
                format!(
                    "not a readable GGUF file ({})",
                    crate::error::one_line(&e.to_string())
                ),
            )
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            content,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::file(&self.path, msg)
    }

    fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self
            .metadata(key)
            .ok_or_else(|| self.err(format!("missing metadata {key}")))?;
        match v {
            Value::U32(x) => Ok(*x),
            Value::I32(x) => Ok(*x as u32),
            Value::U64(x) => Ok(*x as u32),
            Value::I64(x) => Ok(*x as u32),
            _ => Err(self.err(format!("metadata {key} is not an integer"))),
        }
    }

    /// An f32 value widened to the f64 with the same shortest decimal form (1e-5, not
    /// 9.999999747378752e-6), as HF's config.json has it.
    fn get_f64(&self, key: &str) -> Option<f64> {
        let v = self.metadata(key).and_then(|v| v.to_f32().ok())?;
        format!("{v}").parse().ok()
    }

    fn get_str(&self, key: &str) -> Option<String> {
        self.metadata(key).and_then(|v| v.to_string().ok()).cloned()
    }

    fn get_strings(&self, key: &str) -> Result<Vec<String>> {
        let v = self
            .metadata(key)
            .ok_or_else(|| self.err(format!("missing metadata {key}")))?;
        v.to_vec()
            .map_err(|_| self.err(format!("metadata {key} is not an array")))?
            .iter()
            .map(|x| {
                x.to_string()
                    .cloned()
                    .map_err(|_| self.err(format!("metadata {key} holds a non-string")))
            })
            .collect()
    }

    /// The model's hyper-parameters; only the `llama` GGUF architecture is supported.
    pub fn config(&self) -> Result<Config> {
        let arch = self.get_str("general.architecture").unwrap_or_default();
        if arch != "llama" {
            return Err(Error::Unsupported(format!(
                "{}: unsupported GGUF architecture '{arch}' (supported: llama)",
                self.path.display()
            )));
        }
        let hidden = self.get_u32("llama.embedding_length")? as usize;
        let heads = self.get_u32("llama.attention.head_count")? as usize;
        let kv_heads = self
            .get_u32("llama.attention.head_count_kv")
            .map(|v| v as usize)
            .unwrap_or(heads);
        let head_dim = self
            .get_u32("llama.rope.dimension_count")
            .map(|v| v as usize)
            .unwrap_or(hidden / heads);
        let vocab = self.get_strings("tokenizer.ggml.tokens")?.len();
        let tied = !self.content.tensor_infos.contains_key("output.weight");
        if self.metadata("llama.rope.scaling.type").is_some()
            || self.content.tensor_infos.contains_key("rope_freqs.weight")
        {
            return Err(Error::Unsupported(format!(
                "{}: GGUF rope scaling is not supported by convert",
                self.path.display()
            )));
        }
        Ok(Config {
            arch: Arch::Llama,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.get_u32("llama.feed_forward_length")? as usize,
            num_hidden_layers: self.get_u32("llama.block_count")? as usize,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: self.get_u32("llama.context_length").unwrap_or(2048) as usize,
            rms_norm_eps: self
                .get_f64("llama.attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5),
            rope_theta: self.get_f64("llama.rope.freq_base").unwrap_or(10_000.0),
            rope_scaling: None,
            tie_word_embeddings: tied,
            qkv_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            o_bias: self
                .content
                .tensor_infos
                .contains_key("blk.0.attn_output.bias"),
            mlp_bias: false,
            sliding_window: None,
            bos_token_id: self.get_u32("tokenizer.ggml.bos_token_id").ok(),
            eos_token_ids: self
                .get_u32("tokenizer.ggml.eos_token_id")
                .ok()
                .into_iter()
                .collect(),
            pad_token_id: self.get_u32("tokenizer.ggml.padding_token_id").ok(),
            torch_dtype: "float32".to_string(),
        })
    }

    /// The tokenizer described by the metadata: a byte-level BPE (`tokenizer.ggml.model = gpt2`)
    /// with the pre-tokenizer the `pre` key names. candle's own GGUF tokenizer ignores `pre=smollm`
    /// and adds a prefix space, which gives wrong ids for SmolLM2 (CANDLE-NOTES.md).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let model = self.get_str("tokenizer.ggml.model").unwrap_or_default();
        if model != "gpt2" {
            return Err(Error::Unsupported(format!(
                "{}: unsupported GGUF tokenizer model '{model}' (supported: gpt2 byte-level BPE)",
                self.path.display()
            )));
        }
        let pre = self
            .get_str("tokenizer.ggml.pre")
            .unwrap_or_else(|| "default".into());
        let tokens = self.get_strings("tokenizer.ggml.tokens")?;
        let merges = self.get_strings("tokenizer.ggml.merges")?;
        let types: Vec<i32> = match self.metadata("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|_| self.err("tokenizer.ggml.token_type is not an array"))?
                .iter()
                .map(|x| x.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        // llama.cpp token types: 3 = control, 4 = user-defined; both are special in HF.
        let special: Vec<u32> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == 3 || **t == 4)
            .map(|(i, _)| i as u32)
            .collect();
        let mut json = byte_level_bpe_json(&tokens, &merges, &special);
        match pre.as_str() {
            "smollm" => {}
            "gpt2" | "default" => {
                // No digit splitting: only the byte-level step.
                json["pre_tokenizer"] = json["pre_tokenizer"]["pretokenizers"][1].clone();
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: unsupported GGUF pre-tokenizer '{other}' (supported: smollm, gpt2)",
                    self.path.display()
                )))
            }
        }
        let name = |key: &str| -> Option<String> {
            self.get_u32(key)
                .ok()
                .and_then(|id| tokens.get(id as usize).cloned())
        };
        let specials = SpecialTokens {
            bos: name("tokenizer.ggml.bos_token_id"),
            eos: name("tokenizer.ggml.eos_token_id"),
            pad: name("tokenizer.ggml.padding_token_id")
                .or_else(|| name("tokenizer.ggml.eos_token_id")),
            unk: name("tokenizer.ggml.unknown_token_id"),
            chat_template: self.get_str("tokenizer.chat_template"),
            add_bos: self
                .metadata("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(false),
        };
        Tokenizer::from_json(&json, &self.path, specials)
    }

    /// Every tensor dequantized to f32 on `device`, renamed to HF names, with Q/K rows restored to
    /// HF's half-split rotary layout (llama.cpp permutes them for its interleaved rope).
    pub fn hf_tensors(&mut self, device: &Device) -> Result<Vec<(String, Tensor)>> {
        let cfg = self.config()?;
        let mut names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let hf = hf_name(&name).ok_or_else(|| self.err(format!("unexpected tensor {name}")))?;
            let q = self
                .content
                .tensor(&mut self.file, &name, device)
                .map_err(|e| {
                    self.err(format!(
                        "reading tensor {name}: {}",
                        crate::error::one_line(&e.to_string())
                    ))
                })?;
            let mut t = q.dequantize(device)?;
            if name.ends_with("attn_q.weight") || name.ends_with("attn_q.bias") {
                t = unpermute(&t, cfg.num_attention_heads)?;
            } else if name.ends_with("attn_k.weight") || name.ends_with("attn_k.bias") {
                t = unpermute(&t, cfg.num_key_value_heads)?;
            }
            out.push((hf, t));
        }
        Ok(out)
    }
}

/// GGUF tensor name → HF Llama tensor name.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Inverse of llama.cpp's `permute(w, n_head)`: rows (head, pair i, half j) stored interleaved as
/// (head, i, j) go back to HF's (head, j, i). Works for (out, in) weights and (out,) biases.
pub fn unpermute(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let half = rows / n_head / 2;
    let rest: usize = dims[1..].iter().product();
    Ok(t.reshape((n_head, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// unpermute ∘ llama.cpp's permute = identity.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> Result<()> {
        let (n_head, hd, inp) = (3, 4, 5);
        let hf = Tensor::arange(0f32, (n_head * hd * inp) as f32, &Device::Cpu)?
            .reshape((n_head * hd, inp))?;
        // permute: reshape(n_head, 2, hd/2, in).swapaxes(1, 2).reshape(out, in)
        let gguf = hf
            .reshape((n_head, 2, hd / 2, inp))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n_head * hd, inp))?;
        let back = unpermute(&gguf, n_head)?;
        assert_eq!(back.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn maps_names() {
        assert_eq!(
            hf_name("blk.12.ffn_down.weight").unwrap(),
            "model.layers.12.mlp.down_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_norm.weight").unwrap(),
            "model.layers.0.input_layernorm.weight"
        );
        assert!(hf_name("blk.x.attn_q.weight").is_none());
        assert!(hf_name("rope_freqs.weight").is_none());
    }
}
