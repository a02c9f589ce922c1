//! Causal self-attention as one CPU op, forward and backward: `softmax(q kᵀ + causal mask) v` for
//! every query head, without the (B·h·T·T) score tensors of the op-by-op graph, its mask, or its
//! head transposes.
//!
//! Query positions are taken in blocks of [`BLOCK`]; a block multiplies only the keys it can see
//! (those up to its last position, and from its first position's window start), so the four
//! products (scores, output; and in backward dP, dQ, dK, dV — six) cost (n + 1) / 2n of the dense
//! ones for n blocks: 62.5% at T = 256. Each (sequence, KV head) is one parallel task owning its
//! query heads' rows, its keys' and values' gradients, and its probabilities (kept for the
//! backward): results do not depend on the thread count, and resumed runs stay bit-identical.

use super::{gemm_f32, host_f32};
use crate::vexp;
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Query positions per block: small enough that the causal triangle skips most hidden scores,
/// large enough that each product stays a GEMM rather than a loop of dot products.
const BLOCK: usize = 64;

/// Sizes of one call: B sequences, `h` query heads over `kvh` key/value heads, T positions, head
/// width D; `window`: how many keys (itself included) a position sees at most.
#[derive(Clone, Copy, Debug)]
struct Geom {
    b: usize,
    h: usize,
    kvh: usize,
    t: usize,
    d: usize,
    window: Option<usize>,
}

impl Geom {
    fn of(q: &[usize], k: &[usize], v: &[usize], window: Option<usize>) -> Result<Self> {
        let bad = || -> Result<Self> {
            candle_core::bail!(
                "causal attention: q {q:?}, k {k:?}, v {v:?} (expected (B, h, T, D) and (B, kvh, T, D) with kvh dividing h)"
            )
        };
        let (&[b, h, t, d], &[kb, kvh, kt, kd]) = (q, k) else {
            return bad();
        };
        if k != v || (kb, kt, kd) != (b, t, d) || kvh == 0 || h % kvh != 0 || window == Some(0) {
            return bad();
        }
        Ok(Self {
            b,
            h,
            kvh,
            t,
            d,
            window,
        })
    }

    fn rep(&self) -> usize {
        self.h / self.kvh
    }

    /// The first key position `p` sees.
    fn first_key(&self, p: usize) -> usize {
        self.window.map_or(0, |w| (p + 1).saturating_sub(w))
    }

    /// Query blocks `(p0, p1, k0)`: positions `p0..p1`, which see keys `k0..p1` between them.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        (0..self.t)
            .step_by(BLOCK)
            .map(|p0| (p0, (p0 + BLOCK).min(self.t), self.first_key(p0)))
    }

    /// Floats of one query head's probabilities, all blocks.
    fn probs_per_head(&self) -> usize {
        self.blocks()
            .map(|(p0, p1, k0)| (p1 - p0) * (p1 - k0))
            .sum()
    }
}

/// One (sequence, KV head)'s forward: `o` (rep, T, D) and every query head's probabilities,
/// block by block, into `probs` (rep · [`Geom::probs_per_head`]).
fn task_forward(g: &Geom, q: &[f32], k: &[f32], v: &[f32], o: &mut [f32], probs: &mut [f32]) {
    let d = g.d;
    let mut scores = vec![0f32; g.t];
    let mut off = 0;
    for r in 0..g.rep() {
        let qr = &q[r * g.t * d..(r + 1) * g.t * d];
        let or = &mut o[r * g.t * d..(r + 1) * g.t * d];
        for (p0, p1, k0) in g.blocks() {
            let (bq, nk) = (p1 - p0, p1 - k0);
            let s = &mut probs[off..off + bq * nk];
            off += bq * nk;
            // S = Q_blk · K_visᵀ: K's rows read as columns.
            gemm_f32(
                bq,
                nk,
                d,
                s,
                (1, nk),
                false,
                &qr[p0 * d..],
                (1, d),
                &k[k0 * d..],
                (d, 1),
                1,
            );
            for (i, row) in s.chunks_exact_mut(nk).enumerate() {
                let p = p0 + i;
                let (lo, hi) = (g.first_key(p) - k0, p + 1 - k0);
                row[..lo].fill(0.0);
                row[hi..].fill(0.0);
                let seen = &mut row[lo..hi];
                let mx = vexp::max(seen);
                if mx == f32::NEG_INFINITY {
                    // Every score −∞ or NaN: the row becomes NaN or zeros, as the masked softmax.
                    let fill = if seen.iter().any(|x| x.is_nan()) {
                        f32::NAN
                    } else {
                        0.0
                    };
                    seen.fill(fill);
                    continue;
                }
                let scores = &mut scores[..seen.len()];
                scores.copy_from_slice(seen);
                let sum = vexp::exp_sum_into(scores, 1.0, -mx, seen);
                vexp::scale(seen, (1.0 / sum) as f32);
            }
            // O_blk = P · V_vis.
            gemm_f32(
                bq,
                d,
                nk,
                &mut or[p0 * d..p1 * d],
                (1, d),
                false,
                s,
                (1, nk),
                &v[k0 * d..],
                (1, d),
                1,
            );
        }
    }
}

