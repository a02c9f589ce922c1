//! What a run is set up with before its first step: the teacher's targets (a cache, a live
//! teacher, or the data's own next tokens), the token shards and their checks, the loss, the
//! memory plan — and the batches, labels and validation pass the loop draws from them.

use crate::config::RunConfig;
use crate::loss::{distill_loss, next_token_labels, KdKind, LossConfig};
use candle_core::{DType, Device, Tensor};
use distill_core::cache::{CacheExpect, TeacherCache};
use distill_core::run_dir::EvalMetrics;
use distill_core::shards::TokenShards;
use distill_core::{CausalLm, Config, Error, ModelDir, Result, TeacherTargets, Tokenizer};
use serde::Serialize;

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

pub(crate) enum Targets {
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

pub(crate) struct Setup {
    pub(crate) cfg: RunConfig,
    pub(crate) device: Device,
    pub(crate) teacher_cfg: Config,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) train: TokenShards,
    pub(crate) valid: Option<TokenShards>,
    pub(crate) targets: Targets,
    /// A live teacher for evaluation when the cache does not cover the validation split.
    pub(crate) eval_teacher: Option<CausalLm>,
    /// Sequences of the train split that can be used (a cache may cover a prefix).
    pub(crate) train_limit: usize,
    pub(crate) loss: LossConfig,
    /// On-policy prompts from `onpolicy.prompts`, tokenized (None: shard prefixes).
    pub(crate) onpolicy_prompts: Option<Vec<Vec<u32>>>,
}

