//! `distill convert`: a llama.cpp GGUF file → a complete Hugging Face model dir.

use candle_core::{DType, Device};
use distill_core::gguf::Gguf;
use distill_core::{save_model_dir, Error, ModelCard, Result};
use std::collections::HashMap;
use std::path::Path;

/// What a conversion wrote.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    pub tensors: usize,
    pub params: usize,
    pub vocab_size: usize,
    pub layers: usize,
}

/// Dequantizes every tensor of `gguf`, maps names and layouts to HF's, and writes `out` with the
/// weights in `dtype` (f32 keeps the dequantized values exactly).
pub fn convert_gguf(gguf: &Path, out: &Path, dtype: DType) -> Result<ConvertSummary> {
    let mut g = Gguf::open(gguf)?;
    let cfg = g.config()?;
    let tokenizer = g.tokenizer()?;
    if tokenizer.vocab_size() != cfg.vocab_size {
        return Err(Error::file(
            gguf,
            format!(
                "tokenizer has {} tokens but the model {}",
                tokenizer.vocab_size(),
                cfg.vocab_size
            ),
        ));
    }
    let tensors: HashMap<_, _> = g.hf_tensors(&Device::Cpu)?.into_iter().collect();
    let params = tensors.values().map(|t| t.elem_count()).sum();
    let lineage = g.lineage();
    let file = gguf.file_name().unwrap_or_default().to_string_lossy();
    let card = ModelCard::derived(
        lineage
            .base_model
            .clone()
            .unwrap_or_else(|| file.to_string()),
        &lineage,
    )
    .tag("gguf-conversion")
    .section(
        "Origin",
        format!(
            "Converted by `distill convert` from the llama.cpp file `{file}` (`general.name`: \
             {}): every tensor dequantized to f32 and stored as {dtype:?}, Q/K un-permuted to \
             Hugging Face's layout, the tokenizer rebuilt from the GGUF metadata. {} layers, \
             {} parameters, vocabulary {}. The weights keep the quantization error of the file \
             they came from.",
            g.metadata("general.name")
                .and_then(|v| v.to_string().ok())
                .map(|s| format!("`{s}`"))
                .unwrap_or_else(|| "none".into()),
            cfg.num_hidden_layers,
            params,
            cfg.vocab_size,
        ),
    )
    .section(
        "Licence",
        match &lineage.license {
            Some(l) => format!("`{l}`, as the GGUF file's `general.license` states."),
            None => "The GGUF file states no licence: check its source's.".into(),
        },
    );
    save_model_dir(out, &cfg, &tensors, &tokenizer, dtype, &card)?;
    Ok(ConvertSummary {
        tensors: tensors.len(),
        params,
        vocab_size: cfg.vocab_size,
        layers: cfg.num_hidden_layers,
    })
}
