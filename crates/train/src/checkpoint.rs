//! Checkpoints of a run: a complete model dir plus the optimizer's state and the trainer's, written
//! under a temporary name and renamed into place; and reading one back for an exact resume. The
//! names of the files are the run dir's (`distill_core::run_dir`).

use crate::config::{RunConfig, StudentInit};
use crate::optim::AdamW;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use distill_core::fsio::{fresh_tmp_dir, replace_dir};
use distill_core::run_dir::EvalMetrics;
use distill_core::run_dir::{
    read_state, write_state, RunDir, TrainerState, OPTIMIZER_FILE, PROJECTION_FILE, STATE_FILE,
};
use distill_core::shards::TokenShardsMeta;
use distill_core::{Config, Error, ModelCard, Result, Tokenizer};
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
    pub card: ModelCard,
    /// The hidden-state loss's learned projections, saved beside the model (not in it).
    pub projections: Option<HashMap<String, Tensor>>,
}

/// Writes the checkpoint `dir` (replacing one of the same name only once the new one is complete).
pub(crate) fn save(dir: &Path, t: &Trainable, state: &TrainerState) -> Result<()> {
    let tmp = fresh_tmp_dir(dir)?;
    let mut tensors = distill_core::weights::varmap_tensors(t.varmap);
    tensors.extend(t.frozen.iter().map(|(k, v)| (k.clone(), v.clone())));
    distill_core::model_dir::write_model_files(
        &tmp,
        t.cfg,
        &tensors,
        t.tokenizer,
        DType::F32,
        &t.card,
    )?;
    distill_core::weights::save_safetensors(
        &t.opt.state_tensors()?,
        DType::F32,
        &tmp.join(OPTIMIZER_FILE),
    )?;
    if let Some(p) = &t.projections {
        distill_core::weights::save_safetensors(p, DType::F32, &tmp.join(PROJECTION_FILE))?;
    }
    write_state(&tmp, state)?;
    replace_dir(&tmp, dir)
}

/// A checkpoint's model card: teacher, start, data, loss, progress and the last validation figures.
pub(crate) fn card(
    run: &RunConfig,
    student: &Config,
    data: &TokenShardsMeta,
    state: &TrainerState,
    eval: Option<&EvalMetrics>,
) -> ModelCard {
    let teacher = &run.teacher.model;
    let lineage = distill_core::model_card::lineage(teacher);
    let start =
        match run.student.init {
            StudentInit::Random => "random initialisation".to_string(),
            StudentInit::TeacherLayers => "a copy of some of the teacher's layers".to_string(),
            StudentInit::Model => format!(
            "the model dir `{}` (a `distill prune` cut of the teacher, or another model with its \
             tokenizer)",
            run.student.model.as_deref().unwrap_or(Path::new("?")).display()
        ),
        };
    let l = &run.loss;
    let kd = if l.alpha_kd > 0.0 {
        format!(
            "{} × {} at temperature {}",
            l.alpha_kd, l.kind, l.temperature
        )
    } else {
        "no distillation term".into()
    };
    let targets = match &run.data.cache {
        Some(c) => format!("the teacher's top-k targets cached in `{}`", c.display()),
        None if run.teacher.top_k > 0 => {
            format!("the live teacher, reduced to its top {}", run.teacher.top_k)
        }
        None => "the live teacher's full distributions".into(),
    };
    let sources: Vec<String> = data
        .sources
        .iter()
        .map(|s| format!("`{}` ({} tokens)", s.path, s.tokens))
        .collect();
    let mut card = ModelCard::derived(
        format!(
            "{} — a student distilled by distill (step {})",
            run.name, state.step
        ),
        &lineage,
    )
    .tag("distillation")
    .tag("knowledge-distillation");
    if run.student.init == StudentInit::Model {
        card = card.tag("pruning");
    }
    card.datasets = data
        .sources
        .iter()
        .map(|s| {
            Path::new(&s.path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| s.path.clone())
        })
        .collect();
    card = card
        .section(
            "What this is",
            format!(
                "A student of the teacher `{}`, started from {start}: {} layers, hidden {}, {} \
                 heads ({} KV), MLP {}, {:.1}M parameters.",
                teacher.display(),
                student.num_hidden_layers,
                student.hidden_size,
                student.num_attention_heads,
                student.num_key_value_heads,
                student.intermediate_size,
                student.num_params() as f64 / 1e6
            ),
        )
        .section(
            "Training",
            format!(
                "- loss: {kd} + {} × cross-entropy on the text, against {targets}\n\
                 - steps: {} of {} (batch {} × {} tokens, lr {}), {} tokens seen, {:.0} s\n\
                 - data: the train split of `{}`{}\n\
                 - the run's config is in the run dir (`config.toml`); this dir's \
                 `trainer_state.json` resumes it exactly",
                l.alpha_ce,
                state.step,
                run.train.max_steps,
                run.train.batch_size,
                data.seq_len,
                run.train.lr,
                state.tokens,
                state.elapsed_seconds,
                run.data.tokens.display(),
                if sources.is_empty() {
                    String::new()
                } else {
                    format!(", from {}", sources.join(", "))
                },
            ),
        );
    card = card.section(
        "Evaluation",
        match eval {
            Some(e) => format!(
                "At step {} on {} held-out tokens (the valid split of the same token dir): \
                 perplexity {:.2}, KL(teacher ‖ student) {:.4} nats/token. `distill eval` \
                 measures more (agreement, calibration, other corpora).",
                e.step, e.eval_tokens, e.perplexity, e.kl_to_teacher
            ),
            None => "Not evaluated during training: run `distill eval`.".into(),
        },
    );
    card.section(
        "Use",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\
         tok = AutoTokenizer.from_pretrained(\"THIS_DIR\")\n\
         model = AutoModelForCausalLM.from_pretrained(\"THIS_DIR\")\n```\n\
         or `distill generate --model THIS_DIR --prompt \"...\"`; `distill export` writes a GGUF \
         for llama.cpp.",
    )
    .section("Licence", distill_core::model_card::licence_note(&lineage))
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
