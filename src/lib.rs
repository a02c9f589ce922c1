pub use distill_api as api;
pub use distill_core as core;
pub use distill_eval as eval;
pub use distill_prune as prune;
pub use distill_teacher as teacher;
pub use distill_train as train;
