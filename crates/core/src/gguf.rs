//! Reading llama.cpp's GGUF files: the hyper-parameters as a `Config`, the tokenizer from the
//! metadata, and every tensor dequantized to f32 under its Hugging Face name and layout.

use crate::config::{Arch, Config};
use crate::error::{Error, Result};
use crate::tokenizer::{byte_level_bpe_json, SpecialTokens, Tokenizer};
use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
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

    /// Where the file's weights come from, as a Hugging Face id and licence: the
    /// `general.base_model.0.*` keys when the converter wrote them, else the file's
    /// `general.organization` and its name up to the first dot
    /// (`SmolLM2-135M-Instruct.Q4_1.gguf` of HuggingFaceTB → `HuggingFaceTB/SmolLM2-135M-Instruct`).
    pub fn lineage(&self) -> crate::model_card::Lineage {
        let base = match (
            self.get_str("general.base_model.0.organization"),
            self.get_str("general.base_model.0.name"),
        ) {
            (Some(org), Some(name)) => Some(format!("{org}/{name}").replace(' ', "-")),
            _ => self.get_str("general.organization").and_then(|org| {
                let stem = self.path.file_name()?.to_str()?.split('.').next()?;
                (!stem.is_empty()).then(|| format!("{org}/{stem}"))
            }),
        };
        crate::model_card::Lineage {
            base_model: base,
            license: self.get_str("general.license"),
        }
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
            gemma3: None,
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
            "gpt2" | "gpt-2" | "default" => {
                // No digit splitting: only the byte-level step.
                json["pre_tokenizer"] = json["pre_tokenizer"]["pretokenizers"][1].clone();
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: unsupported GGUF pre-tokenizer '{other}' (supported: smollm, gpt-2)",
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

/// llama.cpp's tensor names beside HF Llama's: whole-model tensors, then per-layer modules
/// (`blk.N.{gguf}.weight` ↔ `model.layers.N.{hf}.weight`). [`hf_name`] and [`gguf_name`] read it.
const MODEL_TENSORS: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];
const LAYER_MODULES: [(&str, &str); 9] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// Maps `name` through the tables above, from the side `from` (0 = GGUF, 1 = HF) to the other.
fn map_name(name: &str, from: usize) -> Option<String> {
    let pick = |pair: &(&'static str, &'static str), side: usize| [pair.0, pair.1][side];
    if let Some(p) = MODEL_TENSORS.iter().find(|p| pick(p, from) == name) {
        return Some(pick(p, 1 - from).to_string());
    }
    let prefix = ["blk.", "model.layers."];
    let rest = name.strip_prefix(prefix[from])?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let p = LAYER_MODULES.iter().find(|p| pick(p, from) == module)?;
    Some(format!(
        "{}{layer}.{}.{kind}",
        prefix[1 - from],
        pick(p, 1 - from)
    ))
}

/// GGUF tensor name → HF Llama tensor name.
pub fn hf_name(gguf: &str) -> Option<String> {
    map_name(gguf, 0)
}

/// HF Llama tensor name → GGUF tensor name (the inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    map_name(hf, 1)
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

/// The tensor type of a GGUF export: `f32` keeps the weights exactly, `f16` halves the file,
/// `q8_0` (llama.cpp's 8-bit blocks of 32) quarters it. Norms stay f32 whatever is chosen, as
/// llama.cpp's own converter does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Q8_0,
}

impl std::str::FromStr for GgufType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "q8_0" => Ok(Self::Q8_0),
            other => Err(Error::Msg(format!(
                "GGUF type '{other}': expected f32, f16 or q8_0"
            ))),
        }
    }
}

