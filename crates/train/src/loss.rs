//! Distillation losses: pure functions of (student logits, teacher targets, labels) → scalars,
//! f32 inside (f64 accumulators), mean over unmasked positions.
//!
//! With `p` the teacher's and `q` the student's distribution at temperature τ (softmax of
//! logits/τ), the KD term of one position is one of
//! - forward KL  `KL(p‖q) = Σ p (log p − log q)` (Hinton et al.; mode-covering),
//! - reverse KL  `KL(q‖p)` (mode-seeking; MiniLLM),
//! - generalized JSD(β) `β KL(p‖m) + (1−β) KL(q‖m)`, `m = β p + (1−β) q`, with β = 0 giving
//!   forward KL and β = 1 reverse KL exactly as TRL's `generalized_jsd_loss` (GKD paper) does,
//! - skew forward KL(α) `KL(p ‖ α p + (1−α) q)` and skew reverse KL(α)
//!   `KL(q ‖ α q + (1−α) p)` (DistiLLM),
//! - total variation distance `½ Σ |p − q|`,
//!
//! multiplied by τ² so that gradient magnitudes do not shrink as τ grows (Hinton et al.). The
//! hard-label term is the cross-entropy of the next token at temperature 1. The total is
//! `α_kd · mean(KD) + α_ce · mean(CE)` over positions whose label is not [`IGNORE`].
//!
//! **Sparse targets** (a top-k cache): the teacher distribution is known on the k kept tokens and
//! as one **tail bucket** holding the rest of the mass, `r = 1 − Σ_kept p`. The divergence is
//! taken between the (k+1)-bucket distributions: the student's tail bucket is `1 − Σ_kept q`
//! (its mass on every token the teacher did not keep). At τ = 1 the teacher's buckets are exact.
//! At τ ≠ 1 the tail's tempered mass is unknown without all logits; it is computed as if the
//! tail mass were spread evenly over the V − k tokens not kept (each with logit
//! `log(r/(V−k)) + logsumexp`), which is exact at τ = 1 and keeps the kept tokens' relative
//! tempered probabilities exact at any τ.
//!
//! **Vocabularies** that differ only by padding: only the first `min(V_student, V_teacher)` ids
//! take part; the student's extra ids are masked (as if their logits were −∞) and receive no
//! gradient; teacher mass on extra ids is dropped and the rest renormalised.
//!
//! The hot path is a fused CPU op with a hand-written backward ([`KdOp`]): one pass per row over
//! the vocabulary for the value, one for the gradient (vectorised exponentials, [`vexp`]), no
//! (B, T, V) temporaries besides the gradient itself; [`distill_loss_from_hidden`] fuses the
//! output projection too, so that not even those exist. Other devices use [`composite_loss`], built from candle ops (it is also the
//! oracle the fused op is tested against).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};
use distill_core::{Error, Result, TeacherTargets};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

mod fused;
use distill_core::vexp;
pub use fused::{distill_loss_from_hidden, fused_buffer_bytes};

/// A label that takes no part in the loss (padding, positions without a next token).
pub const IGNORE: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum KdKind {
    ForwardKl,
    ReverseKl,
    Jsd { beta: f32 },
    SkewForwardKl { alpha: f32 },
    SkewReverseKl { alpha: f32 },
    Tvd,
}

