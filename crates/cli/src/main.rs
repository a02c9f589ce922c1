//! The `distill` binary: one subcommand per pipeline stage, thin over the library crates.

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Args, Parser, Subcommand};
use distill_core::ModelDir;
use distill_core::{parse_device, ChatMessage};
use distill_teacher::generate::{generate, SamplingParams};
use std::io::Write;
use std::path::PathBuf;

#[cfg(feature = "api")]
mod api_cmd;
mod cache_cmd;
mod eval_cmd;
mod progress;
#[cfg(feature = "api")]
mod provenance_cmd;
mod prune_cmd;
mod train_cmd;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "distill",
    version,
    about = "Teacher-student knowledge distillation of language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a llama.cpp GGUF file into a Hugging Face model dir.
    Convert(ConvertArgs),
    /// Generate text from a model dir.
    Generate(GenerateArgs),
    /// Tokenize text files (.txt, .jsonl, dirs of them) into packed, memory-mapped token shards.
    Prepare(PrepareArgs),
    /// Run the teacher over token shards once and store its top-k targets (resumable, shardable).
    Cache(cache_cmd::CacheArgs),
    /// Cut the teacher by measured importance (depth, heads, MLP and hidden channels) into a
    /// smaller model dir for distillation to heal.
    Prune(prune_cmd::PruneArgs),
    /// Distil a student from the teacher (cache or online) with a KD loss; checkpoints, resume.
    Train(train_cmd::TrainArgs),
    /// Evaluate teacher and students in one pass: perplexity, bits/byte, KL, agreement, ECE, speed.
    Eval(eval_cmd::EvalArgs),
    /// Serve a teacher over an OpenAI-compatible HTTP API (keys, quotas, audit log, usage report).
    #[cfg(feature = "api")]
    Serve(api_cmd::ServeArgs),
    /// Collect a teacher's answers (and top logprobs) from an OpenAI-compatible API, resumably.
    #[cfg(feature = "api")]
    Collect(api_cmd::CollectArgs),
    /// Turn collected answers into masked token shards and (with logprobs) a teacher cache.
    #[cfg(feature = "api")]
    PrepareCollected(api_cmd::PrepareCollectedArgs),
    /// Was a suspect model distilled from a teacher? A statistical test against independent
    /// references, white-box (model dirs on token shards) or black-box (dirs or API endpoints).
    #[cfg(feature = "api")]
    Provenance(provenance_cmd::ProvenanceArgs),
    /// (needs the `api` feature: `cargo build --release`)
    #[cfg(not(feature = "api"))]
    #[command(name = "provenance", disable_help_flag = true)]
    ProvenanceUnbuilt(WithoutApi),
    /// (needs the `api` feature: `cargo build --release`)
    #[cfg(not(feature = "api"))]
    #[command(name = "serve", disable_help_flag = true)]
    ServeUnbuilt(WithoutApi),
    /// (needs the `api` feature: `cargo build --release`)
    #[cfg(not(feature = "api"))]
    #[command(name = "collect", disable_help_flag = true)]
    CollectUnbuilt(WithoutApi),
    /// (needs the `api` feature: `cargo build --release`)
    #[cfg(not(feature = "api"))]
    #[command(name = "prepare-collected", disable_help_flag = true)]
    PrepareCollectedUnbuilt(WithoutApi),
    /// Write a model dir as a llama.cpp GGUF file (llama.cpp, Ollama, LM Studio).
    Export(ExportArgs),
    /// Write a model's logits for a text (ids and logits as safetensors), to compare with
    /// another implementation (scripts/check_logits.py runs transformers on the same ids).
    Logits(LogitsArgs),
    /// Throughput benchmarks (never part of the test suite).
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// The arguments of a subcommand this binary was built without; only the refusal reads them.
#[cfg(not(feature = "api"))]
#[derive(Args)]
struct WithoutApi {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    _args: Vec<String>,
}

#[derive(Args)]
struct ExportArgs {
    /// The model dir to export (a converted teacher, a pruned dir, a checkpoint).
    #[arg(long)]
    model: PathBuf,
    /// The GGUF file to write (replaced only once the new one is complete).
    #[arg(long)]
    gguf: PathBuf,
    /// Tensor type of the matrices (norms stay f32): f32 exact, f16, q8_0 (8-bit blocks of 32).
    #[arg(long, default_value = "f16", value_parser = ["f32", "f16", "q8_0"])]
    dtype: String,
}

