//! `distill prepare`: text files → token shards. Streams file by file (a `.jsonl` line by line),
//! tokenizes documents in parallel batches, packs them with EOS between documents, and writes the
//! shards and `meta.json` into a temporary dir that replaces the output only when complete.

use crate::digest::hex;
use crate::error::{Error, Result};
use crate::shards::{SourceMeta, SplitWriter, TokenShardsMeta, FORMAT_VERSION};
use crate::tokenizer::{ChatMessage, Tokenizer};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub seq_len: usize,
    /// Fraction of documents (outside `valid/` dirs) held out by a stable hash of their key.
    pub valid_fraction: f64,
    /// The JSONL field holding a document's text (`messages` arrays are rendered with the chat
    /// template when the field is absent).
    pub text_field: String,
    /// In `.txt` files, blank lines separate documents (otherwise a file is one document).
    pub blank_line_docs: bool,
    /// Replace invalid UTF-8 with U+FFFD (counted) instead of refusing the file.
    pub lossy: bool,
    /// Overwrite an output dir that holds shards from another tokenizer.
    pub force: bool,
    pub shard_sequences: usize,
    /// Documents tokenized per parallel batch.
    pub batch_documents: usize,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            seq_len: 256,
            valid_fraction: 0.0,
            text_field: "text".into(),
            blank_line_docs: false,
            lossy: false,
            force: false,
            shard_sequences: 4096,
            batch_documents: 256,
        }
    }
}

/// Expands files and directories (recursively, sorted) into the `.txt` / `.jsonl` files to read.
pub fn input_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if is_supported(&p) {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            walk(input, &mut files)?;
        } else if !input.exists() {
            return Err(Error::file(input, "input does not exist"));
        } else if is_supported(input) {
            files.push(input.clone());
        } else {
            return Err(Error::file(
                input,
                "unsupported input type (expected .txt or .jsonl)",
            ));
        }
    }
    if files.is_empty() {
        return Err(Error::Msg(format!(
            "no .txt or .jsonl files in {}",
            inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(files)
}

fn is_supported(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("txt" | "jsonl")
    )
}

/// Decodes UTF-8, naming the file (and line) and byte offset of the first invalid sequence, or
/// replacing invalid sequences when `lossy` (returning how many were replaced).
fn decode_utf8(
    bytes: Vec<u8>,
    file: &Path,
    line: Option<usize>,
    offset: u64,
    lossy: bool,
) -> Result<(String, u64)> {
    match String::from_utf8(bytes) {
        Ok(s) => Ok((s, 0)),
        Err(e) => {
            if lossy {
                let bytes = e.into_bytes();
                let bad = bytes
                    .utf8_chunks()
                    .filter(|c| !c.invalid().is_empty())
                    .count() as u64;
                Ok((String::from_utf8_lossy(&bytes).into_owned(), bad))
            } else {
                let at = offset + e.utf8_error().valid_up_to() as u64;
                let loc = match line {
                    Some(l) => format!("{}:{l}", file.display()),
                    None => file.display().to_string(),
                };
                Err(Error::Msg(format!(
                    "{loc}: invalid UTF-8 at byte offset {at} (use --lossy to replace it)"
                )))
            }
        }
    }
}

fn stable_fraction(key: &str) -> f64 {
    let h = Sha256::digest(key.as_bytes());
    let v = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
    (v % 1_000_000) as f64 / 1_000_000.0
}

struct Doc {
    text: String,
    valid: bool,
    /// Index of the input file it came from.
    source: usize,
}

/// The text of one JSONL record: the text field, or chat `messages` rendered with the template.
fn jsonl_text(
    tokenizer: &Tokenizer,
    line: &str,
    file: &Path,
    line_no: usize,
    field: &str,
) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| Error::Msg(format!("{}:{line_no}: not JSON ({e})", file.display())))?;
    match v.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(Error::Msg(format!(
            "{}:{line_no}: field '{field}' is not a string",
            file.display()
        ))),
        None => match v.get("messages") {
            Some(m) => {
                let msgs: Vec<ChatMessage> = serde_json::from_value(m.clone()).map_err(|e| {
                    Error::Msg(format!("{}:{line_no}: bad messages ({e})", file.display()))
                })?;
                tokenizer.apply_chat_template(&msgs, false)
            }
            None => Err(Error::Msg(format!(
                "{}:{line_no}: no '{field}' field (nor 'messages')",
                file.display()
            ))),
        },
    }
}

