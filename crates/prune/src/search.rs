//! From importance and a target to candidate cuts: which layers, heads and channels a shape keeps,
//! and the few shapes (depth-only, width-only, mixed) worth measuring for a parameter budget.

use crate::importance::Importance;
use crate::plan::{Plan, Shape};
use distill_core::{Config, Error, Result};
use serde::{Deserialize, Serialize};

/// What the pruned model should be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Target {
    /// At most this many parameters; the best of several measured cuts.
    Params(usize),
    /// Exactly this shape.
    Shape(Shape),
}

impl Target {
    /// `--target-params`: a ratio of the source (`0.6`), a count (`80000000`) or with a suffix
    /// (`80M`, `1.2B`, `500K`).
    pub fn parse_params(s: &str, source_params: usize) -> Result<Self> {
        let bad = || {
            Error::Msg(format!(
                "--target-params {s}: expected a ratio below 1 (0.6), a count (80000000) or a \
                 count with K/M/B (80M)"
            ))
        };
        let t = s.trim();
        let (num, mult) = match t.chars().last() {
            Some('K' | 'k') => (&t[..t.len() - 1], 1e3),
            Some('M' | 'm') => (&t[..t.len() - 1], 1e6),
            Some('B' | 'b' | 'G' | 'g') => (&t[..t.len() - 1], 1e9),
            _ => (t, 1.0),
        };
        let v: f64 = num.parse().map_err(|_| bad())?;
        if !v.is_finite() || v <= 0.0 {
            return Err(bad());
        }
        // Without a suffix, a number with a decimal point (or 1 and below) is a ratio of the
        // source; a whole number above 1 is a count.
        let ratio = mult == 1.0 && (num.contains('.') || v <= 1.0);
        let n = if ratio {
            (v * source_params as f64).round() as usize
        } else {
            (v * mult) as usize
        };
        if n >= source_params {
            return Err(Error::Msg(format!(
                "--target-params {s} = {n} parameters: at or above the teacher's {source_params} \
                 (nothing to prune)"
            )));
        }
        Ok(Target::Params(n))
    }
}

/// Indices of the `k` highest scores, ascending (ties keep the lower index).
pub fn top_k(scores: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut keep = order[..k.min(order.len())].to_vec();
    keep.sort_unstable();
    keep
}

/// How the layers to keep are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerRanking {
    BlockInfluence,
    DropOneKl,
}

impl LayerRanking {
    fn scores(self, imp: &Importance) -> &[f64] {
        match self {
            LayerRanking::BlockInfluence => &imp.block_influence,
            LayerRanking::DropOneKl => &imp.drop_one_kl,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            LayerRanking::BlockInfluence => "block influence",
            LayerRanking::DropOneKl => "drop-one KL",
        }
    }
}

/// The plan that cuts `src` to `shape`, keeping the most important of each component: layers by
/// `ranking`; hidden channels by magnitude over the whole model; per kept layer the KV groups
/// with the largest summed head norms, in each the strongest query heads, and the MLP channels
/// with the largest mean activation.
pub fn plan_for(
    src: &Config,
    shape: Shape,
    ranking: LayerRanking,
    imp: &Importance,
) -> Result<Plan> {
    shape.check(src)?;
    let layers = top_k(ranking.scores(imp), shape.layers);
    let rep = src.kv_groups();
    let per_group = shape.heads / shape.kv_heads;
    let mut kv_heads = Vec::new();
    let mut heads = Vec::new();
    let mut mlp = Vec::new();
    for &l in &layers {
        let h = &imp.heads[l];
        let group_scores: Vec<f64> = (0..src.num_key_value_heads)
            .map(|g| h[g * rep..(g + 1) * rep].iter().sum())
            .collect();
        let groups = top_k(&group_scores, shape.kv_heads);
        let mut qs = Vec::new();
        for &g in &groups {
            let inner = top_k(&h[g * rep..(g + 1) * rep], per_group);
            qs.extend(inner.into_iter().map(|j| g * rep + j));
        }
        kv_heads.push(groups);
        heads.push(qs);
        mlp.push(top_k(&imp.mlp[l], shape.intermediate));
    }
    let plan = Plan {
        layers,
        hidden: top_k(&imp.hidden, shape.hidden),
        kv_heads,
        heads,
        mlp,
    };
    plan.check(src)?;
    Ok(plan)
}

/// A cut to measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub name: String,
    pub shape: Shape,
    pub ranking: LayerRanking,
}

/// The largest intermediate size (a multiple of 32) with which `shape` fits `budget`.
fn fit_intermediate(src: &Config, shape: Shape, budget: usize) -> Option<Shape> {
    let mut i = (src.intermediate_size / 32) * 32;
    while i >= 32 {
        let s = Shape {
            intermediate: i,
            ..shape
        };
        if s.params(src) <= budget {
            return Some(s);
        }
        i -= 32;
    }
    None
}