#[derive(Args)]
struct ConvertArgs {
    /// The GGUF file to convert.
    #[arg(long)]
    gguf: PathBuf,
    /// Output model dir (replaced only once the new one is complete).
    #[arg(long)]
    out: PathBuf,
    /// Weight dtype on disk: f32 keeps the dequantized values exactly.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    dtype: String,
}

#[derive(Args)]
struct GenerateArgs {
    /// A Hugging Face model dir (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The prompt.
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    prompt: Option<String>,
    /// A file of prompts, one per line.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Wrap each prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args)]
struct PrepareArgs {
    /// A model dir whose tokenizer.json (and configs) to use.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Input files or directories (.txt: one document per file; .jsonl: one per line). Files under
    /// a directory named `valid`, and files named `valid.*`, go to the validation split.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Output dir (train/, valid/, meta.json); replaced only once the new one is complete.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Fraction of the other documents held out for validation, by a stable hash of each
    /// document's key (file name, or file:line for JSONL).
    #[arg(long, default_value_t = 0.0)]
    valid_fraction: f64,
    /// The JSONL field with the text (lines with `messages` instead use the chat template).
    #[arg(long, default_value = "text")]
    text_field: String,
    /// In .txt files, blank lines separate documents.
    #[arg(long)]
    blank_line_docs: bool,
    /// Replace invalid UTF-8 (and count it) instead of refusing the file.
    #[arg(long)]
    lossy: bool,
    /// Replace an output dir that holds shards from another tokenizer.
    #[arg(long)]
    force: bool,
    /// Sequences per shard file.
    #[arg(long, default_value_t = 4096)]
    shard_sequences: usize,
}

#[derive(Args)]
struct LogitsArgs {
    /// A Hugging Face model dir.
    #[arg(long)]
    model: PathBuf,
    /// The text to score (tokenized without special tokens).
    #[arg(long)]
    text: String,
    /// Score the text as a user message in the model's chat template (with the generation
    /// prompt), as transformers' `apply_chat_template(..., add_generation_prompt=True)`.
    #[arg(long)]
    chat: bool,
    /// Output safetensors file: `ids` u32 (T) and `logits` f32 (T, V).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    device: DeviceArg,
}

fn logits_cmd(a: LogitsArgs) -> Result<()> {
    let device = parse_device(&a.device.device)?;
    let ModelDir {
        model,
        tokenizer: tok,
        ..
    } = ModelDir::load(&a.model, &device)?;
    let ids = match a.chat {
        true => {
            let text = tok.apply_chat_template(&[ChatMessage::new("user", &a.text)], true)?;
            tok.encode(&text, false)?
        }
        false => tok.encode(&a.text, false)?,
    };
    if ids.is_empty() {
        bail!("--text: no tokens to score");
    }
    let input = candle_core::Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?;
    let logits = model.forward(&input)?.squeeze(0)?;
    let tensors = std::collections::HashMap::from([
        (
            "ids".to_string(),
            candle_core::Tensor::new(ids.as_slice(), &device)?,
        ),
        ("logits".to_string(), logits),
    ]);
    candle_core::safetensors::save(&tensors, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("{} tokens → {}", ids.len(), a.out.display());
    Ok(())
}

#[derive(Args)]
pub(crate) struct DeviceArg {
    /// cpu, or cuda:N in a build with `--features cuda`.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Teacher full-sequence logits tok/s at batch × seq_len, and greedy decode tok/s at batch 1.
    Teacher(BenchTeacherArgs),
    /// Teacher-cache throughput as a ratio of the bare teacher forward on the same batches.
    Cache(cache_cmd::BenchCacheArgs),
    /// Student training tokens/s and peak RSS (forward, KD loss, backward, AdamW).
    Train(train_cmd::BenchTrainArgs),
    /// This host's f32 matrix-product rate (GFLOP/s) through candle, on the shapes a model's
    /// layers and output projection multiply: the roofline the other figures are a fraction of.
    Gemm(BenchGemmArgs),
}

#[derive(Args)]
struct BenchGemmArgs {
    /// Products as MxNxK (rows × columns × inner); default: a 1024-token batch through
    /// SmolLM2-shaped layers (576 → 1536, 1536 → 576) and its output projection (576 → 49152).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024x1536x576,1024x576x1536,1024x49152x576"
    )]
    shapes: Vec<String>,
    /// Timed products per shape (after one warm-up).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// f32 (candle's matmul), or bf16 on AMX tiles (B packed once, A rounded per product).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchTeacherArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Timed full-sequence forwards (after one warm-up).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Timed decode steps.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Precision of the model's products (f32, or bf16 on AMX: see `distill cache`).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArg,
}

