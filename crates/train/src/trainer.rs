//! The trainer: batches from token shards, teacher targets from a cache or a live teacher, the
//! KD loss, AdamW with warmup + cosine, gradient accumulation and clipping, periodic evaluation,
//! atomic checkpoints and exact resume.
//!
//! Run dir:
//! ```text
//! config.toml          the resolved config
//! metrics.jsonl        one JSON object per logged step ({"type":"train",...}) and eval ({"type":"eval",...})
//! step-N/              checkpoint: HF model dir + optimizer.safetensors + trainer_state.json
//! final/               the final student (same layout)
//! ```

use crate::config::RunConfig;
use crate::loss::{distill_loss, next_token_labels, KdKind, LossConfig};
use crate::optim::{clip_grads, grad_norm, lr_at, AdamW, AdamWConfig};
use crate::student::build_student;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use distill_core::cache::{CacheExpect, TeacherCache};
use distill_core::error::{read_text, write_atomic, FileContext};
use distill_core::shards::{BatchReader, Cursor, TokenShards};
use distill_core::{CausalLm, Config, Error, Result, TeacherTargets, Tokenizer};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub tokens: u64,
    /// The data order's state: the seed and the cursor fully determine the next batches.
    pub cursor: Cursor,
    pub data_seed: u64,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<u64>,
    pub elapsed_seconds: f64,
    /// The resolved run config, as TOML.
    pub config: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub step: u64,
    pub tokens: u64,
    pub loss: f32,
    pub kd: f32,
    pub ce: f32,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_second: f64,
    pub elapsed: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalMetrics {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub step: u64,
    pub tokens: u64,
    /// Mean next-token cross-entropy (nats) on the validation sequences.
    pub ce: f64,
    pub perplexity: f64,
    /// Mean KL(teacher‖student) at temperature 1 (nats per token).
    pub kl_to_teacher: f64,
    pub eval_tokens: usize,
}

/// The memory a run needs, estimated before step 1.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryPlan {
    pub weights: u64,
    pub grads: u64,
    pub adamw: u64,
    pub activations: u64,
    pub logits: u64,
    pub teacher: u64,
    pub total: u64,
    pub available: Option<u64>,
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |b: u64| format!("{:.0} MB", b as f64 / 1e6);
        write!(
            f,
            "memory plan: weights {}, grads {}, AdamW {}, activations {}, logits {}, teacher {} = {}",
            mb(self.weights),
            mb(self.grads),
            mb(self.adamw),
            mb(self.activations),
            mb(self.logits),
            mb(self.teacher),
            mb(self.total)
        )?;
        if let Some(a) = self.available {
            write!(f, " (available {})", mb(a))?;
        }
        Ok(())
    }
}

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

enum Targets {
    Cache(TeacherCache),
    Live {
        model: CausalLm,
        top_k: usize,
    },
    /// No teacher model: `alpha_kd = 0` without a cache, i.e. learning from text alone — plain
    /// cross-entropy, or sequence-level distillation when the text is a teacher's answers. The
    /// data's own next tokens stand in as one-hot targets (KL to them is the cross-entropy).
    OneHot,
}

struct Setup {
    cfg: RunConfig,
    device: Device,
    teacher_cfg: Config,
    tokenizer: Tokenizer,
    train: TokenShards,
    valid: Option<TokenShards>,
    targets: Targets,
    /// A live teacher for evaluation when the cache does not cover the validation split.
    eval_teacher: Option<CausalLm>,
    /// Sequences of the train split that can be used (a cache may cover a prefix).
    train_limit: usize,
    loss: LossConfig,
}

