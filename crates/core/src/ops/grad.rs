//! The layers' elementwise ops as CPU kernels with their own backward: RMSNorm, the rotary
//! embedding (with the attention's 1/√d folded in), the masked softmax of the attention scores and
//! SwiGLU of the packed gate-and-up product. Each is one parallel pass over its rows forward and
//! one backward ([`crate::vexp`]'s kernels), where candle's differentiable composites take five to
//! ten ops and their backward graphs twice that (a temporary, a zero-filled gradient accumulator
//! and a pass each). With them, the projections as ops that call gemm themselves: `x·Wᵀ`, the
//! same plus a residual, and a trained MLP's gate and up projections with their SwiGLU.
//!
//! Rows are split into fixed-size tasks and per-task partial sums (RMSNorm's weight gradient) are
//! added in task order, so results do not depend on the thread count or on scheduling: resumed runs
//! stay bit-identical. The inputs must be contiguous f32 CPU tensors; [`super`] chooses these ops
//! only then and keeps candle's ops for other devices.

use super::{host_f32, host_f32_all, product, product_alloc, storage_f32};
use crate::model::Precision;
use crate::vexp;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

/// Rows per parallel task: enough work to amortise the dispatch, small enough to balance.
const ROWS_PER_TASK: usize = 32;

/// Runs `f` over the data of a contiguous f32 CPU tensor, under its storage's read lock.
fn with_data<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    f(storage_f32(&storage, layout, op)?)
}

fn cpu_tensor(data: Vec<f32>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// `out[r] = f(r, in[r])` for rows of `n`, in parallel tasks — or on this thread when there is
/// only one task's work (decoding: handing a row to the pool costs more than the row).
fn map_rows(out: &mut [f32], n: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if n == 0 {
        return;
    }
    if out.len() <= n * ROWS_PER_TASK {
        for (r, row) in out.chunks_mut(n).enumerate() {
            f(r, row);
        }
        return;
    }
    out.par_chunks_mut(n * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, rows)| {
            for (i, row) in rows.chunks_mut(n).enumerate() {
                f(task * ROWS_PER_TASK + i, row);
            }
        });
}

/// RMSNorm over the last dimension: `x / √(mean(x²) + eps) · w`. Arguments: x (…, n), w (n).
pub(super) struct RmsNorm {
    pub eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "distill-rms-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (
            host_f32(sx, lx, self.name())?,
            host_f32(sw, lw, self.name())?,
        );
        let n = w.len();
        if n == 0 || lx.dims().last() != Some(&n) {
            candle_core::bail!("rms-norm: weight of {n} for input {:?}", lx.dims());
        }
        let mut out = vec![0f32; x.len()];
        map_rows(&mut out, n, |r, o| {
            vexp::rms_norm(&x[r * n..(r + 1) * n], w, self.eps, o);
        });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let n = w.elem_count();
        let need_dw = w.track_op();
        let (dx, dw) = with_data(x, self.name(), |x| {
            with_data(w, self.name(), |w| {
                with_data(&dy, self.name(), |dy| {
                    let mut dx = vec![0f32; x.len()];
                    // One partial weight gradient per task, added in task order (deterministic).
                    let partials: Vec<Option<Vec<f32>>> = dx
                        .par_chunks_mut(n * ROWS_PER_TASK)
                        .enumerate()
                        .map(|(task, rows)| {
                            let mut dw = need_dw.then(|| vec![0f32; n]);
                            for (i, dxr) in rows.chunks_mut(n).enumerate() {
                                let r = task * ROWS_PER_TASK + i;
                                let span = r * n..(r + 1) * n;
                                vexp::rms_norm_grad(
                                    &x[span.clone()],
                                    w,
                                    &dy[span],
                                    self.eps,
                                    dxr,
                                    dw.as_deref_mut(),
                                );
                            }
                            dw
                        })
                        .collect();
                    let dw = need_dw.then(|| {
                        let mut total = vec![0f32; n];
                        for p in partials.iter().flatten() {
                            total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
                        }
                        total
                    });
                    Ok((dx, dw))
                })
            })
        })?;
        let dw = dw.map(|d| cpu_tensor(d, w.shape())).transpose()?;
        Ok((Some(cpu_tensor(dx, x.shape())?), dw))
    }
}

/// The half-split rotary embedding times `scale`. Argument: x (B, H, T, D); `cos`, `sin`: (T, D/2)
/// for x's positions.
pub(super) struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
    pub scale: f32,
}

