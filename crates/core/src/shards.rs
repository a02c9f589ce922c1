//! Token shards: packed fixed-length sequences of u32 token ids (documents joined with EOS),
//! little-endian, memory-mapped, with a `meta.json` that carries a format version, the tokenizer
//! hash and per-shard checksums. Written by `distill prepare`, read by the cache builder, the
//! trainer and eval through [`TokenShards`] and the seeded, resumable [`BatchReader`].

use crate::digest::{hex, sha256_hex};
use crate::error::{Error, FileContext, Result};
use crate::fsio::{read_text, write_atomic};
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
    /// Masked splits: sha256 of the shard's target mask (`shard-NNNNN.mask`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_sha256: Option<String>,
}

/// The target mask file beside a shard file: `train/shard-00000.bin` → `train/shard-00000.mask`.
pub fn mask_file(shard_file: &str) -> String {
    format!(
        "{}.mask",
        shard_file.strip_suffix(".bin").unwrap_or(shard_file)
    )
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitMeta {
    pub sequences: u64,
    pub tokens: u64,
    /// Bytes of text (UTF-8) that went into this split, for bits-per-byte.
    pub bytes: u64,
    pub documents: u64,
    pub shards: Vec<ShardMeta>,
    /// Whether each shard has a target mask: one byte per token, 1 where the token is a training
    /// target (predicted from the tokens before it), 0 where it is context only (a prompt, or
    /// padding). Unmasked splits train on every token.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub masked: bool,
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

    /// Refuses shards tokenized by another tokenizer than `model_dir`'s, naming `dir`'s meta.json.
    pub fn check_tokenizer(
        &self,
        dir: &Path,
        tokenizer: &crate::Tokenizer,
        model_dir: &Path,
    ) -> Result<()> {
        let theirs = tokenizer.hash();
        if self.tokenizer_hash == theirs {
            return Ok(());
        }
        let short = |h: &str| h[..12.min(h.len())].to_string();
        Err(Error::file(
            dir.join(META_FILE),
            format!(
                "token shards were made with another tokenizer than the model's {} (tokenizer \
                 hash {} vs {})",
                model_dir.display(),
                short(&self.tokenizer_hash),
                short(&theirs)
            ),
        ))
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
    /// The open shard's target mask (masked splits).
    current_mask: Option<(std::io::BufWriter<std::fs::File>, PathBuf, Sha256)>,
    written: Vec<(PathBuf, ShardMeta)>,
    written_masks: Vec<PathBuf>,
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
            current_mask: None,
            written: Vec::new(),
            written_masks: Vec::new(),
            meta: SplitMeta::default(),
        }
    }

    /// Appends one document (its ids, then EOS).
    pub fn push_document(&mut self, ids: &[u32], eos: u32, bytes: u64) -> Result<()> {
        if self.meta.masked {
            return Err(Error::Msg(
                "a masked split takes whole sequences (push_sequence), not documents".into(),
            ));
        }
        self.pending.extend_from_slice(ids);
        self.pending.push(eos);
        self.meta.documents += 1;
        self.meta.bytes += bytes;
        let full = self.pending.len() / self.seq_len * self.seq_len;
        if full > 0 {
            let seqs: Vec<u32> = self.pending.drain(..full).collect();
            for seq in seqs.chunks(self.seq_len) {
                self.write_sequence(seq, None)?;
            }
        }
        Ok(())
    }

    /// Appends one sequence of exactly `seq_len` ids with its target mask (1 = train on this
    /// token), making the split a masked one. `bytes`: the text it came from, for bits-per-byte.
    pub fn push_sequence(&mut self, ids: &[u32], mask: &[u8], bytes: u64) -> Result<()> {
        if ids.len() != self.seq_len || mask.len() != self.seq_len {
            return Err(Error::Msg(format!(
                "push_sequence: {} ids and {} mask bytes for sequences of {}",
                ids.len(),
                mask.len(),
                self.seq_len
            )));
        }
        if !self.meta.masked && self.meta.sequences > 0 {
            return Err(Error::Msg(
                "push_sequence on a split that already holds packed documents".into(),
            ));
        }
        self.meta.masked = true;
        self.meta.documents += 1;
        self.meta.bytes += bytes;
        self.write_sequence(ids, Some(mask))
    }

    fn write_sequence(&mut self, seq: &[u32], mask: Option<&[u8]>) -> Result<()> {
        if self.current.is_none() {
            let name = format!("{}/shard-{:05}.bin", self.split, self.written.len());
            let path = self.dir.join(&name);
            let tmp = crate::fsio::tmp_name(&path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            self.current = Some((std::io::BufWriter::new(f), tmp, 0, Sha256::new()));
            if mask.is_some() {
                let mpath = self.dir.join(mask_file(&name));
                let mtmp = crate::fsio::tmp_name(&mpath);
                let f = std::fs::File::create(&mtmp).map_err(|e| Error::io(&mtmp, e))?;
                self.current_mask = Some((std::io::BufWriter::new(f), mtmp, Sha256::new()));
            }
        }
        if let (Some(mask), Some((w, tmp, hasher))) = (mask, self.current_mask.as_mut()) {
            w.write_all(mask).map_err(|e| Error::io(&*tmp, e))?;
            hasher.update(mask);
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
            let mask_sha256 = match self.current_mask.take() {
                Some((mut w, mtmp, mh)) => {
                    w.flush().map_err(|e| Error::io(&mtmp, e))?;
                    self.written_masks.push(mtmp);
                    Some(hex(&mh.finalize()))
                }
                None => None,
            };
            self.written.push((
                tmp,
                ShardMeta {
                    file: name,
                    sequences: n,
                    sha256: hex(&hasher.finalize()),
                    mask_sha256,
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
        for (mtmp, (_, shard)) in self.written_masks.iter().zip(&self.written) {
            let dst = self.dir.join(mask_file(&shard.file));
            std::fs::rename(mtmp, &dst).map_err(|e| Error::io(&dst, e))?;
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
    /// Target masks, for masked splits.
    masks: Vec<memmap2::Mmap>,
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
        let mut masks = Vec::new();
        let mut offsets = vec![0u64];
        for s in &sm.shards {
            if sm.masked {
                let path = dir.join(mask_file(&s.file));
                let f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
                // SAFETY: as for the shards below.
                let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&path, e))?;
                let want = s.sequences * meta.seq_len as u64;
                if map.len() as u64 != want {
                    return Err(Error::file(
                        &path,
                        format!(
                            "target mask is {} bytes, meta.json says {want}: truncated or corrupt",
                            map.len()
                        ),
                    ));
                }
                check_sha256(&path, &map, s.mask_sha256.as_deref())?;
                masks.push(map);
            }
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
            check_sha256(&path, &map, Some(&s.sha256))?;
            // Ids past the vocabulary would index outside the embeddings.
            if let Some((i, id)) = map
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .enumerate()
                .find(|&(_, id)| id as usize >= meta.vocab_size)
            {
                return Err(Error::file(
                    &path,
                    format!(
                        "token id {id} at position {i} is outside the vocabulary of {} (corrupt shard)",
                        meta.vocab_size
                    ),
                ));
            }
            offsets.push(offsets.last().copied().unwrap_or(0) + s.sequences);
            maps.push(map);
        }
        Ok(Self {
            split: split.to_string(),
            maps,
            masks,
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

    /// Sequence `i`'s target mask (seq_len bytes, 1 = a training target), or None for an
    /// unmasked split (every token is a target).
    pub fn target_mask(&self, i: usize) -> Option<&[u8]> {
        if self.masks.is_empty() {
            return None;
        }
        let shard = self.offsets.partition_point(|&o| o <= i as u64) - 1;
        let local = i - self.offsets[shard] as usize;
        let n = self.meta.seq_len;
        Some(&self.masks[shard][local * n..(local + 1) * n])
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

/// Checks a shard file's bytes against the sha256 its meta.json recorded. Measured on the 18 MB
/// train split of data/tokens/corpus: sha256 29 ms, the vocabulary scan 9 ms (sha2 0.10.9,
/// release), so every open verifies.
fn check_sha256(path: &Path, bytes: &[u8], want: Option<&str>) -> Result<()> {
    let Some(want) = want else { return Ok(()) };
    let got = sha256_hex(bytes);
    if got != want {
        return Err(Error::file(
            path,
            format!("sha256 {got} does not match meta.json's {want}: the shard changed after it was written"),
        ));
    }
    Ok(())
}

/// Where a [`BatchReader`] stands: the epoch and the position in that epoch's order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
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

#[cfg(test)]
mod tests {
    use super::*;

    fn write_masked(dir: &Path) -> Result<()> {
        let mut w = SplitWriter::new(dir, "train", 4, 2);
        w.push_sequence(&[1, 2, 3, 0], &[0, 1, 1, 0], 10)?;
        w.push_sequence(&[4, 5, 6, 7], &[0, 0, 1, 1], 12)?;
        w.push_sequence(&[8, 9, 0, 0], &[0, 1, 0, 0], 5)?;
        assert!(
            w.push_document(&[1], 0, 1).is_err(),
            "no documents in a masked split"
        );
        let split = w.finish()?;
        assert!(split.masked);
        assert_eq!(split.shards.len(), 2);
        TokenShardsMeta {
            format_version: FORMAT_VERSION,
            tokenizer_hash: "t".into(),
            seq_len: 4,
            eos_id: 0,
            vocab_size: 10,
            splits: BTreeMap::from([("train".to_string(), split)]),
            sources: vec![],
        }
        .write(dir)
    }

    #[test]
    fn masked_splits_round_trip_and_refuse_truncated_masks() {
        let dir = tempfile::tempdir().unwrap();
        write_masked(dir.path()).unwrap();
        let s = TokenShards::open(dir.path(), "train").unwrap();
        assert_eq!(s.sequence(1), vec![4, 5, 6, 7]);
        assert_eq!(s.target_mask(1), Some(&[0u8, 0, 1, 1][..]));
        assert_eq!(s.target_mask(2), Some(&[0u8, 1, 0, 0][..]));
        let mask = dir.path().join("train/shard-00001.mask");
        std::fs::write(&mask, [0u8, 1]).unwrap();
        let e = TokenShards::open(dir.path(), "train")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("shard-00001.mask") && e.contains("truncated"),
            "{e}"
        );
        // Wrong lengths are refused.
        let mut w = SplitWriter::new(dir.path(), "x", 4, 2);
        assert!(w.push_sequence(&[1, 2], &[1, 1], 0).is_err());
    }
}