impl KdKind {
    pub fn name(&self) -> String {
        match self {
            KdKind::ForwardKl => "forward_kl".into(),
            KdKind::ReverseKl => "reverse_kl".into(),
            KdKind::Jsd { beta } => format!("jsd(β={beta})"),
            KdKind::SkewForwardKl { alpha } => format!("skew_forward_kl(α={alpha})"),
            KdKind::SkewReverseKl { alpha } => format!("skew_reverse_kl(α={alpha})"),
            KdKind::Tvd => "tvd".into(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let check = |name: &str, v: f32| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::Msg(format!("loss {name} = {v}: must be in [0, 1]")))
            }
        };
        match *self {
            KdKind::Jsd { beta } => check("beta", beta),
            KdKind::SkewForwardKl { alpha } | KdKind::SkewReverseKl { alpha } => {
                check("alpha", alpha)
            }
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    pub kind: KdKind,
    pub temperature: f32,
    pub alpha_kd: f32,
    pub alpha_ce: f32,
    /// The teacher's vocabulary size, for sparse targets' tail bucket (V − k tokens); `None`:
    /// the student's.
    pub teacher_vocab: Option<usize>,
}

/// The loss of a batch: `total` carries the graph; `kd` and `ce` are the unweighted means (KD
/// already τ²-scaled), for logging.
#[derive(Debug, Clone)]
pub struct LossParts {
    pub total: Tensor,
    pub kd: f32,
    pub ce: f32,
    pub tokens: usize,
}

/// Sparse targets flattened to rows, on the CPU.
#[derive(Debug)]
struct SparseRows {
    k: usize,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    logsumexp: Vec<f32>,
    /// The teacher's vocabulary size (for the tail's size).
    teacher_vocab: usize,
}

/// The fused loss: `apply_op2(student (N, Vs), teacher logits (N, Vt))` for dense targets or
/// `apply_op1(student)` for sparse ones; gives (N, 2) = per-row [KD·τ², CE] (0 on ignored rows).
#[derive(Debug, Clone)]
pub struct KdOp {
    kind: KdKind,
    tau: f32,
    labels: Arc<Vec<u32>>,
    sparse: Option<Arc<SparseRows>>,
    /// Set for the backward op: per-row upstream gradients of the forward's output (N, 5).
    grad: Option<Arc<Vec<f32>>>,
    /// Set for the backward op: the forward's output, whose logsumexps it reuses.
    saved: Option<Arc<Vec<f32>>>,
}

/// Forward output per row: [KD·τ², CE, student lse at τ, student lse at 1, teacher lse at τ].
/// Only the first two enter the loss; the backward reuses the rest instead of recomputing them.
const ROW_OUT: usize = 5;

/// Per-bucket value and `h_b = Q_b · ∂L/∂Q_b` of the KD term, from log-probabilities.
/// Returns (loss contribution, h).
#[inline]
fn bucket(kind: KdKind, logp: f64, logq: f64) -> (f64, f64) {
    let p = logp.exp();
    let q = logq.exp();
    // x·log(x/y) with the 0·log 0 = 0 convention.
    let xlog = |x: f64, lx: f64, ly: f64| if x > 0.0 { x * (lx - ly) } else { 0.0 };
    match kind {
        KdKind::ForwardKl => (xlog(p, logp, logq), -p),
        KdKind::ReverseKl => (xlog(q, logq, logp), q * (logq - logp + 1.0)),
        KdKind::Jsd { beta } => {
            let b = beta as f64;
            if b == 0.0 {
                return bucket(KdKind::ForwardKl, logp, logq);
            }
            if b == 1.0 {
                return bucket(KdKind::ReverseKl, logp, logq);
            }
            let m = b * p + (1.0 - b) * q;
            let lm = m.ln();
            let l = b * xlog(p, logp, lm) + (1.0 - b) * xlog(q, logq, lm);
            (
                l,
                if q > 0.0 {
                    q * (1.0 - b) * (logq - lm)
                } else {
                    0.0
                },
            )
        }
        KdKind::SkewForwardKl { alpha } => {
            let a = alpha as f64;
            let m = a * p + (1.0 - a) * q;
            let lm = m.ln();
            let h = if m > 0.0 { -q * p * (1.0 - a) / m } else { 0.0 };
            (xlog(p, logp, lm), h)
        }
        KdKind::SkewReverseKl { alpha } => {
            let a = alpha as f64;
            let m = a * q + (1.0 - a) * p;
            let lm = m.ln();
            let h = if q > 0.0 {
                q * (logq + 1.0 - lm - a * q / m)
            } else {
                0.0
            };
            (xlog(q, logq, lm), h)
        }
        KdKind::Tvd => {
            let d = q - p;
            (
                0.5 * d.abs(),
                q * 0.5 * d.signum() * (d != 0.0) as u8 as f64,
            )
        }
    }
}

/// The teacher's bucket log-probabilities at temperature `tau` for one position of sparse
/// targets: one per kept token with `keep(id)` true, then the tail bucket (−∞ when the kept tokens
/// hold all the mass). The tail's mass is `1 − Σ exp(logprob)` over all kept tokens, tempered as
/// if spread evenly over the `n_tail` tokens not kept (exact at τ = 1). Used by the fused op and
/// the composite path alike.
fn teacher_buckets(
    ids: &[u32],
    logprobs: &[f32],
    lse: f32,
    tau: f32,
    n_tail: usize,
    keep: impl Fn(u32) -> bool,
) -> Vec<f64> {
    let (tl, tau) = (lse as f64, tau as f64);
    let kept_mass: f64 = logprobs.iter().map(|&x| (x as f64).exp()).sum();
    let tail = (1.0 - kept_mass).max(0.0);
    let n_tail = n_tail.max(1) as f64;
    let mut logits: Vec<f64> = ids
        .iter()
        .zip(logprobs)
        .filter(|(&id, _)| keep(id))
        .map(|(_, &lp)| (lp as f64 + tl) / tau)
        .collect();
    logits.push(if tail > 0.0 {
        n_tail.ln() + ((tail / n_tail).ln() + tl) / tau
    } else {
        f64::NEG_INFINITY
    });
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z = m + logits.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    logits.iter().map(|x| x - z).collect()
}

thread_local! {
    /// The teacher's row of exponentials for the one-pass dense gradient (one row per thread).
    static TEACHER_ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl KdOp {
    /// One row: returns [KD·τ², CE, lse_τ, lse_1, teacher lse_τ]; with
    /// `grad = Some((out, g_kd, g_ce))` also writes ∂/∂s into `out` in the same passes (the
    /// logsumexps taken from the forward's `saved` row when given, else computed).
    fn row(
        &self,
        r: usize,
        s: &[f32],
        t: Option<&[f32]>,
        grad: Option<(&mut [f32], f32, f32)>,
        saved: Option<&[f32]>,
    ) -> [f32; ROW_OUT] {
        let label = self.labels[r];
        if label == IGNORE {
            if let Some((out, _, _)) = grad {
                out.fill(0.0);
            }
            return [0.0; ROW_OUT];
        }
        let tau = self.tau;
        let v = match (t, &self.sparse) {
            (Some(t), _) => s.len().min(t.len()),
            (None, Some(sp)) => s.len().min(sp.teacher_vocab),
            (None, None) => s.len(),
        };
        let s = &s[..v];
        let (mut out, g_kd, g_ce) = match grad {
            Some((o, a, b)) => (Some(o), a, b),
            None => (None, 0.0, 0.0),
        };
        // Student log-probs at τ and at 1. The sparse gradient is a softmax over the whole row:
        // exponentiated once into `out`, its sum is the one `lse` takes (bit for bit), and the
        // gradient is that row scaled, below — one pass of exponentials where two were.
        let fkl = matches!(self.kind, KdKind::ForwardKl | KdKind::Jsd { beta: 0.0 });
        // Σ exp(s/τ − m) and m, where `out` holds those exponentials.
        let mut soft_sum = None;
        let mut soft_shift = 0f32;
        let lse_tau = match (saved, out.as_deref_mut()) {
            (Some(sv), _) => sv[2],
            (None, Some(o)) if (t.is_none() && self.sparse.is_some()) || (t.is_some() && fkl) => {
                // As `lse` forms it: a > 0, so the largest a·s is a times the largest s.
                let m = (1.0 / tau) * vexp::max(s);
                if m == f32::NEG_INFINITY {
                    m
                } else {
                    let sum = vexp::exp_sum_into(s, 1.0 / tau, -m, &mut o[..v]);
                    soft_sum = Some(sum);
                    soft_shift = m;
                    m + sum.ln() as f32
                }
            }
            (None, _) => vexp::lse(s, 1.0 / tau),
        };
        let lse_one = match (saved, out.as_deref(), soft_sum) {
            (Some(sv), _, _) => sv[3],
            _ if tau == 1.0 => lse_tau,
            // At τ = 2 the exponentials in `out` squared are the ones at 1: exp(s − max) =
            // exp(s/2 − max/2)², and m = max/2 exactly (a halving). A pass of products where
            // `lse` would take one of exponentials (the CE term's, a metric unless weighted).
            (None, Some(o), Some(_)) if tau == 2.0 => {
                2.0 * soft_shift + vexp::sum_squares(&o[..v]).ln() as f32
            }
            _ => vexp::lse(s, 1.0),
        };
        let mut tlse_out = 0f32;
        let label = label as usize;
        let ce = if label < v { lse_one - s[label] } else { 0.0 };
        let mut kd = 0f64;
        let scale = (tau * tau) as f64;
        match (t, &self.sparse) {
            (Some(t), _) => {
                let t = &t[..v];
                // With the student's softmax already in `out` (above), the teacher's goes to a
                // per-thread row buffer in the same one pass, and the KL and its gradient read
                // both: two passes of exponentials where four were.
                let one_pass = match (out.as_deref_mut(), soft_sum) {
                    (Some(o), Some(ss)) => {
                        let tm = (1.0 / tau) * vexp::max(t);
                        (tm != f32::NEG_INFINITY).then(|| {
                            TEACHER_ROW.with(|buf| {
                                let mut et = buf.borrow_mut();
                                et.resize(v, 0.0);
                                let st = vexp::exp_sum_into(t, 1.0 / tau, -tm, &mut et);
                                let tlse = tm + st.ln() as f32;
                                let inv = ((1.0 / ss) as f32, (1.0 / st) as f32);
                                let (a, c) = (1.0 / tau, g_kd * tau);
                                let o = &mut o[..v];
                                let kd = vexp::fkl_value_grad_exp(
                                    (s, t),
                                    &et,
                                    a,
                                    (-lse_tau, -tlse),
                                    inv,
                                    c,
                                    o,
                                );
                                (kd, tlse)
                            })
                        })
                    }
                    _ => None,
                };
                let tlse = match (one_pass, saved) {
                    (Some((_, tlse)), _) => tlse,
                    (None, Some(sv)) => sv[4],
                    (None, None) => vexp::lse(t, 1.0 / tau),
                };
                tlse_out = tlse;
                match (one_pass, out.as_deref_mut()) {
                    (Some((k, _)), _) => kd = k,
                    // Forward KL, the common case: Σ p (log p − log q), and q − p with it in the
                    // same pass (vectorised exponentials, f64 block sums).
                    (None, None) if fkl => {
                        kd = vexp::fkl_value(s, t, 1.0 / tau, -lse_tau, -tlse);
                    }
                    (None, Some(o)) if fkl => {
                        let o = &mut o[..v];
                        let c = g_kd * tau;
                        kd = vexp::fkl_value_grad(s, t, 1.0 / tau, -lse_tau, -tlse, c, o);
                    }
                    (None, None) => {
                        for j in 0..v {
                            let lp = (t[j] / tau - tlse) as f64;
                            let lq = (s[j] / tau - lse_tau) as f64;
                            kd += bucket(self.kind, lp, lq).0;
                        }
                    }
                    (None, Some(o)) => {
                        // dz_j = h_j − q_j Σ h; ∂/∂s = τ²·dz/τ.
                        let mut sum_h = 0f64;
                        for j in 0..v {
                            let lp = (t[j] / tau - tlse) as f64;
                            let lq = (s[j] / tau - lse_tau) as f64;
                            let (l, h) = bucket(self.kind, lp, lq);
                            kd += l;
                            o[j] = h as f32;
                            sum_h += h;
                        }
                        let gk = g_kd * tau;
                        for j in 0..v {
                            let q = (s[j] / tau - lse_tau).exp();
                            o[j] = gk * (o[j] - q * sum_h as f32);
                        }
                    }
                }
            }
            (None, Some(sp)) => {
                let k = sp.k;
                let ids = &sp.ids[r * k..(r + 1) * k];
                let lps = &sp.logprobs[r * k..(r + 1) * k];
                // Teacher buckets at τ: kept tokens inside the shared vocabulary, then the tail.
                let logp = teacher_buckets(
                    ids,
                    lps,
                    sp.logsumexp[r],
                    tau,
                    sp.teacher_vocab.saturating_sub(k),
                    |id| (id as usize) < v,
                );
                let kept_n = logp.len() - 1;
                let logp_tail = logp[kept_n];
                // Student buckets.
                let kept_ids: Vec<usize> =
                    ids.iter().map(|&i| i as usize).filter(|&i| i < v).collect();
                let lq: Vec<f64> = kept_ids
                    .iter()
                    .map(|&i| (s[i] / tau - lse_tau) as f64)
                    .collect();
                let q_kept: f64 = lq.iter().map(|x| x.exp()).sum();
                let q_tail = (1.0 - q_kept).max(1e-30);
                let lq_tail = q_tail.ln();
                let mut h = Vec::with_capacity(kept_n);
                let mut sum_h = 0f64;
                for j in 0..kept_n {
                    let (l, hj) = bucket(self.kind, logp[j], lq[j]);
                    kd += l;
                    h.push(hj);
                    sum_h += hj;
                }
                let (l, h_tail) = bucket(self.kind, logp_tail, lq_tail);
                kd += l;
                sum_h += h_tail;
                if let Some(o) = out.as_deref_mut() {
                    let gk = g_kd * tau;
                    let tail_per_q = (h_tail / q_tail) as f32;
                    let sum_h = sum_h as f32;
                    let c = gk * (tail_per_q - sum_h);
                    match soft_sum {
                        // o holds exp(s/τ − m), Σ = e^(lse_τ − m): c·exp(s/τ − lse_τ) = o·c/Σ.
                        Some(sum) => vexp::scale(&mut o[..v], (c as f64 / sum) as f32),
                        None => vexp::exp_into(s, 1.0 / tau, -lse_tau, c, &mut o[..v]),
                    }
                    for (idx, &i) in kept_ids.iter().enumerate() {
                        let q = lq[idx].exp();
                        o[i] = gk * (h[idx] - q * sum_h as f64) as f32;
                    }
                }
            }
            (None, None) => {}
        }
        if let Some(o) = out {
            if g_ce != 0.0 && label < v {
                vexp::add_exp(s, 1.0, -lse_one, g_ce, &mut o[..v]);
                o[label] -= g_ce;
            }
        }
        [(kd * scale) as f32, ce, lse_tau, lse_one, tlse_out]
    }

    fn run(&self, s: &[f32], vs: usize, t: Option<(&[f32], usize)>) -> Vec<f32> {
        let n = s.len() / vs;
        match &self.grad {
            None => {
                let mut out = vec![0f32; n * ROW_OUT];
                out.par_chunks_mut(ROW_OUT).enumerate().for_each(|(r, o)| {
                    let trow = t.map(|(t, vt)| &t[r * vt..(r + 1) * vt]);
                    let res = self.row(r, &s[r * vs..(r + 1) * vs], trow, None, None);
                    o.copy_from_slice(&res);
                });
                out
            }
            Some(g) => {
                let mut out = vec![0f32; n * vs];
                out.par_chunks_mut(vs).enumerate().for_each(|(r, o)| {
                    let trow = t.map(|(t, vt)| &t[r * vt..(r + 1) * vt]);
                    let srow = &s[r * vs..(r + 1) * vs];
                    let saved = self
                        .saved
                        .as_ref()
                        .map(|sv| &sv[r * ROW_OUT..(r + 1) * ROW_OUT]);
                    let (gk, gc) = (g[ROW_OUT * r], g[ROW_OUT * r + 1]);
                    self.row(r, srow, trow, Some((&mut o[..], gk, gc)), saved);
                    // Ids beyond the shared vocabulary: masked, no gradient (already 0).
                });
                out
            }
        }
    }

    fn out_shape(&self, n: usize, vs: usize) -> Shape {
        if self.grad.is_some() {
            Shape::from((n, vs))
        } else {
            Shape::from((n, ROW_OUT))
        }
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    distill_core::ops::host_f32(s, l, &format!("kd loss: {what}"))
}

/// Dense teacher logits (N, Vt) for `n` student rows, as a slice and Vt.
fn teacher_rows<'a>(
    t: &'a CpuStorage,
    lt: &Layout,
    n: usize,
) -> candle_core::Result<(&'a [f32], usize)> {
    let (nt, vt) = lt.shape().dims2()?;
    if nt != n {
        candle_core::bail!("kd loss: {n} student rows vs {nt} teacher rows");
    }
    Ok((f32_slice(t, lt, "teacher logits")?, vt))
}

impl CustomOp1 for KdOp {
    fn name(&self) -> &'static str {
        "kd-loss-sparse"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, vs) = l.shape().dims2()?;
        let s = f32_slice(s, l, "student logits")?;
        Ok((
            CpuStorage::F32(self.run(s, vs, None)),
            self.out_shape(n, vs),
        ))
    }

