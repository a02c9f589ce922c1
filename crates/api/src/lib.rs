//! distill-api: black-box distillation over an OpenAI-compatible HTTP API, both sides of it.
//!
//! - [`server`]: `distill serve`, the teacher behind `/v1/chat/completions` and `/v1/completions`
//!   (logprobs, streaming, batched decoding in [`engine`]), with the defence side in [`guard`]:
//!   API keys, per-key quotas (429 + `Retry-After`), an audit log and a distillation-pattern report.
//! - [`client`]: `distill collect`, which gathers a teacher's answers from any compatible endpoint.
//! - [`convert`]: `distill prepare-collected`, which turns the answers into token shards
//!   (sequence-level distillation) and, from their `top_logprobs`, sparse teacher targets in the
//!   teacher-cache format, both of which `distill train` takes.

pub mod client;
pub mod convert;
pub mod engine;
pub mod guard;
pub mod protocol;
pub mod server;
