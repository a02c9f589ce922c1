//! `distill cache`: runs the teacher over token shards once and stores its top-k targets (format:
//! `distill_core::cache`). Resumable at shard granularity, splittable across machines with
//! `part = [I, N]` (every N-th shard), and reproducible: the same settings write byte-identical
//! shards.

use candle_core::{DType, Tensor};
use distill_core::cache::{
    encode_shard, manifest_name, plan, tokens_hash, CacheDType, CacheManifest, CacheSettings,
    CacheShardMeta, PlannedShard, TeacherTargets,
};
use distill_core::logits::row_topk;
use distill_core::shards::{TokenShards, TokenShardsMeta};
use distill_core::ModelDir;
use distill_core::{CausalLm, Error, Result};
use rayon::prelude::*;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct CacheOptions {
    pub top_k: usize,
    pub dtype: CacheDType,
    pub batch_size: usize,
    pub shard_sequences: usize,
    pub max_sequences: Option<u64>,
    pub splits: Vec<String>,
    /// `[I, N]`: process only the shards whose plan index ≡ I (mod N).
    pub part: [usize; 2],
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            top_k: 64,
            dtype: CacheDType::F16,
            batch_size: 8,
            shard_sequences: 256,
            max_sequences: None,
            splits: vec!["train".into(), "valid".into()],
            part: [0, 1],
        }
    }
}

#[derive(Debug, Clone)]
pub struct CacheSummary {
    /// Tokens this part covers, and of those the ones computed in this run (the rest were
    /// already complete).
    pub tokens_total: u64,
    pub tokens_computed: u64,
    pub shards_total: usize,
    pub shards_written: usize,
    /// Bytes of this part's shards on disk.
    pub bytes: u64,
    pub bytes_per_token: f64,
    pub seconds: f64,
}

/// Rows of the lm_head product materialised at once: bounds the logits buffer to
/// ROWS · V · 4 bytes (≈ 50 MB at V = 49,152) whatever the batch.
const LOGIT_ROWS: usize = 256;

/// The teacher's top-k targets for a batch of ids (B, T): flat `ids` (B·T·K), `logprobs`
/// (B·T·K, f32) and `logsumexp` (B·T). The lm_head product is computed in row chunks so the
/// full (B, T, V) logits never exist; top-k and logsumexp run on the CPU for any device.
pub fn topk_batch(
    model: &CausalLm,
    ids: &Tensor,
    k: usize,
) -> Result<(Vec<u32>, Vec<f32>, Vec<f32>)> {
    topk_from_hidden(model, &model.hidden_states(ids)?, k)
}

/// [`topk_batch`] from the model's final-norm hidden states (B, T, hidden).
pub fn topk_from_hidden(
    model: &CausalLm,
    hidden: &Tensor,
    k: usize,
) -> Result<(Vec<u32>, Vec<f32>, Vec<f32>)> {
    let (b, t, h) = hidden.dims3()?;
    let rows = b * t;
    let hidden = hidden.reshape((rows, h))?;
    let v = model.config().vocab_size;
    let k = k.min(v);
    let mut out_ids = vec![0u32; rows * k];
    let mut out_lp = vec![0f32; rows * k];
    let mut out_lse = vec![0f32; rows];
    for r0 in (0..rows).step_by(LOGIT_ROWS) {
        let n = LOGIT_ROWS.min(rows - r0);
        let logits = model
            .logits(&hidden.narrow(0, r0, n)?)?
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?;
        // Read in place (a 50 MB chunk is not worth a copy).
        let (storage, layout) = logits.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Err(Error::Msg("teacher logits: expected host memory".into()));
        };
        distill_core::ops::host_f32(cpu, layout, "teacher logits")?
            .par_chunks_exact(v)
            .zip(out_ids[r0 * k..(r0 + n) * k].par_chunks_exact_mut(k))
            .zip(out_lp[r0 * k..(r0 + n) * k].par_chunks_exact_mut(k))
            .zip(out_lse[r0..r0 + n].par_iter_mut())
            .for_each(|(((row, ids), lps), lse)| *lse = row_topk(row, ids, lps));
    }
    if let Some(i) = out_lse.iter().position(|x| !x.is_finite()) {
        return Err(Error::Msg(format!(
            "the teacher produced non-finite logits (sequence {} of the batch, position {})",
            i / t,
            i % t
        )));
    }
    Ok((out_ids, out_lp, out_lse))
}

