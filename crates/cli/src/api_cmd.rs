//! `distill serve` (the teacher behind an OpenAI-compatible API) and `distill collect` (a client
//! that gathers a teacher's answers from any such API).

use anyhow::{bail, Context, Result};
use clap::Args;
use distill_api::client::{collect, CollectOptions};
use distill_api::convert::{prepare_collected, PrepareCollectedOptions};
use distill_api::guard::{load_keys, read_audit, report_markdown, usage_report};
use distill_api::server::{serve, AppState, ServeOptions};
use distill_core::parse_device;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct ServeArgs {
    /// The teacher: a Hugging Face model dir.
    #[arg(long, required_unless_present = "report")]
    model: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// API keys (TOML: [[keys]] with key, name, and optional requests_per_minute,
    /// tokens_per_day, admin). Without it the server is open to anyone who can reach it.
    #[arg(long)]
    keys: Option<PathBuf>,
    /// Most choices decoded together in one batch.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Append one JSON line per request here (key, time, tokens, logprobs asked, prompt hash
    /// and template signature).
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// The model id clients name (default: the model dir's name).
    #[arg(long)]
    model_name: Option<String>,
    /// Keep the keys' quota usage here across restarts (JSON, rewritten atomically); default
    /// with --keys: KEYS_FILE's name + `.usage.json` beside it.
    #[arg(long, requires = "keys")]
    quota_state: Option<PathBuf>,
    /// Print the distillation-pattern report of an audit log and exit.
    #[arg(long, value_name = "AUDIT_LOG")]
    report: Option<PathBuf>,
    /// With --report: JSON instead of a markdown table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: crate::DeviceArg,
}

pub fn serve_cmd(a: ServeArgs) -> Result<()> {
    if let Some(log) = &a.report {
        let report = usage_report(&read_audit(log)?);
        if a.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report_markdown(&report));
        }
        return Ok(());
    }
    let model = a.model.expect("clap requires --model without --report");
    let keys = a.keys.as_deref().map(load_keys).transpose()?;
    let quota_state = a.quota_state.clone().or_else(|| {
        a.keys.as_ref().map(|k| {
            let name = k.file_name().unwrap_or_default().to_string_lossy();
            k.with_file_name(format!("{name}.usage.json"))
        })
    });
    let opts = ServeOptions {
        model_dir: model.clone(),
        model_name: a.model_name,
        device: parse_device(&a.device.device)?,
        max_batch: a.max_batch,
        keys,
        audit_log: a.audit_log,
        rate_window: Duration::from_secs(60),
        quota_state,
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.addr)
            .await
            .with_context(|| format!("--addr {}: cannot listen", a.addr))?;
        let state = AppState::load(&opts)?;
        eprintln!(
            "distill serve: '{}' on http://{}/v1 ({}; batches of up to {} rows{})",
            state.model_name,
            listener.local_addr()?,
            model.display(),
            opts.max_batch,
            if opts.keys.is_some() {
                "; API keys required"
            } else {
                "; no API keys"
            },
        );
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("distill serve: shutting down");
        };
        serve(listener, state, shutdown).await.context("serving")
    })
}

#[derive(Args)]
pub struct CollectArgs {
    /// The API's base URL, e.g. http://127.0.0.1:8080 (or …/v1).
    #[arg(long)]
    endpoint: String,
    /// Bearer key (default: $OPENAI_API_KEY when set).
    #[arg(long)]
    api_key: Option<String>,
    /// The model id to ask (default: the first one GET /v1/models lists).
    #[arg(long)]
    model: Option<String>,
    /// Prompts: one per line, or JSON lines with "prompt" or "messages".
    #[arg(long)]
    prompts: PathBuf,
    /// Output dir: collect.json and responses.jsonl.
    #[arg(long)]
    out: PathBuf,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Ask for the k most likely alternatives of every token (0–20); omit for text only.
    #[arg(long)]
    top_logprobs: Option<usize>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Per-prompt seeds: this + the prompt's index.
    #[arg(long)]
    seed: Option<u64>,
    /// A system message before each prompt.
    #[arg(long)]
    system: Option<String>,
    /// Continue a collection in --out, skipping prompts already answered.
    #[arg(long)]
    resume: bool,
    /// Retries of one request after transient errors (429s are waited out, not counted).
    #[arg(long, default_value_t = 6)]
    max_retries: u32,
    /// Only the first N prompts.
    #[arg(long)]
    limit: Option<usize>,
    /// Ask the plain-text completions endpoint (each prompt's text as `prompt`) instead of chat.
    #[arg(long)]
    completions: bool,
}

