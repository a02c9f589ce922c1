//! Run with: cargo run --release --example distill_smollm2 [-- STEPS]
//!
//! The whole distillation path in code, without the CLI: cache the SmolLM2 teacher's top-64
//! targets on a slice of the corpus, distil a 4-layer student from them, evaluate teacher and
//! student. Needs the teacher and tokens that `scripts/quickstart.sh` (or fetch-teacher.sh,
//! fetch-data.sh and `distill prepare`) put in models/ and data/tokens/corpus. A few minutes on a
//! 2-core CPU with the default 32 steps.

use anyhow::{bail, Result};
use candle_core::Device;
use distill::core::ModelDir;
use distill::eval::{evaluate, report, EvalOptions};
use distill::teacher::cache::{build_cache, CacheOptions};
use distill::train::config::RunConfig;
use distill::train::trainer::{train, Event, RunOptions};
use std::path::Path;

#[path = "common/mod.rs"]
mod common;

fn main() -> Result<()> {
    let steps: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(32);
    let teacher_dir = Path::new(common::TEACHER);
    let tokens = &common::tokens();
    if !teacher_dir.exists() || !tokens.exists() {
        bail!(
            "run scripts/quickstart.sh first (it fetches the teacher and prepares {})",
            tokens.display()
        );
    }
    let device = Device::Cpu;

    // 1. Teacher → cache: top-64 targets for the first 32 training sequences.
    let teacher = ModelDir::load(teacher_dir, &device)?;
    let hash = teacher.hash()?;
    let cache_dir = &common::out("cache/example");
    let opts = CacheOptions {
        max_sequences: Some(32),
        splits: vec!["train".into()],
        shard_sequences: 32,
        ..Default::default()
    };
    let s = build_cache(&teacher, &hash, tokens, cache_dir, &opts, |done, total| {
        eprint!("\rcache: {done}/{total} tokens");
    })?;
    eprintln!(
        "\ncached {} tokens, {:.0} bytes/token",
        s.tokens_total, s.bytes_per_token
    );
    drop(teacher);

    // 2. Cache → student: the committed config, shortened.
    let run = &common::out("runs/example");
    let _ = std::fs::remove_dir_all(run);
    let cfg = RunConfig::load(
        Path::new("configs/smollm2-student.toml"),
        &[
            format!("data.tokens=\"{}\"", tokens.display()),
            format!("data.cache=\"{}\"", cache_dir.display()),
            format!("train.max_steps={steps}"),
            "train.batch_size=4".into(),
            "train.warmup_steps=4".into(),
            "train.eval_every=0".into(),
            "train.checkpoint_every=0".into(),
        ],
    )?;
    let opts = RunOptions {
        out: run.to_path_buf(),
        ..Default::default()
    };
    let summary = train(cfg, &opts, |e| {
        if let Event::Step(m) = e {
            eprint!(
                "\rstep {} loss {:.4} {:.0} tok/s   ",
                m.step, m.loss, m.tokens_per_second
            );
        }
    })?;
    eprintln!(
        "\ntrained {} steps → {}",
        summary.steps,
        summary.final_dir.display()
    );

    // 3. Teacher and student, side by side.
    let eval_opts = EvalOptions {
        max_tokens: 1024,
        prompts: vec!["The capital of France is".into()],
        max_new_tokens: 12,
        ..Default::default()
    };
    let r = evaluate(
        teacher_dir,
        std::slice::from_ref(&summary.final_dir),
        tokens,
        &eval_opts,
        &device,
        |_, _| {},
    )?;
    report::write_report(&r, &run.join("report"))?;
    println!("{}", report::markdown(&r));
    Ok(())
}