impl GgufType {
    fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` (LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_Q8_0).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct GgufExport {
    pub tensors: usize,
    pub bytes: u64,
    /// The llama.cpp pre-tokenizer name written (`smollm`, `gpt-2`).
    pub pre_tokenizer: String,
    /// Matrices kept in f16 because their rows do not split into q8_0's blocks of 32.
    pub kept_f16: Vec<String>,
}

/// llama.cpp's `permute(w, n_head)` (convert_hf_to_gguf.py): HF's half-split rotary rows
/// (head, half j, pair i) interleaved as (head, i, j). [`unpermute`] inverts it.
pub fn permute(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let half = dims[0] / n_head / 2;
    let rest: usize = dims[1..].iter().product();
    Ok(t.reshape((n_head, 2, half, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// The llama.cpp name of a tokenizer.json pre-tokenizer, for the two byte-level BPE ones that
/// [`Gguf::tokenizer`] rebuilds: SmolLM2's (digits one by one, then byte-level) and GPT-2's.
fn llama_cpp_pre(pre: &Value_) -> Option<&'static str> {
    let byte_level = |v: &Value_| {
        v["type"] == "ByteLevel"
            && v["add_prefix_space"] == false
            && v.get("use_regex").is_none_or(|r| r == true)
    };
    if byte_level(pre) {
        return Some("gpt-2");
    }
    match (pre["type"].as_str(), pre["pretokenizers"].as_array()) {
        (Some("Sequence"), Some(seq))
            if seq.len() == 2
                && seq[0]["type"] == "Digits"
                && seq[0]["individual_digits"] == true
                && byte_level(&seq[1]) =>
        {
            Some("smollm")
        }
        _ => None,
    }
}

type Value_ = serde_json::Value;

/// The tokenizer metadata llama.cpp reads (`tokenizer.ggml.*`, the chat template), from a
/// byte-level BPE tokenizer.json; other tokenizers are refused by name.
fn tokenizer_metadata(
    tok: &Tokenizer,
    vocab_size: usize,
) -> Result<(Vec<(String, Value)>, String)> {
    let src = tok.source().to_path_buf();
    let refuse = |msg: String| Error::Unsupported(format!("{}: {msg}", src.display()));
    let json: Value_ = serde_json::from_str(
        &tok.inner()
            .to_string(false)
            .map_err(|e| Error::Msg(format!("serialising tokenizer: {e}")))?,
    )
    .expect("tokenizers writes JSON");
    let model = &json["model"];
    if model["type"] != "BPE" || json["decoder"]["type"] != "ByteLevel" {
        return Err(refuse(
            "GGUF export supports byte-level BPE tokenizers (gpt2 in llama.cpp) only".into(),
        ));
    }
    let pre = llama_cpp_pre(&json["pre_tokenizer"]).ok_or_else(|| {
        refuse(format!(
            "its pre-tokenizer has no llama.cpp name distill knows (smollm, gpt-2), so llama.cpp \
             would split text differently: {}",
            json["pre_tokenizer"]
        ))
    })?;
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![1i32; vocab_size];
    let vocab = model["vocab"].as_object().cloned().unwrap_or_default();
    for (t, id) in vocab {
        if let Some(slot) = id.as_u64().and_then(|i| tokens.get_mut(i as usize)) {
            *slot = Some(t);
        }
    }
    for a in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(content.to_string());
            // llama.cpp: 3 = control (special), 4 = user-defined.
            types[id as usize] = if a["special"] == true { 3 } else { 4 };
        }
    }
    // Ids the model has but the tokenizer never produces (a padded vocabulary) get
    // placeholder names, as llama.cpp's converter writes them.
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            Value::String(t.unwrap_or_else(|| {
                types[i] = 5; // unused
                format!("[PAD{i}]")
            }))
        })
        .collect();
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Value_::String(s) => Some(s.clone()),
            Value_::Array(pair) if pair.len() == 2 => {
                Some(format!("{} {}", pair[0].as_str()?, pair[1].as_str()?))
            }
            _ => None,
        })
        .map(Value::String)
        .collect();
    let mut md = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        (
            "tokenizer.ggml.add_bos_token".into(),
            Value::Bool(tok.add_bos_token),
        ),
    ];
    for (key, token) in [
        ("bos_token_id", &tok.bos_token),
        ("eos_token_id", &tok.eos_token),
        ("unknown_token_id", &tok.unk_token),
        ("padding_token_id", &tok.pad_token),
    ] {
        if let Some(id) = token.as_deref().and_then(|t| tok.token_to_id(t)) {
            md.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    if let Some(t) = &tok.chat_template {
        md.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
    }
    Ok((md, pre.to_string()))
}

/// Writes a model (HF tensors, its config and tokenizer) as a llama.cpp GGUF file: llama
/// architecture metadata, Q/K rows permuted for llama.cpp's rope, the tokenizer with its
/// pre-tokenizer and chat template, and `lineage` as `general.base_model.0.*` and
/// `general.license`. Written under a temporary name and renamed into place.
pub fn write_gguf(
    path: &Path,
    cfg: &Config,
    tensors: &HashMap<String, Tensor>,
    tokenizer: &Tokenizer,
    dtype: GgufType,
    name: &str,
    lineage: &crate::model_card::Lineage,
) -> Result<GgufExport> {
    if cfg.arch != Arch::Llama || cfg.qkv_bias {
        return Err(Error::Unsupported(format!(
            "GGUF export writes the llama architecture; this model is {}",
            cfg.arch.architecture()
        )));
    }
    if cfg.rope_scaling.is_some() {
        return Err(Error::Unsupported(
            "GGUF export does not write rope scaling".into(),
        ));
    }
    let (tok_md, pre) = tokenizer_metadata(tokenizer, cfg.vocab_size)?;
    let u32v = |x: usize| Value::U32(x as u32);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(dtype.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        ("llama.vocab_size".into(), u32v(cfg.vocab_size)),
        (
            "llama.context_length".into(),
            u32v(cfg.max_position_embeddings),
        ),
        ("llama.embedding_length".into(), u32v(cfg.hidden_size)),
        (
            "llama.feed_forward_length".into(),
            u32v(cfg.intermediate_size),
        ),
        ("llama.block_count".into(), u32v(cfg.num_hidden_layers)),
        (
            "llama.attention.head_count".into(),
            u32v(cfg.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u32v(cfg.num_key_value_heads),
        ),
        // A pruned model's head_dim need not be hidden / heads: llama.cpp reads it here.
        ("llama.attention.key_length".into(), u32v(cfg.head_dim)),
        ("llama.attention.value_length".into(), u32v(cfg.head_dim)),
        ("llama.rope.dimension_count".into(), u32v(cfg.head_dim)),
        (
            "llama.rope.freq_base".into(),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
    ];
    if let Some(l) = &lineage.license {
        md.push(("general.license".into(), Value::String(l.clone())));
    }
    if let Some((org, base)) = lineage
        .base_model
        .as_deref()
        .and_then(|b| b.split_once('/'))
    {
        md.push(("general.base_model.count".into(), Value::U32(1)));
        md.push((
            "general.base_model.0.name".into(),
            Value::String(base.into()),
        ));
        md.push((
            "general.base_model.0.organization".into(),
            Value::String(org.into()),
        ));
    }
    md.extend(tok_md);

    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut out: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    let mut kept_f16 = Vec::new();
    for hf in names {
        if cfg.tie_word_embeddings && hf == "lm_head.weight" {
            continue;
        }
        let g = gguf_name(hf)
            .ok_or_else(|| Error::Unsupported(format!("GGUF export: unexpected tensor {hf}")))?;
        let mut t = tensors[hf].to_dtype(candle_core::DType::F32)?;
        if g.ends_with("attn_q.weight") {
            t = permute(&t, cfg.num_attention_heads)?;
        } else if g.ends_with("attn_k.weight") {
            t = permute(&t, cfg.num_key_value_heads)?;
        }
        let ty = match (t.rank(), dtype) {
            (1, _) => GgmlDType::F32,
            (_, GgufType::Q8_0) if t.dims()[t.rank() - 1] % GgmlDType::Q8_0.block_size() != 0 => {
                kept_f16.push(g.clone());
                GgmlDType::F16
            }
            (_, d) => d.ggml(),
        };
        out.push((g, QTensor::quantize(&t, ty)?));
    }
    let tmp = crate::fsio::tmp_name(path);
    let write = || -> Result<()> {
        let mut f = std::io::BufWriter::new(File::create(&tmp).map_err(|e| Error::io(&tmp, e))?);
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = out.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut f, &md_refs, &t_refs)
            .map_err(|e| Error::file(&tmp, crate::error::one_line(&e.to_string())))?;
        use std::io::Write;
        f.flush().map_err(|e| Error::io(&tmp, e))?;
        f.get_ref().sync_all().map_err(|e| Error::io(&tmp, e))
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(GgufExport {
        tensors: out.len(),
        bytes: std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len(),
        pre_tokenizer: pre,
        kept_f16,
    })
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
        for g in [
            "token_embd.weight",
            "output.weight",
            "blk.7.attn_k.weight",
            "blk.0.ffn_norm.weight",
        ] {
            assert_eq!(gguf_name(&hf_name(g).unwrap()).unwrap(), g);
        }
        assert!(gguf_name("model.layers.3.mlp.nope.weight").is_none());
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    /// An export read back by distill's own reader: same config, tokenizer, lineage; weights
    /// exactly equal in f32, logits within f16's and q8_0's rounding.
    #[test]
    fn export_round_trips_through_the_reader() -> Result<()> {
        use crate::model_card::Lineage;
        use crate::testing::{named_tensors, random_model, tiny_config, tiny_tokenizer};
        let tok = tiny_tokenizer();
        let lineage = Lineage {
            base_model: Some("org/tiny-base".into()),
            license: Some("apache-2.0".into()),
        };
        // The second shape has head_dim ≠ hidden / heads (as a head-pruned model) and its own
        // output matrix.
        let shapes = [
            tiny_config(),
            Config {
                num_attention_heads: 2,
                num_key_value_heads: 1,
                tie_word_embeddings: false,
                ..tiny_config()
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        let ids = Tensor::new(&[[3u32, 70, 200, 5, 9, 120, 33, 1]], &Device::Cpu)?;
        for cfg in shapes {
            let tensors = named_tensors(&random_model(&cfg, 3)?.1);
            let load = |t: HashMap<String, Tensor>, cfg: &Config| {
                let vb =
                    candle_nn::VarBuilder::from_tensors(t, candle_core::DType::F32, &Device::Cpu);
                crate::CausalLm::load(vb, cfg)?.forward(&ids)
            };
            let want = load(tensors.clone(), &cfg)?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            // f32: the weights are compared exactly above; the logits differ by float rounding
            // only (the same values at other addresses take other SIMD paths).
            for (ty, rel_tol) in [
                (GgufType::F32, 1e-5),
                (GgufType::F16, 5e-3),
                (GgufType::Q8_0, 5e-2),
            ] {
                let path = dir.path().join("m.gguf");
                let e = write_gguf(&path, &cfg, &tensors, &tok, ty, "tiny", &lineage)?;
                assert_eq!(e.pre_tokenizer, "smollm");
                // 2 heads × head_dim 8: o_proj's rows (16) do not split into q8_0's blocks.
                let odd = ty == GgufType::Q8_0 && cfg.num_attention_heads == 2;
                let want_f16: Vec<String> = match odd {
                    true => (0..2)
                        .map(|l| format!("blk.{l}.attn_output.weight"))
                        .collect(),
                    false => vec![],
                };
                assert_eq!(e.kept_f16, want_f16);
                let mut g = Gguf::open(&path)?;
                let back = g.config()?;
                assert_eq!(
                    Config {
                        max_position_embeddings: cfg.max_position_embeddings,
                        bos_token_id: cfg.bos_token_id,
                        eos_token_ids: cfg.eos_token_ids.clone(),
                        pad_token_id: cfg.pad_token_id,
                        ..back.clone()
                    },
                    cfg
                );
                assert_eq!(g.lineage(), lineage);
                let t2 = g.tokenizer()?;
                let text = "the 2026 <|im_end|> thee\n\n42";
                assert_eq!(t2.encode(text, true)?, tok.encode(text, true)?);
                assert_eq!(t2.chat_template, tok.chat_template);
                assert_eq!(t2.eos_token, tok.eos_token);
                let got: HashMap<String, Tensor> =
                    g.hf_tensors(&Device::Cpu)?.into_iter().collect();
                if ty == GgufType::F32 {
                    for (name, t) in &tensors {
                        if let Some(b) = got.get(name) {
                            let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
                            assert_eq!(b.dims(), t.dims(), "{name}");
                            assert_eq!(flat(b)?, flat(t)?, "{name}");
                        }
                    }
                    let missing: Vec<_> =
                        tensors.keys().filter(|k| !got.contains_key(*k)).collect();
                    assert!(
                        missing.iter().all(|k| *k == "lm_head.weight"),
                        "{missing:?}"
                    );
                }
                let logits = load(got, &back)?;
                let delta = (logits - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    delta <= rel_tol * scale,
                    "{ty:?}: max |Δ| {delta} of {scale}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn export_refuses_what_llama_cpp_would_read_otherwise() {
        use crate::testing::{named_tensors, random_model, tiny_tokenizer};
        let cfg = Config {
            vocab_size: tiny_tokenizer().vocab_size(),
            ..Config::tiny_qwen2()
        };
        let (_, varmap) = random_model(&cfg, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.gguf");
        let err = write_gguf(
            &path,
            &cfg,
            &named_tensors(&varmap),
            &tiny_tokenizer(),
            GgufType::F32,
            "q",
            &Default::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("llama architecture"), "{err}");
        assert!(!path.exists());
        assert!("q4"
            .parse::<GgufType>()
            .unwrap_err()
            .to_string()
            .contains("f32, f16 or q8_0"));
    }
}