/// The most layers of `shape`'s width that fit `budget`.
fn fit_layers(src: &Config, shape: Shape, budget: usize) -> Option<Shape> {
    (1..=src.num_hidden_layers)
        .rev()
        .map(|layers| Shape { layers, ..shape })
        .find(|s| s.params(src) <= budget)
}

/// The cuts worth measuring for a target.
pub fn proposals(src: &Config, target: &Target) -> Result<Vec<Proposal>> {
    let full = Shape::of(src);
    let prop = |name: String, shape: Shape, ranking| Proposal {
        name,
        shape,
        ranking,
    };
    let mut out = Vec::new();
    match target {
        Target::Shape(shape) => {
            shape.check(src)?;
            if shape.params(src) >= src.num_params() {
                return Err(Error::Msg(format!(
                    "prune shape {shape:?}: {} parameters, not below the teacher's {}",
                    shape.params(src),
                    src.num_params()
                )));
            }
            out.push(prop(
                "shape, drop-one KL".into(),
                *shape,
                LayerRanking::DropOneKl,
            ));
            if shape.layers < full.layers {
                out.push(prop(
                    "shape, block influence".into(),
                    *shape,
                    LayerRanking::BlockInfluence,
                ));
            }
        }
        Target::Params(budget) => {
            let budget = *budget;
            if budget >= src.num_params() {
                return Err(Error::Msg(format!(
                    "target of {budget} parameters: at or above the teacher's {}",
                    src.num_params()
                )));
            }
            let depth = fit_layers(src, full, budget);
            if let Some(d) = depth {
                for r in [LayerRanking::BlockInfluence, LayerRanking::DropOneKl] {
                    out.push(prop(
                        format!("depth: {} layers by {}", d.layers, r.describe()),
                        d,
                        r,
                    ));
                }
            }
            if let Some(w) = fit_intermediate(src, full, budget) {
                out.push(prop(
                    format!("width: MLP {} → {}", full.intermediate, w.intermediate),
                    w,
                    LayerRanking::DropOneKl,
                ));
            }
            let step = src.head_dim.max(32);
            let narrow = Shape {
                hidden: ((full.hidden * 3 / 4) / step).max(1) * step,
                ..full
            };
            // Gemma 3 keeps its hidden width (`Shape::check`).
            if narrow.hidden < full.hidden && src.arch != distill_core::Arch::Gemma3 {
                if let Some(w) = fit_intermediate(src, narrow, budget) {
                    out.push(prop(
                        format!(
                            "width: hidden {} → {}, MLP → {}",
                            full.hidden, w.hidden, w.intermediate
                        ),
                        w,
                        LayerRanking::DropOneKl,
                    ));
                }
            }
            // Mixed: a quarter, half and three quarters of the way from the depth-only cut to
            // all layers, the MLP narrowed to fit.
            let depth_layers = depth.map_or(1, |d| d.layers);
            let span = full.layers - depth_layers;
            let mut mids: Vec<usize> = (1..=3).map(|k| depth_layers + span * k / 4).collect();
            mids.dedup();
            for &mid in mids
                .iter()
                .filter(|&&m| m > depth_layers && m < full.layers)
            {
                let base = Shape {
                    layers: mid,
                    ..full
                };
                if let Some(m) = fit_intermediate(src, base, budget) {
                    out.push(prop(
                        format!("mixed: {mid} layers, MLP → {}", m.intermediate),
                        m,
                        LayerRanking::DropOneKl,
                    ));
                }
            }
            let mid = depth_layers + span / 2;
            if mid > depth_layers && mid < full.layers {
                let base = Shape {
                    layers: mid,
                    ..full
                };
                let rep = src.kv_groups();
                let fewer = Shape {
                    heads: full.kv_heads * (rep.max(2) - 1),
                    ..base
                };
                // transformers 5 refuses a config whose hidden size the heads do not divide.
                if rep > 1 && full.hidden.is_multiple_of(fewer.heads) {
                    if let Some(m) = fit_intermediate(src, fewer, budget) {
                        out.push(prop(
                            format!(
                                "mixed: {mid} layers, heads {} → {}, MLP → {}",
                                full.heads, m.heads, m.intermediate
                            ),
                            m,
                            LayerRanking::DropOneKl,
                        ));
                    }
                }
            }
            if out.is_empty() {
                return Err(Error::Msg(format!(
                    "target of {budget} parameters: no cut fits (the embeddings alone take {})",
                    src.num_params() - src.num_non_embedding_params()
                )));
            }
        }
    }
    Ok(out)
}