pub fn collect_cmd(a: CollectArgs) -> Result<()> {
    if a.concurrency == 0 {
        bail!("--concurrency: must be at least 1");
    }
    let opts = CollectOptions {
        endpoint: a.endpoint,
        api_key: a.api_key.or_else(|| std::env::var("OPENAI_API_KEY").ok()),
        model: a.model,
        prompts: a.prompts,
        out: a.out,
        concurrency: a.concurrency,
        top_logprobs: a.top_logprobs,
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        seed: a.seed,
        system: a.system,
        resume: a.resume,
        max_retries: a.max_retries,
        limit: a.limit,
        completions: a.completions,
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let tty = std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::new(0);
    if tty {
        bar.set_style(
            indicatif::ProgressStyle::with_template("collect [{bar:30}] {pos}/{len} {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let start = Instant::now();
    let mut last_log = Instant::now();
    let summary = rt.block_on(collect(&opts, |p| {
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        let msg = format!(
            "{:.2} req/s, {:.1} tok/s, {} errors, {} retries, {} rate-limited",
            p.done as f64 / secs,
            p.completion_tokens as f64 / secs,
            p.failed,
            p.retries,
            p.rate_limited
        );
        bar.set_length(p.total as u64);
        bar.set_position((p.skipped + p.done + p.failed) as u64);
        bar.set_message(msg.clone());
        if !tty && (last_log.elapsed().as_secs() >= 5 || p.skipped + p.done + p.failed == p.total) {
            last_log = Instant::now();
            eprintln!(
                "collect: {}/{} ({msg})",
                p.skipped + p.done + p.failed,
                p.total
            );
        }
    }))?;
    bar.finish_and_clear();
    let p = &summary.progress;
    eprintln!(
        "collect: {} new answers ({} already there), {} completion tokens in {:.1}s; {} retries, {} rate-limited → {}",
        p.done,
        p.skipped,
        p.completion_tokens,
        summary.elapsed.as_secs_f64(),
        p.retries,
        p.rate_limited,
        summary.responses.display()
    );
    if let Some((i, e)) = summary.failures.first() {
        bail!(
            "{} of {} prompts failed (first: prompt {i}: {e}); rerun with --resume to retry them",
            summary.failures.len(),
            p.total,
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct PrepareCollectedArgs {
    /// A `distill collect --out` dir.
    #[arg(long)]
    collected: PathBuf,
    /// A model dir with the API model's tokenizer (tokenizer.json; config.json for the vocabulary).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Output dir: tokens/ (masked token shards) and, when the answers carry logprobs, cache/.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 4096)]
    shard_sequences: usize,
}

pub fn prepare_collected_cmd(a: PrepareCollectedArgs) -> Result<()> {
    let s = prepare_collected(&PrepareCollectedOptions {
        collected: a.collected,
        tokenizer: a.tokenizer,
        out: a.out,
        seq_len: a.seq_len,
        shard_sequences: a.shard_sequences,
    })?;
    eprintln!(
        "{} answers → {} sequences of {} ({} target tokens; {} truncated, {} skipped) → {}",
        s.answers,
        s.sequences,
        a.seq_len,
        s.target_tokens,
        s.truncated,
        s.skipped,
        s.tokens_dir.display()
    );
    if s.unmapped > 0 {
        eprintln!(
            "{} API tokens matched no id of the tokenizer (masked), e.g. {}",
            s.unmapped,
            s.unmapped_examples.join(", ")
        );
    }
    match &s.cache {
        Some((dir, k)) => eprintln!(
            "sparse teacher targets (top-{k} logprobs from the API) → {}",
            dir.display()
        ),
        None => eprintln!("no logprobs in the answers: no teacher cache (text-only distillation)"),
    }
    Ok(())
}
