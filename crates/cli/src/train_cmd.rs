//! `distill train`.

use anyhow::{bail, Context, Result};
use clap::Args;
use distill_train::config::RunConfig;
use distill_train::trainer::{run_config, train, Event, RunOptions};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Args)]
pub struct TrainArgs {
    /// Run config (TOML), e.g. configs/smollm2-student.toml.
    #[arg(long, required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Run dir (default runs/NAME).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override train.max_steps.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Override any config key, e.g. --set train.lr=3e-4 --set loss.kind=reverse_kl.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue the run in RUN_DIR from its latest checkpoint (its own config.toml applies).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "out"])]
    resume: Option<PathBuf>,
    /// Start even if the memory plan exceeds the available memory.
    #[arg(long)]
    ignore_memory_plan: bool,
    /// Device for student and live teacher: cpu, cuda, cuda:N (overrides train.device).
    #[arg(long)]
    device: Option<String>,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let mut sets = a.sets.clone();
    if let Some(n) = a.max_steps {
        sets.push(format!("train.max_steps={n}"));
    }
    if let Some(d) = &a.device {
        distill_core::parse_device(d)?;
        sets.push(format!("train.device={d:?}"));
    }
    let (cfg, out, resume) = match &a.resume {
        Some(run) => {
            let base = run_config(run)?;
            let mut table: toml::Table = toml::from_str(&base.to_toml())?;
            for s in &sets {
                distill_train::config::apply_set(&mut table, s)?;
            }
            let cfg = RunConfig::from_table(table).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {e}",
                    distill_core::run_dir::RunDir::new(run)
                        .config_path()
                        .display()
                )
            })?;
            (cfg, run.clone(), true)
        }
        None => {
            let path = a.config.as_ref().expect("clap requires --config");
            let cfg = RunConfig::load(path, &sets)?;
            let out = a
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs").join(&cfg.name));
            (cfg, out, false)
        }
    };
    if cfg.train.max_steps == 0 {
        bail!("train.max_steps is 0: nothing to do");
    }
    let opts = RunOptions {
        out: out.clone(),
        resume,
        ignore_memory_plan: a.ignore_memory_plan,
        stop_after: None,
    };
    let tty = std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::new(cfg.train.max_steps);
    if tty {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "train [{bar:30}] step {pos}/{len} {msg} ETA {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let log_every = cfg.train.log_every.max(1);
    let summary = train(cfg, &opts, |e| {
        match e {
        Event::Plan(p) => bar.suspend(|| eprintln!("{p}")),
        Event::Start { step, max_steps } => {
            bar.set_position(step);
            if step > 0 {
                bar.suspend(|| eprintln!("resuming at step {step} of {max_steps}"));
            }
        }
        Event::Step(m) => {
            bar.set_position(m.step);
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.0} tok/s{}",
                m.loss,
                m.lr,
                m.tokens_per_second,
                time_split(m)
            ));
            if !tty && m.step.is_multiple_of(log_every) {
                eprintln!(
                    "step {} loss {:.4} (kd {:.4}, ce {:.4}{}) lr {:.2e} grad-norm {:.3} {:.0} tok/s{}",
                    m.step,
                    m.loss,
                    m.kd,
                    m.ce,
                    extra_terms(m),
                    m.lr,
                    m.grad_norm,
                    m.tokens_per_second,
                    time_split(m)
                );
            }
        }
        Event::Eval(e) => bar.suspend(|| {
            eprintln!(
                "eval step {}: ce {:.4}, perplexity {:.2}, KL(teacher‖student) {:.4} over {} tokens",
                e.step, e.ce, e.perplexity, e.kl_to_teacher, e.eval_tokens
            )
        }),
        Event::Checkpoint(p) => bar.suspend(|| eprintln!("checkpoint {}", p.display())),
    }
    })?;
    bar.finish_and_clear();
    let eval = summary
        .last_eval
        .map(|e| {
            format!(
                ", validation perplexity {:.2}, KL {:.4}",
                e.perplexity, e.kl_to_teacher
            )
        })
        .unwrap_or_default();
    eprintln!(
        "trained {} steps, {} tokens in {:.1}s{eval} → {}",
        summary.steps,
        summary.tokens,
        summary.seconds,
        summary.final_dir.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct BenchTrainArgs {
    #[arg(long, default_value_t = 4)]
    layers: usize,
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 768)]
    intermediate: usize,
    #[arg(long, default_value_t = 49152)]
    vocab: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 2.0)]
    temperature: f32,
    /// 0: dense targets (full-vocabulary teacher logits); k: top-k sparse targets.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Timed steps (after one warm-up).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Form the (B, T, V) logits and clip as a tensor pass, as before the fused lm-head loss (to
    /// measure what the fusion buys).
    #[arg(long)]
    unfused: bool,
    /// Train this model dir (e.g. `distill prune`'s output) instead of a new model of the shape
    /// above (the shape flags are then ignored).
    #[arg(long)]
    student: Option<std::path::PathBuf>,
    /// Freeze the tied embeddings (as `student.freeze_embeddings = true`).
    #[arg(long)]
    freeze_embeddings: bool,
    /// The products' precision, forward and backward: f32, or bf16 on AMX tiles (as
    /// `train.precision`).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: crate::DeviceArg,
}