fn setup(cfg: RunConfig) -> Result<Setup> {
    let device = distill_core::parse_device(&cfg.train.device)?;
    let tdir = &cfg.teacher.model;
    if !tdir.is_dir() {
        return Err(Error::file(tdir, "teacher model dir does not exist"));
    }
    let teacher_cfg = Config::from_file(tdir.join("config.json"))?;
    let tokenizer = Tokenizer::from_dir(tdir)?;
    let train = TokenShards::open(&cfg.data.tokens, "train")?;
    train
        .meta
        .check_tokenizer(&cfg.data.tokens, &tokenizer, tdir)?;
    let valid = match train.meta.splits.get("valid") {
        Some(s) if s.sequences > 0 => Some(TokenShards::open(&cfg.data.tokens, "valid")?),
        _ => None,
    };
    let has_weights = distill_core::weights::safetensors_files(tdir).is_ok_and(|f| !f.is_empty());
    let (targets, teacher_vocab) = match &cfg.data.cache {
        Some(dir) => {
            // The teacher's weights hash, when the dir has weights (a black-box run's teacher
            // dir may hold only config.json and the tokenizer).
            let expect = CacheExpect {
                teacher_hash: if has_weights {
                    Some(distill_core::weights::model_hash(tdir)?)
                } else {
                    None
                },
                tokenizer_hash: Some(tokenizer.hash()),
                tokens_hash: None,
            };
            let cache = TeacherCache::open(dir, &train.meta, &expect)?;
            let v = cache.settings().vocab_size;
            (Targets::Cache(cache), v)
        }
        None if cfg.loss.alpha_kd == 0.0 => (Targets::OneHot, teacher_cfg.vocab_size),
        None => {
            let (model, _) = distill_core::load_model(tdir, &device)?;
            (
                Targets::Live {
                    model,
                    top_k: cfg.teacher.top_k,
                },
                teacher_cfg.vocab_size,
            )
        }
    };
    let train_limit = match &targets {
        Targets::Cache(c) => c.sequences("train"),
        Targets::Live { .. } | Targets::OneHot => train.len(),
    };
    if train_limit == 0 {
        return Err(Error::Msg(
            "the teacher cache holds no train sequences".into(),
        ));
    }
    let loss = cfg.loss.to_config(Some(teacher_vocab))?;
    let eval_teacher = match (&targets, &valid) {
        (Targets::Cache(c), Some(_))
            if cfg.train.eval_every > 0
                && c.sequences("valid") < cfg.train.eval_sequences
                && has_weights =>
        {
            Some(distill_core::load_model(tdir, &device)?.0)
        }
        _ => None,
    };
    Ok(Setup {
        eval_teacher,
        cfg,
        device,
        teacher_cfg,
        tokenizer,
        train,
        valid,
        targets,
        train_limit,
        loss,
    })
}

/// Student and teacher vocabularies: equal, or differing only by padding (both cover the
/// tokenizer); anything else is refused naming both.
pub fn check_vocab(student: usize, teacher: usize, tokenizer: usize) -> Result<()> {
    if student == teacher || (student >= tokenizer && teacher >= tokenizer) {
        return Ok(());
    }
    Err(Error::Msg(format!(
        "student vocabulary ({student}) and teacher vocabulary ({teacher}) differ by more than \
         padding (the tokenizer has {tokenizer} tokens)"
    )))
}

impl Setup {
    fn targets(&self, split: &str, seqs: &[usize], ids: &Tensor) -> Result<TeacherTargets> {
        match &self.targets {
            Targets::Cache(c) => c.targets(split, seqs, &self.device),
            Targets::Live { model, top_k: 0 } => Ok(TeacherTargets::Dense {
                logits: model.forward(ids)?,
            }),
            Targets::Live { model, top_k } => {
                distill_teacher::cache::live_sparse_targets(model, ids, *top_k)
            }
            Targets::OneHot => {
                let (b, t) = ids.dims2()?;
                let v: Vec<u32> = ids.flatten_all()?.to_vec1()?;
                let next = next_token_labels(&v, b, t)
                    .into_iter()
                    .map(|l| if l == crate::loss::IGNORE { 0 } else { l })
                    .collect();
                Ok(TeacherTargets::Sparse {
                    ids: Tensor::from_vec(next, (b, t, 1), &self.device)?,
                    logprobs: Tensor::zeros((b, t, 1), DType::F32, &self.device)?,
                    logsumexp: Tensor::zeros((b, t), DType::F32, &self.device)?,
                })
            }
        }
    }

