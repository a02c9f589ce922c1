//! distill-eval: how close is a student to its teacher, at what cost — one pass over validation
//! token shards that runs the teacher once and every model on the same batches, then a report
//! (markdown, JSON, PNG plots).

pub mod metrics;
pub mod provenance;
pub mod report;

use candle_core::{DType, Device, Tensor};
use distill_core::shards::TokenShards;
use distill_core::{CausalLm, Error, ModelDir, Result, Tokenizer};
use metrics::{add_row, summarize, Accumulator};
use rayon::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Stop after this many predicted tokens (0 = the whole split).
    pub max_tokens: usize,
    /// Sequences per forward.
    pub batch_size: usize,
    pub split: String,
    /// Prompts for side-by-side greedy generations.
    pub prompts: Vec<String>,
    pub max_new_tokens: usize,
    /// Measure prefill and decode speed (a few seconds per model).
    pub speed: bool,
    /// The exposure-bias metric: KL(teacher‖student) on the student's own continuations.
    pub own_text: OwnTextOptions,
}

/// Settings of the exposure-bias metric: each student continues the first `prompt_tokens` ids
/// of the first `sequences` sequences of the split (held-out prompts) by sampling
/// `new_tokens` at temperature 1 (seeded), and KL(teacher‖student) is averaged over the
/// generated positions. A student trained only on fixed text may do well on it and drift on its
/// own; this measures the second.
#[derive(Debug, Clone, Copy)]
pub struct OwnTextOptions {
    /// 0 = off.
    pub sequences: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
}

impl Default for OwnTextOptions {
    fn default() -> Self {
        Self {
            sequences: 16,
            prompt_tokens: 32,
            new_tokens: 32,
        }
    }
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            max_tokens: 16_384,
            batch_size: 4,
            split: "valid".into(),
            prompts: Vec::new(),
            max_new_tokens: 32,
            speed: true,
            own_text: OwnTextOptions::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub name: String,
    pub path: PathBuf,
    pub is_teacher: bool,
    pub params: usize,
    pub non_embedding_params: usize,
    pub size_on_disk_bytes: u64,
    pub layers: usize,
    pub hidden: usize,
    pub vocab_size: usize,
    pub perplexity: f64,
    pub cross_entropy: f64,
    pub bits_per_byte: f64,
    pub tokens: u64,
    /// Teacher-relative metrics; `None` for a model with another tokenizer (see `note`).
    pub kl_to_teacher: Option<f64>,
    /// KL(teacher‖student) on the student's own sampled continuations of held-out prompts
    /// (exposure bias; see [`OwnTextOptions`]); `None` for the teacher, a model with another
    /// tokenizer, or when not measured.
    pub kl_on_own_text: Option<f64>,
    pub top1_agreement: Option<f64>,
    pub top5_agreement: Option<f64>,
    pub ece: f64,
    pub prefill_tokens_per_second: Option<f64>,
    pub decode_tokens_per_second: Option<f64>,
    /// Prefill speed relative to the teacher's.
    pub speedup: Option<f64>,
    /// The training step, for a checkpoint dir named `step-N` (or `final`) inside a run.
    pub step: Option<u64>,
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt: String,
    /// (model name, completion).
    pub completions: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tokens_dir: PathBuf,
    pub split: String,
    pub tokens: u64,
    pub bytes: u64,
    pub device: String,
    pub threads: usize,
    pub models: Vec<ModelReport>,
    pub generations: Vec<Generation>,
}

/// A model in the pass: its dir opened once, and what the pass has accumulated for it.
struct Loaded {
    md: ModelDir,
    name: String,
    same_tokenizer: bool,
    acc: Accumulator,
}

pub use distill_core::run_dir::checkpoint_step;