/// Live sparse targets (the same values a cache would hold, in f32).
pub fn live_sparse_targets(model: &CausalLm, ids: &Tensor, k: usize) -> Result<TeacherTargets> {
    sparse_targets_from_hidden(model, &model.hidden_states(ids)?, k)
}

/// [`live_sparse_targets`] from the model's final-norm hidden states (B, T, hidden).
pub fn sparse_targets_from_hidden(
    model: &CausalLm,
    hidden: &Tensor,
    k: usize,
) -> Result<TeacherTargets> {
    let (b, t, _) = hidden.dims3()?;
    let k = k.min(model.config().vocab_size);
    let (i, lp, lse) = topk_from_hidden(model, hidden, k)?;
    let device = hidden.device();
    Ok(TeacherTargets::Sparse {
        ids: Tensor::from_vec(i, (b, t, k), device)?,
        logprobs: Tensor::from_vec(lp, (b, t, k), device)?,
        logsumexp: Tensor::from_vec(lse, (b, t), device)?,
    })
}

/// The settings a run of `opts` over `tokens` with this teacher produces.
pub fn settings_for(
    teacher_hash: &str,
    teacher: &ModelDir,
    tokens: &TokenShardsMeta,
    opts: &CacheOptions,
) -> CacheSettings {
    CacheSettings {
        top_k: opts.top_k.min(teacher.config.vocab_size),
        dtype: opts.dtype,
        teacher_hash: teacher_hash.to_string(),
        tokenizer_hash: tokens.tokenizer_hash.clone(),
        tokens_hash: tokens_hash(tokens),
        seq_len: tokens.seq_len,
        vocab_size: teacher.config.vocab_size,
        splits: opts.splits.clone(),
        shard_sequences: opts.shard_sequences.max(1),
        max_sequences: opts.max_sequences,
        batch_size: opts.batch_size.max(1),
        teacher_precision: teacher.model.precision(),
    }
}

