//! Token shards: packed fixed-length sequences of u32 token ids (documents joined with EOS),
//! little-endian, memory-mapped, with a `meta.json` that carries a format version, the tokenizer
//! hash and per-shard checksums. Written by `distill prepare`, read by the cache builder, the
//! trainer and eval through [`TokenShards`] and the seeded, resumable [`BatchReader`].

use crate::error::{read_text, write_atomic, Error, FileContext, Result};
use crate::tokenizer::hex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT_VERSION: u32 = 1;
pub const META_FILE: &str = "meta.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardMeta {
    /// File name relative to the shards dir, e.g. `train/shard-00000.bin`.
    pub file: String,
    pub sequences: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitMeta {
    pub sequences: u64,
    pub tokens: u64,
    /// Bytes of text (UTF-8) that went into this split, for bits-per-byte.
    pub bytes: u64,
    pub documents: u64,
    pub shards: Vec<ShardMeta>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceMeta {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
    pub documents: u64,
    pub tokens: u64,
    /// Invalid UTF-8 sequences replaced (only with `--lossy`).
    #[serde(default)]
    pub replaced: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenShardsMeta {
    pub format_version: u32,
    /// sha256 of the tokenizer that produced the ids (`Tokenizer::hash`).
    pub tokenizer_hash: String,
    pub seq_len: usize,
    pub eos_id: u32,
    pub vocab_size: usize,
    pub splits: BTreeMap<String, SplitMeta>,
    pub sources: Vec<SourceMeta>,
}

impl TokenShardsMeta {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(META_FILE);
        if !path.exists() {
            return Err(Error::file(dir, "not a token shards dir (no meta.json)"));
        }
        let meta: Self = serde_json::from_str(&read_text(&path)?).with_file(&path)?;
        if meta.format_version != FORMAT_VERSION {
            return Err(Error::file(
                &path,
                format!(
                    "token shards format version {} (this build reads {FORMAT_VERSION})",
                    meta.format_version
                ),
            ));
        }
        Ok(meta)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("meta serialises");
        write_atomic(dir.join(META_FILE), text.as_bytes())
    }
}

/// Packs a stream of documents' ids into `seq_len` sequences and writes them as shards of at most
/// `shard_sequences` sequences each. Files are written under temporary names; `finish` renames.
pub struct SplitWriter {
    dir: PathBuf,
    split: String,
    seq_len: usize,
    shard_sequences: usize,
    pending: Vec<u32>,
    current: Option<(std::io::BufWriter<std::fs::File>, PathBuf, u64, Sha256)>,
    written: Vec<(PathBuf, ShardMeta)>,
    pub meta: SplitMeta,
}

impl SplitWriter {
    pub fn new(dir: &Path, split: &str, seq_len: usize, shard_sequences: usize) -> Self {
        Self {
            dir: dir.to_path_buf(),
            split: split.to_string(),
            seq_len,
            shard_sequences: shard_sequences.max(1),
            pending: Vec::new(),
            current: None,
            written: Vec::new(),
            meta: SplitMeta::default(),
        }
    }

    /// Appends one document (its ids, then EOS).
    pub fn push_document(&mut self, ids: &[u32], eos: u32, bytes: u64) -> Result<()> {
        self.pending.extend_from_slice(ids);
        self.pending.push(eos);
        self.meta.documents += 1;
        self.meta.bytes += bytes;
        let full = self.pending.len() / self.seq_len * self.seq_len;
        if full > 0 {
            let seqs: Vec<u32> = self.pending.drain(..full).collect();
            for seq in seqs.chunks(self.seq_len) {
                self.write_sequence(seq)?;
            }
        }
        Ok(())
    }

    fn write_sequence(&mut self, seq: &[u32]) -> Result<()> {
        if self.current.is_none() {
            let name = format!("{}/shard-{:05}.bin", self.split, self.written.len());
            let path = self.dir.join(&name);
            let tmp = crate::error::tmp_name(&path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            self.current = Some((std::io::BufWriter::new(f), tmp, 0, Sha256::new()));
        }
        let (w, tmp, n, hasher) = self.current.as_mut().expect("just opened");
        let bytes: Vec<u8> = seq.iter().flat_map(|t| t.to_le_bytes()).collect();
        w.write_all(&bytes).map_err(|e| Error::io(&*tmp, e))?;
        hasher.update(&bytes);
        *n += 1;
        self.meta.sequences += 1;
        self.meta.tokens += seq.len() as u64;
        if *n as usize >= self.shard_sequences {
            self.close_shard()?;
        }
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some((mut w, tmp, n, hasher)) = self.current.take() {
            w.flush().map_err(|e| Error::io(&tmp, e))?;
            let name = format!("{}/shard-{:05}.bin", self.split, self.written.len());
            self.written.push((
                tmp,
                ShardMeta {
                    file: name,
                    sequences: n,
                    sha256: hex(&hasher.finalize()),
                },
            ));
        }
        Ok(())
    }

    /// Closes the last shard (the tail shorter than one sequence is dropped) and renames the files
    /// into place. Returns the split's metadata.
    pub fn finish(mut self) -> Result<SplitMeta> {
        self.close_shard()?;
        for (tmp, shard) in &self.written {
            let dst = self.dir.join(&shard.file);
            std::fs::rename(tmp, &dst).map_err(|e| Error::io(&dst, e))?;
        }
        self.meta.shards = self.written.into_iter().map(|(_, s)| s).collect();
        Ok(self.meta)
    }
}

/// Memory-mapped token shards of one split.
pub struct TokenShards {
    pub meta: TokenShardsMeta,
    pub split: String,
    maps: Vec<memmap2::Mmap>,
    /// Cumulative sequence counts: shard i holds sequences offsets[i]..offsets[i+1].
    offsets: Vec<u64>,
    dir: PathBuf,
}

impl TokenShards {
    /// Opens `split` of a shards dir; each shard's length is checked against the manifest.
    pub fn open(dir: &Path, split: &str) -> Result<Self> {
        let meta = TokenShardsMeta::read(dir)?;
        let sm = meta.splits.get(split).ok_or_else(|| {
            Error::file(
                dir.join(META_FILE),
                format!("no split '{split}' in token shards"),
            )
        })?;
        if sm.sequences == 0 {
            return Err(Error::file(
                dir.join(META_FILE),
                format!("split '{split}' holds no sequences"),
            ));
        }
        let mut maps = Vec::new();
        let mut offsets = vec![0u64];
        for s in &sm.shards {
            let path = dir.join(&s.file);
            let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: shard files are written once and never modified in place.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&path, e))?;
            let want = s.sequences * meta.seq_len as u64 * 4;
            if map.len() as u64 != want {
                return Err(Error::file(
                    &path,
                    format!(
                        "shard is {} bytes, meta.json says {want}: truncated or corrupt",
                        map.len()
                    ),
                ));
            }
            offsets.push(offsets.last().copied().unwrap_or(0) + s.sequences);
            maps.push(map);
        }
        Ok(Self {
            split: split.to_string(),
            maps,
            offsets,
            dir: dir.to_path_buf(),
            meta,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn len(&self) -> usize {
        *self.offsets.last().unwrap_or(&0) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn seq_len(&self) -> usize {
        self.meta.seq_len
    }

    /// Sequence `i` (seq_len ids).
    pub fn sequence(&self, i: usize) -> Vec<u32> {
        let shard = self.offsets.partition_point(|&o| o <= i as u64) - 1;
        let local = i - self.offsets[shard] as usize;
        let n = self.meta.seq_len;
        let bytes = &self.maps[shard][local * n * 4..(local + 1) * n * 4];
        bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
}

/// Where a [`BatchReader`] stands: the epoch and the position in that epoch's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub index: u64,
}

/// Deterministic shuffled batches: each epoch visits every sequence once in an order fixed by
/// (seed, epoch). The cursor can be saved and restored to continue exactly where a run stopped.
pub struct BatchReader<'a> {
    shards: &'a TokenShards,
    seed: u64,
    /// Only sequences `0..limit` take part (e.g. the prefix a teacher cache covers).
    limit: usize,
    order: Vec<u32>,
    cursor: Cursor,
}

impl<'a> BatchReader<'a> {
    pub fn new(shards: &'a TokenShards, seed: u64) -> Self {
        Self::with_limit(shards, seed, shards.len())
    }

    /// A reader over the first `limit` sequences only.
    pub fn with_limit(shards: &'a TokenShards, seed: u64, limit: usize) -> Self {
        let mut r = Self {
            shards,
            seed,
            limit: limit.min(shards.len()).max(1),
            order: Vec::new(),
            cursor: Cursor { epoch: 0, index: 0 },
        };
        r.shuffle();
        r
    }

    /// Sequences per epoch.
    pub fn epoch_len(&self) -> usize {
        self.order.len()
    }

    fn shuffle(&mut self) {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let mut order: Vec<u32> = (0..self.limit as u32).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            self.seed ^ self.cursor.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        order.shuffle(&mut rng);
        self.order = order;
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    pub fn restore(&mut self, cursor: Cursor) {
        let reshuffle = cursor.epoch != self.cursor.epoch;
        self.cursor = cursor;
        if reshuffle {
            self.shuffle();
        }
    }

    /// The next `batch` sequences, row-major (batch · seq_len ids), crossing epochs as needed.
    pub fn next_batch(&mut self, batch: usize) -> Vec<u32> {
        self.next_indices(batch)
            .into_iter()
            .flat_map(|i| self.shards.sequence(i))
            .collect()
    }

    /// The numbers of the next `batch` sequences (to fetch their tokens and their teacher
    /// targets), crossing epochs as needed.
    pub fn next_indices(&mut self, batch: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(batch);
        for _ in 0..batch {
            if self.cursor.index as usize >= self.order.len() {
                self.cursor = Cursor {
                    epoch: self.cursor.epoch + 1,
                    index: 0,
                };
                self.shuffle();
            }
            out.push(self.order[self.cursor.index as usize] as usize);
            self.cursor.index += 1;
        }
        out
    }
}