    fn bwd(&self, s: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad.flatten_all()?.to_vec1::<f32>()?;
        let op = KdOp {
            grad: Some(Arc::new(g)),
            saved: Some(Arc::new(res.flatten_all()?.to_vec1::<f32>()?)),
            ..self.clone()
        };
        Ok(Some(s.apply_op1_no_bwd(&op)?))
    }
}

impl CustomOp2 for KdOp {
    fn name(&self) -> &'static str {
        "kd-loss-dense"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        ls: &Layout,
        t: &CpuStorage,
        lt: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, vs) = ls.shape().dims2()?;
        let t = teacher_rows(t, lt, n)?;
        let s = f32_slice(s, ls, "student logits")?;
        Ok((
            CpuStorage::F32(self.run(s, vs, Some(t))),
            self.out_shape(n, vs),
        ))
    }

    fn bwd(
        &self,
        s: &Tensor,
        t: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.flatten_all()?.to_vec1::<f32>()?;
        let op = KdOp {
            grad: Some(Arc::new(g)),
            saved: Some(Arc::new(res.flatten_all()?.to_vec1::<f32>()?)),
            ..self.clone()
        };
        Ok((Some(s.apply_op2_no_bwd(t, &op)?), None))
    }
}

/// Labels for next-token prediction on packed sequences: position i predicts token i+1; the last
/// position of each sequence has no label.
pub fn next_token_labels(ids: &[u32], batch: usize, seq_len: usize) -> Vec<u32> {
    let mut labels = vec![IGNORE; batch * seq_len];
    for b in 0..batch {
        for i in 0..seq_len - 1 {
            labels[b * seq_len + i] = ids[b * seq_len + i + 1];
        }
    }
    labels
}

