//! `distill convert`: a llama.cpp GGUF file → a complete Hugging Face model dir.

use candle_core::{DType, Device};
use distill_core::gguf::Gguf;
use distill_core::{save_model_dir, Error, Result};
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
    save_model_dir(out, &cfg, &tensors, &tokenizer, dtype)?;
    Ok(ConvertSummary {
        tensors: tensors.len(),
        params,
        vocab_size: cfg.vocab_size,
        layers: cfg.num_hidden_layers,
    })
}
