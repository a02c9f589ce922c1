//! The teacher cache: the teacher's top-k targets for every position of a token-shards dir,
//! computed once (`distill cache`, crate distill-teacher) and read by the trainer and eval.
//!
//! Layout of a cache dir:
//! ```text
//! manifest.json                              settings + the complete shards (sha256, bytes)
//! manifest.part-I-of-N.json                  the same, for one part of a `--shard I/N` run
//! {split}/shard-TTTTT-CCCC.safetensors       sequences of token shard TTTTT, chunk CCCC
//! ```
//! Each shard holds, for `n` sequences of `seq_len` positions:
//! `ids` u32 (n, seq_len, k) — the teacher's k most likely next tokens, most likely first (ties:
//! lower id first); `logprobs` f16|f32 (n, seq_len, k) — their log-probabilities at temperature 1;
//! `logsumexp` f32 (n, seq_len) — the full-vocabulary logsumexp of the raw logits. So the raw
//! logit of a kept token is `logprob + logsumexp`, the tail mass is `1 − Σ exp(logprob)`, and any
//! temperature can be re-derived over the kept set.
//!
//! Log-probs are stored as f16 by default: they are ≤ 0 and near 0 where the probability mass is,
//! where f16's spacing is finest (≤ 2⁻¹¹ relative), unlike raw logits of magnitude 20–30 whose f16
//! spacing is ~0.016.
//!
//! Cache shards are aligned with token shards (each lies inside one) and small (default 256
//! sequences) so that an interrupted run loses little and resumes at the first incomplete shard.

use crate::digest::hex;
use crate::error::{Error, FileContext, Result};
use crate::fsio::{read_text, write_atomic};
use crate::model::Precision;
use crate::shards::TokenShardsMeta;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const CACHE_FORMAT_VERSION: u32 = 1;
/// The format version of a cache whose teacher ran at a precision other than f32: the same
/// format, numbered apart so that a build from before `teacher_precision` existed (which would
/// read the cache as f32 and continue it with f32 shards) refuses it.
pub const CACHE_FORMAT_VERSION_REDUCED_PRECISION: u32 = 2;
pub const MANIFEST: &str = "manifest.json";

/// `teacher_hash` prefix of a cache built from a teacher's API answers (`api:MODEL`): there are no
/// weights to hash, so readers check only the tokenizer and tokens.
pub const API_TEACHER_PREFIX: &str = "api:";

/// What the trainer gets for a batch, from a cache or from a live teacher.
#[derive(Debug, Clone)]
pub enum TeacherTargets {
    /// Full-vocabulary raw logits (B, T, V), f32 — a live teacher.
    Dense { logits: Tensor },
    /// Top-k targets (a cache, or a live teacher reduced to top-k): `ids` u32 (B, T, K),
    /// `logprobs` f32 (B, T, K) at temperature 1, `logsumexp` f32 (B, T).
    Sparse {
        ids: Tensor,
        logprobs: Tensor,
        logsumexp: Tensor,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheDType {
    F16,
    F32,
}

impl CacheDType {
    pub fn bytes(self) -> usize {
        match self {
            CacheDType::F16 => 2,
            CacheDType::F32 => 4,
        }
    }
}

impl std::str::FromStr for CacheDType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f16" => Ok(Self::F16),
            "f32" => Ok(Self::F32),
            _ => Err(Error::Msg(format!(
                "cache dtype '{s}': expected f16 or f32"
            ))),
        }
    }
}

