//! distill-prune: the student cut from the teacher (Minitron, ShortGPT, Sheared-LLaMA). Importance
//! is measured on calibration batches of token shards, a few candidate cuts (depth-only,
//! width-only, mixed) are scored by their KL to the teacher on the same batches, and the best is
//! written as a complete HF model dir (config of the new shape, weights, the teacher's tokenizer)
//! with `prune-report.json` / `prune-report.md` beside the weights. Distillation then heals it.

pub mod importance;
pub mod plan;
pub mod search;

pub use importance::Importance;
pub use plan::{Plan, Shape};
pub use search::{LayerRanking, Target};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use distill_core::fsio::write_atomic;
use distill_core::shards::TokenShards;
use distill_core::{CausalLm, Config, Error, ModelCard, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The report written into the pruned dir.
pub const REPORT_JSON: &str = "prune-report.json";
pub const REPORT_MD: &str = "prune-report.md";

#[derive(Debug, Clone)]
pub struct PruneOptions {
    pub teacher: PathBuf,
    /// Token shards (their train split) to calibrate on.
    pub tokens: PathBuf,
    pub out: PathBuf,
    pub target: TargetSpec,
    /// Sequences the activation statistics are measured on.
    pub calib_sequences: usize,
    /// Of those, how many the KL figures (drop-one, candidates) are measured on.
    pub kl_sequences: usize,
    pub batch_size: usize,
    pub device: Device,
}

/// The target as the user gave it; resolved against the teacher's size.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetSpec {
    /// `--target-params`: a ratio or a count.
    Params(String),
    /// An explicit shape; unset fields keep the teacher's.
    Shape {
        layers: Option<usize>,
        hidden: Option<usize>,
        heads: Option<usize>,
        kv_heads: Option<usize>,
        intermediate: Option<usize>,
    },
}

impl TargetSpec {
    pub fn resolve(&self, src: &Config) -> Result<Target> {
        match self {
            TargetSpec::Params(s) => Target::parse_params(s, src.num_params()),
            TargetSpec::Shape {
                layers,
                hidden,
                heads,
                kv_heads,
                intermediate,
            } => {
                let full = Shape::of(src);
                Ok(Target::Shape(Shape {
                    layers: layers.unwrap_or(full.layers),
                    hidden: hidden.unwrap_or(full.hidden),
                    heads: heads.unwrap_or(full.heads),
                    kv_heads: kv_heads.unwrap_or(full.kv_heads),
                    intermediate: intermediate.unwrap_or(full.intermediate),
                }))
            }
        }
    }
}

/// A measured candidate cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub name: String,
    pub shape: Shape,
    pub ranking: LayerRanking,
    pub params: usize,
    /// Mean KL(teacher ‖ cut) per token on the calibration batches, nats.
    pub kl: f64,
}