/// mimalloc's `mi_option_purge_delay` (index 15 of `mi_option_e` in mimalloc.h, v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// `mi_option_arena_reserve` (index 23 of `mi_option_e` in mimalloc v2's mimalloc.h).
const MI_OPTION_ARENA_RESERVE: libmimalloc_sys::mi_option_t = 23;

/// Bytes of the arena committed at start: `DISTILL_ARENA_GIB` GiB, else 8 GiB — and none under
/// strict overcommit accounting, where committed memory is charged whether touched or not.
fn reserved_arena_bytes() -> std::result::Result<usize, String> {
    if let Ok(v) = std::env::var("DISTILL_ARENA_GIB") {
        return v
            .trim()
            .parse::<usize>()
            .ok()
            .and_then(|gib| gib.checked_mul(1 << 30))
            .ok_or_else(|| {
                format!("DISTILL_ARENA_GIB={v:?}: expected a whole number of GiB (0: no arena)")
            });
    }
    Ok(
        match std::fs::read_to_string("/proc/sys/vm/overcommit_memory") {
            Ok(mode) if mode.trim() == "2" => 0,
            _ => 8 << 30,
        },
    )
}

fn main() {
    // Every forward allocates and frees tensors of hundreds of MB (all-position logits are
    // B·T·V·4 bytes). By default mimalloc returns freed memory to the OS after 10 ms, so each
    // step page-faults it back in, zeroed: ~10% of a teacher forward. Keep it instead.
    // SAFETY: called before any other thread exists.
    // Training allocates several (B·T·V)-sized tensors per step; blocks that do not fit mimalloc's
    // default 1 GiB arena go to the OS and come back page-faulted every step. A large arena
    // (address space only; committed on use) keeps them: −22% peak RSS on `bench train`.
    // SAFETY: as above.
    // Even so, arenas reserved on demand are committed on demand, and each forward's fresh
    // blocks came back page-faulted and zeroed by the kernel (3–4 s of system time in 12 s of
    // `bench teacher`). One arena committed up front, as `MIMALLOC_RESERVE_OS_MEMORY` would
    // make, is reused instead: −70% system time, +10% teacher tok/s. Under the kernel's default
    // overcommit heuristic committed address space costs no memory until touched; under strict
    // accounting (`vm.overcommit_memory = 2`) it would be charged in full, so none is reserved
    // there. DISTILL_ARENA_GIB sets its size (0: none).
    // SAFETY: as above.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_RESERVE, 16 * 1024 * 1024);
        // KiB
        let bytes = reserved_arena_bytes().unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(1);
        });
        if bytes > 0 {
            // A refusal (an address-space limit) only leaves the default behaviour.
            let _ = libmimalloc_sys::mi_reserve_os_memory_ex(
                bytes,
                true,
                false,
                false,
                std::ptr::null_mut(),
            );
        }
    };
    // candle's elementwise ops run on its own pool, whose workers spin for 25,000 rounds after
    // each op before parking; the GEMMs that follow run on rayon's threads. On a host with as
    // many cores as threads the spinning worker takes a core from the GEMM: 7.8% of a healing
    // step's samples were candle-bp-0 spinning (`perf record … bench train --student
    // runs/smollm2-pruned-init …`). Parking at once costs a wake-up (µs) per op that is large
    // enough to use the pool (small ops, e.g. decoding's, run inline). A value the user sets wins.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        // One line, whatever the error chain holds.
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Convert(a) => convert(a),
        Command::Generate(a) => generate_cmd(a),
        Command::Prepare(a) => prepare(a),
        Command::Cache(a) => cache_cmd::cache(a),
        Command::Prune(a) => prune_cmd::run(a),
        Command::Train(a) => train_cmd::run(a),
        Command::Eval(a) => eval_cmd::run(a),
        #[cfg(feature = "api")]
        Command::Serve(a) => api_cmd::serve_cmd(a),
        #[cfg(feature = "api")]
        Command::Collect(a) => api_cmd::collect_cmd(a),
        #[cfg(feature = "api")]
        Command::PrepareCollected(a) => api_cmd::prepare_collected_cmd(a),
        #[cfg(feature = "api")]
        Command::Provenance(a) => provenance_cmd::run(a),
        #[cfg(not(feature = "api"))]
        Command::ServeUnbuilt(_)
        | Command::CollectUnbuilt(_)
        | Command::PrepareCollectedUnbuilt(_)
        | Command::ProvenanceUnbuilt(_) => {
            anyhow::bail!(
                "this distill binary was built without the `api` feature (serve, collect, \
                 prepare-collected, provenance): scripts/quickstart.sh builds it so, to save build time; \
                 `cargo build --release` builds the full one"
            )
        }
        Command::Export(a) => export(a),
        Command::Logits(a) => logits_cmd(a),
        Command::Bench(BenchCommand::Cache(a)) => cache_cmd::bench(a),
        Command::Bench(BenchCommand::Train(a)) => train_cmd::bench(a),
        Command::Bench(BenchCommand::Teacher(a)) => bench_teacher(a),
        Command::Bench(BenchCommand::Gemm(a)) => bench_gemm(a),
    }
}

