//! Weights on disk: finding a model dir's safetensors (single file or sharded with
//! `model.safetensors.index.json`), checking them before candle maps them, loading a model from
//! them, and writing tensors back as safetensors.

use crate::config::Config;
use crate::error::{Error, FileContext, Result};
use crate::fsio::{read_text, write_atomic};
use crate::model::CausalLm;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The safetensors files of a HF model dir, in a stable order.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let json: serde_json::Value =
            serde_json::from_str(&read_text(&index)?).with_file(&index)?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::file(&index, "no weight_map object"))?;
        let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        if files.is_empty() {
            return Err(Error::file(&index, "weight_map names no files"));
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(Error::file(
        dir,
        "no model.safetensors or model.safetensors.index.json in model dir",
    ))
}

/// Parses a safetensors file's header and checks that its tensors fit in the file, so a truncated
/// or corrupt file is reported by name instead of failing deep inside candle.
pub fn check_safetensors(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is only read, and only while this function runs.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    safetensors::SafeTensors::deserialize(&mmap)
        .map(|_| ())
        .map_err(|e| Error::file(path, format!("not a valid safetensors file ({e:?})")))
}

/// A VarBuilder over memory-mapped safetensors files, converting to `dtype` on access.
pub fn mmap_var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    for f in files {
        check_safetensors(f)?;
    }
    // SAFETY: the files must not be modified while the model is alive; model dirs are read-only
    // inputs for the whole run.
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }.map_err(|e| {
        Error::file(
            files.first().map(PathBuf::as_path).unwrap_or(Path::new("")),
            e,
        )
    })
}

/// Loads `config.json` and the weights of a HF model dir, computing in f32.
pub fn load_model(dir: &Path, device: &Device) -> Result<(CausalLm, Config)> {
    if !dir.is_dir() {
        return Err(Error::file(dir, "model dir does not exist"));
    }
    let cfg = Config::from_file(dir.join("config.json"))?;
    let files = safetensors_files(dir)?;
    let vb = mmap_var_builder(&files, DType::F32, device)?;
    let model = CausalLm::load(vb, &cfg).map_err(|e| {
        // Missing tensors and wrong shapes: name the weights and say what was expected.
        let what = if files.len() == 1 {
            files[0].clone()
        } else {
            dir.join("model.safetensors.index.json")
        };
        Error::file(what, format!("weights do not match config.json: {e}"))
    })?;
    Ok((model, cfg))
}

/// Every tensor of a model dir's safetensors by name, as f32 on `device`.
pub fn load_tensors(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let files = safetensors_files(dir)?;
    for f in &files {
        check_safetensors(f)?;
    }
    // SAFETY: model dirs are read-only inputs while they are loaded.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .map_err(|e| Error::file(&files[0], e))?;
    st.tensors()
        .into_iter()
        .map(|(name, _)| {
            let t = st
                .load(&name, device)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| Error::file(&files[0], format!("tensor {name}: {e}")))?;
            Ok((name, t))
        })
        .collect()
}

/// sha256 of a file, hex, streamed (the file is never held in memory).
pub fn file_sha256(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(crate::digest::hex(&hasher.finalize()))
}

/// The identity of a model dir's weights: sha256 over `config.json` and every safetensors file
/// (each file's name and sha256, in a stable order). Two dirs with the same files hash the same
/// wherever they live; any changed weight or config changes it.
pub fn model_hash(dir: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut files = vec![dir.join("config.json")];
    files.extend(safetensors_files(dir)?);
    let hashes = files
        .iter()
        .map(|f| file_sha256(f))
        .collect::<Result<Vec<_>>>()?;
    let mut hasher = Sha256::new();
    for (f, h) in files.iter().zip(hashes) {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        hasher.update(format!("{name} {h}\n").as_bytes());
    }
    Ok(crate::digest::hex(&hasher.finalize()))
}

/// A VarMap's tensors by name (what `save_model_dir` / `save_safetensors` take).
pub fn varmap_tensors(varmap: &candle_nn::VarMap) -> HashMap<String, Tensor> {
    varmap
        .data()
        .lock()
        .expect("varmap lock poisoned")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

/// The torch dtype name written in `config.json` for a candle dtype.
pub fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// Writes named tensors as one safetensors file in `dtype`, atomically.
pub fn save_safetensors(
    tensors: &HashMap<String, Tensor>,
    dtype: DType,
    path: &Path,
) -> Result<()> {
    let converted = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_dtype(dtype)?.contiguous()?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let tmp = crate::fsio::tmp_name(path);
    candle_core::safetensors::save(&converted, &tmp).with_file(&tmp)?;
    // The serialiser creates the file owner-only; model files are meant to be shared.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Writes tensors as `n` shards with a `model.safetensors.index.json`, HF's sharded layout.
pub fn save_sharded_safetensors(
    tensors: &HashMap<String, Tensor>,
    dtype: DType,
    dir: &Path,
    n: usize,
) -> Result<()> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let per = names.len().div_ceil(n.max(1));
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, chunk) in names.chunks(per.max(1)).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        let part: HashMap<String, Tensor> = chunk
            .iter()
            .map(|k| ((*k).clone(), tensors[*k].clone()))
            .collect();
        for (k, t) in &part {
            total += t.elem_count() * dtype.size_in_bytes();
            weight_map.insert(k.clone(), serde_json::Value::String(file.clone()));
        }
        save_safetensors(&part, dtype, &dir.join(&file))?;
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    write_atomic(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)
            .expect("a JSON value serialises")
            .as_bytes(),
    )
}