/// The distillation loss of a batch. `student_logits` (B, T, Vs) or (N, Vs); `targets` for the
/// same positions; `labels` (N) with [`IGNORE`] for positions that take no part. On the CPU the
/// fused op runs; elsewhere [`composite_loss`].
pub fn distill_loss(
    student_logits: &Tensor,
    targets: &TeacherTargets,
    labels: &[u32],
    cfg: &LossConfig,
) -> Result<LossParts> {
    cfg.kind.validate()?;
    let vs = student_logits.dim(D::Minus1)?;
    let s = student_logits
        .reshape(((), vs))?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let n = s.dim(0)?;
    check_labels(labels, n)?;
    let tokens = labels.iter().filter(|&&l| l != IGNORE).count();
    if !s.device().is_cpu() {
        return composite_loss(&s, targets, labels, cfg);
    }
    let (op, dense) = kd_op(targets, labels, cfg, vs)?;
    let rows = match dense {
        Some(t) => s.apply_op2(&t, op)?,
        None => s.apply_op1(op)?,
    };
    combine(&rows, tokens, cfg)
}

fn check_labels(labels: &[u32], n: usize) -> Result<()> {
    if labels.len() != n {
        return Err(Error::Msg(format!(
            "{} labels for {n} positions",
            labels.len()
        )));
    }
    Ok(())
}

