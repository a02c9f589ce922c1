//! `distill prepare-collected`: turns a collection (`distill collect`) into training data.
//!
//! - **Token shards** (`OUT/tokens`, a masked split): one sequence per answer — the chat-templated
//!   prompt, then the teacher's completion (and EOS when it stopped by itself), padded to
//!   `seq_len` — with a target mask that trains only on the completion. Trained with
//!   `alpha_kd = 0` this is sequence-level distillation: the student learns the teacher's answers
//!   as text. It needs no logprobs.
//! - **Sparse teacher targets** (`OUT/cache`, the teacher-cache format) when every answer carries
//!   `top_logprobs`: at the position before each completion token, the k alternatives the API
//!   returned with their log-probabilities (k ≤ 20), mapped back to ids through the shared
//!   tokenizer by their bytes. The cache names the API's model (`api:MODEL`) instead of weights.
//!
//! The completion's ids are the API's own tokens (mapped by their bytes), not a re-tokenization of
//! its text, so that position j of the sequence is the token whose alternatives the API reported.
//! A token whose bytes match no id is reported, re-tokenized from its text, and masked.

use crate::client::{CollectMeta, Collected};
use distill_core::cache::{
    encode_shard, plan, tokens_hash, CacheDType, CacheManifest, CacheSettings, CacheShardMeta,
    API_TEACHER_PREFIX, CACHE_FORMAT_VERSION,
};
use distill_core::error::{Error, Result};
use distill_core::fsio::{read_text, write_atomic};
use distill_core::shards::{SourceMeta, SplitWriter, TokenShardsMeta, FORMAT_VERSION};
use distill_core::Tokenizer;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct PrepareCollectedOptions {
    /// A `distill collect --out` dir.
    pub collected: PathBuf,
    /// A model dir with the tokenizer the API's model uses (config.json gives the vocabulary).
    pub tokenizer: PathBuf,
    /// Output dir: `tokens/` and (with logprobs) `cache/`.
    pub out: PathBuf,
    pub seq_len: usize,
    pub shard_sequences: usize,
}

#[derive(Debug, Clone, Default)]
pub struct PrepareCollectedSummary {
    pub answers: usize,
    pub sequences: usize,
    /// Tokens the student is trained on (completion tokens + EOS).
    pub target_tokens: u64,
    /// Answers cut at `seq_len`.
    pub truncated: usize,
    /// Answers left out: the prompt alone fills `seq_len`.
    pub skipped: usize,
    /// API tokens whose bytes match no id (masked), with a few examples.
    pub unmapped: usize,
    pub unmapped_examples: Vec<String>,
    pub tokens_dir: PathBuf,
    /// The sparse-target cache, when the answers carry logprobs: its k.
    pub cache: Option<(PathBuf, usize)>,
}

/// Reads a collection's meta and its complete answers, in prompt order.
pub fn read_collection(dir: &Path) -> Result<(CollectMeta, Vec<Collected>)> {
    let meta_path = dir.join("collect.json");
    if !meta_path.exists() {
        return Err(Error::file(dir, "not a collection (no collect.json)"));
    }
    let meta: CollectMeta = serde_json::from_str(&read_text(&meta_path)?)
        .map_err(|e| Error::file(&meta_path, format!("not a collect.json: {e}")))?;
    let path = dir.join("responses.jsonl");
    // A torn last line from a killed run is skipped (`collect --resume` cuts it).
    let (mut out, _) = distill_core::fsio::read_jsonl::<Collected>(&path, "a collected answer")?;
    if out.is_empty() {
        return Err(Error::file(&path, "no answers"));
    }
    out.sort_by_key(|c| c.index);
    out.dedup_by_key(|c| c.index);
    Ok((meta, out))
}

/// One answer as a training sequence.
struct Sample {
    ids: Vec<u32>,
    mask: Vec<u8>,
    /// Per position (predicting the next token): k (id, logprob) alternatives, when known.
    targets: Vec<Option<Vec<(u32, f32)>>>,
    bytes: u64,
}