impl Rope {
    /// Rotates every (B·H·T) row of `x` by `sign` (+1 forward, −1 backward).
    fn rotate(&self, x: &[f32], dims: &[usize], sign: f32) -> Result<Vec<f32>> {
        let (t, d) = match dims {
            [_, _, t, d] => (*t, *d),
            _ => candle_core::bail!("rope: input of shape {dims:?}, expected (B, H, T, D)"),
        };
        let half = d / 2;
        let name = "distill-rope";
        with_data(&self.cos, name, |cos| {
            with_data(&self.sin, name, |sin| {
                if d % 2 != 0 || cos.len() != t * half || sin.len() != t * half {
                    candle_core::bail!("rope: tables of {} for T = {t}, D = {d}", cos.len());
                }
                let mut out = vec![0f32; x.len()];
                map_rows(&mut out, d, |r, o| {
                    let p = (r % t) * half;
                    let (c, s) = (&cos[p..p + half], &sin[p..p + half]);
                    vexp::rope_row(&x[r * d..(r + 1) * d], c, s, sign, self.scale, o);
                });
                Ok(out)
            })
        })
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "distill-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = self.rotate(host_f32(s, l, self.name())?, l.dims(), 1.0)?;
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        // A rotation's transpose is the opposite rotation.
        let dy = dy.contiguous()?;
        let dx = with_data(&dy, self.name(), |g| self.rotate(g, x.dims(), -1.0))?;
        Ok(Some(cpu_tensor(dx, x.shape())?))
    }
}

/// Softmax over the last dimension of `att + mask`, where `mask` (T, S) is additive (−∞ where
/// hidden) and row `r` of `att` (…, S) takes mask row `r mod T` — the layout of the attention
/// scores (B, kv-heads, rep·T, S), whose rows cycle through the T query positions.
pub(super) struct MaskedSoftmax {
    pub mask: Tensor,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "distill-masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let a = host_f32(s, l, self.name())?;
        let (t, n) = self.mask.dims2()?;
        let dims = l.dims();
        let rows_per_head = dims.len().checked_sub(2).map(|i| dims[i]);
        if dims.last() != Some(&n) || t == 0 || rows_per_head.is_none_or(|r| r % t != 0) {
            candle_core::bail!("masked softmax: mask ({t}, {n}) for scores {dims:?}");
        }
        let out = with_data(&self.mask, self.name(), |m| {
            let mut out = vec![0f32; a.len()];
            map_rows(&mut out, n, |r, o| {
                let q = r % t;
                vexp::softmax_masked(&a[r * n..(r + 1) * n], &m[q * n..(q + 1) * n], o);
            });
            Ok(out)
        })?;
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, att: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        let n = self.mask.dim(1)?;
        let dx = with_data(y, self.name(), |y| {
            with_data(&dy, self.name(), |g| {
                let mut dx = vec![0f32; y.len()];
                map_rows(&mut dx, n, |r, o| {
                    let span = r * n..(r + 1) * n;
                    vexp::softmax_grad(&y[span.clone()], &g[span], o);
                });
                Ok(dx)
            })
        })?;
        Ok(Some(cpu_tensor(dx, att.shape())?))
    }
}

/// SwiGLU of a packed (…, 2·width) tensor whose rows are `[gate | up]` (the output of one
/// gate-and-up GEMM), → (…, width); the backward writes the packed gradient `[dgate | dup]`.
pub(super) struct SwiGluPacked {
    pub width: usize,
}

impl CustomOp1 for SwiGluPacked {
    fn name(&self) -> &'static str {
        "distill-swiglu-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = host_f32(s, l, self.name())?;
        let w = self.width;
        if w == 0 || l.dims().last() != Some(&(2 * w)) {
            candle_core::bail!("swiglu: packed rows of {:?} for width {w}", l.dims());
        }
        let mut out = vec![0f32; x.len() / 2];
        map_rows(&mut out, w, |r, o| {
            let row = &x[2 * w * r..2 * w * (r + 1)];
            vexp::swiglu(&row[..w], &row[w..], o);
        });
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("checked: at least one dimension") = w;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        let w = self.width;
        let dx = with_data(x, self.name(), |xs| {
            with_data(&dy, self.name(), |g| {
                let mut dx = vec![0f32; xs.len()];
                map_rows(&mut dx, 2 * w, |r, o| {
                    let row = &xs[2 * w * r..2 * w * (r + 1)];
                    let (dg, du) = o.split_at_mut(w);
                    vexp::swiglu_grad(&row[..w], &row[w..], &g[w * r..w * (r + 1)], dg, du);
                });
                Ok(dx)
            })
        })?;
        Ok(Some(cpu_tensor(dx, x.shape())?))
    }
}