/// The fused op for these targets, and for dense ones the teacher's logits as (N, Vt) f32.
fn kd_op(
    targets: &TeacherTargets,
    labels: &[u32],
    cfg: &LossConfig,
    vs: usize,
) -> Result<(KdOp, Option<Tensor>)> {
    let op = KdOp {
        kind: cfg.kind,
        tau: cfg.temperature,
        labels: Arc::new(labels.to_vec()),
        sparse: None,
        grad: None,
        saved: None,
    };
    Ok(match targets {
        TeacherTargets::Dense { logits } => {
            let vt = logits.dim(D::Minus1)?;
            let t = logits
                .reshape(((), vt))?
                .to_dtype(DType::F32)?
                .contiguous()?;
            (op, Some(t))
        }
        TeacherTargets::Sparse {
            ids,
            logprobs,
            logsumexp,
        } => {
            let k = ids.dim(D::Minus1)?;
            let sp = SparseRows {
                k,
                ids: ids.flatten_all()?.to_vec1()?,
                logprobs: logprobs.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                logsumexp: logsumexp.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                teacher_vocab: cfg.teacher_vocab.unwrap_or(vs),
            };
            (
                KdOp {
                    sparse: Some(Arc::new(sp)),
                    ..op
                },
                None,
            )
        }
    })
}