pub fn bench(a: BenchTrainArgs) -> Result<()> {
    use distill_train::bench::{bench_train, TrainBenchOptions};
    let device = distill_core::parse_device(&a.device.device)?;
    let precision: distill_core::Precision = a.precision.parse().context("--precision")?;
    let o = TrainBenchOptions {
        layers: a.layers,
        hidden: a.hidden,
        heads: a.heads,
        intermediate: a.intermediate,
        vocab: a.vocab,
        batch: a.batch,
        seq_len: a.seq_len,
        temperature: a.temperature,
        top_k: a.top_k,
        steps: a.steps,
        unfused: a.unfused,
        student: a.student.clone(),
        freeze_embeddings: a.freeze_embeddings,
        precision,
    };
    let r = bench_train(&o, &device).with_context(|| format!("--precision {precision}"))?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let what = match &a.student {
            Some(d) => format!(
                "{}{}",
                d.display(),
                if a.freeze_embeddings {
                    " (embeddings frozen)"
                } else {
                    ""
                }
            ),
            None => format!(
                "{}L/{}/{}H/{} vocab {}",
                a.layers, a.hidden, a.heads, a.intermediate, a.vocab
            ),
        };
        println!(
            "train {what} ({:.1}M params), {}, {} targets, {} products, batch {} × {}: {:.1} tok/s, peak RSS {:.0} MB, {} threads on {}",
            r.params as f64 / 1e6, r.loss_kind, r.targets, r.precision, r.batch, r.seq_len,
            r.tokens_per_second, r.peak_rss_bytes as f64 / 1e6, r.threads, r.device
        );
    }
    Ok(())
}

/// The on-policy KD and hidden-state terms of a step, when the run has them.
fn extra_terms(m: &distill_core::run_dir::StepMetrics) -> String {
    let mut out = String::new();
    if let Some(k) = m.on_policy_kd {
        out.push_str(&format!(", on-policy kd {k:.4}"));
    }
    if let Some(h) = m.hidden {
        out.push_str(&format!(", hidden {h:.4}"));
    }
    out
}

/// Where a step's time went, when it sampled or ran a live teacher: " · sample 41% teacher 22%
/// update 37%".
fn time_split(m: &distill_core::run_dir::StepMetrics) -> String {
    match m.seconds {
        Some(t) if t.sample + t.teacher > 0.0 => {
            let total = (t.sample + t.teacher + t.update).max(1e-9);
            let pct = |x: f64| 100.0 * x / total;
            format!(
                " · sample {:.0}% teacher {:.0}% update {:.0}%",
                pct(t.sample),
                pct(t.teacher),
                pct(t.update)
            )
        }
        _ => String::new(),
    }
}