fn dir_size(dir: &Path) -> u64 {
    distill_core::weights::safetensors_files(dir)
        .map(|fs| {
            fs.iter()
                .filter_map(|f| std::fs::metadata(f).ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn load(dir: &Path, device: &Device, teacher_tok: Option<&Tokenizer>) -> Result<Loaded> {
    let md = ModelDir::load(dir, device)?;
    let same = teacher_tok.is_none_or(|t| t.hash() == md.tokenizer.hash());
    Ok(Loaded {
        name: md.name(),
        md,
        same_tokenizer: same,
        acc: Accumulator::new(),
    })
}

/// Logits of a batch as host f32 rows (B·T rows of V).
fn logits_rows(model: &CausalLm, ids: &Tensor) -> Result<(Vec<f32>, usize)> {
    let logits = model.forward(ids)?;
    let v = logits.dim(2)?;
    Ok((
        logits
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?,
        v,
    ))
}

/// Evaluates the teacher and every student on the same batches of `tokens_dir`'s split.
pub fn evaluate(
    teacher_dir: &Path,
    students: &[PathBuf],
    tokens_dir: &Path,
    opts: &EvalOptions,
    device: &Device,
    progress: impl FnMut(u64, u64),
) -> Result<Report> {
    let shards = TokenShards::open(tokens_dir, &opts.split)?;
    let mut teacher = load(teacher_dir, device, None)?;
    shards
        .meta
        .check_tokenizer(tokens_dir, &teacher.md.tokenizer, teacher_dir)?;
    let mut models = Vec::new();
    for s in students {
        models.push(load(s, device, Some(&teacher.md.tokenizer))?);
    }
    if shards.is_empty() || shards.seq_len() < 2 {
        return Err(Error::file(
            tokens_dir,
            format!("split '{}' holds no sequences", opts.split),
        ));
    }
    let bytes = score(&shards, &mut teacher, &mut models, opts, device, progress)?;
    let all: Vec<&Loaded> = std::iter::once(&teacher).chain(models.iter()).collect();
    let mut speeds = Vec::new();
    for m in &all {
        speeds.push(if opts.speed {
            let r = distill_teacher::bench::bench_model(
                &m.md.model,
                1,
                shards.seq_len().min(256),
                2,
                32,
            )?;
            Some((r.prefill_tokens_per_second, r.decode_tokens_per_second))
        } else {
            None
        });
    }
    let teacher_prefill = speeds[0].map(|s| s.0);
    let generations = generations(&all, opts)?;
    let mut own = vec![None];
    for m in &models {
        own.push(match m.same_tokenizer {
            true => own_text_kl(&teacher.md.model, &m.md, &shards, opts)?,
            false => None,
        });
    }
    let models = all
        .iter()
        .zip(&speeds)
        .zip(own)
        .enumerate()
        .map(|(i, ((m, speed), own))| {
            let mut r = model_report(m, *speed, teacher_prefill, i == 0, bytes);
            r.kl_on_own_text = own;
            r
        })
        .collect();
    Ok(Report {
        tokens_dir: tokens_dir.to_path_buf(),
        split: opts.split.clone(),
        tokens: teacher.acc.tokens,
        bytes,
        device: distill_core::device::device_name(device),
        threads: distill_core::device::cpu_threads(),
        models,
        generations,
    })
}

/// The scoring pass: every batch of the split through the teacher once and through each student,
/// each row's metrics accumulated per model. Returns the bytes of text the scored tokens cover.
fn score(
    shards: &TokenShards,
    teacher: &mut Loaded,
    models: &mut [Loaded],
    opts: &EvalOptions,
    device: &Device,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64> {
    // A masked split (e.g. answers collected from an API, `distill prepare-collected`) is scored
    // on its target tokens only: the answers, not the prompts that condition them.
    let masked = shards.target_mask(0).is_some();
    if masked {
        if let Some(m) = models.iter().find(|m| !m.same_tokenizer) {
            return Err(Error::file(
                &m.md.dir,
                "has another tokenizer than the teacher: a masked split can only score students \
                 with the teacher's tokenizer",
            ));
        }
    }
    let token_bytes = masked.then(|| teacher.md.tokenizer.token_bytes_table());
    let t = shards.seq_len();
    let per_seq = (t - 1) as u64;
    let n_seqs = if opts.max_tokens == 0 {
        shards.len()
    } else {
        (opts.max_tokens as u64)
            .div_ceil(per_seq)
            .min(shards.len() as u64) as usize
    };
    let total = n_seqs as u64 * per_seq;
    let (mut bytes, mut done) = (0u64, 0u64);
    progress(0, total);
    for b0 in (0..n_seqs).step_by(opts.batch_size.max(1)) {
        let seqs: Vec<usize> = (b0..(b0 + opts.batch_size.max(1)).min(n_seqs)).collect();
        let ids: Vec<u32> = seqs.iter().flat_map(|&i| shards.sequence(i)).collect();
        let b = seqs.len();
        // Labels: position i predicts token i+1; the last position of each sequence is skipped,
        // and so are positions whose next token is not a target (masked splits).
        let masks: Vec<Option<&[u8]>> = seqs.iter().map(|&i| shards.target_mask(i)).collect();
        let rows: Vec<(usize, u32)> = (0..b)
            .flat_map(|s| (0..t - 1).map(move |i| (s, i)))
            .filter(|&(s, i)| masks[s].is_none_or(|m| m[i + 1] == 1))
            .map(|(s, i)| (s * t + i, ids[s * t + i + 1]))
            .collect();
        bytes += match &token_bytes {
            Some(table) => rows
                .iter()
                .map(|&(_, l)| table.get(l as usize).map_or(0, Vec::len) as u64)
                .sum::<u64>(),
            None => (0..b)
                .map(|s| {
                    let text = teacher
                        .md
                        .tokenizer
                        .decode(&ids[s * t + 1..(s + 1) * t], true)?;
                    Ok(text.len() as u64)
                })
                .sum::<Result<u64>>()?,
        };
        let input = Tensor::from_vec(ids.clone(), (b, t), device)?;
        let (tl, tv) = logits_rows(&teacher.md.model, &input)?;
        let summaries: Vec<metrics::RowSummary> = rows
            .par_iter()
            .map(|&(r, _)| summarize(&tl[r * tv..(r + 1) * tv]))
            .collect();
        let row_acc = |logits: &[f32], v: usize| -> Accumulator {
            rows.par_iter()
                .enumerate()
                .fold(Accumulator::new, |mut acc, (k, &(r, label))| {
                    let teacher_row = Some((&tl[r * tv..(r + 1) * tv], &summaries[k]));
                    add_row(&mut acc, &logits[r * v..(r + 1) * v], label, teacher_row);
                    acc
                })
                .reduce(Accumulator::new, |mut a, b| {
                    a.merge(&b);
                    a
                })
        };
        teacher.acc.merge(&row_acc(&tl, tv));
        for m in models.iter_mut() {
            if m.same_tokenizer {
                let (sl, sv) = logits_rows(&m.md.model, &input)?;
                m.acc.merge(&row_acc(&sl, sv));
            } else {
                for s in 0..b {
                    let text = teacher
                        .md
                        .tokenizer
                        .decode(&ids[s * t..(s + 1) * t], false)?;
                    score_retokenized(m, &text, device)?;
                }
            }
        }
        done += b as u64 * per_seq;
        progress(done, total);
    }
    Ok(bytes)
}

/// A model with another tokenizer: the same text re-tokenized, cross-entropy per its own tokens
/// (compare such models by bits per byte).
fn score_retokenized(m: &mut Loaded, text: &str, device: &Device) -> Result<()> {
    let mut own = m.md.tokenizer.encode(text, false)?;
    own.truncate(m.md.config.max_position_embeddings.min(4096));
    if own.len() < 2 {
        return Ok(());
    }
    let n = own.len();
    let input = Tensor::from_vec(own.clone(), (1, n), device)?;
    let (sl, sv) = logits_rows(&m.md.model, &input)?;
    for i in 0..n - 1 {
        add_row(&mut m.acc, &sl[i * sv..(i + 1) * sv], own[i + 1], None);
    }
    Ok(())
}

/// The exposure-bias metric of one student (see [`OwnTextOptions`]): mean KL(teacher‖student)
/// at temperature 1 over the positions that predict a token the student sampled itself. None
/// when the split's sequences are too short for the prompt or the metric is off.
pub fn own_text_kl(
    teacher: &CausalLm,
    student: &ModelDir,
    shards: &TokenShards,
    opts: &EvalOptions,
) -> Result<Option<f64>> {
    let o = opts.own_text;
    let n = o.sequences.min(shards.len());
    if n == 0 || o.new_tokens == 0 || o.prompt_tokens == 0 || o.prompt_tokens > shards.seq_len() {
        return Ok(None);
    }
    let p = o.prompt_tokens;
    let device = student.model.device();
    let stop = student.tokenizer.stop_ids();
    let (mut kl, mut count) = (0f64, 0u64);
    let b = opts.batch_size.max(1);
    for (batch, b0) in (0..n).step_by(b).enumerate() {
        let seqs: Vec<usize> = (b0..(b0 + b).min(n)).collect();
        let prompts: Vec<u32> = seqs
            .iter()
            .flat_map(|&i| shards.sequence(i)[..p].to_vec())
            .collect();
        let params = distill_teacher::generate::SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: batch as u64,
            max_new_tokens: o.new_tokens,
        };
        let sample = distill_teacher::generate::sample_batch(
            &student.model,
            &prompts,
            seqs.len(),
            &stop,
            &params,
        )?;
        let t = sample.seq_len();
        let input = Tensor::from_vec(sample.ids.clone(), (seqs.len(), t), device)?;
        let (tl, tv) = logits_rows(teacher, &input)?;
        let (sl, sv) = logits_rows(&student.model, &input)?;
        let rows: Vec<usize> = (0..seqs.len())
            .flat_map(|r| (0..t - 1).map(move |i| (r, i)))
            .filter(|&(r, i)| sample.is_generated(r, i + 1))
            .map(|(r, i)| r * t + i)
            .collect();
        kl += rows
            .par_iter()
            .map(|&r| {
                let (trow, srow) = (&tl[r * tv..(r + 1) * tv], &sl[r * sv..(r + 1) * sv]);
                metrics::kl_row(trow, summarize(trow).lse, srow, summarize(srow).lse)
            })
            .sum::<f64>();
        count += rows.len() as u64;
    }
    Ok((count > 0).then(|| kl / count as f64))
}

/// Greedy completions of every prompt by every model, side by side.
fn generations(models: &[&Loaded], opts: &EvalOptions) -> Result<Vec<Generation>> {
    let params = distill_teacher::generate::SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        max_new_tokens: opts.max_new_tokens,
    };
    let mut out = Vec::new();
    for p in &opts.prompts {
        let mut completions = Vec::new();
        for m in models {
            let tok = &m.md.tokenizer;
            let ids = tok.encode(p, true)?;
            let gen = distill_teacher::generate::generate(
                &m.md.model,
                &ids,
                &tok.stop_ids(),
                &params,
                |_| Ok(()),
            )?;
            completions.push((m.name.clone(), tok.decode(&gen.tokens, true)?));
        }
        out.push(Generation {
            prompt: p.clone(),
            completions,
        });
    }
    Ok(out)
}

/// One model's row of the report.
fn model_report(
    m: &Loaded,
    speed: Option<(f64, f64)>,
    teacher_prefill: Option<f64>,
    is_teacher: bool,
    bytes: u64,
) -> ModelReport {
    let a = &m.acc;
    let cfg = &m.md.config;
    let rel = m.same_tokenizer && a.compared > 0;
    let frac = |x: u64| rel.then(|| x as f64 / a.compared.max(1) as f64);
    ModelReport {
        name: m.name.clone(),
        path: m.md.dir.clone(),
        is_teacher,
        params: cfg.num_params(),
        non_embedding_params: cfg.num_non_embedding_params(),
        size_on_disk_bytes: dir_size(&m.md.dir),
        layers: cfg.num_hidden_layers,
        hidden: cfg.hidden_size,
        vocab_size: cfg.vocab_size,
        perplexity: a.perplexity(),
        cross_entropy: a.mean_ce(),
        bits_per_byte: a.ce / std::f64::consts::LN_2 / bytes.max(1) as f64,
        tokens: a.tokens,
        kl_to_teacher: rel.then(|| a.kl / a.compared.max(1) as f64),
        kl_on_own_text: None,
        top1_agreement: frac(a.top1),
        top5_agreement: frac(a.top5),
        ece: a.ece(),
        prefill_tokens_per_second: speed.map(|s| s.0),
        decode_tokens_per_second: speed.map(|s| s.1),
        speedup: match (speed, teacher_prefill) {
            (Some(s), Some(t)) => Some(s.0 / t),
            _ => None,
        },
        step: checkpoint_step(&m.md.dir),
        note: (!m.same_tokenizer).then(|| {
            "another tokenizer than the teacher's: perplexity is per its own tokens on the \
             same text (compare bits per byte); no teacher-relative metrics"
                .to_string()
        }),
    }
}