fn export(a: ExportArgs) -> Result<()> {
    let dtype: distill_core::gguf::GgufType = a.dtype.parse()?;
    let cfg = distill_core::Config::from_file(a.model.join("config.json"))?;
    let tokenizer = distill_core::Tokenizer::from_dir(&a.model)?;
    let tensors = distill_core::weights::load_tensors(&a.model, &candle_core::Device::Cpu)?;
    let lineage = distill_core::model_card::lineage(&a.model);
    let name = distill_core::model_dir::display_name(&a.model);
    let e = distill_core::gguf::write_gguf(
        &a.gguf, &cfg, &tensors, &tokenizer, dtype, &name, &lineage,
    )?;
    if !e.kept_f16.is_empty() {
        eprintln!(
            "{} matrices kept in f16 (rows not a multiple of 32): {}",
            e.kept_f16.len(),
            e.kept_f16.join(", ")
        );
    }
    eprintln!(
        "{} tensors ({}, pre-tokenizer {}), {:.1} MB → {}",
        e.tensors,
        a.dtype,
        e.pre_tokenizer,
        e.bytes as f64 / 1e6,
        a.gguf.display()
    );
    Ok(())
}

fn convert(a: ConvertArgs) -> Result<()> {
    let dtype = match a.dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    let start = std::time::Instant::now();
    let s = distill_teacher::convert::convert_gguf(&a.gguf, &a.out, dtype)?;
    eprintln!(
        "converted {} → {}: {} tensors, {:.1}M parameters, {} layers, vocab {} ({:.1}s)",
        a.gguf.display(),
        a.out.display(),
        s.tensors,
        s.params as f64 / 1e6,
        s.layers,
        s.vocab_size,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn prepare(a: PrepareArgs) -> Result<()> {
    use distill_core::prepare::{input_files, prepare, PrepareOptions};
    let tok = distill_core::Tokenizer::from_dir(&a.tokenizer)?;
    let files = input_files(&a.input)?;
    let total: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let opts = PrepareOptions {
        seq_len: a.seq_len,
        valid_fraction: a.valid_fraction,
        text_field: a.text_field,
        blank_line_docs: a.blank_line_docs,
        lossy: a.lossy,
        force: a.force,
        shard_sequences: a.shard_sequences,
        ..Default::default()
    };
    let start = std::time::Instant::now();
    let meta = prepare(
        &tok,
        &a.input,
        &a.out,
        &opts,
        progress::bar(total, progress::Unit::Bytes, "prepare"),
    )?;
    let secs = start.elapsed().as_secs_f64();
    for (name, s) in &meta.splits {
        eprintln!(
            "{name}: {} documents, {} sequences × {} = {} tokens in {} shard(s)",
            s.documents,
            s.sequences,
            meta.seq_len,
            s.tokens,
            s.shards.len()
        );
    }
    let replaced: u64 = meta.sources.iter().map(|s| s.replaced).sum();
    if replaced > 0 {
        eprintln!("replaced {replaced} invalid UTF-8 sequence(s) (--lossy)");
    }
    eprintln!(
        "prepared {} file(s), {:.1} MB in {:.1}s ({:.2} MB/s) → {}",
        meta.sources.len(),
        total as f64 / 1e6,
        secs,
        total as f64 / 1e6 / secs.max(1e-9),
        a.out.display()
    );
    Ok(())
}

fn read_prompts(a: &GenerateArgs) -> Result<Vec<String>> {
    if let Some(p) = &a.prompt {
        return Ok(vec![p.clone()]);
    }
    let path = a
        .prompts
        .as_ref()
        .expect("clap requires --prompt or --prompts");
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if prompts.is_empty() {
        bail!("{}: no prompts (expected one per line)", path.display());
    }
    Ok(prompts)
}

fn generate_cmd(a: GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        max_new_tokens: a.max_new_tokens,
    };
    params.check()?;
    let prompts = read_prompts(&a)?;
    let device = parse_device(&a.device.device)?;
    let teacher = ModelDir::load(&a.model, &device)?;
    let tok = &teacher.tokenizer;
    let stop = tok.stop_ids();
    let mut stdout = std::io::stdout().lock();
    for (i, prompt) in prompts.iter().enumerate() {
        let text = if a.chat {
            tok.apply_chat_template(&[ChatMessage::new("user", prompt)], true)?
        } else {
            prompt.clone()
        };
        let ids = tok.encode(&text, true)?;
        if prompts.len() > 1 {
            writeln!(
                stdout,
                "{}### prompt {}: {prompt}",
                if i > 0 { "\n" } else { "" },
                i + 1
            )?;
        } else if !a.chat {
            write!(stdout, "{prompt}")?;
        }
        let mut stream = tok.decode_stream(true);
        let start = std::time::Instant::now();
        let out = generate(&teacher.model, &ids, &stop, &params, |id| {
            if let Some(piece) = stream.push(id)? {
                let _ = write!(stdout, "{piece}");
                let _ = stdout.flush();
            }
            Ok(())
        })?;
        writeln!(stdout)?;
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "[{} prompt tokens, {} generated, {:.1} tok/s, finish: {:?}]",
            ids.len(),
            out.tokens.len(),
            out.tokens.len() as f64 / secs,
            out.finish
        );
    }
    Ok(())
}