/// Tokenizes and packs everything; `progress(bytes_read)` is called after each batch.
pub fn prepare(
    tokenizer: &Tokenizer,
    inputs: &[PathBuf],
    out: &Path,
    opts: &PrepareOptions,
    mut progress: impl FnMut(u64),
) -> Result<TokenShardsMeta> {
    if opts.seq_len < 2 {
        return Err(Error::Msg("--seq-len must be at least 2".into()));
    }
    let files = input_files(inputs)?;
    let hash = tokenizer.hash();
    if let Ok(old) = TokenShardsMeta::read(out) {
        if old.tokenizer_hash != hash && !opts.force {
            return Err(Error::file(
                out,
                format!(
                    "holds token shards from another tokenizer ({}…, this one is {}…); use --force to replace them",
                    &old.tokenizer_hash[..12],
                    &hash[..12]
                ),
            ));
        }
    }
    let eos = tokenizer
        .eos_id()
        .or_else(|| tokenizer.stop_ids().first().copied())
        .ok_or_else(|| {
            Error::file(
                tokenizer.source(),
                "tokenizer has no EOS token to join documents",
            )
        })?;

    let tmp = crate::fsio::fresh_tmp_dir(out)?;
    let meta = match write_shards(tokenizer, &files, &tmp, eos, hash, opts, &mut progress) {
        Ok(meta) => meta,
        Err(e) => {
            // Nothing half-written stays behind; an earlier complete output is untouched.
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    crate::fsio::replace_dir(&tmp, out)?;
    Ok(meta)
}

fn write_shards(
    tokenizer: &Tokenizer,
    files: &[PathBuf],
    tmp: &Path,
    eos: u32,
    hash: String,
    opts: &PrepareOptions,
    progress: &mut impl FnMut(u64),
) -> Result<TokenShardsMeta> {
    let mut train = SplitWriter::new(tmp, "train", opts.seq_len, opts.shard_sequences);
    let mut valid = SplitWriter::new(tmp, "valid", opts.seq_len, opts.shard_sequences);
    let mut sources: Vec<SourceMeta> = Vec::new();
    let mut done_bytes = 0u64;
    // One batch across files, so that many one-document files (books) tokenize in parallel too;
    // bounded by count and bytes. Documents keep their input order.
    let mut batch: Vec<Doc> = Vec::new();
    let mut batch_bytes = 0usize;
    const BATCH_BYTES: usize = 4 << 20;
    let mut flush = |batch: &mut Vec<Doc>, sources: &mut Vec<SourceMeta>| -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let texts: Vec<&str> = batch.iter().map(|d| d.text.as_str()).collect();
        let encs = tokenizer
            .inner()
            .encode_batch_fast(texts, false)
            .map_err(|e| Error::file(&sources[batch[0].source].path, format!("tokenizing: {e}")))?;
        for (doc, enc) in batch.iter().zip(encs) {
            let ids = enc.get_ids();
            sources[doc.source].tokens += ids.len() as u64 + 1;
            let w = if doc.valid { &mut valid } else { &mut train };
            w.push_document(ids, eos, doc.text.len() as u64)?;
        }
        batch.clear();
        Ok(())
    };

    for file in files {
        let src = sources.len();
        sources.push(SourceMeta {
            path: file.display().to_string(),
            sha256: String::new(),
            bytes: 0,
            documents: 0,
            tokens: 0,
            replaced: 0,
        });
        // `…/valid/…` dirs and `valid.*` files (data/raw's layout) are validation data.
        let in_valid_dir = file.components().any(|c| {
            Path::new(c.as_os_str())
                .file_stem()
                .is_some_and(|s| s == "valid")
        });
        let mut hasher = Sha256::new();
        let mut docs: Vec<(String, String)> = Vec::new(); // (text, split key) of this step
        let mut take = |docs: &mut Vec<(String, String)>,
                        sources: &mut Vec<SourceMeta>,
                        batch: &mut Vec<Doc>|
         -> bool {
            for (text, key) in docs.drain(..) {
                if text.trim().is_empty() {
                    continue;
                }
                sources[src].documents += 1;
                let valid = in_valid_dir || stable_fraction(&key) < opts.valid_fraction;
                batch_bytes += text.len();
                batch.push(Doc {
                    text,
                    valid,
                    source: src,
                });
            }
            let full = batch.len() >= opts.batch_documents || batch_bytes >= BATCH_BYTES;
            if full {
                batch_bytes = 0;
            }
            full
        };
        let is_jsonl = file.extension().and_then(|e| e.to_str()) == Some("jsonl");
        if is_jsonl {
            let f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
            let mut reader = std::io::BufReader::new(f);
            let mut line_no = 0usize;
            let mut offset = 0u64;
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let n = reader
                    .read_until(b'\n', &mut buf)
                    .map_err(|e| Error::io(file, e))?;
                if n == 0 {
                    break;
                }
                line_no += 1;
                hasher.update(&buf);
                let (line, bad) = decode_utf8(
                    std::mem::take(&mut buf),
                    file,
                    Some(line_no),
                    offset,
                    opts.lossy,
                )?;
                offset += n as u64;
                sources[src].replaced += bad;
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let text = jsonl_text(tokenizer, line, file, line_no, &opts.text_field)?;
                docs.push((text, format!("{}#{line_no}", file.display())));
                if take(&mut docs, &mut sources, &mut batch) {
                    flush(&mut batch, &mut sources)?;
                    progress(done_bytes + offset);
                }
            }
            sources[src].bytes = offset;
        } else {
            let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
            hasher.update(&bytes);
            sources[src].bytes = bytes.len() as u64;
            let (text, bad) = decode_utf8(bytes, file, None, 0, opts.lossy)?;
            sources[src].replaced += bad;
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if opts.blank_line_docs {
                let text = text.replace("\r\n", "\n");
                for (i, block) in text.split("\n\n").enumerate() {
                    docs.push((block.trim().to_string(), format!("{name}#{i}")));
                }
            } else {
                docs.push((text, name));
            }
            if take(&mut docs, &mut sources, &mut batch) {
                flush(&mut batch, &mut sources)?;
            }
        }
        done_bytes += sources[src].bytes;
        progress(done_bytes);
        sources[src].sha256 = hex(&hasher.finalize());
    }
    flush(&mut batch, &mut sources)?;
    progress(done_bytes);
    if sources.iter().all(|s| s.documents == 0) {
        return Err(Error::Msg(format!(
            "empty inputs: no documents in {} file(s)",
            files.len()
        )));
    }
    let mut splits = BTreeMap::new();
    splits.insert("train".to_string(), train.finish()?);
    splits.insert("valid".to_string(), valid.finish()?);
    let meta = TokenShardsMeta {
        format_version: FORMAT_VERSION,
        tokenizer_hash: hash,
        seq_len: opts.seq_len,
        eos_id: eos,
        vocab_size: tokenizer.vocab_size(),
        splits,
        sources,
    };
    meta.write(tmp)?;
    Ok(meta)
}