/// Everything that determines a cache's content. Two runs (or parts) with equal settings write
/// byte-identical shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheSettings {
    pub top_k: usize,
    pub dtype: CacheDType,
    /// `weights::model_hash` of the teacher dir.
    pub teacher_hash: String,
    /// `Tokenizer::hash` of the tokenizer the token shards were made with.
    pub tokenizer_hash: String,
    /// [`tokens_hash`] of the token shards' meta.json.
    pub tokens_hash: String,
    pub seq_len: usize,
    pub vocab_size: usize,
    /// Splits cached, in order.
    pub splits: Vec<String>,
    /// Sequences per cache shard.
    pub shard_sequences: usize,
    /// Only the first N sequences of each split (a slice of a large corpus).
    pub max_sequences: Option<u64>,
    /// Sequences per teacher forward. It does not change the values' meaning, but floating-point
    /// results can depend on the batch shape, so it is part of what makes shards reproducible.
    pub batch_size: usize,
    /// The precision of the teacher's products (`distill cache --teacher-precision`); absent
    /// from manifests of f32 caches, as before it existed.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub teacher_precision: Precision,
}

impl CacheSettings {
    /// Human-readable differences (`self` = what is on disk, `other` = what was asked).
    pub fn differences(&self, other: &CacheSettings) -> Vec<String> {
        let mut d = Vec::new();
        let mut cmp = |name: &str, a: String, b: String| {
            if a != b {
                d.push(format!("{name} {a} on disk vs {b} asked"));
            }
        };
        cmp("top-k", self.top_k.to_string(), other.top_k.to_string());
        cmp(
            "dtype",
            format!("{:?}", self.dtype),
            format!("{:?}", other.dtype),
        );
        cmp(
            "teacher hash",
            short(&self.teacher_hash),
            short(&other.teacher_hash),
        );
        cmp(
            "tokenizer hash",
            short(&self.tokenizer_hash),
            short(&other.tokenizer_hash),
        );
        cmp(
            "tokens hash",
            short(&self.tokens_hash),
            short(&other.tokens_hash),
        );
        cmp(
            "seq_len",
            self.seq_len.to_string(),
            other.seq_len.to_string(),
        );
        cmp(
            "vocab size",
            self.vocab_size.to_string(),
            other.vocab_size.to_string(),
        );
        cmp("splits", self.splits.join(","), other.splits.join(","));
        cmp(
            "shard sequences",
            self.shard_sequences.to_string(),
            other.shard_sequences.to_string(),
        );
        cmp(
            "max sequences",
            format!("{:?}", self.max_sequences),
            format!("{:?}", other.max_sequences),
        );
        cmp(
            "batch size",
            self.batch_size.to_string(),
            other.batch_size.to_string(),
        );
        cmp(
            "teacher precision",
            self.teacher_precision.to_string(),
            other.teacher_precision.to_string(),
        );
        d
    }

    /// The manifest's format version for these settings (f32 caches keep version 1).
    pub fn format_version(&self) -> u32 {
        if self.teacher_precision.is_f32() {
            CACHE_FORMAT_VERSION
        } else {
            CACHE_FORMAT_VERSION_REDUCED_PRECISION
        }
    }

    /// Bytes per cached position: k ids (u32) + k log-probs + one f32 logsumexp.
    pub fn bytes_per_token(&self) -> usize {
        self.top_k * (4 + self.dtype.bytes()) + 4
    }
}

fn short(h: &str) -> String {
    h.chars().take(12).collect()
}

/// One cache shard as planned from the token shards: which sequences it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedShard {
    pub split: String,
    /// File name relative to the cache dir.
    pub file: String,
    /// The token shard it lies in (relative to the tokens dir) and that shard's sha256.
    pub token_shard: String,
    pub token_sha256: String,
    /// Index of its first sequence within the split (as `TokenShards::sequence` counts).
    pub first: u64,
    pub sequences: u64,
}

/// A written, complete shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheShardMeta {
    #[serde(flatten)]
    pub shard: PlannedShard,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheManifest {
    pub format_version: u32,
    pub settings: CacheSettings,
    /// `[I, N]` for a part of a `--shard I/N` run; `[0, 1]` for a whole run or a merged cache.
    pub part: [usize; 2],
    /// Complete shards, in plan order.
    pub shards: Vec<CacheShardMeta>,
}

/// The manifest file of part I of N (`manifest.json` for a whole run).
pub fn manifest_name(part: [usize; 2]) -> String {
    if part == [0, 1] {
        MANIFEST.to_string()
    } else {
        format!("manifest.part-{}-of-{}.json", part[0], part[1])
    }
}

