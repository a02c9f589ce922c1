//! Tokenizers: HF `tokenizer.json` plus what the model dir's configs say about special tokens and
//! the chat template, or the same built from a GGUF file's metadata.

use crate::digest::sha256_hex;
use crate::error::{Error, FileContext, Result};
use crate::fsio::read_text;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it was read from, for error messages.
    source: PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// Extra ids that end generation (from config.json / generation_config.json).
    extra_eos_ids: Vec<u32>,
    pub chat_template: Option<String>,
    /// Whether encoding with special tokens prepends BOS (tokenizer_config `add_bos_token`).
    pub add_bos_token: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

/// `"<|im_end|>"` or `{"content": "<|im_end|>", ...}` in tokenizer_config.json.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|n| n as u32)
            .collect(),
        _ => vec![],
    }
}

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_str(&read_text(path)?).with_file(path)
}

impl Tokenizer {
    /// Reads `tokenizer.json`, and `tokenizer_config.json`, `config.json`, `generation_config.json`
    /// and `chat_template.jinja` when present, from a HF model dir.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(Error::file(
                &tok_path,
                "missing (the model dir needs a tokenizer.json)",
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&tok_path).with_file(&tok_path)?;
        let cfg_path = dir.join("tokenizer_config.json");
        let tcfg = if cfg_path.exists() {
            read_json(&cfg_path)?
        } else {
            json!({})
        };
        let mut chat_template = match tcfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or(list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template = Some(read_text(&jinja)?);
        }
        let mut extra_eos_ids = Vec::new();
        for name in ["config.json", "generation_config.json"] {
            let p = dir.join(name);
            if p.exists() {
                extra_eos_ids.extend(ids_of(read_json(&p)?.get("eos_token_id")));
            }
        }
        let tok = Self {
            inner,
            source: tok_path,
            bos_token: token_string(tcfg.get("bos_token")),
            eos_token: token_string(tcfg.get("eos_token")),
            pad_token: token_string(tcfg.get("pad_token")),
            unk_token: token_string(tcfg.get("unk_token")),
            extra_eos_ids,
            chat_template,
            add_bos_token: tcfg
                .get("add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        Ok(tok)
    }

    /// Wraps an in-memory `tokenizer.json` (used for GGUF-derived tokenizers and tests).
    pub fn from_json(
        tokenizer_json: &Value,
        source: &Path,
        specials: SpecialTokens,
    ) -> Result<Self> {
        let bytes = serde_json::to_vec(tokenizer_json).expect("a JSON value serialises");
        let inner = tokenizers::Tokenizer::from_bytes(bytes).with_file(source)?;
        Ok(Self {
            inner,
            source: source.to_path_buf(),
            bos_token: specials.bos,
            eos_token: specials.eos,
            pad_token: specials.pad,
            unk_token: specials.unk,
            extra_eos_ids: vec![],
            chat_template: specials.chat_template,
            add_bos_token: specials.add_bos,
        })
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The raw bytes of every token id (index = id): byte-level BPE tokens through GPT-2's
    /// byte table, SentencePiece `<0xNN>` byte tokens and `▁` spaces, added tokens as their text.
    /// Concatenating the bytes of a sequence's tokens gives its text (before any normaliser).
    pub fn token_bytes_table(&self) -> Vec<Vec<u8>> {
        use std::collections::HashMap;
        let byte_level = matches!(
            self.inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        let unbyte: HashMap<char, u8> = byte_chars()
            .into_iter()
            .enumerate()
            .map(|(b, c)| (c, b as u8))
            .collect();
        let added = self.inner.get_added_tokens_decoder();
        (0..self.vocab_size() as u32)
            .map(|id| {
                let Some(tok) = self.inner.id_to_token(id) else {
                    return Vec::new();
                };
                if added.contains_key(&id) {
                    return tok.into_bytes();
                }
                if byte_level {
                    if let Some(bytes) = tok.chars().map(|c| unbyte.get(&c).copied()).collect() {
                        return bytes;
                    }
                }
                if let Some(hex) = tok.strip_prefix("<0x").and_then(|r| r.strip_suffix('>')) {
                    if let (2, Ok(b)) = (hex.len(), u8::from_str_radix(hex, 16)) {
                        return vec![b];
                    }
                }
                tok.replace('\u{2581}', " ").into_bytes()
            })
            .collect()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Every id that ends a generation: the tokenizer's EOS and the configs' `eos_token_id`s.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = self.extra_eos_ids.clone();
        ids.extend(self.eos_id());
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Token ids of `text`; with `add_special`, BOS is prepended when the tokenizer asks for it.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special)
            .with_file(&self.source)?;
        let mut ids = enc.get_ids().to_vec();
        if add_special && self.add_bos_token {
            if let Some(bos) = self.bos_id() {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).with_file(&self.source)
    }

    /// Incremental decoder for streaming generated tokens as text.
    pub fn decode_stream(&self, skip_special: bool) -> TextStream<'_> {
        TextStream {
            inner: self.inner.decode_stream(skip_special),
            source: &self.source,
        }
    }

    /// Renders `messages` with the chat template (HF `apply_chat_template`, jinja semantics).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::file(
                &self.source,
                "this model has no chat_template (tokenizer_config.json); use a plain prompt",
            )
        })?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| Error::file(&self.source, format!("chat_template: {e}")))?;
        let tmpl = env.get_template("chat").expect("template was just added");
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| Error::file(&self.source, format!("chat_template: {e}")))
    }

    /// sha256 of the canonical `tokenizer.json` text; equal tokenizers hash equal.
    pub fn hash(&self) -> String {
        let text = self.inner.to_string(false).unwrap_or_default();
        sha256_hex(text.as_bytes())
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into a model dir.
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| Error::Msg(format!("serialising tokenizer: {e}")))?;
        crate::fsio::write_atomic(dir.join("tokenizer.json"), json.as_bytes())?;
        let mut added = serde_json::Map::new();
        for (id, tok) in self.inner.get_added_tokens_decoder() {
            added.insert(
                id.to_string(),
                json!({"content": tok.content, "lstrip": tok.lstrip, "normalized": tok.normalized,
                       "rstrip": tok.rstrip, "single_word": tok.single_word, "special": tok.special}),
            );
        }
        let mut cfg = json!({
            "add_bos_token": self.add_bos_token,
            "add_prefix_space": false,
            "added_tokens_decoder": added,
            "clean_up_tokenization_spaces": false,
            "model_max_length": 8192,
            // The class that loads tokenizer.json as written. "GPT2Tokenizer" makes transformers
            // rebuild a GPT-2 tokenizer from the vocab and merges with GPT-2's own pre-tokenizer,
            // which splits "\n\n" into two tokens where SmolLM2's tokenizer.json keeps one
            // (transformers 5.24: `"Wetlands\n\n27"` → 198, 198 instead of 1116).
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        let obj = cfg
            .as_object_mut()
            .expect("json! of an object is an object");
        for (key, val) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
            ("unk_token", &self.unk_token),
            ("chat_template", &self.chat_template),
        ] {
            if let Some(v) = val {
                obj.insert(key.into(), json!(v));
            }
        }
        crate::fsio::write_atomic(
            dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&cfg)
                .expect("a JSON value serialises")
                .as_bytes(),
        )
    }
}

