//! distill-train: the KL-divergence training loop — losses (fused CPU ops with hand-written
//! backward), AdamW with saveable state, the LR schedule, student construction, the trainer with
//! checkpoints and exact resume.

pub mod bench;
pub mod config;
pub mod loss;
pub mod optim;
pub mod student;
pub mod trainer;
