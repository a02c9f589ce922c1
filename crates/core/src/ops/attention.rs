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
//!
//! Non-finite values: a NaN among the scores a position sees makes its row NaN, as the masked
//! softmax did; keys it cannot see never reach it. Values are read through the block's
//! probabilities, whose hidden entries are 0, so a NaN in a value row past a position but inside
//! its block of 64 still reaches it (0 · NaN) — the loss is NaN either way.

use super::{gemm_f32, host_f32, host_f32_all, storage_f32};
use crate::vexp;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Device, Layout, Result, Shape, Tensor};
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

/// One (sequence, KV head)'s forward from its query heads `q` (rep, T, D), keys `k` (T, D) and
/// values `v` (T rows of D, `vs` apart): `o` (rep, T, D) and every query head's probabilities,
/// block by block, into `probs` (rep · [`Geom::probs_per_head`]).
fn task_forward(
    g: &Geom,
    q: &[f32],
    k: &[f32],
    (v, vs): (&[f32], usize),
    o: &mut [f32],
    probs: &mut [f32],
) {
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
                &v[k0 * vs..],
                (1, vs),
                1,
            );
        }
    }
}

/// [`task_forward`] into new buffers: the task's output (rep, T, D) and probabilities.
fn task_outputs(g: &Geom, q: &[f32], k: &[f32], v: (&[f32], usize)) -> (Vec<f32>, Vec<f32>) {
    let mut o = vec![0f32; g.rep() * g.t * g.d];
    let mut probs = vec![0f32; g.rep() * g.probs_per_head()];
    task_forward(g, q, k, v, &mut o, &mut probs);
    (o, probs)
}

/// One (sequence, KV head)'s backward from its inputs (as [`task_forward`]'s), its probabilities
/// `probs` and the output gradient `dy` (B, T, h·D) read at `head0`, the group's first query
/// head, of sequence `b`: `dq` (rep, T, D), `dk`, `dv` (T, D), which must come in zeroed.
#[allow(clippy::too_many_arguments)]
fn task_backward(
    g: &Geom,
    b: usize,
    head0: usize,
    q: &[f32],
    k: &[f32],
    (v, vs): (&[f32], usize),
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
                &v[k0 * vs..],
                (vs, 1),
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
        (0..g.b * g.kvh)
            .into_par_iter()
            .map(|task| {
                task_outputs(
                    g,
                    &q[task * rep * td..(task + 1) * rep * td],
                    &k[task * td..(task + 1) * td],
                    (&v[task * td..(task + 1) * td], g.d),
                )
            })
            .collect()
    }
}

/// Every task's output (rep, T, D), `o(task)`, as (B, T, h·D) rows: the heads side by side.
fn heads_side_by_side<'a>(g: &Geom, o: impl Fn(usize) -> &'a [f32] + Sync) -> Vec<f32> {
    let (rep, d, row) = (g.rep(), g.d, g.h * g.d);
    let mut out = vec![0f32; g.b * g.t * row];
    out.par_chunks_mut(g.t * row)
        .enumerate()
        .for_each(|(b, seq)| {
            for gi in 0..g.kvh {
                let o = o(b * g.kvh + gi);
                for r in 0..rep {
                    let head = gi * rep + r;
                    for p in 0..g.t {
                        seq[p * row + head * d..p * row + (head + 1) * d]
                            .copy_from_slice(&o[(r * g.t + p) * d..(r * g.t + p + 1) * d]);
                    }
                }
            }
        });
    out
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
        let [q, k, v] = host_f32_all(name, [(sq, lq), (sk, lk), (sv, lv)])?;
        let tasks = self.forward_tasks(&g, q, k, v);
        let out = heads_side_by_side(&g, |task| &tasks[task].0);
        if self.keep {
            let probs = tasks.into_iter().map(|(_, p)| p).collect();
            *self.saved.lock().expect("attention's saved probabilities") = Some(probs);
        }
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.t, g.h * g.d))))
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
            storage_f32(&sq, lq, name)?,
            storage_f32(&sk, lk, name)?,
            storage_f32(&sv, lv, name)?,
            storage_f32(&sg, lg, name)?,
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
                    (&vd[task * td..(task + 1) * td], g.d),
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