fn bench_teacher(a: BenchTeacherArgs) -> Result<()> {
    let precision: distill_core::Precision = a.precision.parse().context("--precision")?;
    let device = parse_device(&a.device.device)?;
    let mut m = ModelDir::load(&a.model, &device)?;
    m.model
        .set_precision(precision)
        .with_context(|| format!("--precision {precision}"))?;
    let r = distill_teacher::bench::bench_model(
        &m.model,
        a.batch,
        a.seq_len,
        a.iters,
        a.decode_tokens,
    )?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "teacher {} ({} products): full-sequence {:.1} tok/s (batch {} × {}), decode {:.1} tok/s (batch 1), {} threads on {}",
            a.model.display(),
            a.precision,
            r.prefill_tokens_per_second,
            r.batch,
            r.seq_len,
            r.decode_tokens_per_second,
            r.threads,
            r.device
        );
    }
    Ok(())
}

fn bench_gemm(a: BenchGemmArgs) -> Result<()> {
    let mut shapes = Vec::new();
    for s in &a.shapes {
        let dims: Vec<usize> = s
            .split('x')
            .map(|d| d.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| anyhow::anyhow!("--shapes {s}: expected MxNxK, e.g. 1024x1536x576"))?;
        match dims[..] {
            [m, n, k] if m > 0 && n > 0 && k > 0 => shapes.push((m, n, k)),
            _ => anyhow::bail!("--shapes {s}: expected MxNxK with three positive sizes"),
        }
    }
    let precision: distill_core::Precision = a.precision.parse().context("--precision")?;
    let r = distill_train::bench::bench_gemm(&shapes, a.iters.max(1), precision)
        .with_context(|| format!("--precision {precision}"))?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        for s in &r.shapes {
            println!("gemm {}x{}x{}: {:.1} GFLOP/s", s.m, s.n, s.k, s.gflops);
        }
        println!(
            "{} GEMM roofline (FLOP-weighted over the shapes): {:.1} GFLOP/s, {} threads",
            r.precision, r.gflops, r.threads
        );
    }
    Ok(())
}
