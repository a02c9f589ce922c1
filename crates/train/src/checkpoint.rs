//! Checkpoints of a run: a complete model dir plus the optimizer's state and the trainer's, written
//! under a temporary name and renamed into place; and reading one back for an exact resume. The
//! names of the files are the run dir's (`distill_core::run_dir`).

use crate::optim::AdamW;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use distill_core::fsio::{fresh_tmp_dir, replace_dir};
use distill_core::run_dir::{
    read_state, write_state, RunDir, TrainerState, OPTIMIZER_FILE, STATE_FILE,
};
use distill_core::{Config, Error, Result, Tokenizer};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The checkpoint a run continues from: its latest with `resume`, none without; resuming a run
/// with no checkpoint is refused naming the dir.
pub(crate) fn resume_point(run: &RunDir, resume: bool) -> Result<Option<PathBuf>> {
    match (resume, run.latest_checkpoint()) {
        (false, _) => {
            if run.has_checkpoints() {
                return Err(Error::file(
                    run.path(),
                    "run dir already holds checkpoints; use --resume to continue it or another --out",
                ));
            }
            Ok(None)
        }
        (true, Some(last)) => Ok(Some(last)),
        (true, None) => Err(Error::file(
            run.path(),
            format!("nothing to resume: no step-N/ checkpoint with {STATE_FILE}"),
        )),
    }
}

/// Loads a checkpoint's weights into the student's variables (before anything is frozen: frozen
/// tensors leave the VarMap, so a resumed run never depends on the dir its student started from).
pub(crate) fn load_weights(checkpoint: &Path, varmap: &mut VarMap) -> Result<()> {
    let weights = checkpoint.join("model.safetensors");
    distill_core::weights::check_safetensors(&weights)?;
    varmap.load(&weights).map_err(|e| Error::file(&weights, e))
}

/// A checkpoint's trainer state, with its optimizer state loaded into `opt`.
pub(crate) fn load(checkpoint: &Path, opt: &mut AdamW) -> Result<TrainerState> {
    let state = read_state(checkpoint)?;
    let opt_path = checkpoint.join(OPTIMIZER_FILE);
    distill_core::weights::check_safetensors(&opt_path)?;
    let tensors = candle_core::safetensors::load(&opt_path, &Device::Cpu)
        .map_err(|e| Error::file(&opt_path, e))?;
    opt.load_state(&tensors, state.step)
        .map_err(|e| Error::file(&opt_path, e))?;
    Ok(state)
}

/// What a checkpoint holds besides the trainer state.
pub(crate) struct Trainable<'a> {
    pub cfg: &'a Config,
    pub varmap: &'a VarMap,
    /// Frozen tensors (not in the VarMap), saved with the rest so the dir is a complete model.
    pub frozen: &'a HashMap<String, Tensor>,
    pub opt: &'a AdamW,
    pub tokenizer: &'a Tokenizer,
}

/// Writes the checkpoint `dir` (replacing one of the same name only once the new one is complete).
pub(crate) fn save(dir: &Path, t: &Trainable, state: &TrainerState) -> Result<()> {
    let tmp = fresh_tmp_dir(dir)?;
    let mut tensors = distill_core::weights::varmap_tensors(t.varmap);
    tensors.extend(t.frozen.iter().map(|(k, v)| (k.clone(), v.clone())));
    distill_core::model_dir::write_model_files(&tmp, t.cfg, &tensors, t.tokenizer, DType::F32)?;
    distill_core::weights::save_safetensors(
        &t.opt.state_tensors(),
        DType::F32,
        &tmp.join(OPTIMIZER_FILE),
    )?;
    write_state(&tmp, state)?;
    replace_dir(&tmp, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_points_refuse_a_run_with_nothing_to_resume_and_a_new_run_over_checkpoints() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::new(tmp.path());
        assert_eq!(resume_point(&run, false).unwrap(), None);
        let err = resume_point(&run, true).unwrap_err().to_string();
        assert!(
            err.contains("nothing to resume") && err.contains(STATE_FILE),
            "{err}"
        );
        assert!(err.starts_with(&tmp.path().display().to_string()), "{err}");

        let step = run.step_dir(5);
        std::fs::create_dir_all(&step).unwrap();
        std::fs::write(step.join(STATE_FILE), "{}").unwrap();
        assert_eq!(resume_point(&run, true).unwrap(), Some(step));
        let err = resume_point(&run, false).unwrap_err().to_string();
        assert!(err.contains("already holds checkpoints"), "{err}");

        let err = run.existing_config().unwrap_err().to_string();
        assert!(err.contains("not a run dir"), "{err}");
    }
}