pub fn prepare_collected(opts: &PrepareCollectedOptions) -> Result<PrepareCollectedSummary> {
    let (meta, answers) = read_collection(&opts.collected)?;
    if meta.completions {
        return Err(Error::file(
            opts.collected.join("collect.json"),
            "a --completions collection (plain-text prompts): prepare-collected builds \
             chat-template sequences and needs a chat collection",
        ));
    }
    if opts.out.exists() {
        return Err(Error::file(
            &opts.out,
            "already exists; remove it or choose another --out",
        ));
    }
    if opts.seq_len < 8 {
        return Err(Error::Msg("--seq-len: at least 8".into()));
    }
    let tok = Tokenizer::from_dir(&opts.tokenizer)?;
    let vocab = match distill_core::Config::from_file(opts.tokenizer.join("config.json")) {
        Ok(c) => c.vocab_size,
        Err(_) => tok.vocab_size(),
    };
    let eos = tok
        .eos_id()
        .or_else(|| tok.stop_ids().first().copied())
        .ok_or_else(|| Error::file(&opts.tokenizer, "the tokenizer has no EOS token"))?;
    let table = tok.token_bytes_table();
    let mut by_bytes: HashMap<&[u8], u32> = HashMap::new();
    for (id, b) in table.iter().enumerate() {
        if !b.is_empty() {
            by_bytes.entry(b.as_slice()).or_insert(id as u32);
        }
    }
    let k = meta.top_logprobs.filter(|&k| k > 0);
    let with_logprobs = k.is_some() && answers.iter().all(|a| a.logprobs.is_some());
    let mut summary = PrepareCollectedSummary {
        answers: answers.len(),
        ..Default::default()
    };
    let mut samples = Vec::new();
    for a in &answers {
        let prompt_text = tok.apply_chat_template(&a.messages, true)?;
        let prompt = tok.encode(&prompt_text, true)?;
        if prompt.len() + 1 >= opts.seq_len {
            summary.skipped += 1;
            continue;
        }
        let mut ids = prompt.clone();
        let mut mask = vec![0u8; prompt.len()];
        let mut targets: Vec<Option<Vec<(u32, f32)>>> = vec![None; prompt.len()];
        let mut push = |id: u32, m: u8, alts: Option<Vec<(u32, f32)>>, targets: &mut Vec<_>| {
            // The alternatives predict this token: they belong to the position before it.
            if let Some(last) = targets.last_mut() {
                *last = alts;
            }
            ids.push(id);
            mask.push(m);
            targets.push(None);
        };
        match &a.logprobs {
            Some(tokens) => {
                for t in tokens {
                    let bytes = t
                        .bytes
                        .clone()
                        .unwrap_or_else(|| t.token.as_bytes().to_vec());
                    match by_bytes.get(bytes.as_slice()) {
                        Some(&id) => {
                            let alts = with_logprobs.then(|| {
                                t.top_logprobs
                                    .iter()
                                    .filter_map(|alt| {
                                        let b = alt
                                            .bytes
                                            .clone()
                                            .unwrap_or_else(|| alt.token.as_bytes().to_vec());
                                        by_bytes.get(b.as_slice()).map(|&i| (i, alt.logprob as f32))
                                    })
                                    .collect()
                            });
                            push(id, 1, alts, &mut targets);
                        }
                        None => {
                            summary.unmapped += 1;
                            if summary.unmapped_examples.len() < 5 {
                                summary.unmapped_examples.push(format!("{:?}", t.token));
                            }
                            for id in tok.encode(&t.token, false)? {
                                push(id, 0, None, &mut targets);
                            }
                        }
                    }
                }
            }
            None => {
                for id in tok.encode(&a.completion, false)? {
                    push(id, 1, None, &mut targets);
                }
            }
        }
        if a.finish_reason.as_deref() == Some("stop") {
            // The teacher ended its answer: the API reports no alternatives for the stop token,
            // so the target there is EOS alone.
            push(
                eos,
                1,
                with_logprobs.then(|| vec![(eos, 0.0)]),
                &mut targets,
            );
        }
        if ids.len() > opts.seq_len {
            summary.truncated += 1;
            ids.truncate(opts.seq_len);
            mask.truncate(opts.seq_len);
            targets.truncate(opts.seq_len);
            // The last position's target lies beyond the sequence.
            if let Some(last) = targets.last_mut() {
                *last = None;
            }
        }
        let pad = opts.seq_len - ids.len();
        ids.extend(std::iter::repeat_n(eos, pad));
        mask.extend(std::iter::repeat_n(0, pad));
        targets.extend(std::iter::repeat_n(None, pad));
        summary.target_tokens += mask.iter().map(|&m| m as u64).sum::<u64>();
        samples.push(Sample {
            ids,
            mask,
            targets,
            bytes: (prompt_text.len() + a.completion.len()) as u64,
        });
    }
    if samples.is_empty() {
        return Err(Error::file(
            &opts.collected,
            format!(
                "no answer fits --seq-len {} (every prompt alone is longer)",
                opts.seq_len
            ),
        ));
    }
    summary.sequences = samples.len();

    // Write into a temporary dir, renamed into place when complete.
    let tmp = distill_core::fsio::fresh_tmp_dir(&opts.out)?;
    let tokens_dir = tmp.join("tokens");
    std::fs::create_dir_all(&tokens_dir).map_err(|e| Error::io(&tokens_dir, e))?;
    let mut writer = SplitWriter::new(&tokens_dir, "train", opts.seq_len, opts.shard_sequences);
    for s in &samples {
        writer.push_sequence(&s.ids, &s.mask, s.bytes)?;
    }
    let split = writer.finish()?;
    let responses = opts.collected.join("responses.jsonl");
    let resp_bytes = std::fs::read(&responses).map_err(|e| Error::io(&responses, e))?;
    let tokens_meta = TokenShardsMeta {
        format_version: FORMAT_VERSION,
        tokenizer_hash: tok.hash(),
        seq_len: opts.seq_len,
        eos_id: eos,
        vocab_size: tok.vocab_size(),
        splits: BTreeMap::from([("train".to_string(), split)]),
        sources: vec![SourceMeta {
            path: responses.display().to_string(),
            sha256: distill_core::digest::sha256_hex(&resp_bytes),
            bytes: resp_bytes.len() as u64,
            documents: samples.len() as u64,
            tokens: summary.target_tokens,
            replaced: 0,
        }],
    };
    tokens_meta.write(&tokens_dir)?;

    if let (true, Some(k)) = (with_logprobs, k) {
        let cache_dir = tmp.join("cache");
        let settings = CacheSettings {
            top_k: k,
            dtype: CacheDType::F32,
            teacher_hash: format!("{API_TEACHER_PREFIX}{}", meta.model),
            tokenizer_hash: tok.hash(),
            tokens_hash: tokens_hash(&tokens_meta),
            seq_len: opts.seq_len,
            vocab_size: vocab,
            splits: vec!["train".into()],
            shard_sequences: opts.shard_sequences,
            max_sequences: None,
            batch_size: 1,
            teacher_precision: Default::default(),
        };
        let mut manifest = CacheManifest {
            format_version: CACHE_FORMAT_VERSION,
            settings: settings.clone(),
            part: [0, 1],
            shards: vec![],
        };
        // Positions without alternatives (prompt, padding: masked from the loss) get a finite
        // uniform placeholder over ids 0..k.
        let placeholder: Vec<(u32, f32)> = (0..k as u32).map(|i| (i, -(k as f32).ln())).collect();
        for p in plan(&tokens_meta, &settings)? {
            let n = p.sequences as usize;
            let t = opts.seq_len;
            let mut ids = Vec::with_capacity(n * t * k);
            let mut lps = Vec::with_capacity(n * t * k);
            for s in &samples[p.first as usize..p.first as usize + n] {
                for pos in &s.targets {
                    let alts = pos.as_deref().unwrap_or(&placeholder);
                    let mut used: Vec<u32> = Vec::with_capacity(k);
                    for &(id, lp) in alts.iter().take(k) {
                        ids.push(id);
                        lps.push(lp);
                        used.push(id);
                    }
                    // Fewer than k (unmapped alternatives, the stop token): fill with other ids
                    // at probability ~0, finite so that the loss stays finite.
                    let mut filler = 0u32;
                    while used.len() < k {
                        while used.contains(&filler) {
                            filler += 1;
                        }
                        ids.push(filler);
                        lps.push(-1e4);
                        used.push(filler);
                    }
                }
            }
            let lse = vec![0f32; n * t];
            let bytes = encode_shard(&ids, &lps, &lse, n, &settings)?;
            let path = cache_dir.join(&p.file);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            write_atomic(&path, &bytes)?;
            manifest.shards.push(CacheShardMeta {
                shard: p.clone(),
                bytes: bytes.len() as u64,
                sha256: distill_core::digest::sha256_hex(&bytes),
            });
        }
        manifest.write(&cache_dir)?;
        summary.cache = Some((opts.out.join("cache"), k));
    }
    distill_core::fsio::replace_dir(&tmp, &opts.out)?;
    summary.tokens_dir = opts.out.join("tokens");
    Ok(summary)
}
