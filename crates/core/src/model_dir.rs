//! Writing a complete Hugging Face model dir (config.json, model.safetensors, tokenizer.json,
//! tokenizer_config.json, generation_config.json) — what `convert` produces and what a training
//! checkpoint contains. The dir is assembled under a temporary name and renamed into place, so a
//! crash never leaves a half-written model that looks complete.

use crate::config::Config;
use crate::error::{write_atomic, Error, Result};
use crate::tokenizer::Tokenizer;
use crate::weights::{save_safetensors, torch_dtype_name};
use candle_core::{DType, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// Writes `tensors` (HF names) with `cfg` and `tokenizer` as a model dir at `out`, replacing any
/// previous one only once the new one is complete.
pub fn save_model_dir(
    out: &Path,
    cfg: &Config,
    tensors: &HashMap<String, Tensor>,
    tokenizer: &Tokenizer,
    dtype: DType,
) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = crate::error::tmp_name(out);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;

    let mut cfg = cfg.clone();
    cfg.torch_dtype = torch_dtype_name(dtype).to_string();
    let config_json =
        serde_json::to_string_pretty(&cfg.to_hf_json()).expect("a JSON value serialises");
    write_atomic(tmp.join("config.json"), config_json.as_bytes())?;
    save_safetensors(tensors, dtype, &tmp.join("model.safetensors"))?;
    tokenizer.save_dir(&tmp)?;
    let mut gen = serde_json::Map::new();
    if let Some(b) = cfg.bos_token_id {
        gen.insert("bos_token_id".into(), json!(b));
    }
    match cfg.eos_token_ids.as_slice() {
        [] => {}
        [one] => {
            gen.insert("eos_token_id".into(), json!(one));
        }
        many => {
            gen.insert("eos_token_id".into(), json!(many));
        }
    }
    if let Some(p) = cfg.pad_token_id {
        gen.insert("pad_token_id".into(), json!(p));
    }
    write_atomic(
        tmp.join("generation_config.json"),
        serde_json::to_string_pretty(&gen)
            .expect("a JSON value serialises")
            .as_bytes(),
    )?;

    if out.exists() {
        let old = out.with_file_name(format!(
            ".{}.old",
            out.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    }
    Ok(())
}
