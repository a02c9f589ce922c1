//! distill-teacher: the frozen teacher — loading a HF model dir, converting llama.cpp GGUF files to
//! HF dirs, generation with a KV cache, and throughput benchmarks.

pub mod bench;
pub mod cache;
pub mod convert;
pub mod generate;

use candle_core::Device;
use distill_core::{CausalLm, Config, Result, Tokenizer};
use std::path::{Path, PathBuf};

/// A model dir loaded for inference: weights (f32, memory-mapped), config and tokenizer.
pub struct Teacher {
    pub model: CausalLm,
    pub config: Config,
    pub tokenizer: Tokenizer,
    pub dir: PathBuf,
}

impl Teacher {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let (model, config) = distill_core::load_model(dir, device)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        Ok(Self {
            model,
            config,
            tokenizer,
            dir: dir.to_path_buf(),
        })
    }
}
