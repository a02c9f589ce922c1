//! What a pruned model keeps of its source model, and the slicing of the source's tensors (HF
//! names) into the pruned model's. Every index is the source's; lists are ascending, so the kept
//! channels, heads and layers stay in their original order.

use candle_core::{Tensor, D};
use distill_core::{Arch, Config, Error, Gemma3, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The shape of a (pruned) model: what `config.json` says about its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub layers: usize,
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
}

impl Shape {
    pub fn of(cfg: &Config) -> Self {
        Self {
            layers: cfg.num_hidden_layers,
            hidden: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            intermediate: cfg.intermediate_size,
        }
    }

    /// `src` reshaped (head_dim, vocabulary, biases and everything else kept). Gemma 3's layer
    /// types are the first `layers` of the source's; [`Plan::config`] keeps the kept layers' own.
    pub fn config(&self, src: &Config) -> Config {
        Config {
            num_hidden_layers: self.layers,
            hidden_size: self.hidden,
            num_attention_heads: self.heads,
            num_key_value_heads: self.kv_heads,
            intermediate_size: self.intermediate,
            gemma3: src.gemma3.clone().map(|g| Gemma3 {
                sliding_layers: g.sliding_layers.iter().copied().take(self.layers).collect(),
                ..g
            }),
            ..src.clone()
        }
    }

    pub fn params(&self, src: &Config) -> usize {
        self.config(src).num_params()
    }

    /// Checks that `src` can be cut to this shape: nothing grows, nothing is empty, and query
    /// heads stay whole groups of the same size over the kept KV heads.
    pub fn check(&self, src: &Config) -> Result<()> {
        let s = Shape::of(src);
        let bad = |msg: String| Err(Error::Msg(format!("prune shape: {msg}")));
        for (name, v, max) in [
            ("layers", self.layers, s.layers),
            ("hidden", self.hidden, s.hidden),
            ("heads", self.heads, s.heads),
            ("kv_heads", self.kv_heads, s.kv_heads),
            ("intermediate", self.intermediate, s.intermediate),
        ] {
            if v == 0 || v > max {
                return bad(format!(
                    "{name} = {v}: must be between 1 and the source's {max}"
                ));
            }
        }
        if src.arch == Arch::Gemma3 && self.hidden != s.hidden {
            return bad(format!(
                "hidden = {}: Gemma 3 scales its embeddings by √hidden, so its hidden width \
                 ({}) is kept",
                self.hidden, s.hidden
            ));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "heads = {} is not a multiple of kv_heads = {} (grouped-query attention keeps \
                 whole groups of equal size)",
                self.heads, self.kv_heads
            ));
        }
        if self.heads / self.kv_heads > s.heads / s.kv_heads {
            return bad(format!(
                "heads / kv_heads = {} exceeds the source's {} query heads per KV head",
                self.heads / self.kv_heads,
                s.heads / s.kv_heads
            ));
        }
        Ok(())
    }
}

/// The source indices a pruned model keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Source layers kept: the pruned model's layer i is the source's `layers[i]`.
    pub layers: Vec<usize>,
    /// Hidden (residual-stream) channels kept, one set for the whole model.
    pub hidden: Vec<usize>,
    /// Per kept layer: the source KV heads kept.
    pub kv_heads: Vec<Vec<usize>>,
    /// Per kept layer: the source query heads kept, the same number from each kept KV head's group.
    pub heads: Vec<Vec<usize>>,
    /// Per kept layer: the source MLP channels kept.
    pub mlp: Vec<Vec<usize>>,
}

impl Plan {
    /// Keeps everything: the pruned model is the source.
    pub fn identity(src: &Config) -> Self {
        let l = src.num_hidden_layers;
        Self {
            layers: (0..l).collect(),
            hidden: (0..src.hidden_size).collect(),
            kv_heads: vec![(0..src.num_key_value_heads).collect(); l],
            heads: vec![(0..src.num_attention_heads).collect(); l],
            mlp: vec![(0..src.intermediate_size).collect(); l],
        }
    }

