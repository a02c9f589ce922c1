//! Run with: cargo run --release --example api_distillation [-- PROMPTS STEPS]
//!
//! Black-box distillation, both sides, on loopback: `distill serve` puts the SmolLM2 teacher
//! behind an OpenAI-compatible API with an API key and an audit log; a collector asks it PROMPTS
//! chat prompts (default 200, from the chatterbot corpus that scripts/fetch-data.sh fetched) with
//! top-20 logprobs; the answers become training data; four students of the same shape train for
//! STEPS steps (default 24) on the same prompts:
//!
//! - `api-logprobs`: KL to the API's top-20 alternatives at every answer token;
//! - `api-text`: the answers as text (sequence-level distillation, no logprobs needed);
//! - `white-box`: KL to the local teacher's own top-64 on the very same sequences (what a lab with
//!   the weights gets from the same teacher tokens);
//! - `no-teacher`: the same prompts without the teacher's answers (cross-entropy on the prompts).
//!
//! All four are evaluated on the teacher's answers to 40 held-out prompts, scored on the answer
//! tokens given their prompts (perplexity, KL to the teacher, agreement), and the server's usage
//! report shows what the collection looked like from its side.
//! About ten minutes on a 2-core CPU. Needs models/smollm2-135m-instruct and data/raw/prompts
//! (scripts/quickstart.sh, or scripts/fetch-teacher.sh + scripts/fetch-data.sh).