/// SwiGLU of two projections of the same input, `silu(x W_gᵀ) · (x W_uᵀ)`: x (…, in), W_g and
/// W_u (width, in) → (…, width). The two products are kept by the op for its backward, so neither
/// a concatenated weight (a copy forward, slices and their accumulators backward) nor a packed
/// product is a tensor of candle's graph.
pub(super) struct SwiGluLinear {
    /// The products' precision ([`super::Autocast`]), forward and backward.
    pub precision: Precision,
    /// Whether a backward will run (the products are kept for it).
    pub keep: bool,
    pub saved: std::sync::Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl SwiGluLinear {
    /// (rows, in, width) of x (…, in) and the two (width, in) weights.
    fn sizes(x: &[usize], wg: &[usize], wu: &[usize]) -> Result<(usize, usize, usize)> {
        if wg != wu {
            candle_core::bail!("swiglu projections: weights {wg:?} and {wu:?}");
        }
        Linear::sizes(x, wg)
    }

    /// `x W_gᵀ` and `x W_uᵀ`, each (rows × width), in fresh memory.
    fn gate_up(
        &self,
        x: &[f32],
        wg: &[f32],
        wu: &[f32],
        (rows, i, w): (usize, usize, usize),
    ) -> (Vec<f32>, Vec<f32>) {
        let threads = candle_core::utils::get_num_threads();
        let p = self.precision;
        let product = |weight| product_alloc(p, (rows, w, i), x, (1, i), weight, (i, 1), threads);
        (product(wg), product(wu))
    }
}

impl CustomOp3 for SwiGluLinear {
    fn name(&self) -> &'static str {
        "distill-swiglu-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
        su: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let [x, wg, wu] = host_f32_all(name, [(sx, lx), (sg, lg), (su, lu)])?;
        let sizes = Self::sizes(lx.dims(), lg.dims(), lu.dims())?;
        let (rows, _, w) = sizes;
        let (gate, up) = self.gate_up(x, wg, wu, sizes);
        let mut out = vec![0f32; rows * w];
        map_rows(&mut out, w, |r, o| {
            let row = w * r..w * (r + 1);
            vexp::swiglu(&gate[row.clone()], &up[row], o);
        });
        if self.keep {
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some((gate, up));
        }
        let mut dims = lx.dims().to_vec();
        *dims.last_mut().expect("checked: at least one dimension") = w;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wg: &Tensor,
        wu: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let sizes = Self::sizes(x.dims(), wg.dims(), wu.dims())?;
        let (rows, i, w) = sizes;
        let dy = dy.contiguous()?;
        let threads = candle_core::utils::get_num_threads();
        with_data(x, name, |xs| {
            with_data(wg, name, |g_w| {
                with_data(wu, name, |u_w| {
                    // The forward's products, or the same GEMMs again if it kept none.
                    let kept = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
                    let (gate, up) = match kept {
                        Some((gate, up)) if gate.len() == rows * w => (gate, up),
                        _ => self.gate_up(xs, g_w, u_w, sizes),
                    };
                    // [dgate | dup] (rows × 2·width).
                    let dgu = with_data(&dy, name, |g| {
                        let mut dgu = vec![0f32; rows * 2 * w];
                        map_rows(&mut dgu, 2 * w, |r, o| {
                            let row = w * r..w * (r + 1);
                            let (dg, du) = o.split_at_mut(w);
                            let (gr, ur) = (&gate[row.clone()], &up[row.clone()]);
                            vexp::swiglu_grad(gr, ur, &g[row], dg, du);
                        });
                        Ok(dgu)
                    })?;
                    drop((gate, up));
                    let dx = if x.track_op() {
                        // dx (rows×in) = dgate · W_g + dup · W_u.
                        let p = self.precision;
                        let mut dx =
                            product_alloc(p, (rows, i, w), &dgu, (1, 2 * w), g_w, (1, i), threads);
                        product(
                            p,
                            (rows, i, w),
                            &mut dx,
                            true,
                            &dgu[w..],
                            (1, 2 * w),
                            u_w,
                            (1, i),
                            threads,
                        );
                        Some(cpu_tensor(dx, x.shape())?)
                    } else {
                        None
                    };
                    // dW (width×in) = dhalfᵀ (width×rows) · x (rows×in).
                    let dweight = |half: usize, weight: &Tensor| -> Result<Option<Tensor>> {
                        if !weight.track_op() {
                            return Ok(None);
                        }
                        let lhs = &dgu[half * w..];
                        let (p, shape) = (self.precision, (w, i, rows));
                        let dw = product_alloc(p, shape, lhs, (2 * w, 1), xs, (1, i), threads);
                        Ok(Some(cpu_tensor(dw, weight.shape())?))
                    };
                    Ok((dx, dweight(0, wg)?, dweight(1, wu)?))
                })
            })
        })
    }
}