    pub fn shape(&self) -> Shape {
        Shape {
            layers: self.layers.len(),
            hidden: self.hidden.len(),
            heads: self.heads.first().map_or(0, Vec::len),
            kv_heads: self.kv_heads.first().map_or(0, Vec::len),
            intermediate: self.mlp.first().map_or(0, Vec::len),
        }
    }

    /// Checks the plan against its source: indices in range, ascending and unique, the same
    /// counts in every layer, and each kept query head in a kept KV head's group.
    pub fn check(&self, src: &Config) -> Result<()> {
        let shape = self.shape();
        shape.check(src)?;
        let bad = |msg: String| Err(Error::Msg(format!("prune plan: {msg}")));
        let l = self.layers.len();
        if self.kv_heads.len() != l || self.heads.len() != l || self.mlp.len() != l {
            return bad(format!(
                "{l} layers but {} / {} / {} per-layer lists",
                self.kv_heads.len(),
                self.heads.len(),
                self.mlp.len()
            ));
        }
        let ascending = |v: &[usize], max: usize| {
            v.windows(2).all(|w| w[0] < w[1]) && v.last().is_none_or(|&x| x < max)
        };
        if !ascending(&self.layers, src.num_hidden_layers) {
            return bad("layers must be ascending source indices".into());
        }
        if !ascending(&self.hidden, src.hidden_size) {
            return bad("hidden channels must be ascending source indices".into());
        }
        let rep = src.kv_groups();
        for i in 0..l {
            if self.kv_heads[i].len() != shape.kv_heads
                || self.heads[i].len() != shape.heads
                || self.mlp[i].len() != shape.intermediate
            {
                return bad(format!("layer {i} keeps other counts than layer 0"));
            }
            if !ascending(&self.kv_heads[i], src.num_key_value_heads)
                || !ascending(&self.heads[i], src.num_attention_heads)
                || !ascending(&self.mlp[i], src.intermediate_size)
            {
                return bad(format!("layer {i}: indices must be ascending and in range"));
            }
            let per_group = shape.heads / shape.kv_heads;
            for &g in &self.kv_heads[i] {
                let n = self.heads[i].iter().filter(|&&h| h / rep == g).count();
                if n != per_group {
                    return bad(format!(
                        "layer {i}: KV head {g} keeps {n} query heads, not {per_group}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The pruned model's config; each kept layer keeps its attention type (Gemma 3).
    pub fn config(&self, src: &Config) -> Config {
        let mut cfg = self.shape().config(src);
        if let (Some(g), Some(src_g)) = (cfg.gemma3.as_mut(), src.gemma3.as_ref()) {
            g.sliding_layers = self
                .layers
                .iter()
                .map(|&l| src_g.sliding_layers.get(l).copied().unwrap_or(true))
                .collect();
        }
        cfg
    }

    /// Slices the source's tensors (HF names, as loaded) into the pruned model's.
    pub fn apply(
        &self,
        src: &Config,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>> {
        self.check(src)?;
        let device = tensors
            .values()
            .next()
            .map(|t| t.device().clone())
            .ok_or_else(|| Error::Msg("prune: the source has no tensors".into()))?;
        let index = |v: &[usize]| {
            let v: Vec<u32> = v.iter().map(|&i| i as u32).collect();
            Tensor::from_vec(v.clone(), v.len(), &device)
        };
        let get = |name: &str| {
            tensors
                .get(name)
                .ok_or_else(|| Error::Msg(format!("prune: the source lacks tensor {name}")))
        };
        let hidden = index(&self.hidden)?;
        let d = src.head_dim;
        let channels = |heads: &[usize]| -> Vec<usize> {
            heads.iter().flat_map(|&h| h * d..(h + 1) * d).collect()
        };
        let mut out = HashMap::new();
        // (out, in) weights: rows are outputs, columns inputs.
        let pick = |t: &Tensor, rows: Option<&Tensor>, cols: Option<&Tensor>| -> Result<Tensor> {
            let mut t = t.clone();
            if let Some(r) = rows {
                t = t.index_select(r, 0)?;
            }
            if let Some(c) = cols {
                t = t.index_select(c, D::Minus1)?;
            }
            Ok(t.contiguous()?)
        };
        let emb = "model.embed_tokens.weight";
        out.insert(emb.to_string(), pick(get(emb)?, None, Some(&hidden))?);
        if !src.tie_word_embeddings {
            let head = "lm_head.weight";
            out.insert(head.to_string(), pick(get(head)?, None, Some(&hidden))?);
        }
        // RMSNorm divides by the root mean square over the channels it sees: with fewer channels
        // the same vector's mean is over fewer terms. Scaling the kept norm weights by
        // √(hidden / kept) makes the cut exact when the dropped channels carry nothing.
        let rescale = (src.hidden_size as f64 / self.hidden.len() as f64).sqrt();
        let norm_weight =
            |t: &Tensor| -> Result<Tensor> { Ok((pick(t, Some(&hidden), None)? * rescale)?) };
        let norm = "model.norm.weight";
        out.insert(norm.to_string(), norm_weight(get(norm)?)?);
        for (i, &l) in self.layers.iter().enumerate() {
            let from = |part: &str| format!("model.layers.{l}.{part}");
            let to = |part: &str| format!("model.layers.{i}.{part}");
            let q = index(&channels(&self.heads[i]))?;
            let kv = index(&channels(&self.kv_heads[i]))?;
            let mlp = index(&self.mlp[i])?;
            // (name, output rows, input columns) of every tensor of a layer.
            for part in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
                out.insert(to(part), norm_weight(get(&from(part))?)?);
            }
            if src.arch == Arch::Gemma3 {
                // Over hidden channels, which a Gemma cut keeps whole (`Shape::check`).
                for part in [
                    "pre_feedforward_layernorm.weight",
                    "post_feedforward_layernorm.weight",
                ] {
                    out.insert(to(part), pick(get(&from(part))?, Some(&hidden), None)?);
                }
                // Over one head's channels, which no cut touches.
                for part in ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] {
                    out.insert(to(part), get(&from(part))?.clone());
                }
            }
            let parts: [(&str, Option<&Tensor>, Option<&Tensor>); 12] = [
                ("self_attn.q_proj.weight", Some(&q), Some(&hidden)),
                ("self_attn.k_proj.weight", Some(&kv), Some(&hidden)),
                ("self_attn.v_proj.weight", Some(&kv), Some(&hidden)),
                ("self_attn.o_proj.weight", Some(&hidden), Some(&q)),
                ("mlp.gate_proj.weight", Some(&mlp), Some(&hidden)),
                ("mlp.up_proj.weight", Some(&mlp), Some(&hidden)),
                ("mlp.down_proj.weight", Some(&hidden), Some(&mlp)),
                ("self_attn.q_proj.bias", Some(&q), None),
                ("self_attn.k_proj.bias", Some(&kv), None),
                ("self_attn.v_proj.bias", Some(&kv), None),
                ("self_attn.o_proj.bias", Some(&hidden), None),
                ("mlp.down_proj.bias", Some(&hidden), None),
            ];
            for (part, rows, cols) in parts {
                match tensors.get(&from(part)) {
                    Some(t) => {
                        out.insert(to(part), pick(t, rows, cols)?);
                    }
                    None if part.ends_with(".bias") => {}
                    None => {
                        return Err(Error::Msg(format!(
                            "prune: the source lacks {}",
                            from(part)
                        )))
                    }
                }
            }
            for part in ["mlp.gate_proj.bias", "mlp.up_proj.bias"] {
                if let Some(t) = tensors.get(&from(part)) {
                    out.insert(to(part), pick(t, Some(&mlp), None)?);
                }
            }
        }
        Ok(out)
    }
}