pub(crate) fn setup(cfg: RunConfig) -> Result<Setup> {
    let device = distill_core::parse_device(&cfg.train.device)?;
    if !cfg.train.precision.is_f32() {
        distill_core::ops::bf16::require(&device).map_err(|e| {
            Error::Msg(format!(
                "train.precision = \"{}\": {e}",
                cfg.train.precision
            ))
        })?;
    }
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
    // The live teacher (targets, or evaluation beside a cache), at teacher.precision.
    let load_teacher = || -> Result<distill_core::CausalLm> {
        let mut model = ModelDir::load(tdir, &device)?.model;
        model.set_precision(cfg.teacher.precision).map_err(|e| {
            Error::Msg(format!(
                "teacher.precision = \"{}\": {e}",
                cfg.teacher.precision
            ))
        })?;
        Ok(model)
    };
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
            let cached = cache.settings().teacher_precision;
            if cached != cfg.teacher.precision {
                return Err(Error::Msg(format!(
                    "data.cache {} holds the teacher's targets at {cached} and teacher.precision \
                     is {}: set teacher.precision = \"{cached}\" (the live teacher that evaluates \
                     runs at it too), or rebuild the cache",
                    dir.display(),
                    cfg.teacher.precision
                )));
            }
            let v = cache.settings().vocab_size;
            (Targets::Cache(cache), v)
        }
        None if cfg.loss.alpha_kd == 0.0 => (Targets::OneHot, teacher_cfg.vocab_size),
        None => {
            let model = load_teacher()?;
            (
                Targets::Live {
                    model,
                    top_k: cfg.teacher.top_k,
                },
                teacher_cfg.vocab_size,
            )
        }
    };
    for (on, what, why) in [
        (
            cfg.onpolicy.fraction > 0.0,
            format!("onpolicy.fraction = {}", cfg.onpolicy.fraction),
            "the teacher must score the student's own samples",
        ),
        (
            cfg.hidden.weight > 0.0,
            format!("hidden.weight = {}", cfg.hidden.weight),
            "the teacher's hidden states are needed",
        ),
    ] {
        match (&targets, on) {
            (Targets::Cache(_), true) => {
                return Err(Error::Msg(format!(
                    "{what} needs a live teacher ({why}), and a teacher cache holds only output                      targets for the fixed text of the token shards: remove data.cache"
                )))
            }
            (Targets::OneHot, true) => {
                return Err(Error::Msg(format!(
                    "{what} needs a teacher ({why}), and loss.alpha_kd = 0 without a cache runs                      none: set loss.alpha_kd > 0"
                )))
            }
            _ => {}
        }
    }
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
            Some(load_teacher()?)
        }
        _ => None,
    };
    let onpolicy_prompts = match &cfg.onpolicy.prompts {
        Some(path) if cfg.onpolicy.fraction > 0.0 => {
            let keep = cfg.onpolicy.prompt_tokens;
            let mut out = Vec::new();
            for (i, messages) in distill_core::prompts::read_prompts(path)?
                .iter()
                .enumerate()
            {
                let ids = distill_core::prompts::encode_prompt(&tokenizer, messages, true)?;
                if ids.is_empty() || messages.iter().all(|m| m.content.trim().is_empty()) {
                    return Err(Error::file(path, format!("prompt {} is empty", i + 1)));
                }
                out.push(ids[ids.len().saturating_sub(keep)..].to_vec());
            }
            Some(out)
        }
        _ => None,
    };
    Ok(Setup {
        onpolicy_prompts,
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
    pub(crate) fn targets(
        &self,
        split: &str,
        seqs: &[usize],
        ids: &Tensor,
    ) -> Result<TeacherTargets> {
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

    /// The live teacher's targets for `ids` (B, T) and its residual stream after the layers
    /// `taps` (for the hidden-state loss), from one forward. Only for a live teacher (setup
    /// refuses the runs that would need it otherwise).
    pub(crate) fn live_outputs(
        &self,
        ids: &Tensor,
        taps: &[usize],
    ) -> Result<(TeacherTargets, Vec<Tensor>)> {
        let Targets::Live { model, top_k } = &self.targets else {
            return Err(Error::Msg(
                "internal: live teacher outputs asked of a run without a live teacher".into(),
            ));
        };
        let (hidden, states) = model.forward_with_hidden(ids, taps)?;
        let targets = match top_k {
            0 => TeacherTargets::Dense {
                logits: model.logits(&hidden)?,
            },
            k => distill_teacher::cache::sparse_targets_from_hidden(model, &hidden, *k)?,
        };
        Ok((targets, states))
    }

    /// Next-token labels of a batch, [`IGNORE`](crate::loss::IGNORE) where the next token is not
    /// a training target (the split's target mask, e.g. prompt and padding positions).
    pub(crate) fn labels(&self, shards: &TokenShards, seqs: &[usize], ids: &[u32]) -> Vec<u32> {
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

    pub(crate) fn batch(&self, shards: &TokenShards, seqs: &[usize]) -> Result<(Vec<u32>, Tensor)> {
        let t = shards.seq_len();
        let ids: Vec<u32> = seqs.iter().flat_map(|&i| shards.sequence(i)).collect();
        let tensor = Tensor::from_vec(ids.clone(), (seqs.len(), t), &self.device)?;
        Ok((ids, tensor))
    }

    pub(crate) fn memory_plan(&self, student: &Config) -> MemoryPlan {
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
        // On the CPU the output projection is fused with the loss: two chunk buffers and the
        // projection's gradient twice (accumulated transposed, then transposed); elsewhere the
        // student logits, their gradient and the backward's temporaries. Dense teacher logits
        // when the teacher runs online.
        let dense_teacher = matches!(self.targets, Targets::Live { top_k: 0, .. });
        let student_logits = if self.device.is_cpu() {
            // A frozen (tied) embedding gets no gradient: the fused loss computes none for it.
            let dw = if self.cfg.student.freeze_embeddings {
                0
            } else {
                2 * v * h * 4
            };
            // At train.precision = "bf16", the projection in bf16 tiles twice (for the logits and
            // for dh; kept between steps when frozen).
            let packs = if t.precision.is_f32() {
                0
            } else {
                2 * v * h * 2
            };
            crate::loss::fused_buffer_bytes(v as usize, rows as usize) as u64 + dw + packs
        } else {
            rows * v * 4 * 3
        };
        let logits = student_logits + rows * v * 4 * dense_teacher as u64;
        let teacher = match &self.targets {
            Targets::Live { model, .. } => {
                let c = model.config();
                // At bf16, every product's weight once more in 2 bytes: the layers and the
                // lm_head (an untied input embedding is only looked up).
                let packed = match model.precision() {
                    distill_core::Precision::F32 => 0,
                    distill_core::Precision::Bf16 => {
                        let embed = c.vocab_size as u64 * c.hidden_size as u64;
                        let lookup_only = if c.tie_word_embeddings { 0 } else { embed };
                        (c.num_params() as u64 - lookup_only) * 2
                    }
                };
                c.num_params() as u64 * 4
                    + packed
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
    pub(crate) fn evaluate(
        &self,
        student: &CausalLm,
        step: u64,
        tokens: u64,
    ) -> Result<Option<EvalMetrics>> {
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
