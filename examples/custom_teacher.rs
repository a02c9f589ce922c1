//! Run with: cargo run --release --example custom_teacher -- /path/to/hf-model-dir [TEXT_DIR]
//!
//! The swap-in path: any local Hugging Face dir (config.json + *.safetensors + tokenizer.json) of
//! a Llama / SmolLM / TinyLlama / Llama-3.x, Mistral or Qwen2 model works as the teacher — e.g. a
//! Qwen2.5-0.5B-Instruct or TinyLlama-1.1B dir you already have. This example loads it, asks it
//! a question, tokenizes text with its tokenizer (data/sample by default), and distils a tiny
//! student from it online (the live teacher inside the loop, no cache) for a few steps.

use anyhow::{Context, Result};
use candle_core::Device;
use distill::core::prepare::{prepare, PrepareOptions};
use distill::core::ChatMessage;
use distill::core::ModelDir;
use distill::teacher::generate::{generate, SamplingParams};
use distill::train::config::RunConfig;
use distill::train::trainer::{train, RunOptions};
use std::path::PathBuf;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "models/smollm2-135m-instruct".into()),
    );
    let text = PathBuf::from(args.next().unwrap_or_else(|| "data/sample".into()));
    let device = Device::Cpu;
    let teacher =
        ModelDir::load(&dir, &device).with_context(|| format!("loading {}", dir.display()))?;
    let c = &teacher.config;
    println!(
        "{}: {:?}, {} layers, hidden {}, {} heads ({} kv), vocab {}, {:.1}M parameters",
        dir.display(),
        c.arch,
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
        c.num_params() as f64 / 1e6
    );
    let tok = &teacher.tokenizer;
    let prompt = tok
        .apply_chat_template(&[ChatMessage::new("user", "What is distillation?")], true)
        .unwrap_or_else(|_| "Distillation is".into());
    let ids = tok.encode(&prompt, true)?;
    let params = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        max_new_tokens: 32,
    };
    let out = generate(&teacher.model, &ids, &tok.stop_ids(), &params, |_| Ok(()))?;
    println!("teacher: {}", tok.decode(&out.tokens, true)?.trim());

    // Tokens made with this teacher's tokenizer, then a short online distillation run.
    let work = std::env::temp_dir().join(format!("distill-custom-{}", std::process::id()));
    let tokens = work.join("tokens");
    let opts = PrepareOptions {
        seq_len: 64,
        valid_fraction: 0.2,
        blank_line_docs: true,
        ..Default::default()
    };
    let meta = prepare(tok, std::slice::from_ref(&text), &tokens, &opts, |_| {})?;
    println!(
        "tokenized {}: {} training sequences of 64",
        text.display(),
        meta.splits["train"].sequences
    );
    drop(teacher);
    let cfg = RunConfig::from_table(toml::from_str(&format!(
        r#"
name = "custom"
[data]
tokens = "{}"
[teacher]
model = "{}"
[student]
layers = 2
hidden = 128
heads = 4
intermediate = 256
[train]
batch_size = 2
max_steps = 10
warmup_steps = 2
log_every = 1
eval_every = 10
eval_sequences = 4
checkpoint_every = 0
"#,
        tokens.display(),
        dir.display()
    ))?)
    .map_err(anyhow::Error::msg)?;
    let s = train(
        cfg,
        &RunOptions {
            out: work.join("run"),
            ..Default::default()
        },
        |_| {},
    )?;
    if let Some(e) = s.last_eval {
        println!(
            "student after {} steps: validation perplexity {:.1}, KL to the teacher {:.3}",
            s.steps, e.perplexity, e.kl_to_teacher
        );
    }
    println!("student dir: {}", s.final_dir.display());
    Ok(())
}