/// The special tokens and template that go with a tokenizer.json.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
    pub chat_template: Option<String>,
    pub add_bos: bool,
}

/// Streams generated ids as text: tokenizers' `DecodeStream`, which decodes a bounded window of
/// recent ids per step and holds back UTF-8 sequences split across byte-level tokens.
pub struct TextStream<'a> {
    inner: tokenizers::tokenizer::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
    source: &'a Path,
}

impl TextStream<'_> {
    /// Adds one id; returns the new text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.inner.step(id).with_file(self.source)
    }
}

/// GPT-2's byte → printable-char table (`bytes_to_unicode`), as byte-level BPE vocabularies
/// spell bytes.
pub fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut table = vec!['\0'; 256];
    for &b in &printable {
        table[b as usize] = char::from_u32(b).expect("latin-1 code points are chars");
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            table[b as usize] = char::from_u32(256 + n).expect("small code points are chars");
            n += 1;
            printable.push(b);
        }
    }
    table
}

/// The `tokenizer.json` of a GPT-2-style byte-level BPE as HF writes it for SmolLM2: digits split
/// one by one, byte-level pre-tokenization without a prefix space, `special` ids added as special
/// tokens.
pub fn byte_level_bpe_json(vocab: &[String], merges: &[String], special: &[u32]) -> Value {
    let vocab_map: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Value> = special
        .iter()
        .map(|&id| {
            json!({"id": id, "content": vocab[id as usize], "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab_map, "merges": merges}
    })
}