    /// Next-token labels of a batch, [`IGNORE`](crate::loss::IGNORE) where the next token is not
    /// a training target (the split's target mask, e.g. prompt and padding positions).
    fn labels(&self, shards: &TokenShards, seqs: &[usize], ids: &[u32]) -> Vec<u32> {
        let t = shards.seq_len();
        let mut labels = next_token_labels(ids, seqs.len(), t);
        for (b, &seq) in seqs.iter().enumerate() {
            if let Some(mask) = shards.target_mask(seq) {
                for i in 0..t - 1 {
                    if mask[i + 1] == 0 {
                        labels[b * t + i] = crate::loss::IGNORE;
                    }
                }
            }
        }
        labels
    }

    fn batch(&self, shards: &TokenShards, seqs: &[usize]) -> Result<(Vec<u32>, Tensor)> {
        let t = shards.seq_len();
        let ids: Vec<u32> = seqs.iter().flat_map(|&i| shards.sequence(i)).collect();
        let tensor = Tensor::from_vec(ids.clone(), (seqs.len(), t), &self.device)?;
        Ok((ids, tensor))
    }

    fn memory_plan(&self, student: &Config) -> MemoryPlan {
        let p = student.num_params() as u64;
        let t = &self.cfg.train;
        let rows = (t.batch_size * self.train.seq_len()) as u64;
        let (h, ff, l) = (
            student.hidden_size as u64,
            student.intermediate_size as u64,
            student.num_hidden_layers as u64,
        );
        let heads = student.num_attention_heads as u64;
        let seq = self.train.seq_len() as u64;
        // Per layer and position, kept for backward: ~12 hidden-sized tensors (norms, q/k/v/o,
        // residuals), 4 intermediate-sized (gate, up, act, product), attention scores and probs.
        let per_layer =
            rows * (12 * h + 4 * ff) * 4 + t.batch_size as u64 * heads * seq * seq * 4 * 3;
        let v = student.vocab_size as u64;
        // Student logits, their gradient, the logits' temporaries in backward; dense teacher
        // logits when the teacher runs online.
        let dense_teacher = matches!(self.targets, Targets::Live { top_k: 0, .. });
        let logits = rows * v * 4 * (3 + dense_teacher as u64);
        let teacher = match &self.targets {
            Targets::Live { model, .. } => {
                let c = model.config();
                c.num_params() as u64 * 4
                    + rows * (c.hidden_size as u64 * 8 + c.intermediate_size as u64 * 4) * 4
            }
            Targets::Cache(_) | Targets::OneHot => 0,
        };
        let weights = p * 4;
        let total = weights * 4 + per_layer * l + logits + teacher;
        MemoryPlan {
            weights,
            grads: weights,
            adamw: weights * 2,
            activations: per_layer * l,
            logits,
            teacher,
            total,
            available: distill_core::device::available_memory_bytes(),
        }
    }

