//! Run configs: TOML files (`configs/*.toml`) with `--set key=value` overrides. Unknown keys are
//! refused, naming the key; the resolved config is written into the run dir.

use crate::loss::{KdKind, LossConfig};
use distill_core::error::FileContext;
use distill_core::fsio::read_text;
use distill_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Run name (the run dir defaults to `runs/NAME`).
    pub name: String,
    pub data: DataSection,
    pub teacher: TeacherSection,
    pub student: StudentSection,
    #[serde(default)]
    pub loss: LossSection,
    #[serde(default)]
    pub train: TrainSection,
    /// On-policy distillation: batches of the student's own samples, scored by the teacher.
    #[serde(default, skip_serializing_if = "OnPolicySection::is_off")]
    pub onpolicy: OnPolicySection,
    /// A hidden-state loss between student layers and mapped teacher layers.
    #[serde(default, skip_serializing_if = "HiddenSection::is_off")]
    pub hidden: HiddenSection,
}

/// On-policy distillation (GKD, Agarwal et al. 2024): a fraction of the micro-batches has the
/// student continue prompts taken from the token shards (the first `prompt_tokens` ids of each
/// sequence), the live teacher scores every generated token, and the KD loss is taken on the
/// generated positions only (no cross-entropy: the tokens are the student's own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnPolicySection {
    /// λ: the fraction of micro-batches that are on-policy (0 = off-policy only, 1 = all).
    pub fraction: f64,
    /// Prompt length, in tokens, taken from the start of each sequence.
    pub prompt_tokens: usize,
    /// New tokens the student samples after each prompt.
    pub max_new_tokens: usize,
    /// Sampling temperature of the student's continuations (1 = its own distribution).
    pub temperature: f64,
    /// Prompts to continue instead of shard prefixes: a prompts file (one per line, or JSONL
    /// with "prompt" or "messages"), rendered with the chat template when the teacher's
    /// tokenizer has one; taken in turn, each cut to its last `prompt_tokens` ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompts: Option<PathBuf>,
}

impl Default for OnPolicySection {
    fn default() -> Self {
        Self {
            fraction: 0.0,
            prompt_tokens: 64,
            max_new_tokens: 64,
            temperature: 1.0,
            prompts: None,
        }
    }
}

impl OnPolicySection {
    pub fn is_off(&self) -> bool {
        *self == Self::default()
    }

    /// Whether micro-batch `k` (counted from 0 over the whole run) is on-policy: λ of them,
    /// spread evenly (k is on-policy when ⌊(k+1)λ⌋ > ⌊kλ⌋), so the schedule is a function of
    /// the step and a resumed run continues it exactly.
    pub fn is_on_policy(&self, k: u64) -> bool {
        self.fraction > 0.0
            && ((k + 1) as f64 * self.fraction).floor() > (k as f64 * self.fraction).floor()
    }
}

/// Hidden-state distillation (TinyBERT, MiniLM, Minitron's healing): the residual stream after
/// student layer s is matched to the teacher's after layer t for each pair (s, t), through a
/// learned linear projection when the widths differ (saved in the checkpoint, not in the model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HiddenSection {
    /// Weight of the hidden-state term in the total loss (0 = off).
    pub weight: f32,
    /// `cosine` (1 − cos per position) or `mse` (mean squared error per element).
    pub kind: String,
    /// (student layer, teacher layer) pairs; absent: the layer map of the prune report in
    /// `student.model` (every kept layer to the teacher layer it came from).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<[usize; 2]>>,
}

impl Default for HiddenSection {
    fn default() -> Self {
        Self {
            weight: 0.0,
            kind: "cosine".into(),
            layers: None,
        }
    }
}

