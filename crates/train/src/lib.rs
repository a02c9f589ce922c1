//! distill-train: the KL-divergence training loop — losses (fused CPU ops with hand-written
//! backward), AdamW with saveable state, the LR schedule, student construction, the trainer with
//! checkpoints and exact resume.

pub mod bench;
mod checkpoint;
pub mod config;
pub mod hidden;
pub mod loss;
pub mod optim;
mod setup;
pub mod student;
pub mod trainer;
