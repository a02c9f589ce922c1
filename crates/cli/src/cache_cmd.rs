//! `distill cache` and `distill bench cache`.

use crate::progress::{self, Unit};
use crate::DeviceArg;
use anyhow::{bail, Context, Result};
use clap::Args;
use distill_core::cache::CacheDType;
use distill_core::parse_device;
use distill_core::shards::TokenShardsMeta;
use distill_core::ModelDir;
use distill_teacher::cache::{build_cache, merge_cache, CacheOptions};
use std::path::PathBuf;

#[derive(Args)]
pub struct CacheArgs {
    /// Teacher model dir (HF layout).
    #[arg(long, required_unless_present = "merge")]
    teacher: Option<PathBuf>,
    /// Token shards dir (from `distill prepare`).
    #[arg(long)]
    tokens: PathBuf,
    /// Cache dir to write (or to continue: the same command resumes an interrupted run).
    #[arg(long)]
    out: PathBuf,
    /// Teacher tokens kept per position.
    #[arg(long, default_value_t = 64)]
    top_k: usize,
    /// Storage type of the kept log-probs.
    #[arg(long, default_value = "f16", value_parser = ["f16", "f32"])]
    dtype: String,
    /// Sequences per teacher forward.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Precision of the teacher's products: bf16 (inputs and weights rounded, sums in f32) runs
    /// on AMX tiles, several times faster where the CPU has them, at a small KL to f32
    /// (`distill bench cache --teacher-precision bf16` measures both). Recorded in the manifest.
    #[arg(long, default_value = "f32")]
    teacher_precision: String,
    /// Process only part I of N (every N-th shard), e.g. `--shard 0/4` … `--shard 3/4` on four
    /// machines; then `distill cache --merge` on the assembled dir.
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// Sequences per cache shard (the unit of resume and of `--shard`).
    #[arg(long, default_value_t = 256)]
    shard_sequences: usize,
    /// Cache only the first N sequences of each split (a slice of a large corpus).
    #[arg(long)]
    max_sequences: Option<u64>,
    /// Splits to cache (default: every split of the token shards).
    #[arg(long, value_delimiter = ',')]
    splits: Vec<String>,
    /// Verify the parts assembled in --out (every shard, checksums) and write its manifest.json.
    #[arg(long, conflicts_with = "shard")]
    merge: bool,
    #[command(flatten)]
    device: DeviceArg,
}

fn parse_part(s: &str) -> Result<[usize; 2]> {
    let bad = || anyhow::anyhow!("--shard {s}: expected I/N with 0 ≤ I < N, e.g. 0/4");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok([i, n])
}