/// One (sequence, KV head)'s backward from its probabilities `probs` and the output gradient
/// `dy` (B, T, h·D) read at `head0`, the group's first query head, of sequence `b`: `dq` (rep,
/// T, D), `dk`, `dv` (T, D), which must come in zeroed.
#[allow(clippy::too_many_arguments)]
fn task_backward(
    g: &Geom,
    b: usize,
    head0: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dy: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (d, row) = (g.d, g.h * g.d);
    let mut dp = vec![0f32; BLOCK * g.t];
    let mut ds = vec![0f32; BLOCK * g.t];
    let mut off = 0;
    for r in 0..g.rep() {
        let qr = &q[r * g.t * d..(r + 1) * g.t * d];
        let dqr = &mut dq[r * g.t * d..(r + 1) * g.t * d];
        // Row p of this head's output gradient.
        let dy_at = |p: usize| (b * g.t + p) * row + (head0 + r) * d;
        for (p0, p1, k0) in g.blocks() {
            let (bq, nk) = (p1 - p0, p1 - k0);
            let p = &probs[off..off + bq * nk];
            off += bq * nk;
            let dy_blk = &dy[dy_at(p0)..];
            let (dp, ds) = (&mut dp[..bq * nk], &mut ds[..bq * nk]);
            // dP = dO · V_visᵀ.
            gemm_f32(
                bq,
                nk,
                d,
                dp,
                (1, nk),
                false,
                dy_blk,
                (1, row),
                &v[k0 * d..],
                (d, 1),
                1,
            );
            // dS = P ⊙ (dP − Σ P·dP) per row; hidden entries have P = 0 and so dS = 0.
            for ((pr, gr), sr) in p
                .chunks_exact(nk)
                .zip(dp.chunks_exact(nk))
                .zip(ds.chunks_exact_mut(nk))
            {
                vexp::softmax_grad(pr, gr, sr);
            }
            // dQ_blk = dS · K_vis.
            gemm_f32(
                bq,
                d,
                nk,
                &mut dqr[p0 * d..p1 * d],
                (1, d),
                false,
                ds,
                (1, nk),
                &k[k0 * d..],
                (1, d),
                1,
            );
            // dK_vis += dSᵀ · Q_blk, dV_vis += Pᵀ · dO.
            gemm_f32(
                nk,
                d,
                bq,
                &mut dk[k0 * d..p1 * d],
                (1, d),
                true,
                ds,
                (nk, 1),
                &qr[p0 * d..],
                (1, d),
                1,
            );
            gemm_f32(
                nk,
                d,
                bq,
                &mut dv[k0 * d..p1 * d],
                (1, d),
                true,
                p,
                (nk, 1),
                dy_blk,
                (1, row),
                1,
            );
        }
    }
}

/// Causal attention of rotated, pre-scaled queries q (B, h, T, D) over keys and values
/// (B, kvh, T, D) at positions 0..T → (B, T, h·D), head-major along the last dimension.
pub(super) struct CausalAttention {
    pub window: Option<usize>,
    /// Keep the probabilities for the backward (a gradient will flow); else it recomputes them.
    pub keep: bool,
    pub saved: Mutex<Option<Vec<Vec<f32>>>>,
}

