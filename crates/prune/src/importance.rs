//! Importance measured on calibration batches: per layer (block influence, and the KL to the
//! source when that layer alone is dropped), per attention head, per MLP channel and per hidden
//! channel (activation magnitudes, as Minitron ranks them).

use candle_core::{Device, Tensor, D};
use distill_core::model::log_softmax;
use distill_core::shards::TokenShards;
use distill_core::{CausalLm, Probe, Result};
use serde::{Deserialize, Serialize};

/// Per-component importance of the source model (higher = more important).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Importance {
    /// Tokens the activation statistics were measured on.
    pub tokens: usize,
    /// Tokens the KL figures were measured on (a prefix of the calibration batches).
    pub kl_tokens: usize,
    /// Per layer: 1 − mean cosine between the residual stream before and after the block
    /// (ShortGPT's block influence).
    pub block_influence: Vec<f64>,
    /// Per layer: mean KL(source ‖ source without that layer) per token, nats.
    pub drop_one_kl: Vec<f64>,
    /// Per layer, per query head: mean L2 norm of what the head writes into the residual stream
    /// (its output through its slice of o_proj).
    pub heads: Vec<Vec<f64>>,
    /// Per layer, per MLP channel: mean L2 norm of what the channel writes into the residual
    /// stream (|silu(gate) · up| times the norm of its down_proj column).
    pub mlp: Vec<Vec<f64>>,
    /// Per hidden channel: mean |RMSNorm output|, summed over every norm of the model.
    pub hidden: Vec<f64>,
}

/// Calibration batches: `sequences` sequences spread evenly over the split (so they sample the
/// whole corpus, not its first documents), `batch` rows each.
pub fn calibration_batches(
    shards: &TokenShards,
    sequences: usize,
    batch: usize,
    device: &Device,
) -> Result<Vec<Tensor>> {
    let n = sequences.min(shards.len()).max(1);
    let step = shards.len() as f64 / n as f64;
    let picks: Vec<usize> = (0..n).map(|i| (i as f64 * step) as usize).collect();
    let t = shards.seq_len();
    picks
        .chunks(batch.max(1))
        .map(|chunk| {
            let ids: Vec<u32> = chunk.iter().flat_map(|&i| shards.sequence(i)).collect();
            Ok(Tensor::from_vec(ids, (chunk.len(), t), device)?)
        })
        .collect()
}

/// Mean KL(p ‖ q) per position, from the source's log-probabilities and a model's logits.
pub fn mean_kl(source_logp: &Tensor, logits: &Tensor) -> Result<f64> {
    let logq = log_softmax(logits)?;
    let kl = (source_logp.exp()? * (source_logp - logq)?)?.sum(D::Minus1)?;
    Ok(kl.mean_all()?.to_scalar::<f32>()? as f64)
}

/// The source's log-probabilities on the KL batches, kept to score cuts against.
pub struct Reference {
    pub batches: Vec<Tensor>,
    pub logp: Vec<Tensor>,
}

impl Reference {
    /// Mean KL(source ‖ model) per token over the reference batches.
    pub fn kl(&self, model: &CausalLm) -> Result<f64> {
        let mut total = 0.0;
        for (ids, logp) in self.batches.iter().zip(&self.logp) {
            total += mean_kl(logp, &model.forward(ids)?)?;
        }
        Ok(total / self.batches.len().max(1) as f64)
    }

    /// Per layer of the source: the mean KL(source ‖ source without that layer). The layers
    /// before the dropped one are shared, so each removal runs only the layers after it.
    pub fn drop_one_kl(
        &self,
        source: &CausalLm,
        progress: &mut dyn FnMut(String),
    ) -> Result<Vec<f64>> {
        let layers = source.config().num_hidden_layers;
        let mut kl = vec![0.0; layers];
        for (ids, logp) in self.batches.iter().zip(&self.logp) {
            let stream = source.residual_stream(ids)?;
            for (l, v) in kl.iter_mut().enumerate() {
                *v += mean_kl(logp, &source.forward_from(&stream[l], l + 1)?)?;
            }
        }
        let n = self.batches.len().max(1) as f64;
        kl.iter_mut().for_each(|v| *v /= n);
        for (l, v) in kl.iter().enumerate() {
            progress(format!("drop-one KL: layer {l:>2}: {v:.4} nats"));
        }
        Ok(kl)
    }
}

/// Measures every importance on `batches`; the first `kl_batches` of them also serve the
/// drop-one KL and become the reference that candidate cuts are scored on.
pub fn measure(
    model: &CausalLm,
    batches: &[Tensor],
    kl_batches: usize,
    progress: &mut dyn FnMut(String),
) -> Result<(Importance, Reference)> {
    let cfg = model.config();
    let mut probe = Probe::new(cfg);
    let kl_batches = kl_batches.clamp(1, batches.len());
    let mut reference = Reference {
        batches: Vec::new(),
        logp: Vec::new(),
    };
    for (i, ids) in batches.iter().enumerate() {
        let logits = model.forward_probed(ids, &mut probe)?;
        if i < kl_batches {
            reference.batches.push(ids.clone());
            reference.logp.push(log_softmax(&logits)?);
        }
        progress(format!(
            "activations: batch {}/{} ({} tokens)",
            i + 1,
            batches.len(),
            probe.tokens
        ));
    }
    let kl_tokens: usize = reference.batches.iter().map(Tensor::elem_count).sum();
    let drop_one_kl = reference.drop_one_kl(model, progress)?;
    let n = probe.tokens.max(1) as f64;
    let mean = |v: &[f64]| v.iter().map(|x| x / n).collect::<Vec<_>>();
    let importance = Importance {
        tokens: probe.tokens,
        kl_tokens,
        block_influence: probe.layer_cos.iter().map(|c| 1.0 - c / n).collect(),
        drop_one_kl,
        heads: probe.head_norm.iter().map(|v| mean(v)).collect(),
        mlp: probe.mlp_act.iter().map(|v| mean(v)).collect(),
        hidden: mean(&probe.hidden_act),
    };
    Ok((importance, reference))
}
