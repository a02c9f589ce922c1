//! distill-core: what every stage shares — errors, devices, HF configs, the Llama-family causal LM,
//! weight loading (safetensors, GGUF) and tokenizers.

pub mod cache;
pub mod config;
pub mod device;
pub mod digest;
pub mod error;
pub mod fsio;
pub mod gguf;
pub mod logits;
pub mod model;
pub mod model_card;
pub mod model_dir;
pub mod ops;
pub mod prepare;
pub mod prompts;
pub mod run_dir;
pub mod shards;
pub mod testing;
pub mod tokenizer;
pub mod vexp;
pub mod weights;

pub use cache::TeacherTargets;
pub use config::{Arch, Config, Gemma3, HfConfig};
pub use device::parse_device;
pub use error::{Error, Result};
pub use model::{CausalLm, KvCache, Precision, Probe};
pub use model_card::ModelCard;
pub use model_dir::{save_model_dir, ModelDir};
pub use tokenizer::{ChatMessage, Tokenizer};
pub use weights::load_model;