impl CacheManifest {
    pub fn read(path: &Path) -> Result<Self> {
        let text = read_text(path)?;
        let v: serde_json::Value = serde_json::from_str(&text).with_file(path)?;
        let version = v.get("format_version").and_then(|v| v.as_u64());
        let known = [CACHE_FORMAT_VERSION, CACHE_FORMAT_VERSION_REDUCED_PRECISION];
        if !version.is_some_and(|v| known.iter().any(|&k| k as u64 == v)) {
            return Err(Error::file(
                path,
                format!(
                    "teacher cache format version {} (this build reads {CACHE_FORMAT_VERSION} \
                     and {CACHE_FORMAT_VERSION_REDUCED_PRECISION})",
                    version.map_or("missing".to_string(), |v| v.to_string())
                ),
            ));
        }
        let m: Self = serde_json::from_value(v).with_file(path)?;
        if m.format_version != m.settings.format_version() {
            return Err(Error::file(
                path,
                format!(
                    "teacher cache format version {} does not match its teacher precision {}",
                    m.format_version, m.settings.teacher_precision
                ),
            ));
        }
        Ok(m)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("manifest serialises");
        write_atomic(dir.join(manifest_name(self.part)), text.as_bytes())
    }
}

/// The identity of a token-shards dir's content: sha256 over its seq_len and every shard's name
/// and sha256 (all splits).
pub fn tokens_hash(meta: &TokenShardsMeta) -> String {
    let mut h = Sha256::new();
    h.update(format!("seq_len {}\n", meta.seq_len).as_bytes());
    for (name, split) in &meta.splits {
        for s in &split.shards {
            h.update(format!("{name} {} {} {}\n", s.file, s.sequences, s.sha256).as_bytes());
        }
    }
    hex(&h.finalize())
}