/// `y = x Wᵀ`: x (…, in), W (out, in) → (…, out); backward `dx = dy W`, `dW = dyᵀ x`, each one
/// GEMM on candle's thread count, and only where a gradient flows.
pub(super) struct Linear {
    /// The products' precision ([`super::Autocast`]), forward and backward.
    pub precision: Precision,
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "distill-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (
            host_f32(sx, lx, self.name())?,
            host_f32(sw, lw, self.name())?,
        );
        Self::forward(self.precision, x, lx, w, lw, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Self::backward(self.precision, x, w, dy)
    }
}

impl Linear {
    /// (rows, in, out) of x (…, in) and W (out, in).
    fn sizes(x: &[usize], w: &[usize]) -> Result<(usize, usize, usize)> {
        match (x.last(), w) {
            (Some(&i), &[o, wi]) if i == wi => Ok((x.iter().product::<usize>() / i.max(1), i, o)),
            _ => candle_core::bail!("linear: input {x:?} for weight {w:?}"),
        }
    }

    /// `[r +] x · Wᵀ`, (…, out).
    fn forward(
        p: Precision,
        x: &[f32],
        lx: &Layout,
        w: &[f32],
        lw: &Layout,
        residual: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, i, o) = Self::sizes(lx.dims(), lw.dims())?;
        let threads = candle_core::utils::get_num_threads();
        // y (rows×out) = [r +] x (rows×in) · Wᵀ (in×out): W's rows read as columns.
        let y = match residual {
            None => product_alloc(p, (rows, o, i), x, (1, i), w, (i, 1), threads),
            Some(r) => {
                if r.len() != rows * o {
                    candle_core::bail!(
                        "linear + residual: {} residual values for {rows}×{o}",
                        r.len()
                    );
                }
                let mut y = r.to_vec();
                product(p, (rows, o, i), &mut y, true, x, (1, i), w, (i, 1), threads);
                y
            }
        };
        let mut dims = lx.dims().to_vec();
        *dims.last_mut().expect("checked: at least one dimension") = o;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    /// The input's and the weight's gradients, each only where one flows.
    fn backward(
        p: Precision,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let name = "distill-linear";
        let (rows, i, o) = Self::sizes(x.dims(), w.dims())?;
        let dy = dy.contiguous()?;
        let threads = candle_core::utils::get_num_threads();
        with_data(&dy, name, |g| {
            let dx = if x.track_op() {
                with_data(w, name, |w| {
                    // dx (rows×in) = dy (rows×out) · W (out×in).
                    let dx = product_alloc(p, (rows, i, o), g, (1, o), w, (1, i), threads);
                    Ok(Some(cpu_tensor(dx, x.shape())?))
                })?
            } else {
                None
            };
            let dw = if w.track_op() {
                with_data(x, name, |x| {
                    // dW (out×in) = dyᵀ (out×rows) · x (rows×in).
                    let dw = product_alloc(p, (o, i, rows), g, (o, 1), x, (1, i), threads);
                    Ok(Some(cpu_tensor(dw, w.shape())?))
                })?
            } else {
                None
            };
            Ok((dx, dw))
        })
    }
}

/// `r + x·Wᵀ` (a residual stream plus a projection), one op: the residual, copied, is the GEMM's
/// initial value (a copy where an add read two tensors), and the projection's output is no
/// tensor whose gradient candle would accumulate; the residual's gradient is the output's, as is.
pub(super) struct LinearAdd {
    /// The products' precision ([`super::Autocast`]), forward and backward.
    pub precision: Precision,
}

impl CustomOp3 for LinearAdd {
    fn name(&self) -> &'static str {
        "distill-linear-add"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sr: &CpuStorage,
        lr: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let [x, w, r] = host_f32_all(name, [(sx, lx), (sw, lw), (sr, lr)])?;
        // The output's shape: x's with the last dimension W's rows.
        let out = match (lx.dims().split_last(), lw.dims().first()) {
            (Some((_, lead)), Some(&o)) => Some([lead, &[o]].concat()),
            _ => None,
        };
        if out.as_deref() != Some(lr.dims()) {
            candle_core::bail!(
                "{name}: residual {:?} for input {:?}, weight {:?}",
                lr.dims(),
                lx.dims(),
                lw.dims()
            );
        }
        Linear::forward(self.precision, x, lx, w, lw, Some(r))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        r: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = Linear::backward(self.precision, x, w, dy)?;
        let dr = r.track_op().then(|| dy.clone());
        Ok((dx, dw, dr))
    }
}
