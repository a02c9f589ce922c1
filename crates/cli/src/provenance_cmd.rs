//! `distill provenance`: was the suspect distilled from a candidate teacher? Gathers the signals
//! (white-box: next-token distributions of model dirs on held-out token shards; black-box: greedy
//! answers, and top logprobs where an API gives them, of model dirs or OpenAI-compatible
//! endpoints), then runs `distill_eval::provenance::test` and writes its report.

use anyhow::{bail, Context, Result};
use clap::Args;
use distill_api::client::{collect, CollectOptions, Collected};
use distill_core::shards::TokenShards;
use distill_core::{parse_device, ModelDir};
use distill_eval::provenance::{
    black_box_similarities, markdown, test, white_box_similarities, write_report, Answers,
    BlackBoxOptions, TestOptions,
};
use distill_teacher::generate::{generate, SamplingParams};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct ProvenanceArgs {
    /// Candidate teacher(s): a model dir, or an endpoint `http(s)://HOST/v1#MODEL` (`#MODEL`
    /// optional: the first model the endpoint lists). Several are Holm-corrected.
    #[arg(long, required = true, num_args = 1..)]
    teacher: Vec<String>,
    /// The model(s) under test (dirs or endpoints); several are tested one by one against the
    /// same teachers and references, sharing every answer (a zoo in one run).
    #[arg(long, required = true, num_args = 1..)]
    suspect: Vec<String>,
    /// Independent reference models (dirs or endpoints); at least one is needed for a verdict.
    #[arg(long, num_args = 1..)]
    reference: Vec<String>,
    /// White-box: held-out token shards (their validation split); every model must be a dir
    /// with the teacher's tokenizer.
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    tokens: Option<PathBuf>,
    /// Black-box: prompts (one per line, or JSONL with "prompt" or "messages"), answered greedily.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Prompts (or held-out sequences) used, from the start of the file.
    #[arg(long, default_value_t = 500)]
    max_prompts: usize,
    /// Black-box: tokens generated per answer, and words of the answers compared.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// Black-box: ask for plain-text completions of each prompt's text (`/v1/completions`;
    /// model dirs continue the text itself) instead of chat answers. For models trained on
    /// prose rather than conversations.
    #[arg(long)]
    completions: bool,
    /// Black-box: top logprobs asked of endpoints (0 = none; at most 20, 5 with --completions).
    #[arg(long, default_value_t = 5)]
    top_logprobs: usize,
    /// Black-box: the weight of the top-logprob overlap in the similarity of two answers, when
    /// every model's API returned top logprobs (the text agreement gets the rest).
    #[arg(long, default_value_t = BlackBoxOptions::default().top_weight)]
    top_weight: f64,
    /// Black-box: generated positions whose top logprobs are compared (the first, then the next
    /// ones while the two answers agree).
    #[arg(long, default_value_t = BlackBoxOptions::default().top_positions)]
    top_positions: usize,
    /// Black-box: requests in flight to each endpoint (a local `distill serve` batches up to its
    /// --max-batch of them into one forward; a rate-limited API may want fewer).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// The environment variable holding the endpoints' API key.
    #[arg(long, default_value = "DISTILL_API_KEY")]
    api_key_env: String,
    /// Significance level of the verdict.
    #[arg(long, default_value_t = 0.01)]
    alpha: f64,
    #[arg(long, default_value_t = 9999)]
    permutations: usize,
    /// Report dir (report.md, report.json, agreement.png; with several suspects one dir each
    /// and summary.md).
    #[arg(long, default_value = "provenance")]
    out: PathBuf,
    /// Where endpoints' answers are kept (one `distill collect` dir per model; a rerun reuses
    /// them, e.g. with fewer --max-prompts). Default: OUT/answers.
    #[arg(long)]
    answers_dir: Option<PathBuf>,
    /// Print report.json to stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: crate::DeviceArg,
}

/// A model named on the command line.
enum Source {
    Dir(PathBuf),
    Endpoint { base: String, model: Option<String> },
}

impl Source {
    fn parse(s: &str) -> Self {
        if s.starts_with("http://") || s.starts_with("https://") {
            let (base, model) = match s.split_once('#') {
                Some((b, m)) if !m.is_empty() => (b.to_string(), Some(m.to_string())),
                Some((b, _)) => (b.to_string(), None),
                None => (s.to_string(), None),
            };
            Source::Endpoint { base, model }
        } else {
            Source::Dir(PathBuf::from(s))
        }
    }

    fn label(&self) -> String {
        match self {
            Source::Dir(d) => distill_core::model_dir::display_name(d),
            Source::Endpoint { base, model } => model.clone().unwrap_or_else(|| base.clone()),
        }
    }
}

