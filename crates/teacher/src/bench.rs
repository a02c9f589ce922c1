//! `distill bench teacher`: full-sequence (all-position logits) throughput at batch × seq_len, and
//! greedy decode throughput at batch 1 with the KV cache. Not part of the test suite.

use candle_core::Tensor;
use distill_core::{CausalLm, KvCache, Result};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct TeacherBench {
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
pub fn bench_teacher(
    model: &CausalLm,
    batch: usize,
    seq_len: usize,
    iters: usize,
    decode_tokens: usize,
) -> Result<TeacherBench> {
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
    Ok(TeacherBench {
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
