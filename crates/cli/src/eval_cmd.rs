//! `distill eval`.

use crate::progress::{self, Unit};
use anyhow::{bail, Context, Result};
use clap::Args;
use distill_eval::{evaluate, report, EvalOptions};
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    /// The teacher model dir (HF layout).
    #[arg(long)]
    teacher: PathBuf,
    /// Student model dirs (any HF dirs; a run's checkpoints: --student runs/NAME/step-*).
    #[arg(long, num_args = 1.., required = true)]
    student: Vec<PathBuf>,
    /// Token shards dir; its validation split is evaluated.
    #[arg(long)]
    tokens: PathBuf,
    #[arg(long, default_value = "valid")]
    split: String,
    /// Predicted tokens to evaluate (0 = the whole split).
    #[arg(long, default_value_t = 16384)]
    max_tokens: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Report dir (default: report/ beside the first student, e.g. runs/NAME/report).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Prompts (one per line) for side-by-side greedy generations.
    #[arg(long, default_value = "data/prompts/eval.txt")]
    prompts: PathBuf,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Skip the speed measurements.
    #[arg(long)]
    no_speed: bool,
    /// Exposure bias: held-out prompts (the first --own-text-prompt tokens of this many
    /// sequences) each student continues itself; KL(teacher‖student) on its own tokens. 0 = off.
    #[arg(long, default_value_t = 16)]
    own_text_sequences: usize,
    #[arg(long, default_value_t = 32)]
    own_text_prompt: usize,
    /// Tokens each student samples per prompt (temperature 1, seeded).
    #[arg(long, default_value_t = 32)]
    own_text_tokens: usize,
    /// Print report.json to stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: crate::DeviceArg,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let device = distill_core::parse_device(&a.device.device)?;
    let prompts: Vec<String> = if a.prompts.exists() {
        std::fs::read_to_string(&a.prompts)
            .with_context(|| format!("reading {}", a.prompts.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    } else if a.prompts == std::path::Path::new("data/prompts/eval.txt") {
        Vec::new() // the default set is optional outside the repo
    } else {
        bail!("{}: prompts file does not exist", a.prompts.display());
    };
    let opts = EvalOptions {
        max_tokens: a.max_tokens,
        batch_size: a.batch_size.max(1),
        split: a.split.clone(),
        prompts,
        max_new_tokens: a.max_new_tokens,
        speed: !a.no_speed,
        own_text: distill_eval::OwnTextOptions {
            sequences: a.own_text_sequences,
            prompt_tokens: a.own_text_prompt,
            new_tokens: a.own_text_tokens,
        },
    };
    let mut bar: Option<Box<dyn FnMut(u64)>> = None;
    let r = evaluate(
        &a.teacher,
        &a.student,
        &a.tokens,
        &opts,
        &device,
        |done, total| {
            let f = bar.get_or_insert_with(|| Box::new(progress::bar(total, Unit::Tokens, "eval")));
            f(done)
        },
    )?;
    let out = a.out.clone().unwrap_or_else(|| {
        let first = &a.student[0];
        match first.parent() {
            Some(p) if distill_eval::checkpoint_step(first).is_some() => p.join("report"),
            _ => PathBuf::from("report"),
        }
    });
    let files = report::write_report(&r, &out)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let md = report::markdown(&r);
        // The headline table (the markdown up to the notes).
        for line in md.lines().take_while(|l| !l.starts_with("KL(t‖s)")) {
            println!("{line}");
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
