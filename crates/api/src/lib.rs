//! distill-api: black-box distillation over an OpenAI-compatible HTTP API, both sides of it.
//!
//! - [`server`]: `distill serve`, the teacher behind `/v1/chat/completions` and `/v1/completions`
//!   (logprobs, streaming, batched decoding in [`engine`]), with the defence side in [`guard`]:
//!   API keys, per-key quotas (429 + `Retry-After`), an audit log and a distillation-pattern report.
//! - [`client`]: `distill collect`, which gathers a teacher's answers from any compatible endpoint.

pub mod client;
pub mod engine;
pub mod guard;
pub mod protocol;
pub mod server;