/// A file-name-safe form of a label.
fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub fn run(a: ProvenanceArgs) -> Result<()> {
    let device = parse_device(&a.device.device)?;
    let black_box = BlackBoxOptions {
        words: a.max_new_tokens,
        top_weight: a.top_weight,
        top_positions: a.top_positions,
    };
    if a.prompts.is_some() {
        black_box.check()?; // before any model is asked
    }
    let mut specs: Vec<String> = a.teacher.clone();
    specs.extend(a.suspect.iter().cloned());
    specs.extend(a.reference.iter().cloned());
    let sources: Vec<Source> = specs.iter().map(|s| Source::parse(s)).collect();
    let mut labels: Vec<String> = sources.iter().map(Source::label).collect();
    // Distinct names in the report even when two dirs share one.
    // Distinct file names too (answers and reports live under slug(label)): a spec given twice,
    // or two labels with one slug, get their place in the list appended.
    for i in 0..labels.len() {
        if labels[..i].contains(&labels[i]) {
            labels[i] = format!("{} ({})", labels[i], specs[i]);
        }
        if labels[..i].iter().any(|l| slug(l) == slug(&labels[i])) {
            labels[i] = format!("{} #{}", labels[i], i + 1);
        }
    }
    let (nt, ns) = (a.teacher.len(), a.suspect.len());
    let teachers: Vec<usize> = (0..nt).collect();
    let suspects: Vec<usize> = (nt..nt + ns).collect();
    let references: Vec<usize> = (nt + ns..sources.len()).collect();
    if references.is_empty() {
        bail!(
            "no --reference models: agreement with the teacher alone cannot tell distillation \
             from shared training data or a shared model family; give at least one independent \
             reference model"
        );
    }
    let opts = TestOptions {
        alpha: a.alpha,
        permutations: a.permutations.max(99),
        seed: 0,
    };
    let (sims, mode) = match (&a.tokens, &a.prompts) {
        (Some(tokens), _) => (
            white_box(&sources, &labels, tokens, a.max_prompts, &device)?,
            "white-box",
        ),
        (None, Some(prompts)) => {
            let mut answers = Vec::new();
            for (src, label) in sources.iter().zip(&labels) {
                if std::io::stderr().is_terminal() {
                    eprintln!("asking {label} …");
                }
                answers.push(answers_of(src, label, prompts, &a, &device)?);
            }
            (black_box_similarities(&answers, black_box)?, "black-box")
        }
        (None, None) => bail!("give --tokens DIR (white-box) or --prompts FILE (black-box)"),
    };
    let mut reports = Vec::new();
    for &suspect in &suspects {
        reports.push(test(&sims, &teachers, suspect, &references, mode, opts)?);
    }
    let mut files = Vec::new();
    for r in &reports {
        let dir = match reports.len() {
            1 => a.out.clone(),
            _ => a.out.join(slug(&r.suspect)),
        };
        files.extend(write_report(r, &dir)?);
    }
    if reports.len() > 1 {
        let summary = a.out.join("summary.md");
        distill_core::fsio::write_atomic(&summary, summary_table(&reports).as_bytes())?;
        files.push(summary);
    }
    if a.json {
        match reports.len() {
            1 => println!("{}", serde_json::to_string_pretty(&reports[0])?),
            _ => println!("{}", serde_json::to_string_pretty(&reports)?),
        }
    } else if reports.len() == 1 {
        print!("{}", markdown(&reports[0]));
    } else {
        print!("{}", summary_table(&reports));
    }
    for r in &reports {
        for v in &r.teachers {
            eprintln!(
                "{}: {} from {} (p = {:.2e}, Holm {:.2e}, effect size {:.2}, α = {})",
                r.suspect,
                if v.derived {
                    "DERIVED"
                } else {
                    "not shown to be derived"
                },
                v.teacher,
                v.p_value,
                v.p_adjusted,
                v.effect_size,
                r.alpha
            );
        }
    }
    eprintln!(
        "report: {}",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// One row per (suspect, candidate teacher).
fn summary_table(reports: &[distill_eval::provenance::ProvenanceReport]) -> String {
    let mut s = String::from(
        "| suspect | candidate teacher | sim(suspect, teacher) | max sim(reference, teacher) | p | p (Holm) | effect size | verdict |\n|---|---|---:|---:|---:|---:|---:|---|\n",
    );
    for r in reports {
        for v in &r.teachers {
            let best_ref = v
                .reference_similarity
                .iter()
                .map(|x| x.1)
                .fold(f64::NEG_INFINITY, f64::max);
            s.push_str(&format!(
                "| {} | {} | {:.3} | {:.3} | {:.2e} | {:.2e} | {:.2} | {} |\n",
                r.suspect,
                v.teacher,
                v.suspect_similarity,
                best_ref,
                v.p_value,
                v.p_adjusted,
                v.effect_size,
                if v.derived {
                    "**derived**"
                } else {
                    "not shown"
                }
            ));
        }
    }
    s
}

fn white_box(
    sources: &[Source],
    labels: &[String],
    tokens: &Path,
    max: usize,
    device: &candle_core::Device,
) -> Result<distill_eval::provenance::Similarities> {
    let mut dirs = Vec::new();
    for (s, label) in sources.iter().zip(labels) {
        match s {
            Source::Dir(d) => dirs.push(ModelDir::load(d, device)?),
            Source::Endpoint { .. } => bail!(
                "{label}: an endpoint has no next-token distributions to compare white-box; use \
                 --prompts FILE for a black-box test"
            ),
        }
    }
    let shards = TokenShards::open(tokens, "valid")?;
    shards
        .meta
        .check_tokenizer(tokens, &dirs[0].tokenizer, &dirs[0].dir)?;
    for d in &dirs[1..] {
        if d.tokenizer.hash() != dirs[0].tokenizer.hash() {
            bail!(
                "{}: another tokenizer than {}'s: a white-box comparison needs the same token ids; \
                 use --prompts FILE for a black-box test",
                d.dir.join("tokenizer.json").display(),
                dirs[0].dir.display()
            );
        }
    }
    let models: Vec<(String, &distill_core::CausalLm)> = labels
        .iter()
        .cloned()
        .zip(dirs.iter().map(|d| &d.model))
        .collect();
    Ok(white_box_similarities(&models, &shards, max, device)?)
}

/// One model's greedy answers to the prompts: generated here for a model dir (text only), asked
/// of an endpoint through `distill collect`'s client (with top logprobs when it gives them),
/// resumably under `OUT/answers/LABEL/`.
fn answers_of(
    src: &Source,
    label: &str,
    prompts: &Path,
    a: &ProvenanceArgs,
    device: &candle_core::Device,
) -> Result<Answers> {
    let all = distill_api::client::read_prompts(prompts)?;
    let n = all.len().min(a.max_prompts);
    match src {
        Source::Dir(dir) => {
            let md = ModelDir::load(dir, device)?;
            let params = SamplingParams {
                max_new_tokens: a.max_new_tokens,
                ..Default::default()
            };
            let mut texts = Vec::with_capacity(n);
            for messages in &all[..n] {
                let ids =
                    distill_core::prompts::encode_prompt(&md.tokenizer, messages, !a.completions)?;
                let g = generate(&md.model, &ids, &md.tokenizer.stop_ids(), &params, |_| {
                    Ok(())
                })?;
                texts.push(md.tokenizer.decode(&g.tokens, true)?);
            }
            Ok(Answers {
                name: label.to_string(),
                texts,
                top: None,
            })
        }
        Source::Endpoint { base, model } => {
            let out = a
                .answers_dir
                .clone()
                .unwrap_or_else(|| a.out.join("answers"))
                .join(slug(label));
            let opts = CollectOptions {
                endpoint: base.clone(),
                api_key: std::env::var(&a.api_key_env).ok(),
                model: model.clone(),
                prompts: prompts.to_path_buf(),
                out: out.clone(),
                concurrency: a.concurrency,
                top_logprobs: (a.top_logprobs > 0).then_some(a.top_logprobs),
                max_tokens: a.max_new_tokens,
                temperature: 0.0,
                seed: None,
                system: None,
                resume: true,
                max_retries: 2,
                limit: Some(n),
                completions: a.completions,
            };
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let summary = rt
                .block_on(collect(&opts, |_| {}))
                .map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
            if let Some((i, why)) = summary.failures.first() {
                bail!(
                    "{label}: {} of {n} prompts got no answer (prompt {i}: {})",
                    summary.failures.len(),
                    why.lines().next().unwrap_or("")
                );
            }
            let (mut rows, _) = distill_core::fsio::read_jsonl::<Collected>(
                &summary.responses,
                "a collected response",
            )?;
            rows.retain(|r| r.index < n); // a kept collection may hold more prompts
            rows.sort_by_key(|r| r.index);
            rows.dedup_by_key(|r| r.index);
            if rows.len() != n {
                bail!(
                    "{}: {} answers for {n} prompts",
                    summary.responses.display(),
                    rows.len()
                );
            }
            // The top-logprob signal needs alternatives on every answer that has tokens (an API
            // that returns `logprobs` with empty `top_logprobs` offers none).
            let has_top = rows.iter().all(|r| {
                r.logprobs
                    .as_ref()
                    .is_some_and(|l| l.iter().all(|t| !t.top_logprobs.is_empty()))
            });
            let top = has_top.then(|| {
                rows.iter()
                    .map(|r| {
                        r.logprobs
                            .as_deref()
                            .unwrap_or_default()
                            .iter()
                            .map(position_top)
                            .collect()
                    })
                    .collect()
            });
            Ok(Answers {
                name: label.to_string(),
                texts: rows.into_iter().map(|r| r.completion).collect(),
                top,
            })
        }
    }
}

/// One generated position's alternatives for the top-logprob signal: the token the API generated
/// first (at temperature 0 it need not be the most likely one listed), then the others, each
/// keyed by its bytes when the API gives them (lossy text would make different partial UTF-8
/// tokens one "�").
fn position_top(t: &distill_api::client::TokenInfo) -> distill_eval::provenance::TopK {
    fn key(token: &str, bytes: &Option<Vec<u8>>) -> String {
        match bytes {
            Some(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
            None => token.to_string(),
        }
    }
    let chosen = key(&t.token, &t.bytes);
    let mut out = vec![(chosen.clone(), t.logprob)];
    out.extend(
        t.top_logprobs
            .iter()
            .map(|x| (key(&x.token, &x.bytes), x.logprob))
            .filter(|(k, _)| *k != chosen),
    );
    out
}
