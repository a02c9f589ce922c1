//! Opening a Hugging Face model dir ([`ModelDir`]: the one way teacher, students, eval, prune, the
//! API and examples load a model) and writing a complete one (config.json, model.safetensors, tokenizer.json,
//! tokenizer_config.json, generation_config.json, README.md: the model card) — what `convert` produces and what a training
//! checkpoint contains. The dir is assembled under a temporary name and renamed into place, so a
//! crash never leaves a half-written model that looks complete.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::fsio::{fresh_tmp_dir, replace_dir, write_atomic};
use crate::model::CausalLm;
use crate::model_card::ModelCard;
use crate::tokenizer::Tokenizer;
use crate::weights::{save_safetensors, torch_dtype_name};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A model dir opened for inference: the model (f32 weights, memory-mapped), its config and its
/// tokenizer.
#[derive(Clone)]
pub struct ModelDir {
    pub dir: PathBuf,
    pub model: CausalLm,
    pub config: Config,
    pub tokenizer: Tokenizer,
}

impl ModelDir {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let (model, config) = crate::weights::load_model(dir, device)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            model,
            config,
            tokenizer,
        })
    }

    /// The hash of its weights, the identity a teacher cache records (reads every weight file).
    pub fn hash(&self) -> Result<String> {
        crate::weights::model_hash(&self.dir)
    }

    /// A short, unique-enough display name (see [`display_name`]).
    pub fn name(&self) -> String {
        display_name(&self.dir)
    }
}

/// A short, unique-enough display name for a model dir: its name, with its run's for a
/// checkpoint dir (`run/step-40`, `run/final`).
pub fn display_name(dir: &Path) -> String {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    match (
        crate::run_dir::is_checkpoint_name(dir),
        dir.parent().and_then(|p| p.file_name()),
    ) {
        (true, Some(run)) => format!("{}/{name}", run.to_string_lossy()),
        _ => name,
    }
}

/// Writes `tensors` (HF names) with `cfg` and `tokenizer` as a model dir at `out`, replacing any
/// previous one only once the new one is complete.
pub fn save_model_dir(
    out: &Path,
    cfg: &Config,
    tensors: &HashMap<String, Tensor>,
    tokenizer: &Tokenizer,
    dtype: DType,
    card: &ModelCard,
) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = fresh_tmp_dir(out)?;
    write_model_files(&tmp, cfg, tensors, tokenizer, dtype, card)?;
    replace_dir(&tmp, out)
}

/// Writes the files of a model dir into the existing dir `dir` (a checkpoint adds its own files
/// beside them before the whole dir is renamed into place).
pub fn write_model_files(
    dir: &Path,
    cfg: &Config,
    tensors: &HashMap<String, Tensor>,
    tokenizer: &Tokenizer,
    dtype: DType,
    card: &ModelCard,
) -> Result<()> {
    let mut cfg = cfg.clone();
    cfg.torch_dtype = torch_dtype_name(dtype).to_string();
    let config_json =
        serde_json::to_string_pretty(&cfg.to_hf_json()).expect("a JSON value serialises");
    write_atomic(dir.join("config.json"), config_json.as_bytes())?;
    save_safetensors(tensors, dtype, &dir.join("model.safetensors"))?;
    tokenizer.save_dir(dir)?;
    card.write(dir)?;
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
        dir.join("generation_config.json"),
        serde_json::to_string_pretty(&gen)
            .expect("a JSON value serialises")
            .as_bytes(),
    )
}
