//! The trainer: batches from token shards, teacher targets from a cache or a live teacher, the
//! KD loss, AdamW with warmup + cosine, gradient accumulation and clipping, periodic evaluation,
//! atomic checkpoints and exact resume. It reads top-down: set up, resume or start, then the loop
//! (one optimizer step, log, evaluate, checkpoint). Setup lives in `setup.rs`, checkpoints in
//! `checkpoint.rs`, and the run dir's layout and records in `distill_core::run_dir`.

use crate::checkpoint::{self, Trainable};
use crate::config::RunConfig;
use crate::loss::distill_loss;
use crate::optim::{clip_grads, grad_norm, lr_at, AdamW, AdamWConfig};
use crate::setup::{setup, Setup};
use crate::student::build_student;
use candle_core::Tensor;
use candle_nn::VarMap;
use distill_core::run_dir::{EvalMetrics, Record, RunDir, StepMetrics, TrainerState};
use distill_core::shards::BatchReader;
use distill_core::{CausalLm, Config, Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use crate::setup::{check_vocab, MemoryPlan};

/// Events the trainer reports (the CLI draws its progress bar and log lines from them).
pub enum Event<'a> {
    Plan(&'a MemoryPlan),
    Start { step: u64, max_steps: u64 },
    Step(&'a StepMetrics),
    Eval(&'a EvalMetrics),
    Checkpoint(&'a Path),
}

/// Options from the command line around the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub out: PathBuf,
    /// Continue the run in `out` from its latest checkpoint.
    pub resume: bool,
    /// Skip the memory check (the plan is still printed).
    pub ignore_memory_plan: bool,
    /// Stop (with a checkpoint) after this step, as if interrupted; `--resume` continues.
    pub stop_after: Option<u64>,
}

/// The summary of a finished run.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: u64,
    pub tokens: u64,
    pub final_dir: PathBuf,
    pub last_eval: Option<EvalMetrics>,
    pub seconds: f64,
}

/// The student being trained: its forward, its variables and what is frozen out of them.
struct Student {
    model: CausalLm,
    varmap: VarMap,
    cfg: Config,
    frozen: HashMap<String, Tensor>,
}

/// Builds the student (from a checkpoint's weights when resuming), then freezes what the config
/// says.
fn student(s: &Setup, resume_from: Option<&Path>) -> Result<Student> {
    let cfg = &s.cfg;
    let (model, mut varmap, scfg) =
        build_student(&cfg.teacher.model, &s.teacher_cfg, &cfg.student, &s.device)?;
    if let Some(last) = resume_from {
        checkpoint::load_weights(last, &mut varmap)?;
    }
    let (model, frozen) = if cfg.student.freeze_embeddings {
        crate::student::freeze(&scfg, &varmap, &[crate::student::EMBEDDINGS], &s.device)?
    } else {
        (model, HashMap::new())
    };
    check_vocab(
        scfg.vocab_size,
        s.loss.teacher_vocab.unwrap_or(s.teacher_cfg.vocab_size),
        s.tokenizer.vocab_size(),
    )?;
    Ok(Student {
        model,
        varmap,
        cfg: scfg,
        frozen,
    })
}

/// Refuses a run whose memory plan exceeds what the machine has (unless told to go on).
fn check_memory(plan: &MemoryPlan, batch_size: usize, opts: &RunOptions) -> Result<()> {
    match plan.available {
        Some(avail) if plan.total > avail && !opts.ignore_memory_plan => Err(Error::Msg(format!(
            "the run needs about {:.1} GB but {:.1} GB are available: lower train.batch_size \
             (e.g. --set train.batch_size={}) and raise train.grad_accum to keep the \
             effective batch",
            plan.total as f64 / 1e9,
            avail as f64 / 1e9,
            (batch_size / 2).max(1)
        ))),
        _ => Ok(()),
    }
}

/// The losses of one optimizer step (averaged over its micro-batches) and its gradient norm.
struct StepLoss {
    loss: f32,
    kd: f32,
    ce: f32,
    norm: f64,
    lr: f64,
    tokens: u64,
}

/// Forward and backward over `grad_accum` micro-batches, clipping, and the AdamW update at `lr`.
/// A non-finite loss or gradient stops the run before the update, naming the last good checkpoint.
fn optimizer_step(
    s: &Setup,
    st: &Student,
    opt: &mut AdamW,
    reader: &mut BatchReader,
    step: u64,
    last_ckpt: Option<&Path>,
) -> Result<StepLoss> {
    let t = &s.cfg.train;
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    let (mut loss_sum, mut kd_sum, mut ce_sum, mut tokens) = (0f32, 0f32, 0f32, 0u64);
    for _ in 0..t.grad_accum {
        let seqs = reader.next_indices(t.batch_size);
        let (ids, input) = s.batch(&s.train, &seqs)?;
        let targets = s.targets("train", &seqs, &input)?;
        let logits = st.model.forward(&input)?;
        let labels = s.labels(&s.train, &seqs, &ids);
        let parts = distill_loss(&logits, &targets, &labels, &s.loss)?;
        loss_sum += parts.total.to_scalar::<f32>()?;
        kd_sum += parts.kd;
        ce_sum += parts.ce;
        let g = (parts.total / t.grad_accum as f64)?.backward()?;
        for (name, var) in opt.vars() {
            let gi = g
                .get(var.as_tensor())
                .cloned()
                .ok_or_else(|| Error::Msg(format!("parameter {name} received no gradient")))?;
            match grads.get_mut(name) {
                Some(acc) => *acc = (&*acc + gi)?,
                None => {
                    grads.insert(name.to_string(), gi);
                }
            }
        }
        tokens += (seqs.len() * s.train.seq_len()) as u64;
    }
    let n = t.grad_accum as f32;
    let (loss, kd, ce) = (loss_sum / n, kd_sum / n, ce_sum / n);
    let norm = grad_norm(&grads)?;
    if !loss.is_finite() || !norm.is_finite() {
        let last = last_ckpt
            .map(|p| format!("the last good checkpoint is {} (untouched)", p.display()))
            .unwrap_or_else(|| "no checkpoint was written yet".into());
        return Err(Error::Msg(format!(
            "step {step}: non-finite {} (loss {loss}, grad norm {norm}); stopped, {last}; \
             try a lower train.lr or train.grad_clip",
            if loss.is_finite() { "gradient" } else { "loss" }
        )));
    }
    clip_grads(&mut grads, norm, t.grad_clip)?;
    let lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps);
    opt.step(&grads, lr)?;
    Ok(StepLoss {
        loss,
        kd,
        ce,
        norm,
        lr,
        tokens,
    })
}

/// The trainer state a run starts from: the checkpoint's (its optimizer state loaded into `opt`,
/// the data order restored) when resuming, else step 0 in a new run dir.
fn start_state(
    run: &RunDir,
    resume_from: Option<&Path>,
    opt: &mut AdamW,
    reader: &mut BatchReader,
    data_seed: u64,
) -> Result<TrainerState> {
    if let Some(last) = resume_from {
        let state = checkpoint::load(last, opt)?;
        reader.restore(state.cursor);
        return Ok(state);
    }
    std::fs::create_dir_all(run.path()).map_err(|e| Error::io(run.path(), e))?;
    Ok(TrainerState {
        step: 0,
        tokens: 0,
        cursor: reader.cursor(),
        data_seed,
        best_eval_loss: None,
        best_step: None,
        elapsed_seconds: 0.0,
        config: String::new(),
    })
}

/// Runs (or resumes) training. `on_event` sees the plan, every step, evals and checkpoints.
pub fn train(
    cfg: RunConfig,
    opts: &RunOptions,
    mut on_event: impl FnMut(Event),
) -> Result<RunSummary> {
    let start_time = Instant::now();
    let run = RunDir::new(&opts.out);
    // On resume the run's own config is authoritative, except for max_steps (a run may be
    // extended) — the caller passes the loaded config with that applied.
    let s = setup(cfg)?;
    let t = &s.cfg.train;
    let resume_from = checkpoint::resume_point(&run, opts.resume)?;
    let st = student(&s, resume_from.as_deref())?;
    let mut opt = AdamW::new(
        &st.varmap,
        AdamWConfig {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
        },
    )?;
    let mut reader = BatchReader::with_limit(&s.train, t.seed, s.train_limit);
    let mut state = start_state(&run, resume_from.as_deref(), &mut opt, &mut reader, t.seed)?;
    state.config = s.cfg.to_toml();
    run.write_config(&state.config)?;

    let plan = s.memory_plan(&st.cfg);
    on_event(Event::Plan(&plan));
    check_memory(&plan, t.batch_size, opts)?;
    if opts.resume {
        run.truncate_records_after(state.step)?;
    }
    let mut records = run.record_writer()?;

    on_event(Event::Start {
        step: state.step,
        max_steps: t.max_steps,
    });
    let saved = |dir: &Path, state: &TrainerState, opt: &AdamW, eval: Option<&EvalMetrics>| {
        let what = Trainable {
            cfg: &st.cfg,
            varmap: &st.varmap,
            frozen: &st.frozen,
            opt,
            tokenizer: &s.tokenizer,
            card: checkpoint::card(&s.cfg, &st.cfg, &s.train.meta, state, eval),
        };
        checkpoint::save(dir, &what, state)
    };
    let (mut window_tokens, mut window_start) = (0u64, Instant::now());
    // A resumed run's checkpoints still report the last validation figures measured before it.
    let mut last_eval = match opts.resume {
        true => run.records()?.into_iter().rev().find_map(|r| match r {
            Record::Eval(e) => Some(e),
            Record::Train(_) => None,
        }),
        false => None,
    };
    let (run_start, elapsed_before) = (Instant::now(), state.elapsed_seconds);
    let mut last_ckpt = run.latest_checkpoint();
    while state.step < t.max_steps {
        let step = state.step + 1;
        let l = optimizer_step(&s, &st, &mut opt, &mut reader, step, last_ckpt.as_deref())?;
        state.step = step;
        state.tokens += l.tokens;
        state.cursor = reader.cursor();
        state.elapsed_seconds = elapsed_before + run_start.elapsed().as_secs_f64();
        window_tokens += l.tokens;

        let m = StepMetrics {
            step,
            tokens: state.tokens,
            loss: l.loss,
            kd: l.kd,
            ce: l.ce,
            lr: l.lr,
            grad_norm: l.norm,
            tokens_per_second: window_tokens as f64 / window_start.elapsed().as_secs_f64(),
            elapsed: state.elapsed_seconds,
        };
        on_event(Event::Step(&m));
        let is_last = step == t.max_steps;
        if step.is_multiple_of(t.log_every.max(1)) || is_last {
            records.write(&Record::Train(m))?;
            (window_tokens, window_start) = (0, Instant::now());
        }
        if (t.eval_every > 0 && step.is_multiple_of(t.eval_every)) || is_last {
            if let Some(e) = s.evaluate(&st.model, step, state.tokens)? {
                records.write(&Record::Eval(e.clone()))?;
                on_event(Event::Eval(&e));
                if state.best_eval_loss.is_none_or(|b| e.ce < b) {
                    state.best_eval_loss = Some(e.ce);
                    state.best_step = Some(step);
                }
                last_eval = Some(e);
            }
            (window_tokens, window_start) = (0, Instant::now());
        }
        let stop = opts.stop_after == Some(step);
        if (t.checkpoint_every > 0 && step.is_multiple_of(t.checkpoint_every)) || is_last || stop {
            let dir = run.step_dir(step);
            saved(&dir, &state, &opt, last_eval.as_ref())?;
            on_event(Event::Checkpoint(&dir));
            last_ckpt = Some(dir);
            run.remove_old_checkpoints(t.keep_checkpoints, state.best_step)?;
        }
        if stop {
            break;
        }
    }
    let final_dir = run.final_dir();
    if state.step == t.max_steps {
        saved(&final_dir, &state, &opt, last_eval.as_ref())?;
    }
    Ok(RunSummary {
        steps: state.step,
        tokens: state.tokens,
        final_dir,
        last_eval,
        seconds: start_time.elapsed().as_secs_f64(),
    })
}

/// Reads a run's config back (for `--resume`).
pub fn run_config(run: &Path) -> Result<RunConfig> {
    RunConfig::load(&RunDir::new(run).existing_config()?, &[])
}