/// Causal attention straight from the packed projection `[q | k | v]` (B, T, (h + 2·kvh)·D) of
/// positions 0..T, the output of one GEMM: each task rotates its query heads (times `q_scale`)
/// and its key head itself and reads its values in place, → (B, T, h·D). The backward writes the
/// packed gradient, rotated back. Where the op-by-op graph narrows, transposes, copies and rotates
/// q, k and v (and backward undoes each, with a zero-filled accumulator per step), this is one op.
pub(super) struct PackedAttention {
    pub h: usize,
    pub kvh: usize,
    pub window: Option<usize>,
    /// Rotary tables of positions 0..T, (T, D/2).
    pub cos: Tensor,
    pub sin: Tensor,
    pub q_scale: f32,
    /// Keep each task's rotated heads and probabilities for the backward (else recomputed).
    pub keep: bool,
    pub saved: Mutex<Option<Vec<PackedTask>>>,
}

/// One task's rotated query heads (rep, T, D), rotated keys (T, D) and probabilities.
pub(super) struct PackedTask {
    q: Vec<f32>,
    k: Vec<f32>,
    probs: Vec<f32>,
}

impl PackedAttention {
    fn geom(&self, dims: &[usize]) -> Result<Geom> {
        let (h, kvh) = (self.h, self.kvh);
        let &[b, t, w] = dims else {
            candle_core::bail!("packed attention: input {dims:?}, expected (B, T, (h + 2·kvh)·D)")
        };
        let heads = h + 2 * kvh;
        if kvh == 0 || w % heads != 0 {
            candle_core::bail!("packed attention: width {w} for {h} query and {kvh} kv heads")
        }
        let d = w / heads;
        Geom::of(&[b, h, t, d], &[b, kvh, t, d], &[b, kvh, t, d], self.window)
    }

    /// Where task `task`'s values start in the packed data, and their row stride.
    fn values(g: &Geom, task: usize) -> (usize, usize) {
        let w = (g.h + 2 * g.kvh) * g.d;
        let (b, gi) = (task / g.kvh, task % g.kvh);
        (b * g.t * w + (g.h + g.kvh + gi) * g.d, w)
    }

    /// `f` of the rotary tables' data, checked against the sizes of `g`.
    fn tables<R>(&self, g: &Geom, f: impl FnOnce(&[f32], &[f32]) -> Result<R>) -> Result<R> {
        let name = "distill-packed-attention";
        let (sc, lc) = self.cos.storage_and_layout();
        let (ss, ls) = self.sin.storage_and_layout();
        let (cos, sin) = (storage_f32(&sc, lc, name)?, storage_f32(&ss, ls, name)?);
        let half = g.d / 2;
        if !g.d.is_multiple_of(2) || cos.len() != g.t * half || sin.len() != g.t * half {
            candle_core::bail!(
                "packed attention: rotary tables of {} for T = {}, D = {}",
                cos.len(),
                g.t,
                g.d
            )
        }
        f(cos, sin)
    }

    /// Every task's output (rep, T, D) and saved state.
    fn forward_tasks(
        &self,
        g: &Geom,
        x: &[f32],
        cos: &[f32],
        sin: &[f32],
    ) -> Vec<(Vec<f32>, PackedTask)> {
        let (t, d, rep) = (g.t, g.d, g.rep());
        let (w, half) = ((g.h + 2 * g.kvh) * d, d / 2);
        (0..g.b * g.kvh)
            .into_par_iter()
            .map(|task| {
                let (b, gi) = (task / g.kvh, task % g.kvh);
                let rotate = |col: usize, scale: f32, out: &mut [f32]| {
                    for (p, o) in out.chunks_exact_mut(d).enumerate() {
                        let at = (b * t + p) * w + col;
                        let (c, s) = (
                            &cos[p * half..(p + 1) * half],
                            &sin[p * half..(p + 1) * half],
                        );
                        vexp::rope_row(&x[at..at + d], c, s, 1.0, scale, o);
                    }
                };
                let mut q = vec![0f32; rep * t * d];
                for (r, qr) in q.chunks_exact_mut(t * d).enumerate() {
                    rotate((gi * rep + r) * d, self.q_scale, qr);
                }
                let mut k = vec![0f32; t * d];
                rotate((g.h + gi) * d, 1.0, &mut k);
                let (v0, vs) = Self::values(g, task);
                let (o, probs) = task_outputs(g, &q, &k, (&x[v0..], vs));
                (o, PackedTask { q, k, probs })
            })
            .collect()
    }
}