/// The pruned dir's model card: the teacher it was cut from, the shape, the candidates measured.
fn model_card(
    teacher: &Path,
    cfg: &Config,
    pcfg: &Config,
    tokens: &Path,
    candidates: &[Candidate],
    chosen: usize,
) -> ModelCard {
    let lineage = distill_core::model_card::lineage(teacher);
    let mut table = String::from("| candidate | parameters | KL to the teacher |\n|---|---|---|\n");
    for (i, c) in candidates.iter().enumerate() {
        let mark = if i == chosen { " (chosen)" } else { "" };
        table += &format!(
            "| {}{mark} | {:.1}M | {:.4} |\n",
            c.name,
            c.params as f64 / 1e6,
            c.kl
        );
    }
    ModelCard::derived(
        format!(
            "{} cut to {:.0}% by distill prune",
            distill_core::model_dir::display_name(teacher),
            100.0 * pcfg.num_params() as f64 / cfg.num_params() as f64
        ),
        &lineage,
    )
    .tag("pruning")
    .section(
        "What this is",
        format!(
            "The teacher `{}` ({:.1}M parameters) cut by measured importance (block influence and \
             per-layer KL, MLP/head/hidden-channel activations on calibration sequences of \
             `{}`) to {} layers, hidden {}, {} heads ({} KV), MLP {}: {:.1}M parameters. A cut \
             model is not yet a good language model: `distill train` with `student.init = \
             \"model\"` heals it by distillation from the teacher. `prune-report.json` beside this \
             card holds every importance score.",
            teacher.display(),
            cfg.num_params() as f64 / 1e6,
            tokens.display(),
            pcfg.num_hidden_layers,
            pcfg.hidden_size,
            pcfg.num_attention_heads,
            pcfg.num_key_value_heads,
            pcfg.intermediate_size,
            pcfg.num_params() as f64 / 1e6,
        ),
    )
    .section("Candidates measured", table)
    .section("Licence", distill_core::model_card::licence_note(&lineage))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruneReport {
    pub teacher: String,
    pub teacher_params: usize,
    pub tokens: String,
    pub target: Target,
    pub importance: Importance,
    pub candidates: Vec<Candidate>,
    /// Index into `candidates`.
    pub chosen: usize,
    /// What the written dir keeps of the teacher: `plan.layers[i]` is the teacher layer behind
    /// its layer i (the layer map for hidden-state losses).
    pub plan: Plan,
    pub params: usize,
    pub seconds: f64,
}

impl PruneReport {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(REPORT_JSON);
        let text = distill_core::fsio::read_text(&path)?;
        serde_json::from_str(&text).map_err(|e| Error::file(&path, e))
    }

    pub fn chosen(&self) -> &Candidate {
        &self.candidates[self.chosen]
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let c = self.chosen();
        md.push_str(&format!(
            "# Pruned from {}\n\n{} → {} parameters ({:.1}%): {} layers, hidden {}, {} heads / {} KV \
             heads, MLP {}. Chosen: **{}** (KL to the teacher {:.4} nats/token before healing).\n\n",
            self.teacher,
            self.teacher_params,
            self.params,
            100.0 * self.params as f64 / self.teacher_params as f64,
            c.shape.layers,
            c.shape.hidden,
            c.shape.heads,
            c.shape.kv_heads,
            c.shape.intermediate,
            c.name,
            c.kl
        ));
        md.push_str(&format!(
            "Calibration: {} tokens of `{}` (train split) for the activation statistics, the first \
             {} of them for every KL.\n\n## Candidates\n\n| cut | params | KL(teacher ‖ cut) |\n|---|---:|---:|\n",
            self.importance.tokens, self.tokens, self.importance.kl_tokens
        ));
        for (i, c) in self.candidates.iter().enumerate() {
            let mark = if i == self.chosen {
                " **(chosen)**"
            } else {
                ""
            };
            md.push_str(&format!(
                "| {}{mark} | {:.1}M | {:.4} |\n",
                c.name,
                c.params as f64 / 1e6,
                c.kl
            ));
        }
        md.push_str(
            "\n## Layer importance\n\n| layer | block influence | drop-one KL | kept as |\n|---:|---:|---:|---|\n",
        );
        for l in 0..self.importance.block_influence.len() {
            let kept = match self.plan.layers.iter().position(|&x| x == l) {
                Some(i) => format!("layer {i}"),
                None => "dropped".into(),
            };
            md.push_str(&format!(
                "| {l} | {:.4} | {:.4} | {kept} |\n",
                self.importance.block_influence[l], self.importance.drop_one_kl[l]
            ));
        }
        md.push_str("\n## Heads kept per layer\n\n| layer | query heads (teacher indices) | head norms |\n|---:|---|---|\n");
        for (i, &l) in self.plan.layers.iter().enumerate() {
            let norms: Vec<String> = self.importance.heads[l]
                .iter()
                .map(|x| format!("{x:.2}"))
                .collect();
            md.push_str(&format!(
                "| {l} | {:?} | {} |\n",
                self.plan.heads[i],
                norms.join(" ")
            ));
        }
        md
    }
}

