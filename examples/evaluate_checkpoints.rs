//! Run with: cargo run --release --example evaluate_checkpoints [-- RUN_DIR]
//!
//! Compares a training run's checkpoints (step-N/ and final/) with the teacher: one evaluation
//! pass, a table, and plots of perplexity and KL against step in RUN_DIR/report/. Default run:
//! runs/smollm2-student (from `distill train --config configs/smollm2-student.toml`).

use anyhow::{bail, Result};
use candle_core::Device;
use distill::core::run_dir::RunDir;
use distill::eval::{evaluate, report, EvalOptions};
use std::path::{Path, PathBuf};

fn main() -> Result<()> {
    let run = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "runs/smollm2-student".into()),
    );
    let dir = RunDir::new(&run);
    let mut ckpts: Vec<PathBuf> = dir.checkpoints().into_iter().map(|(_, p)| p).collect();
    if dir.final_dir().join("config.json").exists() {
        ckpts.push(dir.final_dir());
    }
    if ckpts.is_empty() {
        bail!("{}: no checkpoints (step-N/ or final/)", run.display());
    }
    let cfg: toml::Table = toml::from_str(&dir.config_text()?)?;
    let teacher = cfg["teacher"]["model"]
        .as_str()
        .unwrap_or("models/smollm2-135m-instruct");
    let tokens = cfg["data"]["tokens"]
        .as_str()
        .unwrap_or("data/tokens/corpus");
    let opts = EvalOptions {
        max_tokens: 4096,
        speed: false,
        ..Default::default()
    };
    let r = evaluate(
        Path::new(teacher),
        &ckpts,
        Path::new(tokens),
        &opts,
        &Device::Cpu,
        |d, t| {
            eprint!("\reval {d}/{t} tokens");
        },
    )?;
    eprintln!();
    let files = report::write_report(&r, &run.join("report"))?;
    println!("{}", report::markdown(&r));
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(())
}