impl HiddenSection {
    pub fn is_off(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Token shards dir (`distill prepare`).
    pub tokens: PathBuf,
    /// Teacher cache dir (`distill cache`); absent: the teacher runs inside the loop (online).
    #[serde(default)]
    pub cache: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSection {
    /// Teacher model dir (HF layout): its tokenizer and config shape the student; its weights
    /// run online or are checked against the cache's teacher hash.
    pub model: PathBuf,
    /// Online only: reduce the live teacher to top-k sparse targets (as a cache would) instead
    /// of full-vocabulary logits. 0 = dense.
    #[serde(default)]
    pub top_k: usize,
    /// Precision of a live teacher's products: "f32", or "bf16" on AMX tiles (several times
    /// faster where the CPU has them, at a KL to f32 that `distill bench cache
    /// --teacher-precision bf16` measures). A cache records its own (`distill cache
    /// --teacher-precision`).
    #[serde(default, skip_serializing_if = "distill_core::Precision::is_f32")]
    pub precision: distill_core::Precision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StudentInit {
    /// HF init (normal 0.02), seeded.
    Random,
    /// Copy the teacher's embeddings, final norm (and lm_head) and a subset of its layers.
    TeacherLayers,
    /// Start from the model dir `student.model` (a `distill prune` output, or any HF model with
    /// the teacher's tokenizer): its config is the student's shape, its weights the start.
    Model,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSection {
    /// A named shape (`tiny`, `4l-256`, `6l-384`); explicit fields below override it.
    #[serde(default)]
    pub preset: Option<String>,
    pub layers: Option<usize>,
    pub hidden: Option<usize>,
    pub heads: Option<usize>,
    pub kv_heads: Option<usize>,
    pub intermediate: Option<usize>,
    /// Vocabulary size if it should differ from the teacher's by padding (e.g. a multiple of 64).
    pub vocab_size: Option<usize>,
    #[serde(default = "default_init")]
    pub init: StudentInit,
    /// With `init = "teacher-layers"`: which teacher layers (default every k-th from 0).
    pub teacher_layers: Option<Vec<usize>>,
    /// With `init = "model"`: the model dir the student starts from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
    /// Keep the input embeddings (and a tied output projection) as they are: no gradient, no
    /// optimizer state. For students that start from the teacher's own embeddings.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub freeze_embeddings: bool,
    #[serde(default)]
    pub seed: u64,
}

fn default_init() -> StudentInit {
    StudentInit::Random
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossSection {
    /// forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl, tvd.
    pub kind: String,
    /// JSD's β.
    pub beta: Option<f32>,
    /// Skew KL's α.
    pub alpha: Option<f32>,
    pub temperature: f32,
    pub alpha_kd: f32,
    pub alpha_ce: f32,
}

impl Default for LossSection {
    fn default() -> Self {
        Self {
            kind: "forward_kl".into(),
            beta: None,
            alpha: None,
            temperature: 2.0,
            alpha_kd: 1.0,
            alpha_ce: 0.0,
        }
    }
}

impl LossSection {
    pub fn to_config(&self, teacher_vocab: Option<usize>) -> Result<LossConfig> {
        let need = |v: Option<f32>, name: &str| {
            v.ok_or_else(|| Error::Msg(format!("loss.kind = \"{}\" needs loss.{name}", self.kind)))
        };
        let kind = match self.kind.as_str() {
            "forward_kl" => KdKind::ForwardKl,
            "reverse_kl" => KdKind::ReverseKl,
            "jsd" => KdKind::Jsd {
                beta: need(self.beta, "beta")?,
            },
            "skew_forward_kl" => KdKind::SkewForwardKl {
                alpha: need(self.alpha, "alpha")?,
            },
            "skew_reverse_kl" => KdKind::SkewReverseKl {
                alpha: need(self.alpha, "alpha")?,
            },
            "tvd" => KdKind::Tvd,
            other => {
                return Err(Error::Msg(format!(
                    "loss.kind = \"{other}\": expected forward_kl, reverse_kl, jsd, \
                     skew_forward_kl, skew_reverse_kl or tvd"
                )))
            }
        };
        kind.validate()?;
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            return Err(Error::Msg(format!(
                "loss.temperature = {}: must be > 0",
                self.temperature
            )));
        }
        Ok(LossConfig {
            kind,
            temperature: self.temperature,
            alpha_kd: self.alpha_kd,
            alpha_ce: self.alpha_ce,
            teacher_vocab,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub max_steps: u64,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global grad-norm clip (0 = off).
    pub grad_clip: f64,
    /// Data order seed.
    pub seed: u64,
    pub log_every: u64,
    pub eval_every: u64,
    /// Validation sequences per evaluation (the first N of the valid split).
    pub eval_sequences: usize,
    pub checkpoint_every: u64,
    /// Step checkpoints kept (the best by validation loss is kept as well).
    pub keep_checkpoints: usize,
    pub device: String,
    /// Precision of the student's products, forward and backward: "f32", or "bf16" (mixed
    /// precision, as `torch.autocast`: each product's operands rounded to bf16 and multiplied
    /// on the CPU's AMX tiles with f32 sums; weights, gradients, AdamW, norms, attention and the
    /// loss stay f32). Evaluation runs at f32.
    #[serde(skip_serializing_if = "distill_core::Precision::is_f32")]
    pub precision: distill_core::Precision,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            batch_size: 8,
            grad_accum: 1,
            max_steps: 1000,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 50,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            seed: 0,
            log_every: 10,
            eval_every: 100,
            eval_sequences: 32,
            checkpoint_every: 200,
            keep_checkpoints: 2,
            device: "cpu".into(),
            precision: distill_core::Precision::F32,
        }
    }
}

/// Applies one `key=value` override (dotted key; the value parsed as TOML, else a string).
pub fn apply_set(table: &mut toml::Table, set: &str) -> Result<()> {
    let (key, value) = set
        .split_once('=')
        .ok_or_else(|| Error::Msg(format!("--set {set}: expected key=value")))?;
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut t = table;
    for p in &parts[..parts.len() - 1] {
        t = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| Error::Msg(format!("--set {set}: {p} is not a table")))?;
    }
    t.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

impl RunConfig {
    /// Reads a TOML config and applies `--set` overrides; unknown keys are refused.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        let text = read_text(path)?;
        let mut table: toml::Table = toml::from_str(&text).with_file(path)?;
        for s in sets {
            apply_set(&mut table, s)?;
        }
        Self::from_table(table).with_file(path)
    }

    pub fn from_table(table: toml::Table) -> std::result::Result<Self, String> {
        let cfg: RunConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| e.message().to_string())?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let t = &self.train;
        if t.batch_size == 0 || t.grad_accum == 0 {
            return Err("train.batch_size and train.grad_accum must be ≥ 1".into());
        }
        if t.lr.is_nan() || t.lr <= 0.0 || t.min_lr < 0.0 || t.min_lr > t.lr {
            return Err(format!(
                "train.lr = {} / train.min_lr = {}: need 0 ≤ min_lr ≤ lr, lr > 0",
                t.lr, t.min_lr
            ));
        }
        self.loss.to_config(None).map_err(|e| e.to_string())?;
        let o = &self.onpolicy;
        if !(0.0..=1.0).contains(&o.fraction) {
            return Err(format!(
                "onpolicy.fraction = {}: expected a fraction of the batches in [0, 1]",
                o.fraction
            ));
        }
        if o.fraction > 0.0 && (o.prompt_tokens == 0 || o.max_new_tokens == 0) {
            return Err("onpolicy.prompt_tokens and onpolicy.max_new_tokens must be ≥ 1".into());
        }
        if !(o.temperature.is_finite() && o.temperature >= 0.0) {
            return Err(format!(
                "onpolicy.temperature = {}: expected a finite value ≥ 0 (0 = greedy)",
                o.temperature
            ));
        }
        let h = &self.hidden;
        if !(h.weight.is_finite() && h.weight >= 0.0) {
            return Err(format!(
                "hidden.weight = {}: expected a value ≥ 0",
                h.weight
            ));
        }
        if h.kind != "cosine" && h.kind != "mse" {
            return Err(format!(
                "hidden.kind = \"{}\": expected cosine or mse",
                h.kind
            ));
        }
        let s = &self.student;
        match (s.init, &s.model) {
            (StudentInit::Model, None) => {
                return Err("student.init = \"model\" needs student.model = \"DIR\"".into())
            }
            (StudentInit::Model, Some(_)) => {
                let shaped = s.preset.is_some()
                    || s.layers.is_some()
                    || s.hidden.is_some()
                    || s.heads.is_some()
                    || s.kv_heads.is_some()
                    || s.intermediate.is_some()
                    || s.vocab_size.is_some()
                    || s.teacher_layers.is_some();
                if shaped {
                    return Err(
                        "student.init = \"model\" takes its shape from student.model's \
                                config.json: remove student.preset, layers, hidden, heads, \
                                kv_heads, intermediate, vocab_size and teacher_layers"
                            .into(),
                    );
                }
            }
            (_, Some(_)) => {
                return Err("student.model is only read with student.init = \"model\"".into())
            }
            _ => {}
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}