    /// CE and KL(teacher‖student) at τ = 1 over the first `eval_sequences` validation sequences
    /// (those the targets cover).
    fn evaluate(&self, student: &CausalLm, step: u64, tokens: u64) -> Result<Option<EvalMetrics>> {
        let Some(valid) = &self.valid else {
            return Ok(None);
        };
        let covered = match (&self.targets, &self.eval_teacher) {
            (_, Some(_)) | (Targets::Live { .. } | Targets::OneHot, _) => valid.len(),
            (Targets::Cache(c), None) => c.sequences("valid"),
        };
        let n = self.cfg.train.eval_sequences.min(covered);
        if n == 0 {
            return Ok(None);
        }
        let cfg = LossConfig {
            kind: KdKind::ForwardKl,
            temperature: 1.0,
            alpha_kd: 1.0,
            alpha_ce: 1.0,
            ..self.loss
        };
        let (mut ce, mut kl, mut count) = (0f64, 0f64, 0usize);
        let b = self.cfg.train.batch_size;
        for start in (0..n).step_by(b) {
            let seqs: Vec<usize> = (start..(start + b).min(n)).collect();
            let (ids, input) = self.batch(valid, &seqs)?;
            let targets = match &self.eval_teacher {
                Some(t) => TeacherTargets::Dense {
                    logits: t.forward(&input)?,
                },
                None => self.targets("valid", &seqs, &input)?,
            };
            let logits = student.forward(&input)?.detach();
            let labels = self.labels(valid, &seqs, &ids);
            let parts = distill_loss(&logits, &targets, &labels, &cfg)?;
            ce += parts.ce as f64 * parts.tokens as f64;
            kl += parts.kd as f64 * parts.tokens as f64;
            count += parts.tokens;
        }
        let c = count.max(1) as f64;
        Ok(Some(EvalMetrics {
            kind: "eval",
            step,
            tokens,
            ce: ce / c,
            perplexity: (ce / c).exp(),
            // Without a teacher (one-hot targets) there is no KL to report: NaN, written as null.
            kl_to_teacher: if matches!(self.targets, Targets::OneHot) && self.eval_teacher.is_none()
            {
                f64::NAN
            } else {
                kl / c
            },
            eval_tokens: count,
        }))
    }
}

