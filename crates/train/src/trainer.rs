//! The trainer: batches from token shards, teacher targets from a cache or a live teacher, the
//! KD loss, AdamW with warmup + cosine, gradient accumulation and clipping, periodic evaluation,
//! atomic checkpoints and exact resume. It reads top-down: set up, resume or start, then the loop
//! (one optimizer step, log, evaluate, checkpoint). Setup lives in `setup.rs`, checkpoints in
//! `checkpoint.rs`, and the run dir's layout and records in `distill_core::run_dir`.

use crate::checkpoint::{self, Trainable};
use crate::config::RunConfig;
use crate::hidden::{HiddenSpec, Projections};
use crate::loss::{distill_loss_from_hidden, LossParts, IGNORE};
use crate::optim::{clip_scale, grad_norm, lr_at, AdamW, AdamWConfig};
use crate::setup::{setup, Setup};
use crate::student::build_student;
use candle_core::Tensor;
use candle_nn::VarMap;
use distill_core::run_dir::{
    EvalMetrics, Record, RunDir, StepMetrics, StepSeconds, TrainerState, PROJECTION_FILE,
};
use distill_core::shards::BatchReader;
use distill_core::{CausalLm, Config, Error, Result, TeacherTargets};
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

/// The student being trained: its forward, its variables and what is frozen out of them, and
/// the hidden-state loss's layer map and projections when the run has one.
struct Student {
    model: CausalLm,
    varmap: VarMap,
    cfg: Config,
    frozen: HashMap<String, Tensor>,
    hidden: Option<(HiddenSpec, Projections)>,
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
    let hidden = match crate::hidden::resolve(cfg, &scfg, &s.teacher_cfg)? {
        Some(spec) => {
            let mut proj = Projections::new(
                &spec,
                scfg.hidden_size,
                s.teacher_cfg.hidden_size,
                cfg.student.seed,
                &s.device,
            )?;
            if let Some(last) = resume_from.filter(|_| !proj.is_empty()) {
                proj.load(&last.join(PROJECTION_FILE))?;
            }
            Some((spec, proj))
        }
        None => None,
    };
    Ok(Student {
        model,
        varmap,
        cfg: scfg,
        frozen,
        hidden,
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
    hidden: Option<f32>,
    on_policy_kd: Option<f32>,
    norm: f64,
    lr: f64,
    tokens: u64,
    seconds: StepSeconds,
}

/// One micro-batch ready for the student: its ids, the teacher's targets and hidden states,
/// the labels (IGNORE where a position takes no part) and the loss settings.
struct MicroBatch {
    input: Tensor,
    targets: TeacherTargets,
    teacher_hidden: Vec<Tensor>,
    labels: Vec<u32>,
    loss: crate::loss::LossConfig,
    on_policy: bool,
    tokens: u64,
}

/// The seed of micro-batch `k`'s sampler: a function of the run's seed and the position in the
/// run, so a resumed run draws exactly what an uninterrupted one would.
fn sample_seed(seed: u64, k: u64) -> u64 {
    let mut x = seed ^ (k.wrapping_add(1)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 31;
    x.wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

/// An off-policy micro-batch: sequences of the token shards, the teacher's targets for them (a
/// cache, the live teacher, or the text's own next tokens).
fn off_policy_batch(
    s: &Setup,
    st: &Student,
    seqs: &[usize],
    seconds: &mut StepSeconds,
) -> Result<MicroBatch> {
    let (ids, input) = s.batch(&s.train, seqs)?;
    let timer = Instant::now();
    let (targets, teacher_hidden) = match &st.hidden {
        Some((spec, _)) => s.live_outputs(&input, &spec.teacher_layers())?,
        None => (s.targets("train", seqs, &input)?, Vec::new()),
    };
    seconds.teacher += timer.elapsed().as_secs_f64();
    Ok(MicroBatch {
        labels: s.labels(&s.train, seqs, &ids),
        tokens: (seqs.len() * s.train.seq_len()) as u64,
        input,
        targets,
        teacher_hidden,
        loss: s.loss,
        on_policy: false,
    })
}

/// An on-policy micro-batch: the student continues the first `prompt_tokens` ids of each
/// sequence (sampled from a gradient-free copy of itself, with the KV cache, all rows at once),
/// the live teacher scores the whole sequence, and the KD loss covers the generated positions
/// only, without cross-entropy (the tokens are the student's own).
fn on_policy_batch(
    s: &Setup,
    st: &Student,
    seqs: &[usize],
    k: u64,
    seconds: &mut StepSeconds,
) -> Result<MicroBatch> {
    let o = &s.cfg.onpolicy;
    let timer = Instant::now();
    let sampler = crate::student::frozen_copy(&st.cfg, &st.varmap, &st.frozen, &s.device)?;
    let params = distill_teacher::generate::SamplingParams {
        temperature: o.temperature,
        top_p: 1.0,
        seed: sample_seed(s.cfg.train.seed, k),
        max_new_tokens: o.max_new_tokens,
    };
    let stop = s.tokenizer.stop_ids();
    let samples = match &s.onpolicy_prompts {
        // Shard prefixes: one length, one batch.
        None => {
            let p = o.prompt_tokens.min(s.train.seq_len() - 1);
            let prompts: Vec<u32> = seqs
                .iter()
                .flat_map(|&i| s.train.sequence(i)[..p].to_vec())
                .collect();
            vec![distill_teacher::generate::sample_batch(
                &sampler,
                &prompts,
                seqs.len(),
                &stop,
                &params,
            )?]
        }
        // Prompts of a file, taken in turn (a function of the micro-batch's place in the run):
        // their lengths differ, so each row samples alone, with its own seed.
        Some(prompts) => (0..seqs.len())
            .map(|b| {
                let prompt = &prompts[(k as usize * seqs.len() + b) % prompts.len()];
                let row = distill_teacher::generate::SamplingParams {
                    seed: params.seed ^ (b as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d),
                    ..params.clone()
                };
                distill_teacher::generate::sample_batch(&sampler, prompt, 1, &stop, &row)
            })
            .collect::<Result<Vec<_>>>()?,
    };
    drop(sampler);
    seconds.sample += timer.elapsed().as_secs_f64();
    let pad = stop.first().copied().unwrap_or(0);
    let (ids, t, labels) = on_policy_rows(&samples, pad);
    let input = Tensor::from_vec(ids, (seqs.len(), t), &s.device)?;
    let timer = Instant::now();
    let taps = st
        .hidden
        .as_ref()
        .map(|(spec, _)| spec.teacher_layers())
        .unwrap_or_default();
    let (targets, teacher_hidden) = s.live_outputs(&input, &taps)?;
    seconds.teacher += timer.elapsed().as_secs_f64();
    Ok(MicroBatch {
        input,
        targets,
        teacher_hidden,
        labels,
        loss: crate::loss::LossConfig {
            alpha_ce: 0.0,
            ..s.loss
        },
        on_policy: true,
        tokens: (seqs.len() * t) as u64,
    })
}

/// The rows of one or more sampled batches as one (B, T) batch — rows shorter than the longest
/// padded at the end with `pad` (causal attention: padding after a row changes nothing before
/// it) — and its labels: position i predicts token i+1 only where that token is one the student
/// generated (not the prompt, not what follows a stop token or pads the row).
fn on_policy_rows(
    samples: &[distill_teacher::generate::BatchSample],
    pad: u32,
) -> (Vec<u32>, usize, Vec<u32>) {
    let t = samples.iter().map(|s| s.seq_len()).max().unwrap_or(0);
    let rows: usize = samples.iter().map(|s| s.rows).sum();
    let (mut ids, mut labels) = (Vec::with_capacity(rows * t), vec![IGNORE; rows * t]);
    let mut r = 0;
    for s in samples {
        let n = s.seq_len();
        for b in 0..s.rows {
            let row = &s.ids[b * n..(b + 1) * n];
            ids.extend_from_slice(row);
            ids.resize((r + 1) * t, pad);
            for i in 0..n - 1 {
                if s.is_generated(b, i + 1) {
                    labels[r * t + i] = row[i + 1];
                }
            }
            r += 1;
        }
    }
    (ids, t, labels)
}

/// The student's loss on a micro-batch: the KD (+ CE) loss, plus the weighted hidden-state term.
fn micro_loss(st: &Student, mb: &MicroBatch) -> Result<(LossParts, Option<f32>)> {
    match &st.hidden {
        None => {
            let hidden = st.model.hidden_states(&mb.input)?;
            Ok((loss_of(st, &hidden, mb)?, None))
        }
        Some((spec, proj)) => {
            let (hidden, states) = st
                .model
                .forward_with_hidden(&mb.input, &spec.student_layers())?;
            let mut parts = loss_of(st, &hidden, mb)?;
            let h = proj.loss(spec.kind, &states, &mb.teacher_hidden)?;
            let hv = h.to_scalar::<f32>()?;
            parts.total = (parts.total + (h * spec.weight as f64)?)?;
            Ok((parts, Some(hv)))
        }
    }
}

/// The KD (+ CE) loss from the student's final hidden states: the output projection fused with
/// the loss (no (B, T, V) logits on the CPU).
fn loss_of(st: &Student, hidden: &Tensor, mb: &MicroBatch) -> Result<LossParts> {
    distill_loss_from_hidden(
        hidden,
        st.model.lm_head_weight(),
        &mb.targets,
        &mb.labels,
        &mb.loss,
    )
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
    let (mut hidden_sum, mut on_kd_sum, mut on_n) = (0f32, 0f32, 0u32);
    let mut seconds = StepSeconds::default();
    for m in 0..t.grad_accum {
        let seqs = reader.next_indices(t.batch_size);
        let k = (step - 1) * t.grad_accum as u64 + m as u64;
        let mb = if s.cfg.onpolicy.is_on_policy(k) {
            on_policy_batch(s, st, &seqs, k, &mut seconds)?
        } else {
            off_policy_batch(s, st, &seqs, &mut seconds)?
        };
        let timer = Instant::now();
        // The student's products at train.precision (the teacher's ran above at its own).
        let autocast = distill_core::ops::Autocast::new(t.precision)?;
        let (parts, hidden) = micro_loss(st, &mb)?;
        loss_sum += parts.total.to_scalar::<f32>()?;
        kd_sum += parts.kd;
        ce_sum += parts.ce;
        hidden_sum += hidden.unwrap_or(0.0);
        if mb.on_policy {
            on_kd_sum += parts.kd;
            on_n += 1;
        }
        tokens += mb.tokens;
        let g = (parts.total / t.grad_accum as f64)?.backward()?;
        drop(autocast);
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
        seconds.update += timer.elapsed().as_secs_f64();
    }
    let timer = Instant::now();
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
    let lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps);
    opt.step_scaled(&grads, lr, clip_scale(norm, t.grad_clip))?;
    seconds.update += timer.elapsed().as_secs_f64();
    Ok(StepLoss {
        loss,
        kd,
        ce,
        hidden: st.hidden.as_ref().map(|_| hidden_sum / n),
        on_policy_kd: (on_n > 0).then(|| on_kd_sum / on_n as f32),
        norm,
        lr,
        tokens,
        seconds,
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
    let mut varmaps = vec![&st.varmap];
    if let Some((_, proj)) = &st.hidden {
        varmaps.push(&proj.varmap);
    }
    let mut opt = AdamW::over(
        &varmaps,
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
            projections: st
                .hidden
                .as_ref()
                .filter(|(_, p)| !p.is_empty())
                .map(|(_, p)| p.tensors()),
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
            hidden: l.hidden,
            on_policy_kd: l.on_policy_kd,
            seconds: Some(l.seconds),
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

#[cfg(test)]
mod tests {
    use super::*;
    use distill_teacher::generate::BatchSample;

    #[test]
    fn on_policy_labels_cover_the_generated_positions_only() {
        // Two rows, prompts of 3, 4 new positions; row 1 drew the stop token 9 as its second.
        let sample = BatchSample {
            ids: vec![1, 2, 3, 10, 11, 12, 13, 4, 5, 6, 20, 9, 9, 9],
            rows: 2,
            prompt_len: 3,
            new_tokens: 4,
            generated: vec![4, 2],
        };
        let x = IGNORE;
        let (ids, t, labels) = on_policy_rows(std::slice::from_ref(&sample), 0);
        assert_eq!((t, ids.clone()), (7, sample.ids.clone()));
        assert_eq!(
            labels,
            [x, x, 10, 11, 12, 13, x, x, x, 20, 9, x, x, x],
            "the prompt's own next tokens, the padding after a stop and each row's last \
             position take no part; the stop token itself is learnt"
        );
        // Rows of prompts of different lengths (a prompts file), padded at the end.
        let short = BatchSample {
            ids: vec![5, 30, 31],
            rows: 1,
            prompt_len: 1,
            new_tokens: 2,
            generated: vec![2],
        };
        let (ids, t, labels) = on_policy_rows(&[sample.clone(), short], 2);
        assert_eq!(t, 7);
        assert_eq!(&ids[14..], &[5, 30, 31, 2, 2, 2, 2]);
        assert_eq!(&labels[14..], &[30, 31, x, x, x, x, x]);
        assert_eq!(
            &labels[..14],
            &[x, x, 10, 11, 12, 13, x, x, x, 20, 9, x, x, x]
        );
        // Off-policy/on-policy micro-batches follow λ over the whole run.
        let o = crate::config::OnPolicySection {
            fraction: 0.25,
            ..Default::default()
        };
        let on: Vec<u64> = (0..12).filter(|&k| o.is_on_policy(k)).collect();
        assert_eq!(on, [3, 7, 11]);
        let all = crate::config::OnPolicySection {
            fraction: 1.0,
            ..Default::default()
        };
        assert!((0..10).all(|k| all.is_on_policy(k)));
        assert!((0..10).all(|k| !crate::config::OnPolicySection::default().is_on_policy(k)));
    }
}