fn combine(rows: &Tensor, tokens: usize, cfg: &LossConfig) -> Result<LossParts> {
    let denom = tokens.max(1) as f64;
    let sums = rows.narrow(1, 0, 2)?.sum(0)?; // [Σ KD, Σ CE]
    let kd = sums.narrow(0, 0, 1)?.squeeze(0)?;
    let ce = sums.narrow(0, 1, 1)?.squeeze(0)?;
    let total = ((kd.affine(cfg.alpha_kd as f64 / denom, 0.0)?
        + ce.affine(cfg.alpha_ce as f64 / denom, 0.0)?)?)
    .contiguous()?;
    let v = sums.to_vec1::<f32>()?;
    Ok(LossParts {
        total,
        kd: (v[0] as f64 / denom) as f32,
        ce: (v[1] as f64 / denom) as f32,
        tokens,
    })
}

/// The same loss from candle ops (differentiable by candle's autograd): the path for non-CPU
/// devices and the oracle for the fused op. `s` is (N, V) f32.
pub fn composite_loss(
    s: &Tensor,
    targets: &TeacherTargets,
    labels: &[u32],
    cfg: &LossConfig,
) -> Result<LossParts> {
    let device = s.device().clone();
    let (n, vs) = s.dims2()?;
    let tau = cfg.temperature as f64;
    let mask_v: Vec<f32> = labels.iter().map(|&l| (l != IGNORE) as u8 as f32).collect();
    let tokens = mask_v.iter().filter(|&&m| m > 0.0).count();
    let mask = Tensor::from_vec(mask_v, n, &device)?;
    let (logp, logq) = match targets {
        TeacherTargets::Dense { logits } => {
            let vt = logits.dim(D::Minus1)?;
            let v = vs.min(vt);
            let t = logits
                .reshape(((), vt))?
                .narrow(1, 0, v)?
                .to_dtype(DType::F32)?;
            let logp = candle_nn::ops::log_softmax(&(t / tau)?, D::Minus1)?;
            let logq = candle_nn::ops::log_softmax(&(s.narrow(1, 0, v)? / tau)?, D::Minus1)?;
            (logp, logq)
        }
        TeacherTargets::Sparse {
            ids,
            logprobs,
            logsumexp,
        } => {
            // Teacher buckets are constants: compute them on the CPU with the same rule.
            let k = ids.dim(D::Minus1)?;
            let lp_v: Vec<f32> = logprobs.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let lse_v: Vec<f32> = logsumexp.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let ids_v: Vec<u32> = ids.flatten_all()?.to_vec1()?;
            let n_tail = cfg.teacher_vocab.unwrap_or(vs).saturating_sub(k);
            let mut bucket_p = Vec::with_capacity(n * (k + 1));
            for r in 0..n {
                let b = teacher_buckets(
                    &ids_v[r * k..(r + 1) * k],
                    &lp_v[r * k..(r + 1) * k],
                    lse_v[r],
                    cfg.temperature,
                    n_tail,
                    |_| true,
                );
                bucket_p.extend(b.iter().map(|&x| x as f32));
            }
            let logp = Tensor::from_vec(bucket_p, (n, k + 1), &device)?;
            let logq_full = candle_nn::ops::log_softmax(&(s / tau)?, D::Minus1)?;
            let kept = logq_full.gather(&ids.reshape((n, k))?.contiguous()?, 1)?;
            let q_kept = kept.exp()?.sum_keepdim(1)?;
            let q_tail = (q_kept.affine(-1.0, 1.0)?.clamp(1e-30, 1.0))?.log()?;
            (logp, Tensor::cat(&[&kept, &q_tail], 1)?)
        }
    };
    let p = logp.exp()?;
    let q = logq.exp()?;
    // x·(lx − ly) with 0·log 0 = 0: where x = 0 the product is 0 as long as lx is finite.
    let xlog = |x: &Tensor, lx: &Tensor, ly: &Tensor| -> Result<Tensor> {
        let finite_lx = lx.maximum(-1e30)?;
        Ok((x * (finite_lx - ly)?)?)
    };
    let per = match cfg.kind {
        KdKind::ForwardKl => xlog(&p, &logp, &logq)?,
        KdKind::Jsd { beta: 0.0 } => xlog(&p, &logp, &logq)?,
        KdKind::ReverseKl => xlog(&q, &logq, &logp)?,
        KdKind::Jsd { beta: 1.0 } => xlog(&q, &logq, &logp)?,
        KdKind::Jsd { beta } => {
            let b = beta as f64;
            let m = ((&p * b)? + (&q * (1.0 - b))?)?;
            let lm = m.log()?;
            ((xlog(&p, &logp, &lm)? * b)? + (xlog(&q, &logq, &lm)? * (1.0 - b))?)?
        }
        KdKind::SkewForwardKl { alpha } => {
            let a = alpha as f64;
            let lm = ((&p * a)? + (&q * (1.0 - a))?)?.log()?;
            xlog(&p, &logp, &lm)?
        }
        KdKind::SkewReverseKl { alpha } => {
            let a = alpha as f64;
            let lm = ((&q * a)? + (&p * (1.0 - a))?)?.log()?;
            xlog(&q, &logq, &lm)?
        }
        KdKind::Tvd => ((&p - &q)?.abs()? * 0.5)?,
    };
    let kd_rows = (per.sum(1)? * (tau * tau))?;
    let logq1 = candle_nn::ops::log_softmax(s, D::Minus1)?;
    let safe_labels: Vec<u32> = labels
        .iter()
        .map(|&l| {
            if l == IGNORE || l as usize >= vs {
                0
            } else {
                l
            }
        })
        .collect();
    let lab = Tensor::from_vec(safe_labels, (n, 1), &device)?;
    let ce_rows = logq1.gather(&lab, 1)?.squeeze(1)?.neg()?;
    let rows = Tensor::stack(&[(kd_rows * &mask)?, (ce_rows * &mask)?], 1)?;
    combine(&rows, tokens, cfg)
}
