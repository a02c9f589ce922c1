//! Run with: cargo run --release --example generate [-- STUDENT_DIR [TEACHER_DIR]]
//!
//! Teacher and student side by side: greedy continuations of a few prompts from each, with the
//! time each took. Default student: runs/smollm2-student/final.

use anyhow::Result;
use candle_core::Device;
use distill::core::ModelDir;
use distill::teacher::generate::{generate, SamplingParams};
use std::path::PathBuf;
use std::time::Instant;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let student = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "runs/smollm2-student/final".into()),
    );
    let teacher = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "models/smollm2-135m-instruct".into()),
    );
    let models = [
        ("teacher", ModelDir::load(&teacher, &Device::Cpu)?),
        ("student", ModelDir::load(&student, &Device::Cpu)?),
    ];
    let prompts = [
        "The capital of France is",
        "Once upon a time",
        "The President said that",
    ];
    let params = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        max_new_tokens: 24,
    };
    for p in prompts {
        println!("### {p}");
        for (name, m) in &models {
            let ids = m.tokenizer.encode(p, true)?;
            let start = Instant::now();
            let out = generate(&m.model, &ids, &m.tokenizer.stop_ids(), &params, |_| Ok(()))?;
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{name:>8} ({:.1} tok/s): {}",
                out.tokens.len() as f64 / secs,
                m.tokenizer.decode(&out.tokens, true)?.replace('\n', " ")
            );
        }
        println!();
    }
    Ok(())
}