use anyhow::{bail, Context, Result};
use candle_core::Device;
use distill::api::client::{collect, read_prompts, CollectOptions};
use distill::api::convert::{prepare_collected, PrepareCollectedOptions};
use distill::api::guard::KeySpec;
use distill::api::server::{serve, AppState, ServeOptions};
use distill::core::shards::{SplitWriter, TokenShardsMeta, FORMAT_VERSION};
use distill::core::{ChatMessage, Tokenizer};
use distill::eval::{evaluate, report, EvalOptions};
use distill::train::config::RunConfig;
use distill::train::trainer::{train, Event, RunOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

/// Held-out prompts: 40, or a fifth of a small run's (CI's fixtures).
fn held_out(n_prompts: usize) -> usize {
    (n_prompts / 5).clamp(2, 40)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let n_prompts: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(200);
    let steps: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(24);
    let teacher = Path::new(common::TEACHER);
    let source = &common::prompts();
    if !teacher.exists() || !source.exists() {
        bail!(
            "run scripts/quickstart.sh first (it fetches the teacher and {})",
            source.display()
        );
    }
    let work = &common::out("runs/api-distillation");
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;

    // The prompts: every k-th of the corpus, the last HELD_OUT kept for evaluation.
    #[allow(non_snake_case)]
    let HELD_OUT = held_out(n_prompts);
    let all = read_prompts(source)?;
    let stride = (all.len() / (n_prompts + HELD_OUT)).max(1);
    let picked: Vec<&Vec<ChatMessage>> = all
        .iter()
        .step_by(stride)
        .take(n_prompts + HELD_OUT)
        .collect();
    let write_prompts = |path: &Path, ps: &[&Vec<ChatMessage>]| -> Result<()> {
        let lines: Vec<String> = ps
            .iter()
            .map(|m| serde_json::json!({ "messages": m }).to_string())
            .collect();
        std::fs::write(path, lines.join("\n") + "\n")?;
        Ok(())
    };
    let (train_prompts, eval_prompts) = picked.split_at(picked.len() - HELD_OUT);
    write_prompts(&work.join("prompts-train.jsonl"), train_prompts)?;
    write_prompts(&work.join("prompts-eval.jsonl"), eval_prompts)?;

    // 1. The lab's side: the teacher behind an API, with a key and an audit log.
    let rt = tokio::runtime::Runtime::new()?;
    let keys = vec![
        KeySpec {
            key: "sk-collector-0001".into(),
            name: "collector".into(),
            requests_per_minute: Some(600),
            tokens_per_day: None,
            admin: false,
        },
        KeySpec {
            key: "sk-admin-0001".into(),
            name: "admin".into(),
            requests_per_minute: None,
            tokens_per_day: None,
            admin: true,
        },
    ];
    let state = AppState::load(&ServeOptions {
        model_dir: teacher.to_path_buf(),
        model_name: None,
        device: Device::Cpu,
        max_batch: 16,
        keys: Some(keys),
        audit_log: Some(work.join("audit.jsonl")),
        rate_window: Duration::from_secs(60),
        quota_state: None,
    })?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(serve(listener, state, async {
        let _ = stop_rx.await;
    }));
    eprintln!("serving the teacher on {base}/v1");

    // 2. The collector's side: answers with top-20 logprobs, 8 requests in flight.
    let collect_opts = |prompts: &str, out: &str| CollectOptions {
        endpoint: base.clone(),
        api_key: Some("sk-collector-0001".into()),
        model: None,
        prompts: work.join(prompts),
        out: work.join(out),
        concurrency: 8,
        top_logprobs: Some(20),
        max_tokens: 40,
        temperature: 0.0,
        seed: None,
        system: None,
        resume: false,
        max_retries: 3,
        limit: None,
        completions: false,
    };
    let t0 = Instant::now();
    for (prompts, out) in [
        ("prompts-train.jsonl", "collected-train"),
        ("prompts-eval.jsonl", "collected-eval"),
    ] {
        let s = rt.block_on(collect(&collect_opts(prompts, out), |p| {
            eprint!("\rcollect {out}: {}/{}  ", p.done + p.skipped, p.total);
        }))?;
        eprintln!(
            "\r{out}: {} answers, {} completion tokens in {:.0}s",
            s.progress.done,
            s.progress.completion_tokens,
            s.elapsed.as_secs_f64()
        );
        if !s.failures.is_empty() {
            bail!("{} prompts failed: {:?}", s.failures.len(), s.failures[0]);
        }
    }
    let collect_secs = t0.elapsed().as_secs_f64();

    // The server's view of it.
    let usage: serde_json::Value = rt.block_on(async {
        reqwest::Client::new()
            .get(format!("{base}/v1/admin/usage"))
            .bearer_auth("sk-admin-0001")
            .send()
            .await?
            .json()
            .await
    })?;
    let _ = stop_tx.send(());
    let _ = rt.block_on(server);

    // 3. Answers → training data: masked token shards + the API's top-20 as a teacher cache.
    let prepared = work.join("prepared");
    let p = prepare_collected(&PrepareCollectedOptions {
        collected: work.join("collected-train"),
        tokenizer: teacher.to_path_buf(),
        out: prepared.clone(),
        seq_len: 128,
        shard_sequences: 4096,
    })?;
    eprintln!(
        "{} answers → {} sequences, {} teacher tokens to learn ({} truncated, {} unmapped)",
        p.answers, p.sequences, p.target_tokens, p.truncated, p.unmapped
    );
    // The baseline's data: the same prompts alone, no answers.
    let tok = Tokenizer::from_dir(teacher)?;
    let prompts_only = work.join("prompts-only");
    write_tokens(
        &tok,
        &prompts_only,
        "train",
        128,
        train_prompts.iter().map(|m| (m.to_vec(), None)),
    )?;
    // The evaluation set: the teacher's answers to the held-out prompts, scored on the answer
    // tokens only (a masked split), each conditioned on its prompt.
    let held_out = prepare_collected(&PrepareCollectedOptions {
        collected: work.join("collected-eval"),
        tokenizer: teacher.to_path_buf(),
        out: work.join("eval-answers"),
        seq_len: 128,
        shard_sequences: 4096,
    })?;

    // 4. Four students, same shape, same steps.
    let common = |tokens: &Path| -> Vec<String> {
        vec![
            format!("teacher.model=\"{}\"", teacher.display()),
            format!("data.tokens=\"{}\"", tokens.display()),
            format!("train.max_steps={steps}"),
            "train.batch_size=8".into(),
            "train.warmup_steps=2".into(),
            "train.eval_every=0".into(),
            "train.checkpoint_every=0".into(),
            "train.log_every=4".into(),
            "loss.temperature=1.0".into(),
            "student.preset=\"4l-256\"".into(),
            "train.lr=2e-3".into(),
            "train.min_lr=2e-4".into(),
        ]
    };
    let cache = prepared.join("cache");
    let api_tokens = prepared.join("tokens");
    let runs: Vec<(&str, Vec<String>)> = vec![
        (
            "api-logprobs",
            [
                common(&api_tokens),
                vec![format!("data.cache=\"{}\"", cache.display())],
            ]
            .concat(),
        ),
        (
            "api-text",
            [
                common(&api_tokens),
                vec!["loss.alpha_kd=0.0".into(), "loss.alpha_ce=1.0".into()],
            ]
            .concat(),
        ),
        (
            "white-box",
            [common(&api_tokens), vec!["teacher.top_k=64".into()]].concat(),
        ),
        (
            "no-teacher",
            [
                common(&prompts_only),
                vec!["loss.alpha_kd=0.0".into(), "loss.alpha_ce=1.0".into()],
            ]
            .concat(),
        ),
    ];
    let mut finals: Vec<PathBuf> = Vec::new();
    for (name, sets) in runs {
        // configs/tiny.toml names no cache; each run adds what it learns from.
        let cfg = RunConfig::load(Path::new("configs/tiny.toml"), &sets)
            .with_context(|| format!("config of {name}"))?;
        let out = work.join(name);
        let t = Instant::now();
        let s = train(
            cfg,
            &RunOptions {
                out: out.clone(),
                ..Default::default()
            },
            |e| {
                if let Event::Step(m) = e {
                    eprint!("\r{name}: step {} loss {:.3}   ", m.step, m.loss);
                }
            },
        )?;
        eprintln!(
            "\r{name}: {} steps in {:.0}s → {}",
            s.steps,
            t.elapsed().as_secs_f64(),
            s.final_dir.display()
        );
        finals.push(s.final_dir);
    }

    // 5. Evaluation on the held-out answers.
    let r = evaluate(
        teacher,
        &finals,
        &held_out.tokens_dir,
        &EvalOptions {
            max_tokens: 0,
            speed: false,
            split: "train".into(),
            ..Default::default()
        },
        &Device::Cpu,
        |_, _| {},
    )?;
    report::write_report(&r, &work.join("report"))?;
    println!("{}", report::markdown(&r));
    println!(
        "collection: {} train + {HELD_OUT} held-out prompts in {collect_secs:.0}s; the server's usage report:\n",
        train_prompts.len()
    );
    println!("{}", usage["markdown"].as_str().unwrap_or_default());
    Ok(())
}

/// Writes `docs` (chat turns, and an assistant answer when given) as packed token shards of one
/// split: whole texts, every token a target (the baseline's prompts-only data).
fn write_tokens(
    tok: &Tokenizer,
    dir: &Path,
    split: &str,
    seq_len: usize,
    docs: impl Iterator<Item = (Vec<ChatMessage>, Option<String>)>,
) -> Result<()> {
    let eos = tok.eos_id().context("the teacher's tokenizer has no EOS")?;
    let mut w = SplitWriter::new(dir, split, seq_len, 4096);
    std::fs::create_dir_all(dir)?;
    for (mut messages, answer) in docs {
        let generation_prompt = answer.is_none();
        if let Some(a) = answer {
            messages.push(ChatMessage::new("assistant", &a));
        }
        let text = tok.apply_chat_template(&messages, generation_prompt)?;
        let ids = tok.encode(&text, true)?;
        w.push_document(&ids, eos, text.len() as u64)?;
    }
    let meta = TokenShardsMeta {
        format_version: FORMAT_VERSION,
        tokenizer_hash: tok.hash(),
        seq_len,
        eos_id: eos,
        vocab_size: tok.vocab_size(),
        splits: BTreeMap::from([(split.to_string(), w.finish()?)]),
        sources: vec![],
    };
    meta.write(dir)?;
    Ok(())
}