/// Step checkpoints in a run dir, by step.
pub fn checkpoints(run: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(run)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join(STATE_FILE).exists().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    dir: &Path,
    cfg: &Config,
    varmap: &VarMap,
    frozen: &HashMap<String, Tensor>,
    opt: &AdamW,
    state: &TrainerState,
    tokenizer: &Tokenizer,
) -> Result<()> {
    let tmp = distill_core::error::tmp_name(dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    let mut tensors = distill_core::weights::varmap_tensors(varmap);
    tensors.extend(frozen.iter().map(|(k, v)| (k.clone(), v.clone())));
    distill_core::save_model_dir(&tmp, cfg, &tensors, tokenizer, DType::F32)?;
    distill_core::weights::save_safetensors(
        &opt.state_tensors(),
        DType::F32,
        &tmp.join(OPTIMIZER_FILE),
    )?;
    let json = serde_json::to_string_pretty(state).expect("state serialises");
    write_atomic(tmp.join(STATE_FILE), json.as_bytes())?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
}

/// A checkpoint's trainer state and optimizer state (its weights are loaded by `train` before
/// the student's embeddings may be frozen).
fn load_checkpoint(dir: &Path, opt: &mut AdamW) -> Result<TrainerState> {
    let state_path = dir.join(STATE_FILE);
    let state: TrainerState =
        serde_json::from_str(&read_text(&state_path)?).with_file(&state_path)?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    distill_core::weights::check_safetensors(&opt_path)?;
    let tensors = candle_core::safetensors::load(&opt_path, &Device::Cpu)
        .map_err(|e| Error::file(&opt_path, e))?;
    opt.load_state(&tensors, state.step)
        .map_err(|e| Error::file(&opt_path, e))?;
    Ok(state)
}

/// Runs (or resumes) training. `on_event` sees the plan, every step, evals and checkpoints.
pub fn train(
    cfg: RunConfig,
    opts: &RunOptions,
    mut on_event: impl FnMut(Event),
) -> Result<RunSummary> {
    let start_time = Instant::now();
    let run = &opts.out;
    // On resume the run's own config is authoritative, except for max_steps (a run may be
    // extended) — the caller passes the loaded config with that applied.
    let s = setup(cfg)?;
    let cfg = &s.cfg;
    let t = &cfg.train;
    let (student, mut varmap, scfg) =
        build_student(&cfg.teacher.model, &s.teacher_cfg, &cfg.student, &s.device)?;
    let resume_from = match (opts.resume, checkpoints(run).pop()) {
        (false, _) => None,
        (true, Some((_, last))) => Some(last),
        (true, None) => {
            return Err(Error::file(
                run,
                "nothing to resume: no step-N/ checkpoint with trainer_state.json",
            ))
        }
    };
    if let Some(last) = &resume_from {
        // The checkpoint's weights go in before anything is frozen (frozen tensors leave the
        // VarMap), so a resumed run never depends on the dir its student started from.
        let weights = last.join("model.safetensors");
        distill_core::weights::check_safetensors(&weights)?;
        varmap
            .load(&weights)
            .map_err(|e| Error::file(&weights, e))?;
    }
    let (student, frozen) = if cfg.student.freeze_embeddings {
        crate::student::freeze(&scfg, &varmap, &[crate::student::EMBEDDINGS], &s.device)?
    } else {
        (student, HashMap::new())
    };
    check_vocab(
        scfg.vocab_size,
        s.loss.teacher_vocab.unwrap_or(s.teacher_cfg.vocab_size),
        s.tokenizer.vocab_size(),
    )?;
    let mut opt = AdamW::new(
        &varmap,
        AdamWConfig {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
        },
    )?;
    let mut reader = BatchReader::with_limit(&s.train, t.seed, s.train_limit);
    let mut state = TrainerState {
        step: 0,
        tokens: 0,
        cursor: reader.cursor(),
        data_seed: t.seed,
        best_eval_loss: None,
        best_step: None,
        elapsed_seconds: 0.0,
        config: cfg.to_toml(),
    };
    if let Some(last) = &resume_from {
        state = load_checkpoint(last, &mut opt)?;
        state.config = cfg.to_toml();
        reader.restore(state.cursor);
    } else {
        if run.join(STATE_FILE).exists() || !checkpoints(run).is_empty() {
            return Err(Error::file(
                run,
                "run dir already holds checkpoints; use --resume to continue it or another --out",
            ));
        }
        std::fs::create_dir_all(run).map_err(|e| Error::io(run, e))?;
    }
    write_atomic(run.join("config.toml"), cfg.to_toml().as_bytes())?;

    let plan = s.memory_plan(&scfg);
    on_event(Event::Plan(&plan));
    if let Some(avail) = plan.available {
        if plan.total > avail && !opts.ignore_memory_plan {
            return Err(Error::Msg(format!(
                "the run needs about {:.1} GB but {:.1} GB are available: lower train.batch_size \
                 (e.g. --set train.batch_size={}) and raise train.grad_accum to keep the \
                 effective batch",
                plan.total as f64 / 1e9,
                avail as f64 / 1e9,
                (t.batch_size / 2).max(1)
            )));
        }
    }

    let metrics_path = run.join("metrics.jsonl");
    if opts.resume && metrics_path.exists() {
        // Records written after the checkpoint (by a run that was killed) are dropped: the
        // resumed run writes them again, identically.
        let text = read_text(&metrics_path)?;
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|st| st <= state.step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomic(&metrics_path, kept.as_bytes())?;
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;
    let mut log = |v: &dyn erased::Json| -> Result<()> {
        writeln!(metrics, "{}", v.json()).map_err(|e| Error::io(&metrics_path, e))
    };

    on_event(Event::Start {
        step: state.step,
        max_steps: t.max_steps,
    });
    let seq_len = s.train.seq_len();
    let mut window_tokens = 0u64;
    let mut window_start = Instant::now();
    let mut last_eval = None;
    let run_start = Instant::now();
    let elapsed_before = state.elapsed_seconds;
    let mut last_ckpt: Option<PathBuf> = checkpoints(run).pop().map(|(_, p)| p);
    while state.step < t.max_steps {
        let step = state.step + 1;
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let (mut loss_sum, mut kd_sum, mut ce_sum) = (0f32, 0f32, 0f32);
        for _ in 0..t.grad_accum {
            let seqs = reader.next_indices(t.batch_size);
            let (ids, input) = s.batch(&s.train, &seqs)?;
            let targets = s.targets("train", &seqs, &input)?;
            let logits = student.forward(&input)?;
            let labels = s.labels(&s.train, &seqs, &ids);
            let parts = distill_loss(&logits, &targets, &labels, &s.loss)?;
            let total = parts.total.to_scalar::<f32>()?;
            loss_sum += total;
            kd_sum += parts.kd;
            ce_sum += parts.ce;
            let scaled = (parts.total / t.grad_accum as f64)?;
            let g = scaled.backward()?;
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
            state.tokens += (seqs.len() * seq_len) as u64;
            window_tokens += (seqs.len() * seq_len) as u64;
        }
        let n = t.grad_accum as f32;
        let (loss, kd, ce) = (loss_sum / n, kd_sum / n, ce_sum / n);
        let norm = grad_norm(&grads)?;
        if !loss.is_finite() || !norm.is_finite() {
            let last = last_ckpt
                .as_ref()
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
        drop(grads);
        state.step = step;
        state.cursor = reader.cursor();
        state.elapsed_seconds = elapsed_before + run_start.elapsed().as_secs_f64();

        let m = StepMetrics {
            kind: "train",
            step,
            tokens: state.tokens,
            loss,
            kd,
            ce,
            lr,
            grad_norm: norm,
            tokens_per_second: window_tokens as f64 / window_start.elapsed().as_secs_f64(),
            elapsed: state.elapsed_seconds,
        };
        on_event(Event::Step(&m));
        if step.is_multiple_of(t.log_every.max(1)) || step == t.max_steps {
            log(&m)?;
            window_tokens = 0;
            window_start = Instant::now();
        }
        let is_last = step == t.max_steps;
        if (t.eval_every > 0 && step.is_multiple_of(t.eval_every)) || is_last {
            if let Some(e) = s.evaluate(&student, step, state.tokens)? {
                log(&e)?;
                on_event(Event::Eval(&e));
                if state.best_eval_loss.is_none_or(|b| e.ce < b) {
                    state.best_eval_loss = Some(e.ce);
                    state.best_step = Some(step);
                }
                last_eval = Some(e);
            }
            window_start = Instant::now();
            window_tokens = 0;
        }
        let stop = opts.stop_after == Some(step);
        if (t.checkpoint_every > 0 && step.is_multiple_of(t.checkpoint_every)) || is_last || stop {
            let dir = run.join(format!("step-{step}"));
            save_checkpoint(&dir, &scfg, &varmap, &frozen, &opt, &state, &s.tokenizer)?;
            on_event(Event::Checkpoint(&dir));
            last_ckpt = Some(dir);
            prune(run, t.keep_checkpoints, state.best_step)?;
        }
        if stop {
            break;
        }
    }
    let final_dir = run.join("final");
    if state.step == t.max_steps {
        save_checkpoint(
            &final_dir,
            &scfg,
            &varmap,
            &frozen,
            &opt,
            &state,
            &s.tokenizer,
        )?;
    }
    Ok(RunSummary {
        steps: state.step,
        tokens: state.tokens,
        final_dir,
        last_eval,
        seconds: start_time.elapsed().as_secs_f64(),
    })
}

/// Keeps the last `keep` step checkpoints and the best one.
fn prune(run: &Path, keep: usize, best: Option<u64>) -> Result<()> {
    let all = checkpoints(run);
    let n = all.len();
    for (i, (step, dir)) in all.into_iter().enumerate() {
        if i + keep.max(1) < n && Some(step) != best {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
    }
    Ok(())
}

/// Reads a run's config back (for `--resume`).
pub fn run_config(run: &Path) -> Result<RunConfig> {
    let path = run.join("config.toml");
    if !path.exists() {
        return Err(Error::file(run, "not a run dir (no config.toml)"));
    }
    RunConfig::load(&path, &[])
}

mod erased {
    /// Lets one closure log both metric kinds.
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).expect("metrics serialise")
        }
    }
}
