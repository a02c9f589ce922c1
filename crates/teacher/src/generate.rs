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

#[cfg(test)]
mod tests {
    use super::*;

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
