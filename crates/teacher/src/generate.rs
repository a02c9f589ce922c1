//! Autoregressive generation with a KV cache: greedy at temperature 0, otherwise seeded
//! temperature + nucleus (top-p) sampling.

use candle_core::{DType, Tensor};
use distill_core::{CausalLm, KvCache, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus mass kept when sampling (1 = the whole distribution).
    pub top_p: f64,
    pub seed: u64,
    pub max_new_tokens: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            max_new_tokens: 128,
        }
    }
}

impl SamplingParams {
    /// Refuses settings no sampler can honour: a negative or non-finite temperature, a nucleus
    /// mass outside (0, 1].
    pub fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(distill_core::Error::Msg(format!(
                "temperature {} is invalid: expected a finite value >= 0 (0 = greedy)",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(distill_core::Error::Msg(format!(
                "top-p {} is invalid: expected a nucleus mass in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Picks the next token from a logits row.
pub struct Sampler {
    rng: ChaCha8Rng,
    temperature: f64,
    top_p: f64,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            temperature: params.temperature,
            top_p: params.top_p,
        }
    }

    /// `logits`: (V,).
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let logits: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
        Ok(self.sample_slice(&logits))
    }

    pub fn sample_slice(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = self.temperature as f32;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        if self.top_p < 1.0 {
            probs.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                mass += p.1;
                if mass as f64 >= self.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for &(id, p) in &probs {
            if r < p {
                return id;
            }
            r -= p;
        }
        probs.last().map(|p| p.0).unwrap_or(0)
    }
}

/// Index of the largest value (the first one on ties, as torch.argmax).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token was generated.
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

/// Generates after `prompt` (ids), calling `on_token` with each new id as soon as it is chosen.
/// Stops at any of `stop_ids` (not included in the output) or after `max_new_tokens`.
pub fn generate(
    model: &CausalLm,
    prompt: &[u32],
    stop_ids: &[u32],
    params: &SamplingParams,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    params.check()?;
    let device = model.device();
    let mut cache = KvCache::new(model.config());
    let mut sampler = Sampler::new(params);
    let mut tokens = Vec::new();
    if prompt.is_empty() || params.max_new_tokens == 0 {
        return Ok(Generation {
            tokens,
            finish: FinishReason::Length,
        });
    }
    let mut input = Tensor::new(prompt, device)?.unsqueeze(0)?;
    for _ in 0..params.max_new_tokens {
        let logits = model.forward_cached(&input, &mut cache)?.squeeze(0)?;
        let next = sampler.sample(&logits)?;
        if stop_ids.contains(&next) {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Stop,
            });
        }
        tokens.push(next);
        on_token(next)?;
        input = Tensor::new(&[next], device)?.unsqueeze(0)?;
    }
    Ok(Generation {
        tokens,
        finish: FinishReason::Length,
    })
}

/// Continuations of a batch of prompts sampled together (one KV cache, one forward per new
/// position for the whole batch): what on-policy distillation trains on and what the
/// exposure-bias metric scores.
#[derive(Debug, Clone)]
pub struct BatchSample {
    /// (B, P + G) ids, row-major: each prompt followed by its `G` new positions. After a row
    /// stops, its remaining positions repeat the stop token.
    pub ids: Vec<u32>,
    pub rows: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    /// Per row: how many of its new positions were generated (the rest follow a stop token),
    /// the stop token included when one was drawn.
    pub generated: Vec<usize>,
}

impl BatchSample {
    pub fn seq_len(&self) -> usize {
        self.prompt_len + self.new_tokens
    }

    /// Whether position `i` of row `b` holds a token the model generated.
    pub fn is_generated(&self, b: usize, i: usize) -> bool {
        i >= self.prompt_len && i - self.prompt_len < self.generated[b]
    }
}

/// Samples `params.max_new_tokens` positions after each of the `rows` prompts of `prompt_len` ids
/// (`prompts` row-major) with one sampler drawing row by row, so a seed fixes the whole batch. A
/// row that draws one of `stop_ids` keeps it and is padded with it from then on.
pub fn sample_batch(
    model: &CausalLm,
    prompts: &[u32],
    rows: usize,
    stop_ids: &[u32],
    params: &SamplingParams,
) -> Result<BatchSample> {
    params.check()?;
    let p = prompts.len().checked_div(rows).unwrap_or(0);
    if rows == 0 || p == 0 || p * rows != prompts.len() {
        return Err(distill_core::Error::Msg(format!(
            "sample_batch: {} prompt ids do not make {rows} non-empty rows of equal length",
            prompts.len()
        )));
    }
    let g = params.max_new_tokens;
    let device = model.device();
    let mut cache = KvCache::new(model.config());
    let mut sampler = Sampler::new(params);
    let mut new: Vec<Vec<u32>> = vec![Vec::with_capacity(g); rows];
    let mut generated = vec![0usize; rows];
    let mut stopped: Vec<Option<u32>> = vec![None; rows];
    let mut input = Tensor::from_vec(prompts.to_vec(), (rows, p), device)?;
    for _ in 0..g {
        let logits: Vec<f32> = model
            .forward_cached(&input, &mut cache)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let v = logits.len() / rows;
        let mut next = Vec::with_capacity(rows);
        for b in 0..rows {
            let id = match stopped[b] {
                Some(stop) => stop,
                None => {
                    let id = sampler.sample_slice(&logits[b * v..(b + 1) * v]);
                    generated[b] += 1;
                    if stop_ids.contains(&id) {
                        stopped[b] = Some(id);
                    }
                    id
                }
            };
            new[b].push(id);
            next.push(id);
        }
        if stopped.iter().all(Option::is_some) {
            // Every row has stopped: the rest is padding, no forward needed.
            let fill = new.iter().map(|r| r.len()).max().unwrap_or(0);
            for (b, row) in new.iter_mut().enumerate() {
                let stop = stopped[b].expect("all stopped");
                row.resize(g.max(fill), stop);
            }
            break;
        }
        input = Tensor::from_vec(next, (rows, 1), device)?;
    }
    let mut ids = Vec::with_capacity(rows * (p + g));
    for (b, row) in new.iter().enumerate() {
        ids.extend_from_slice(&prompts[b * p..(b + 1) * p]);
        ids.extend_from_slice(row);
    }
    Ok(BatchSample {
        ids,
        rows,
        prompt_len: p,
        new_tokens: g,
        generated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_samples_what_each_row_would_alone_and_pads_after_a_stop() {
        let cfg = distill_core::testing::tiny_config();
        let (model, _) = distill_core::testing::random_model(&cfg, 5).unwrap();
        let prompts = [3u32, 7, 9, 4, 4, 1, 20, 2, 8];
        let greedy = SamplingParams {
            max_new_tokens: 6,
            ..Default::default()
        };
        let batch = sample_batch(&model, &prompts, 3, &[], &greedy).unwrap();
        assert_eq!(
            (batch.seq_len(), batch.generated.clone()),
            (9, vec![6, 6, 6])
        );
        for b in 0..3 {
            let alone =
                generate(&model, &prompts[b * 3..b * 3 + 3], &[], &greedy, |_| Ok(())).unwrap();
            assert_eq!(&batch.ids[b * 9..b * 9 + 3], &prompts[b * 3..b * 3 + 3]);
            assert_eq!(
                &batch.ids[b * 9 + 3..(b + 1) * 9],
                alone.tokens.as_slice(),
                "row {b}"
            );
        }
        // A stop id drawn by a row ends it: kept once, then repeated as padding, not generated.
        let stop = batch.ids[3 + 1]; // row 0's second new token
        let stopped = sample_batch(&model, &prompts, 3, &[stop], &greedy).unwrap();
        let first = batch.ids[3..9].iter().position(|&t| t == stop).unwrap();
        assert_eq!(stopped.generated[0], first + 1);
        assert!(stopped.ids[3 + first..9].iter().all(|&t| t == stop));
        assert!(stopped.is_generated(0, 3 + first) && !stopped.is_generated(0, 3 + first + 1));
        assert!(!stopped.is_generated(1, 2) && stopped.is_generated(1, 3));
        // Sampled batches are fixed by the seed.
        let hot = SamplingParams {
            temperature: 1.0,
            seed: 3,
            max_new_tokens: 6,
            ..Default::default()
        };
        let a = sample_batch(&model, &prompts, 3, &[], &hot).unwrap();
        let b = sample_batch(&model, &prompts, 3, &[], &hot).unwrap();
        assert_eq!(a.ids, b.ids);
        assert!(sample_batch(&model, &prompts[..8], 3, &[], &hot).is_err());
    }

    #[test]
    fn greedy_is_argmax_and_sampling_is_seeded() {
        let logits = [0.1f32, 2.0, 1.9, -1.0];
        let mut s = Sampler::new(&SamplingParams::default());
        assert_eq!(s.sample_slice(&logits), 1);
        let params = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(&params);
            (0..32).map(|_| s.sample_slice(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(&params);
            (0..32).map(|_| s.sample_slice(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(a.contains(&1) && a.contains(&2));
        // A tiny nucleus keeps only the top token.
        let mut s = Sampler::new(&SamplingParams {
            temperature: 1.0,
            top_p: 0.01,
            ..Default::default()
        });
        assert!((0..16).all(|_| s.sample_slice(&logits) == 1));
    }
}