/// Builds (or continues) this part of a cache in `out`. `progress(done, total)` is called with
/// token counts of this part. Returns what was done.
pub fn build_cache(
    teacher: &ModelDir,
    teacher_hash: &str,
    tokens_dir: &Path,
    out: &Path,
    opts: &CacheOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<CacheSummary> {
    let start = Instant::now();
    let [part, parts] = opts.part;
    if parts == 0 || part >= parts {
        return Err(Error::Msg(format!(
            "--shard {part}/{parts}: expected I/N with 0 ≤ I < N"
        )));
    }
    let tokens = TokenShardsMeta::read(tokens_dir)?;
    tokens.check_tokenizer(tokens_dir, &teacher.tokenizer, &teacher.dir)?;
    if tokens.vocab_size > teacher.config.vocab_size {
        return Err(Error::file(
            tokens_dir.join(distill_core::shards::META_FILE),
            format!(
                "token vocabulary ({}) is larger than the teacher's ({})",
                tokens.vocab_size, teacher.config.vocab_size
            ),
        ));
    }
    let settings = settings_for(teacher_hash, teacher, &tokens, opts);
    let planned = plan(&tokens, &settings)?;
    let mine: Vec<&PlannedShard> = planned
        .iter()
        .enumerate()
        .filter(|(i, _)| i % parts == part)
        .map(|(_, p)| p)
        .collect();

    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let manifest_path = out.join(manifest_name(opts.part));
    let mut manifest = if manifest_path.exists() {
        let m = CacheManifest::read(&manifest_path)?;
        let diff = m.settings.differences(&settings);
        if !diff.is_empty() {
            return Err(Error::file(
                &manifest_path,
                format!(
                    "holds a cache built with other settings ({}); use another --out or remove it",
                    diff.join("; ")
                ),
            ));
        }
        m
    } else {
        CacheManifest {
            format_version: settings.format_version(),
            settings: settings.clone(),
            part: opts.part,
            shards: Vec::new(),
        }
    };

    let seq_len = settings.seq_len as u64;
    let tokens_total: u64 = mine.iter().map(|p| p.sequences * seq_len).sum();
    let mut done = 0u64;
    let mut computed = 0u64;
    let mut written = 0usize;
    let mut opened: BTreeMap<String, TokenShards> = BTreeMap::new();
    progress(0, tokens_total);
    for p in mine.iter().copied() {
        let complete = manifest.shards.iter().any(|s| {
            s.shard == *p
                && std::fs::metadata(out.join(&s.shard.file)).is_ok_and(|m| m.len() == s.bytes)
        });
        if complete {
            done += p.sequences * seq_len;
            progress(done, tokens_total);
            continue;
        }
        if !opened.contains_key(&p.split) {
            opened.insert(p.split.clone(), TokenShards::open(tokens_dir, &p.split)?);
        }
        let shards = &opened[&p.split];
        let (n, t, k) = (p.sequences as usize, settings.seq_len, settings.top_k);
        let mut ids = Vec::with_capacity(n * t * k);
        let mut lps = Vec::with_capacity(n * t * k);
        let mut lse = Vec::with_capacity(n * t);
        let first = p.first as usize;
        for b0 in (0..n).step_by(settings.batch_size) {
            let b = settings.batch_size.min(n - b0);
            let batch: Vec<u32> = (first + b0..first + b0 + b)
                .flat_map(|i| shards.sequence(i))
                .collect();
            let input = Tensor::from_vec(batch, (b, t), teacher.model.device())?;
            let (i, lp, l) = topk_batch(&teacher.model, &input, k).map_err(|e| match e {
                Error::Msg(m) => Error::Msg(format!("{} ({}): {m}", p.token_shard, p.split)),
                e => e,
            })?;
            ids.extend(i);
            lps.extend(lp);
            lse.extend(l);
            done += (b * t) as u64;
            computed += (b * t) as u64;
            progress(done, tokens_total);
        }
        let bytes = encode_shard(&ids, &lps, &lse, n, &settings)?;
        let path = out.join(&p.file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        distill_core::fsio::write_atomic(&path, &bytes)?;
        manifest.shards.retain(|s| s.shard.file != p.file);
        manifest.shards.push(CacheShardMeta {
            shard: p.clone(),
            bytes: bytes.len() as u64,
            sha256: distill_core::digest::sha256_hex(&bytes),
        });
        manifest.write(out)?;
        written += 1;
    }
    // A run that had nothing to do still leaves a manifest (an empty part is a valid part).
    manifest.write(out)?;
    let bytes: u64 = manifest
        .shards
        .iter()
        .filter(|s| mine.iter().any(|p| **p == s.shard))
        .map(|s| s.bytes)
        .sum();
    Ok(CacheSummary {
        tokens_total,
        tokens_computed: computed,
        shards_total: mine.len(),
        shards_written: written,
        bytes,
        bytes_per_token: bytes as f64 / tokens_total.max(1) as f64,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// `distill cache --merge`: checks that the parts assembled in `dir` form a complete cache over
/// `tokens` (every shard present, lengths and checksums right) and writes its `manifest.json`.
pub fn merge_cache(dir: &Path, tokens: &TokenShardsMeta) -> Result<CacheManifest> {
    use distill_core::cache::{complete_manifest, merge_parts, verify_shards, CacheExpect};
    let merged = merge_parts(dir)?;
    let complete = complete_manifest(dir, merged, tokens, &CacheExpect::default())?;
    verify_shards(dir, &complete.shards)?;
    complete.write(dir)?;
    Ok(complete)
}