impl CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "distill-packed-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = host_f32(s, l, self.name())?;
        let g = self.geom(l.dims())?;
        let tasks = self.tables(&g, |cos, sin| Ok(self.forward_tasks(&g, x, cos, sin)))?;
        let out = heads_side_by_side(&g, |task| &tasks[task].0);
        if self.keep {
            let states = tasks.into_iter().map(|(_, st)| st).collect();
            *self.saved.lock().expect("attention's saved state") = Some(states);
        }
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.t, g.h * g.d))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let name = self.name();
        let g = self.geom(x.dims())?;
        let dy = dy.contiguous()?;
        let (sx, lx) = x.storage_and_layout();
        let (sg, lg) = dy.storage_and_layout();
        let (xd, gd) = (storage_f32(&sx, lx, name)?, storage_f32(&sg, lg, name)?);
        let saved = self.saved.lock().expect("attention's saved state").take();
        let states = match saved {
            Some(s) => s,
            None => self
                .tables(&g, |cos, sin| Ok(self.forward_tasks(&g, xd, cos, sin)))?
                .into_iter()
                .map(|(_, st)| st)
                .collect(),
        };
        let (t, d, rep, kvh) = (g.t, g.d, g.rep(), g.kvh);
        let grads: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = states
            .par_iter()
            .enumerate()
            .map(|(task, st)| {
                let mut dq = vec![0f32; rep * t * d];
                let mut dk = vec![0f32; t * d];
                let mut dv = vec![0f32; t * d];
                let (v0, vs) = Self::values(&g, task);
                task_backward(
                    &g,
                    task / kvh,
                    task % kvh * rep,
                    &st.q,
                    &st.k,
                    (&xd[v0..], vs),
                    &st.probs,
                    gd,
                    &mut dq,
                    &mut dk,
                    &mut dv,
                );
                (dq, dk, dv)
            })
            .collect();
        // The packed gradient: each head's rotated back into its columns (a rotation's transpose
        // is the opposite rotation), the values' copied.
        let w = (g.h + 2 * kvh) * d;
        let half = d / 2;
        let dx = self.tables(&g, |cos, sin| {
            let mut dx = vec![0f32; xd.len()];
            dx.par_chunks_mut(t * w).enumerate().for_each(|(b, seq)| {
                for (p, row) in seq.chunks_exact_mut(w).enumerate() {
                    let (c, s) = (
                        &cos[p * half..(p + 1) * half],
                        &sin[p * half..(p + 1) * half],
                    );
                    for gi in 0..kvh {
                        let (dq, dk, dv) = &grads[b * kvh + gi];
                        for r in 0..rep {
                            let (col, at) = ((gi * rep + r) * d, (r * t + p) * d);
                            let out = &mut row[col..col + d];
                            vexp::rope_row(&dq[at..at + d], c, s, -1.0, self.q_scale, out);
                        }
                        let col = (g.h + gi) * d;
                        vexp::rope_row(
                            &dk[p * d..(p + 1) * d],
                            c,
                            s,
                            -1.0,
                            1.0,
                            &mut row[col..col + d],
                        );
                        let col = (g.h + kvh + gi) * d;
                        row[col..col + d].copy_from_slice(&dv[p * d..(p + 1) * d]);
                    }
                }
            });
            Ok(dx)
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), &Device::Cpu)?))
    }
}