/// The shards a cache of `settings` over `meta` consists of, in order.
pub fn plan(meta: &TokenShardsMeta, settings: &CacheSettings) -> Result<Vec<PlannedShard>> {
    let per = settings.shard_sequences.max(1) as u64;
    let mut out = Vec::new();
    for split in &settings.splits {
        let sm = meta.splits.get(split).ok_or_else(|| {
            Error::Msg(format!(
                "the token shards have no split '{split}' (they have: {})",
                meta.splits.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let limit = settings.max_sequences.unwrap_or(u64::MAX);
        let mut first = 0u64;
        for (t, ts) in sm.shards.iter().enumerate() {
            let n = ts.sequences.min(limit.saturating_sub(first));
            let mut c = 0u64;
            while c * per < n {
                let len = per.min(n - c * per);
                out.push(PlannedShard {
                    split: split.clone(),
                    file: format!("{split}/shard-{t:05}-{c:04}.safetensors"),
                    token_shard: ts.file.clone(),
                    token_sha256: ts.sha256.clone(),
                    first: first + c * per,
                    sequences: len,
                });
                c += 1;
            }
            first += ts.sequences;
            if first >= limit {
                break;
            }
        }
    }
    Ok(out)
}

/// Serialises one shard's arrays as safetensors bytes.
pub fn encode_shard(
    ids: &[u32],
    logprobs: &[f32],
    logsumexp: &[f32],
    sequences: usize,
    settings: &CacheSettings,
) -> Result<Vec<u8>> {
    use safetensors::tensor::{Dtype, TensorView};
    let (t, k) = (settings.seq_len, settings.top_k);
    let ids_b: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    let (lp_dtype, lp_b): (Dtype, Vec<u8>) = match settings.dtype {
        CacheDType::F32 => (
            Dtype::F32,
            logprobs.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        CacheDType::F16 => (
            Dtype::F16,
            logprobs
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
    };
    let lse_b: Vec<u8> = logsumexp.iter().flat_map(|v| v.to_le_bytes()).collect();
    let err = |e: safetensors::SafeTensorError| Error::Msg(format!("safetensors: {e:?}"));
    let views = vec![
        (
            "ids",
            TensorView::new(Dtype::U32, vec![sequences, t, k], &ids_b).map_err(err)?,
        ),
        (
            "logprobs",
            TensorView::new(lp_dtype, vec![sequences, t, k], &lp_b).map_err(err)?,
        ),
        (
            "logsumexp",
            TensorView::new(Dtype::F32, vec![sequences, t], &lse_b).map_err(err)?,
        ),
    ];
    safetensors::serialize(views, None).map_err(err)
}

/// What the caller expects a cache to have been built from; `None` skips that check.
#[derive(Debug, Clone, Default)]
pub struct CacheExpect {
    pub teacher_hash: Option<String>,
    pub tokenizer_hash: Option<String>,
    pub tokens_hash: Option<String>,
}

/// The manifest of a cache dir: `manifest.json`, or (for a dir assembled from the parts of a
/// `--shard I/N` run) the parts' manifests merged in memory.
pub fn load_manifest(dir: &Path) -> Result<CacheManifest> {
    if !dir.is_dir() {
        return Err(Error::file(dir, "teacher cache dir does not exist"));
    }
    let main = dir.join(MANIFEST);
    if main.exists() {
        CacheManifest::read(&main)
    } else {
        merge_parts(dir)
    }
}

/// [`load_manifest`] + [`complete_manifest`].
pub fn read_complete_manifest(
    dir: &Path,
    tokens: &TokenShardsMeta,
    expect: &CacheExpect,
) -> Result<CacheManifest> {
    complete_manifest(dir, load_manifest(dir)?, tokens, expect)
}

/// Checks that every planned shard of `manifest` is complete and names the ones that are not;
/// returns the manifest with its shards in plan order. `expect` is checked first (the tokens
/// hash defaults to that of `tokens`), so a cache of other tokens is refused as such rather than
/// as incomplete.
pub fn complete_manifest(
    dir: &Path,
    manifest: CacheManifest,
    tokens: &TokenShardsMeta,
    expect: &CacheExpect,
) -> Result<CacheManifest> {
    check_expect(
        dir,
        &manifest.settings,
        &CacheExpect {
            tokens_hash: Some(
                expect
                    .tokens_hash
                    .clone()
                    .unwrap_or_else(|| tokens_hash(tokens)),
            ),
            ..expect.clone()
        },
    )?;
    let settings = &manifest.settings;
    let planned = plan(tokens, settings)?;
    let have: BTreeMap<&str, &CacheShardMeta> = manifest
        .shards
        .iter()
        .map(|s| (s.shard.file.as_str(), s))
        .collect();
    let missing: Vec<&str> = planned
        .iter()
        .filter(|p| have.get(p.file.as_str()).is_none_or(|s| s.shard != **p))
        .map(|p| p.file.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(Error::file(
            dir,
            format!(
                "teacher cache incomplete: {} of {} shards missing (first: {}); run the same \
                 `distill cache` command again to finish it",
                missing.len(),
                planned.len(),
                missing[0]
            ),
        ));
    }
    Ok(CacheManifest {
        shards: planned
            .iter()
            .map(|p| have[p.file.as_str()].clone())
            .collect(),
        part: [0, 1],
        ..manifest
    })
}

/// Merges the part manifests found in `dir` (they must agree on settings).
pub fn merge_parts(dir: &Path) -> Result<CacheManifest> {
    let mut parts: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("manifest.part-") && n.ends_with(".json"))
        })
        .collect();
    parts.sort();
    if parts.is_empty() {
        return Err(Error::file(
            dir,
            "not a teacher cache (no manifest.json and no manifest.part-*.json)",
        ));
    }
    let mut merged: Option<CacheManifest> = None;
    let mut seen_parts = Vec::new();
    for p in &parts {
        let m = CacheManifest::read(p)?;
        seen_parts.push(m.part);
        match &mut merged {
            None => merged = Some(CacheManifest { part: [0, 1], ..m }),
            Some(acc) => {
                let diff = acc.settings.differences(&m.settings);
                if !diff.is_empty() {
                    return Err(Error::file(
                        p,
                        format!(
                            "part was built with other settings than {}: {}",
                            parts[0].display(),
                            diff.join("; ")
                        ),
                    ));
                }
                acc.shards.extend(m.shards);
            }
        }
    }
    let n = seen_parts[0][1];
    if let Some(missing) = (0..n).find(|i| !seen_parts.contains(&[*i, n])) {
        return Err(Error::file(
            dir,
            format!(
                "teacher cache incomplete: part {missing}/{n} missing (manifest.part-{missing}-of-{n}.json)"
            ),
        ));
    }
    let mut m = merged.expect("at least one part");
    m.shards.sort_by(|a, b| a.shard.file.cmp(&b.shard.file));
    m.shards.dedup_by(|a, b| a.shard.file == b.shard.file);
    Ok(m)
}

/// Checks a complete manifest's settings against what the caller expects.
pub fn check_expect(dir: &Path, s: &CacheSettings, expect: &CacheExpect) -> Result<()> {
    let checks = [
        ("another teacher", &s.teacher_hash, &expect.teacher_hash),
        (
            "another tokenizer",
            &s.tokenizer_hash,
            &expect.tokenizer_hash,
        ),
        ("other tokens", &s.tokens_hash, &expect.tokens_hash),
    ];
    for (what, have, want) in checks {
        // A cache built from a teacher's API answers names the API's model, not weights: there
        // is no weights hash to compare.
        if what == "another teacher" && have.starts_with(API_TEACHER_PREFIX) {
            continue;
        }
        if let Some(want) = want {
            if have != want {
                let kind = what.split(' ').nth(1).unwrap_or(what);
                return Err(Error::file(
                    dir.join(MANIFEST),
                    format!(
                        "teacher cache was built from {what} ({kind} hash {} in the cache, {} \
                         expected)",
                        short(have),
                        short(want)
                    ),
                ));
            }
        }
    }
    Ok(())
}

struct ShardMap {
    first: u64,
    sequences: u64,
    map: memmap2::Mmap,
    ids_at: usize,
    lp_at: usize,
    lse_at: usize,
}

/// A verified, memory-mapped teacher cache.
pub struct TeacherCache {
    pub manifest: CacheManifest,
    dir: PathBuf,
    /// Per split, its shards in order of `first`.
    splits: BTreeMap<String, Vec<ShardMap>>,
}

impl TeacherCache {
    /// Opens a cache over the token shards described by `tokens`: format version, completeness,
    /// the expected hashes, and every shard's length and sha256 are checked.
    pub fn open(dir: &Path, tokens: &TokenShardsMeta, expect: &CacheExpect) -> Result<Self> {
        let manifest = read_complete_manifest(dir, tokens, expect)?;
        verify_shards(dir, &manifest.shards)?;
        let s = &manifest.settings;
        let mut splits: BTreeMap<String, Vec<ShardMap>> = BTreeMap::new();
        for shard in &manifest.shards {
            let path = dir.join(&shard.shard.file);
            let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: cache shards are written once (temp file + rename) and never modified.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&path, e))?;
            let (ids_at, lp_at, lse_at) = {
                let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| {
                    Error::file(&path, format!("not a valid safetensors file ({e:?})"))
                })?;
                let n = shard.shard.sequences as usize;
                let lp_dtype = match s.dtype {
                    CacheDType::F16 => safetensors::Dtype::F16,
                    CacheDType::F32 => safetensors::Dtype::F32,
                };
                let at = |name: &str, dtype: safetensors::Dtype, shape: Vec<usize>| {
                    let v = st
                        .tensor(name)
                        .map_err(|_| Error::file(&path, format!("no tensor '{name}'")))?;
                    if v.dtype() != dtype || v.shape() != shape.as_slice() {
                        return Err(Error::file(
                            &path,
                            format!(
                                "tensor '{name}' is {:?} {:?}, expected {dtype:?} {shape:?}",
                                v.dtype(),
                                v.shape()
                            ),
                        ));
                    }
                    Ok(v.data().as_ptr() as usize - map.as_ptr() as usize)
                };
                (
                    at("ids", safetensors::Dtype::U32, vec![n, s.seq_len, s.top_k])?,
                    at("logprobs", lp_dtype, vec![n, s.seq_len, s.top_k])?,
                    at("logsumexp", safetensors::Dtype::F32, vec![n, s.seq_len])?,
                )
            };
            splits
                .entry(shard.shard.split.clone())
                .or_default()
                .push(ShardMap {
                    first: shard.shard.first,
                    sequences: shard.shard.sequences,
                    map,
                    ids_at,
                    lp_at,
                    lse_at,
                });
        }
        Ok(Self {
            manifest,
            dir: dir.to_path_buf(),
            splits,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.manifest.settings
    }

    /// Sequences cached for `split` (a prefix of the split: `0..n`).
    pub fn sequences(&self, split: &str) -> usize {
        self.splits
            .get(split)
            .map_or(0, |v| v.iter().map(|s| s.sequences as usize).sum())
    }

    /// Sparse targets for the given sequences of `split` (as `TokenShards::sequence` numbers them).
    pub fn targets(&self, split: &str, seqs: &[usize], device: &Device) -> Result<TeacherTargets> {
        let shards = self.splits.get(split).ok_or_else(|| {
            Error::file(&self.dir, format!("teacher cache holds no split '{split}'"))
        })?;
        let s = &self.manifest.settings;
        let (t, k) = (s.seq_len, s.top_k);
        let mut ids = Vec::with_capacity(seqs.len() * t * k);
        let mut lps = Vec::with_capacity(seqs.len() * t * k);
        let mut lse = Vec::with_capacity(seqs.len() * t);
        for &i in seqs {
            let at = shards.partition_point(|m| m.first <= i as u64);
            let m = at
                .checked_sub(1)
                .map(|a| &shards[a])
                .filter(|m| (i as u64) < m.first + m.sequences)
                .ok_or_else(|| {
                    Error::file(
                        &self.dir,
                        format!("sequence {i} of split '{split}' is not in the teacher cache"),
                    )
                })?;
            let local = i - m.first as usize;
            let words =
                |at: usize, n: usize, size: usize| &m.map[at + local * n * size..][..n * size];
            ids.extend(
                words(m.ids_at, t * k, 4)
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            match s.dtype {
                CacheDType::F16 => lps.extend(
                    words(m.lp_at, t * k, 2)
                        .chunks_exact(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
                ),
                CacheDType::F32 => lps.extend(
                    words(m.lp_at, t * k, 4)
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                ),
            }
            lse.extend(
                words(m.lse_at, t, 4)
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        let b = seqs.len();
        Ok(TeacherTargets::Sparse {
            ids: Tensor::from_vec(ids, (b, t, k), device)?,
            logprobs: Tensor::from_vec(lps, (b, t, k), device)?,
            logsumexp: Tensor::from_vec(lse, (b, t), device)?,
        })
    }
}

/// Checks each shard's length and sha256 against its manifest entry (in parallel).
pub fn verify_shards(dir: &Path, shards: &[CacheShardMeta]) -> Result<()> {
    use rayon::prelude::*;
    shards.par_iter().try_for_each(|s| {
        let path = dir.join(&s.shard.file);
        let len = std::fs::metadata(&path)
            .map_err(|e| Error::io(&path, e))?
            .len();
        if len != s.bytes {
            return Err(Error::file(
                &path,
                format!(
                    "cache shard is {len} bytes, the manifest says {}: truncated or corrupt",
                    s.bytes
                ),
            ));
        }
        let sha = crate::weights::file_sha256(&path)?;
        if sha != s.sha256 {
            return Err(Error::file(
                &path,
                "cache shard checksum does not match the manifest: corrupt",
            ));
        }
        Ok(())
    })
}
