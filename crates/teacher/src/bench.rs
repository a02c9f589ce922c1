//! `distill bench teacher` (any model dir: the teacher or a student): full-sequence (all-position
//! logits) throughput at batch × seq_len, and greedy decode throughput at batch 1 with the KV
//! cache. Not part of the test suite.

use candle_core::Tensor;
use distill_core::logits::{kl_row, row_topk};
use distill_core::{CausalLm, KvCache, Precision, Result};
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
    /// The precision of the teacher's products in the cache and the forward above.
    pub teacher_precision: Precision,
    /// At a precision other than f32: the f32 forward on the same batches, and how far the
    /// targets moved from it.
    pub f32_forward_tokens_per_second: Option<f64>,
    pub f32_agreement: Option<Agreement>,
}

/// How the teacher's next-token distributions at some precision compare with its f32 ones, per
/// position of the bench's batches.
#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    /// KL(p_f32 ‖ p), full vocabulary, in nats: mean, 99th percentile, max over positions.
    pub kl_mean: f64,
    pub kl_p99: f64,
    pub kl_max: f64,
    /// Positions whose most likely token is the same.
    pub top1: f64,
    /// Of the f32 top-k ids, the fraction also in the top-k (k of the cache).
    pub topk_overlap: f64,
    /// Largest difference of a cached log-prob (an f32 top-k id's log-prob, both sides).
    pub topk_logprob_max_abs: f64,
    pub positions: usize,
}

/// Caching throughput as a ratio of the bare teacher forward, on the first `batch · iters`
/// sequences of the train split, with the teacher's products at `precision`. The forward is
/// timed after a warm-up; the cache is built for real (in a temporary dir, removed afterwards)
/// with one shard. At bf16 the f32 forward is timed on the same batches too, and the two
/// forwards' distributions compared ([`Agreement`]).
pub fn bench_cache(
    teacher: &distill_core::ModelDir,
    teacher_hash: &str,
    tokens_dir: &std::path::Path,
    batch: usize,
    iters: usize,
    top_k: usize,
    precision: Precision,
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
    // The bare forward's speed, after a warm-up.
    let timed = |model: &CausalLm| -> Result<f64> {
        model.forward(&batches[0])?.sum_all()?.to_scalar::<f32>()?;
        let start = Instant::now();
        for ids in &batches {
            model.forward(ids)?.sum_all()?.to_scalar::<f32>()?;
        }
        Ok((n * t) as f64 / start.elapsed().as_secs_f64())
    };
    let mut fast = teacher.clone();
    fast.model.set_precision(precision)?;
    let forward = timed(&fast.model)?;
    let (f32_forward, agreement) = if precision.is_f32() {
        (None, None)
    } else {
        let mut reference = teacher.model.clone();
        reference.set_precision(Precision::F32)?;
        let reference = &reference;
        let f32_forward = timed(reference)?;
        let mut acc = AgreementSum::default();
        for ids in &batches {
            acc.add(&reference.forward(ids)?, &fast.model.forward(ids)?, top_k)?;
        }
        (Some(f32_forward), Some(acc.finish()))
    };
    let teacher = &fast;

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
        teacher_precision: precision,
        f32_forward_tokens_per_second: f32_forward,
        f32_agreement: agreement,
    })
}

/// Per-position comparisons, gathered over batches.
#[derive(Default)]
struct AgreementSum {
    kl: Vec<f64>,
    top1: usize,
    overlap: usize,
    kept: usize,
    lp_max: f64,
}

impl AgreementSum {
    /// Adds the positions of one batch's logits (…, V): `reference` f32, `other` at the other
    /// precision.
    fn add(&mut self, reference: &Tensor, other: &Tensor, k: usize) -> Result<()> {
        use rayon::prelude::*;
        let v = reference.dim(candle_core::D::Minus1)?;
        let a = reference.flatten_all()?.to_vec1::<f32>()?;
        let b = other.flatten_all()?.to_vec1::<f32>()?;
        let k = k.clamp(1, v);
        let rows: Vec<(f64, bool, usize, f64)> = a
            .par_chunks(v)
            .zip(b.par_chunks(v))
            .map(|(p, q)| {
                let (mut ip, mut iq) = (vec![0u32; k], vec![0u32; k]);
                let mut lps = vec![0f32; k];
                let mut scratch = vec![0f32; k];
                let lp = row_topk(p, &mut ip, &mut lps);
                let lq = row_topk(q, &mut iq, &mut scratch);
                let overlap = ip.iter().filter(|i| iq.contains(i)).count();
                // The cached log-probs (the f32 top-k's) at the other precision.
                let lp_max = ip
                    .iter()
                    .zip(&lps)
                    .map(|(&i, &l)| (l - (q[i as usize] - lq)).abs() as f64)
                    .fold(0.0, f64::max);
                (kl_row(p, lp, q, lq), ip[0] == iq[0], overlap, lp_max)
            })
            .collect();
        for (kl, same, overlap, lp_max) in rows {
            self.kl.push(kl);
            self.top1 += same as usize;
            self.overlap += overlap;
            self.kept += k;
            self.lp_max = self.lp_max.max(lp_max);
        }
        Ok(())
    }

    fn finish(mut self) -> Agreement {
        let n = self.kl.len().max(1);
        self.kl.sort_by(f64::total_cmp);
        Agreement {
            kl_mean: self.kl.iter().sum::<f64>() / n as f64,
            kl_p99: self.kl.get((n * 99) / 100).copied().unwrap_or(0.0),
            kl_max: self.kl.last().copied().unwrap_or(0.0),
            top1: self.top1 as f64 / n as f64,
            topk_overlap: self.overlap as f64 / self.kept.max(1) as f64,
            topk_logprob_max_abs: self.lp_max,
            positions: self.kl.len(),
        }
    }
}