impl CausalAttention {
    /// Every task's output (rep, T, D) and probabilities.
    fn forward_tasks(
        &self,
        g: &Geom,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Vec<(Vec<f32>, Vec<f32>)> {
        let (td, rep) = (g.t * g.d, g.rep());
        let per_task = rep * g.probs_per_head();
        (0..g.b * g.kvh)
            .into_par_iter()
            .map(|task| {
                let mut o = vec![0f32; rep * td];
                let mut probs = vec![0f32; per_task];
                task_forward(
                    g,
                    &q[task * rep * td..(task + 1) * rep * td],
                    &k[task * td..(task + 1) * td],
                    &v[task * td..(task + 1) * td],
                    &mut o,
                    &mut probs,
                );
                (o, probs)
            })
            .collect()
    }
}

fn data<'a>(s: &'a Storage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(c) => host_f32(c, l, what),
        _ => candle_core::bail!("{what}: CPU tensors only"),
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "distill-causal-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let g = Geom::of(lq.dims(), lk.dims(), lv.dims(), self.window)?;
        let (q, k, v) = (
            host_f32(sq, lq, name)?,
            host_f32(sk, lk, name)?,
            host_f32(sv, lv, name)?,
        );
        let tasks = self.forward_tasks(&g, q, k, v);
        // Scatter each task's (rep, T, D) rows into (B, T, h·D).
        let (rep, d, row) = (g.rep(), g.d, g.h * g.d);
        let mut out = vec![0f32; g.b * g.t * row];
        out.par_chunks_mut(g.t * row)
            .enumerate()
            .for_each(|(b, seq)| {
                for gi in 0..g.kvh {
                    let o = &tasks[b * g.kvh + gi].0;
                    for r in 0..rep {
                        let head = gi * rep + r;
                        for p in 0..g.t {
                            seq[p * row + head * d..p * row + (head + 1) * d]
                                .copy_from_slice(&o[(r * g.t + p) * d..(r * g.t + p + 1) * d]);
                        }
                    }
                }
            });
        if self.keep {
            let probs = tasks.into_iter().map(|(_, p)| p).collect();
            *self.saved.lock().expect("attention's saved probabilities") = Some(probs);
        }
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.t, row))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let g = Geom::of(q.dims(), k.dims(), v.dims(), self.window)?;
        let dy = dy.contiguous()?;
        let (sq, lq) = q.storage_and_layout();
        let (sk, lk) = k.storage_and_layout();
        let (sv, lv) = v.storage_and_layout();
        let (sg, lg) = dy.storage_and_layout();
        let (qd, kd, vd, gd) = (
            data(&sq, lq, name)?,
            data(&sk, lk, name)?,
            data(&sv, lv, name)?,
            data(&sg, lg, name)?,
        );
        let saved = self
            .saved
            .lock()
            .expect("attention's saved probabilities")
            .take();
        let probs = match saved {
            Some(p) => p,
            None => self
                .forward_tasks(&g, qd, kd, vd)
                .into_iter()
                .map(|(_, p)| p)
                .collect(),
        };
        let (td, rep) = (g.t * g.d, g.rep());
        let mut dq = vec![0f32; qd.len()];
        let mut dk = vec![0f32; kd.len()];
        let mut dv = vec![0f32; vd.len()];
        dq.par_chunks_mut(rep * td)
            .zip(dk.par_chunks_mut(td))
            .zip(dv.par_chunks_mut(td))
            .enumerate()
            .for_each(|(task, ((dq, dk), dv))| {
                let (b, gi) = (task / g.kvh, task % g.kvh);
                task_backward(
                    &g,
                    b,
                    gi * rep,
                    &qd[task * rep * td..(task + 1) * rep * td],
                    &kd[task * td..(task + 1) * td],
                    &vd[task * td..(task + 1) * td],
                    &probs[task],
                    gd,
                    dq,
                    dk,
                    dv,
                );
            });
        let dev = Device::Cpu;
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), &dev)?),
            Some(Tensor::from_vec(dk, k.shape(), &dev)?),
            Some(Tensor::from_vec(dv, v.shape(), &dev)?),
        ))
    }
}
