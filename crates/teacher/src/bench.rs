//! `distill bench teacher` (any model dir: the teacher or a student): full-sequence (all-position
//! logits) throughput at batch × seq_len, and greedy decode throughput at batch 1 with the KV
//! cache. Not part of the test suite.

use candle_core::Tensor;
use distill_core::{CausalLm, KvCache, Result};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct ModelBench {
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    pub batch: usize,
    pub seq_len: usize,
    pub decode_tokens: usize,
    pub iterations: usize,
    pub threads: usize,
    pub device: String,
}

/// Times `iters` full-sequence forwards of (batch, seq_len) random ids after one warm-up, then
/// `decode_tokens` single-token steps after a 16-token prompt.
pub fn bench_model(
    model: &CausalLm,
    batch: usize,
    seq_len: usize,
    iters: usize,
    decode_tokens: usize,
) -> Result<ModelBench> {
    let device = model.device();
    let vocab = model.config().vocab_size as u32;
    // Deterministic pseudo-random ids (a small LCG; the values only need to be valid tokens).
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut next_id = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as u32) % vocab
    };
    let ids: Vec<u32> = (0..batch * seq_len).map(|_| next_id()).collect();
    let ids = Tensor::from_vec(ids, (batch, seq_len), device)?;
    model.forward(&ids)?.sum_all()?.to_scalar::<f32>()?; // warm-up
    let start = Instant::now();
    for _ in 0..iters {
        // Reading a scalar forces the computation on lazy devices (CUDA).
        model.forward(&ids)?.sum_all()?.to_scalar::<f32>()?;
    }
    let prefill = (iters * batch * seq_len) as f64 / start.elapsed().as_secs_f64();

    let prompt: Vec<u32> = (0..16).map(|_| next_id()).collect();
    let mut cache = KvCache::new(model.config());
    let logits = model.forward_cached(
        &Tensor::new(prompt.as_slice(), device)?.unsqueeze(0)?,
        &mut cache,
    )?;
    let mut next = logits.argmax(1)?.to_vec1::<u32>()?[0];
    let start = Instant::now();
    for _ in 0..decode_tokens {
        let input = Tensor::new(&[next], device)?.unsqueeze(0)?;
        let logits = model.forward_cached(&input, &mut cache)?;
        next = logits.argmax(1)?.to_vec1::<u32>()?[0];
    }
    let decode = decode_tokens as f64 / start.elapsed().as_secs_f64();
    Ok(ModelBench {
        prefill_tokens_per_second: prefill,
        decode_tokens_per_second: decode,
        batch,
        seq_len,
        decode_tokens,
        iterations: iters,
        threads: distill_core::device::cpu_threads(),
        device: distill_core::device::device_name(device),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct CacheBench {
    /// `distill cache` on the batches (teacher forward, chunked lm_head, top-k, encode, write).
    pub cache_tokens_per_second: f64,
    /// The bare teacher forward (all-position logits) on the same batches.
    pub forward_tokens_per_second: f64,
    pub ratio: f64,
    pub bytes_per_token: f64,
    pub top_k: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub iterations: usize,
    pub peak_rss_bytes: u64,
    pub threads: usize,
    pub device: String,
}

/// Caching throughput as a ratio of the bare teacher forward, on the first `batch · iters`
/// sequences of the train split. The forward is timed after a warm-up; the cache is built for
/// real (in a temporary dir, removed afterwards) with one shard.
pub fn bench_cache(
    teacher: &distill_core::ModelDir,
    teacher_hash: &str,
    tokens_dir: &std::path::Path,
    batch: usize,
    iters: usize,
    top_k: usize,
) -> Result<CacheBench> {
    use crate::cache::{build_cache, CacheOptions};
    use distill_core::shards::TokenShards;
    let shards = TokenShards::open(tokens_dir, "train")?;
    let n = (batch * iters).min(shards.len());
    let t = shards.seq_len();
    let device = teacher.model.device();
    let batches: Vec<Tensor> = (0..n)
        .step_by(batch)
        .map(|b0| {
            let b = batch.min(n - b0);
            let ids: Vec<u32> = (b0..b0 + b).flat_map(|i| shards.sequence(i)).collect();
            Tensor::from_vec(ids, (b, t), device)
        })
        .collect::<candle_core::Result<_>>()?;
    teacher
        .model
        .forward(&batches[0])?
        .sum_all()?
        .to_scalar::<f32>()?; // warm-up
    let start = Instant::now();
    for ids in &batches {
        teacher.model.forward(ids)?.sum_all()?.to_scalar::<f32>()?;
    }
    let forward = (n * t) as f64 / start.elapsed().as_secs_f64();

    let out = std::env::temp_dir().join(format!("distill-bench-cache-{}", std::process::id()));
    let opts = CacheOptions {
        top_k,
        batch_size: batch,
        shard_sequences: n,
        max_sequences: Some(n as u64),
        splits: vec!["train".into()],
        ..Default::default()
    };
    let summary = build_cache(teacher, teacher_hash, tokens_dir, &out, &opts, |_, _| {});
    let _ = std::fs::remove_dir_all(&out);
    let summary = summary?;
    let cache = summary.tokens_computed as f64 / summary.seconds;
    Ok(CacheBench {
        cache_tokens_per_second: cache,
        forward_tokens_per_second: forward,
        ratio: cache / forward,
        bytes_per_token: summary.bytes_per_token,
        top_k,
        batch,
        seq_len: t,
        iterations: iters,
        peak_rss_bytes: distill_core::device::peak_rss_bytes().unwrap_or(0),
        threads: distill_core::device::cpu_threads(),
        device: distill_core::device::device_name(device),
    })
}