/// Builds a model from named tensors (f32) on `device`.
pub fn model_from_tensors(
    cfg: &Config,
    tensors: std::collections::HashMap<String, candle_core::Tensor>,
    device: &Device,
) -> Result<CausalLm> {
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    Ok(CausalLm::load(vb, cfg)?)
}

/// Measures, searches and writes the pruned model dir; `progress` gets one line per stage.
pub fn prune(opts: &PruneOptions, progress: &mut dyn FnMut(String)) -> Result<PruneReport> {
    let start = std::time::Instant::now();
    let tdir = &opts.teacher;
    let distill_core::ModelDir {
        model: teacher,
        config: cfg,
        tokenizer,
        ..
    } = distill_core::ModelDir::load(tdir, &opts.device)?;
    let target = opts.target.resolve(&cfg)?;
    let proposals = search::proposals(&cfg, &target)?;
    let shards = TokenShards::open(&opts.tokens, "train")?;
    shards
        .meta
        .check_tokenizer(&opts.tokens, &tokenizer, tdir)?;
    if opts.calib_sequences == 0 || opts.kl_sequences == 0 || opts.batch_size == 0 {
        return Err(Error::Msg(
            "--calib-sequences, --kl-sequences and --batch-size must be ≥ 1".into(),
        ));
    }
    let batches = importance::calibration_batches(
        &shards,
        opts.calib_sequences,
        opts.batch_size,
        &opts.device,
    )?;
    let kl_batches = opts.kl_sequences.div_ceil(opts.batch_size);
    let (imp, reference) = importance::measure(&teacher, &batches, kl_batches, progress)?;
    let tensors = distill_core::weights::load_tensors(tdir, &opts.device)?;
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut best: Option<(usize, Plan)> = None;
    for p in &proposals {
        let plan = search::plan_for(&cfg, p.shape, p.ranking, &imp)?;
        let pcfg = plan.config(&cfg);
        let model = model_from_tensors(&pcfg, plan.apply(&cfg, &tensors)?, &opts.device)?;
        let kl = reference.kl(&model)?;
        progress(format!(
            "candidate {}: {:.1}M parameters, KL {kl:.4}",
            p.name,
            pcfg.num_params() as f64 / 1e6
        ));
        candidates.push(Candidate {
            name: p.name.clone(),
            shape: p.shape,
            ranking: p.ranking,
            params: pcfg.num_params(),
            kl,
        });
        // A NaN KL (a broken cut) never wins over a number.
        let better = |b: &usize| kl < candidates[*b].kl || candidates[*b].kl.is_nan();
        if best.as_ref().is_none_or(|(b, _)| better(b)) {
            best = Some((candidates.len() - 1, plan));
        }
    }
    let (chosen, plan) = best.expect("proposals is never empty");
    let pcfg = plan.config(&cfg);
    let pruned = plan.apply(&cfg, &tensors)?;
    let card = model_card(tdir, &cfg, &pcfg, &opts.tokens, &candidates, chosen);
    distill_core::save_model_dir(&opts.out, &pcfg, &pruned, &tokenizer, DType::F32, &card)?;
    let report = PruneReport {
        teacher: tdir.display().to_string(),
        teacher_params: cfg.num_params(),
        tokens: opts.tokens.display().to_string(),
        target,
        importance: imp,
        candidates,
        chosen,
        plan,
        params: pcfg.num_params(),
        seconds: start.elapsed().as_secs_f64(),
    };
    write_atomic(
        opts.out.join(REPORT_JSON),
        serde_json::to_string_pretty(&report)
            .expect("the report serialises")
            .as_bytes(),
    )?;
    write_atomic(opts.out.join(REPORT_MD), report.markdown().as_bytes())?;
    Ok(report)
}
