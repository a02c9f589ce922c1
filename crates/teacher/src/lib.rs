//! distill-teacher: the frozen teacher — its cached targets, converting llama.cpp GGUF files to
//! HF dirs, generation with a KV cache, and throughput benchmarks.

pub mod bench;
pub mod cache;
pub mod convert;
pub mod generate;

// The teacher is a model dir like any other: `distill_core::ModelDir` loads it.