pub fn cache(a: CacheArgs) -> Result<()> {
    let tokens = TokenShardsMeta::read(&a.tokens)?;
    if a.merge {
        let m = merge_cache(&a.out, &tokens)?;
        let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
        eprintln!(
            "merged {}: {} shards complete and verified, {:.1} MB → {}",
            a.out.display(),
            m.shards.len(),
            bytes as f64 / 1e6,
            a.out.join(distill_core::cache::MANIFEST).display()
        );
        return Ok(());
    }
    let teacher_dir = a.teacher.as_ref().expect("clap requires --teacher");
    let part = a
        .shard
        .as_deref()
        .map(parse_part)
        .transpose()?
        .unwrap_or([0, 1]);
    if a.top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    let precision: distill_core::Precision =
        a.teacher_precision.parse().context("--teacher-precision")?;
    let device = parse_device(&a.device.device)?;
    let mut teacher = ModelDir::load(teacher_dir, &device)?;
    let hash = teacher.hash()?;
    teacher
        .model
        .set_precision(precision)
        .with_context(|| format!("--teacher-precision {precision}"))?;
    let splits = if a.splits.is_empty() {
        tokens.splits.keys().cloned().collect()
    } else {
        a.splits.clone()
    };
    let opts = CacheOptions {
        top_k: a.top_k,
        dtype: a.dtype.parse::<CacheDType>()?,
        batch_size: a.batch_size.max(1),
        shard_sequences: a.shard_sequences.max(1),
        max_sequences: a.max_sequences,
        splits,
        part,
    };
    let mut bar: Option<Box<dyn FnMut(u64)>> = None;
    let s = build_cache(&teacher, &hash, &a.tokens, &a.out, &opts, |done, total| {
        let f = bar.get_or_insert_with(|| Box::new(progress::bar(total, Unit::Tokens, "cache")));
        f(done)
    })
    .with_context(|| format!("caching {} into {}", a.tokens.display(), a.out.display()))?;
    let peak = distill_core::device::peak_rss_bytes()
        .map(|b| format!(", peak RSS {:.0} MB", b as f64 / 1e6))
        .unwrap_or_default();
    let part_note = if part == [0, 1] {
        String::new()
    } else {
        format!(" (part {}/{})", part[0], part[1])
    };
    eprintln!(
        "cached {} tokens{part_note} in {} shards ({} written now, {} computed tokens at {:.1} tok/s), \
         {:.1} bytes/token, {:.1} MB, {:.1}s{peak} → {}",
        s.tokens_total,
        s.shards_total,
        s.shards_written,
        s.tokens_computed,
        s.tokens_computed as f64 / s.seconds.max(1e-9),
        s.bytes_per_token,
        s.bytes as f64 / 1e6,
        s.seconds,
        a.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct BenchCacheArgs {
    #[arg(long)]
    teacher: PathBuf,
    /// Token shards dir whose train split supplies the batches.
    #[arg(long)]
    tokens: PathBuf,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Timed batches (after one warm-up).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    #[arg(long, default_value_t = 64)]
    top_k: usize,
    /// Precision of the teacher's products (as `distill cache`); at bf16 the f32 forward is
    /// timed too and the two forwards' distributions compared (KL, top-1, top-k overlap).
    #[arg(long, default_value = "f32")]
    teacher_precision: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArg,
}

pub fn bench(a: BenchCacheArgs) -> Result<()> {
    let precision: distill_core::Precision =
        a.teacher_precision.parse().context("--teacher-precision")?;
    let device = parse_device(&a.device.device)?;
    let teacher = ModelDir::load(&a.teacher, &device)?;
    let hash = teacher.hash()?;
    let r = distill_teacher::bench::bench_cache(
        &teacher, &hash, &a.tokens, a.batch, a.iters, a.top_k, precision,
    )
    .with_context(|| format!("--teacher-precision {precision}"))?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "cache {} ({} products): {:.1} tok/s vs bare teacher forward {:.1} tok/s = {:.2}×, {:.1} bytes/token (k={}, f16), batch {} × {}, peak RSS {:.0} MB, {} threads on {}",
            a.teacher.display(),
            r.teacher_precision,
            r.cache_tokens_per_second,
            r.forward_tokens_per_second,
            r.ratio,
            r.bytes_per_token,
            r.top_k,
            r.batch,
            r.seq_len,
            r.peak_rss_bytes as f64 / 1e6,
            r.threads,
            r.device
        );
        if let (Some(f), Some(g)) = (r.f32_forward_tokens_per_second, &r.f32_agreement) {
            println!(
                "f32 forward {:.1} tok/s ({:.2}× at {}); against f32 over {} positions: KL mean {:.2e}, p99 {:.2e}, max {:.2e} nats; top-1 {:.2}%, top-{} overlap {:.2}%, cached log-prob max |Δ| {:.3}",
                f,
                r.forward_tokens_per_second / f,
                r.teacher_precision,
                g.positions,
                g.kl_mean,
                g.kl_p99,
                g.kl_max,
                100.0 * g.top1,
                r.top_k,
                100.0 * g.topk_overlap,
                g.topk_logprob_max_abs
            );
        }
    }
    Ok(())
}
