//! The output projection fused with the distillation loss, in row chunks: no (N, V) logits or
//! logit-gradient tensor ever exists, forward or backward.
//!
//! For a chunk of `c` rows (≈ 128 MiB of logits): `z = h W^T` (one GEMM), the loss value of each
//! row and its gradient `dz` by the same per-row code as [`KdOp`] (so values and gradients are the
//! ones the tested op gives), then `dh = dz W` and `dW^T += h^T dz` (two GEMMs; dW is
//! accumulated transposed and transposed once at the end). The gradient is
//! taken in the forward pass (as Liger-Kernel's fused linear cross-entropy does): the loss is the
//! graph's last node, so recomputing the logits in the backward would cost a fourth GEMM for
//! nothing. The backward scales the saved gradients by the upstream gradient of the total.
//! `dW` is computed only when the projection is trained (a frozen, tied embedding costs none).

use super::{
    check_labels, f32_slice, kd_op, teacher_rows, KdOp, LossConfig, LossParts, IGNORE, ROW_OUT,
};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use distill_core::ops::bf16::{self, PackedBf16};
use distill_core::ops::{gemm_f32, product};
use distill_core::Precision;
use distill_core::{Result, TeacherTargets};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Bytes of logits one chunk holds (two such buffers: logits and their gradient). Each chunk's
/// three GEMMs pack the whole projection again, so fewer, taller chunks pack it less often:
/// 682 rows at V = 49,152 against 170 at 32 MiB, +13% on the 4L/256 student's step for ≈ 0.2 GB
/// more peak RSS (BENCHMARKS.md, fourth pass).
const CHUNK_BYTES: usize = 128 << 20;

/// Rows per chunk for a vocabulary of `v`: ≈ [`CHUNK_BYTES`], at least 16 rows.
fn chunk_rows(v: usize, n: usize) -> usize {
    (CHUNK_BYTES / (4 * v.max(1))).clamp(16, 1024).min(n.max(1))
}

/// Bytes of the chunk buffers a batch of `rows` positions over a vocabulary of `v` uses.
pub fn fused_buffer_bytes(v: usize, rows: usize) -> usize {
    2 * 4 * v * chunk_rows(v, rows)
}

/// Chunk buffers (and the transposed projection gradient) kept between steps: a fresh 128 MiB
/// buffer costs the kernel's page zeroing on every step, a kept one does not.
static SCRATCH: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// The smallest kept buffer of at least `len` floats (its contents are stale), or a new one.
fn take_scratch(len: usize) -> Vec<f32> {
    let mut pool = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
    let best = (0..pool.len())
        .filter(|&i| pool[i].len() >= len)
        .min_by_key(|&i| pool[i].len());
    match best {
        Some(i) => pool.swap_remove(i),
        None => vec![0f32; len],
    }
}

fn give_scratch(buf: Vec<f32>) {
    let mut pool = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < 4 {
        pool.push(buf);
    }
}

/// A frozen projection's bf16 packs (for `z` and, when asked, for `dh`), kept between calls: a
/// frozen tied embedding is the same tensor at every step, and packing its V × d values costs
/// two passes over 113 MB (the SmolLM2 vocabulary) per step. Keyed by the tensor's id (never
/// reused) and its data's address and length. The frozen projection the trainer passes is the
/// model's own embedding after its `Var` is gone, which nothing changes; a tensor changed in
/// place under the same id (candle's `slice_set`) would be served stale packs — nothing in
/// distill does that. One entry (one student per process); it lives until the next one.
type HeadPacks = Arc<(PackedBf16, Option<PackedBf16>)>;
type HeadKey = (candle_core::TensorId, usize, usize);
static HEAD_PACKS: Mutex<Option<(HeadKey, HeadPacks)>> = Mutex::new(None);

/// W (V × d) packed as the right operand of `h Wᵀ` and (when `need_dh`) of `dz W`: from
/// [`HEAD_PACKS`] for a frozen `W` already packed, else packed now (and kept when frozen).
fn head_packs(
    frozen: Option<candle_core::TensorId>,
    w: &[f32],
    v: usize,
    d: usize,
    need_dh: bool,
) -> HeadPacks {
    let key = frozen.map(|id| (id, w.as_ptr() as usize, w.len()));
    if let Some(key) = key {
        let kept = HEAD_PACKS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, packs)) = kept.as_ref() {
            if *k == key && packs.1.is_some() >= need_dh {
                return packs.clone();
            }
        }
    }
    // Packed outside the lock (the packing runs on rayon's pool).
    let packs = Arc::new((
        PackedBf16::pack_strided(w, d, v, (d, 1)),
        need_dh.then(|| PackedBf16::pack_strided(w, v, d, (1, d))),
    ));
    if let Some(key) = key {
        *HEAD_PACKS.lock().unwrap_or_else(|e| e.into_inner()) = Some((key, packs.clone()));
    }
    packs
}

/// Gradients computed in the forward pass, unscaled (upstream gradient 1).
#[derive(Debug, Default)]
struct Saved {
    dh: Option<Vec<f32>>,
    dw: Option<Vec<f32>>,
}

#[derive(Debug, Clone)]
struct LmHeadKd {
    kd: KdOp,
    /// ∂total/∂(row KD·τ²) and ∂total/∂(row CE): α_kd/tokens and α_ce/tokens.
    w_kd: f32,
    w_ce: f32,
    need_dh: bool,
    need_dw: bool,
    /// The products' precision (`ops::Autocast` when the op was built): bf16 packs the projection
    /// into AMX tiles once per call, for `z` and for `dh`.
    precision: Precision,
    /// The projection's tensor when it is frozen: its bf16 packs are kept between calls
    /// ([`HEAD_PACKS`]).
    frozen: Option<candle_core::TensorId>,
    /// Rows per chunk ([`chunk_rows`]; small in tests, to cross chunk boundaries).
    chunk: usize,
    saved: Arc<Mutex<Saved>>,
}

impl LmHeadKd {
    /// The shared vocabulary of a row: the ids that take part (as [`KdOp::row`] computes it).
    fn shared_vocab(&self, vs: usize, vt: Option<usize>) -> usize {
        match (vt, &self.kd.sparse) {
            (Some(vt), _) => vs.min(vt),
            (None, Some(sp)) => vs.min(sp.teacher_vocab),
            (None, None) => vs,
        }
    }

    /// `h` (N, d), `w` (V, d), dense targets `t` (N, Vt): returns [total, Σ KD·τ², Σ CE] and
    /// keeps the gradients.
    fn run(
        &self,
        h: &[f32],
        d: usize,
        w: &[f32],
        v: usize,
        t: Option<(&[f32], usize)>,
    ) -> [f32; 3] {
        let n = h.len() / d.max(1);
        let c = self.chunk.clamp(1, n.max(1));
        let threads = candle_core::utils::get_num_threads();
        let train = self.need_dh || self.need_dw;
        let vshared = self.shared_vocab(v, t.map(|(_, vt)| vt));
        let mut z = take_scratch(c * v);
        let mut dz = if train {
            take_scratch(c * v)
        } else {
            Vec::new()
        };
        let mut dh = if self.need_dh {
            vec![0f32; n * d]
        } else {
            Vec::new()
        };
        // dW accumulates transposed, (d × V) row-major: gemm runs that product at the speed of
        // the other two (≈ 300 GFLOP/s on the 4L/256 student's shapes), where the (V × d) layout
        // packs the chunk's gradient first and reaches ≈ 205 (BENCHMARKS.md, fifth pass; the
        // `gemm_layouts` example of distill-core times both); one transpose at the end costs a
        // pass over the projection. The first chunk overwrites.
        let mut dwt = if self.need_dw {
            take_scratch(d * v)
        } else {
            Vec::new()
        };
        let mut rows = vec![[0f32; ROW_OUT]; n];
        // At bf16: W (V × d) as the right operand of z = h Wᵀ and of dh = dz W, packed once for
        // every chunk, and kept for the next call when W is frozen.
        let packed =
            (!self.precision.is_f32()).then(|| head_packs(self.frozen, w, v, d, self.need_dh));
        for r0 in (0..n).step_by(c) {
            let m = c.min(n - r0);
            let hc = &h[r0 * d..(r0 + m) * d];
            // z (m×V) = h_c (m×d) · W^T (d×V).
            match packed.as_deref() {
                Some((pz, _)) => bf16::gemm(hc, m, pz, &mut z[..m * v], false),
                None => gemm_f32(
                    m,
                    v,
                    d,
                    &mut z,
                    (1, v),
                    false,
                    hc,
                    (1, d),
                    w,
                    (d, 1),
                    threads,
                ),
            }
            let body = |i: usize, s: &[f32], o: Option<&mut [f32]>, out: &mut [f32; ROW_OUT]| {
                let r = r0 + i;
                let trow = t.map(|(t, vt)| &t[r * vt..(r + 1) * vt]);
                match o {
                    None => *out = self.kd.row(r, s, trow, None, None),
                    // Value and gradient in one call: the logsumexps are computed once.
                    Some(o) => {
                        let g = Some((&mut *o, self.w_kd, self.w_ce));
                        *out = self.kd.row(r, s, trow, g, None);
                        // Ids past the shared vocabulary get no gradient (the row leaves them).
                        if self.kd.labels[r] != IGNORE {
                            o[vshared..].fill(0.0);
                        }
                    }
                }
            };
            let rows_c = &mut rows[r0..r0 + m];
            if train {
                z[..m * v]
                    .par_chunks(v)
                    .zip(dz[..m * v].par_chunks_mut(v))
                    .zip(rows_c.par_iter_mut())
                    .enumerate()
                    .for_each(|(i, ((s, o), out))| body(i, s, Some(o), out));
            } else {
                z[..m * v]
                    .par_chunks(v)
                    .zip(rows_c.par_iter_mut())
                    .enumerate()
                    .for_each(|(i, (s, out))| body(i, s, None, out));
            }
            if self.need_dh {
                // dh_c (m×d) = dz (m×V) · W (V×d).
                let dhc = &mut dh[r0 * d..(r0 + m) * d];
                match packed.as_deref() {
                    Some((_, Some(pdh))) => bf16::gemm(&dz[..m * v], m, pdh, dhc, false),
                    _ => gemm_f32(m, d, v, dhc, (1, d), false, &dz, (1, v), w, (1, d), threads),
                }
            }
            if self.need_dw {
                // dW^T (d×V) += h_c^T (d×m) · dz (m×V).
                product(
                    self.precision,
                    (d, v, m),
                    &mut dwt,
                    r0 > 0,
                    hc,
                    (d, 1),
                    &dz,
                    (1, v),
                    threads,
                );
            }
        }
        give_scratch(z);
        if train {
            give_scratch(dz);
        }
        let dw = if self.need_dw {
            if n == 0 {
                // No chunk ran: the kept buffer still holds an earlier step's gradient.
                dwt[..d * v].fill(0.0);
            }
            let dw = distill_core::ops::transpose_f32(&dwt[..d * v], d, v);
            give_scratch(dwt);
            dw
        } else {
            Vec::new()
        };
        let (mut kd, mut ce) = (0f64, 0f64);
        for r in &rows {
            kd += r[0] as f64;
            ce += r[1] as f64;
        }
        let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        saved.dh = self.need_dh.then_some(dh);
        saved.dw = self.need_dw.then_some(dw);
        let total = self.w_kd as f64 * kd + self.w_ce as f64 * ce;
        [total as f32, kd as f32, ce as f32]
    }

    fn forward(
        &self,
        h: &CpuStorage,
        lh: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        t: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = lh.shape().dims2()?;
        let (v, dw) = lw.shape().dims2()?;
        if dw != d {
            candle_core::bail!("fused lm-head loss: hidden size {d}, projection (V, {dw})");
        }
        let h = f32_slice(h, lh, "hidden states")?;
        let w = f32_slice(w, lw, "output projection")?;
        let t = match t {
            Some((t, lt)) => Some(teacher_rows(t, lt, n)?),
            None => None,
        };
        let out = self.run(h, d, w, v, t);
        Ok((CpuStorage::F32(out.to_vec()), Shape::from(3)))
    }

    /// The saved gradients times the upstream gradient of the total.
    fn backward(
        &self,
        h: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_vec1::<f32>()?;
        if g[1] != 0.0 || g[2] != 0.0 {
            candle_core::bail!("fused lm-head loss: only the total (element 0) is differentiable");
        }
        let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        // A gradient the forward kept, times g[0]; refused if an earlier backward took it.
        let take = |need: bool, slot: &mut Option<Vec<f32>>, like: &Tensor| {
            if !need {
                return Ok(None);
            }
            let Some(mut v) = slot.take() else {
                candle_core::bail!("fused lm-head loss: backward run twice");
            };
            if g[0] != 1.0 {
                v.par_iter_mut().for_each(|x| *x *= g[0]);
            }
            Ok(Some(Tensor::from_vec(v, like.shape(), like.device())?))
        };
        let saved = &mut *saved;
        let dh = take(self.need_dh, &mut saved.dh, h)?;
        let dw = take(self.need_dw, &mut saved.dw, w)?;
        Ok((dh, dw))
    }
}

impl CustomOp2 for LmHeadKd {
    fn name(&self) -> &'static str {
        "lm-head-kd-loss-sparse"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        lh: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(h, lh, w, lw, None)
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        self.backward(h, w, grad)
    }
}

impl CustomOp3 for LmHeadKd {
    fn name(&self) -> &'static str {
        "lm-head-kd-loss-dense"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        lh: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        t: &CpuStorage,
        lt: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(h, lh, w, lw, Some((t, lt)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dh, dw) = self.backward(h, w, grad)?;
        Ok((dh, dw, None))
    }
}

/// The distillation loss from the student's final-norm hidden states (B, T, d) or (N, d) and its
/// output projection `lm_head` (V, d): the same value and gradients as
/// [`distill_loss`](super::distill_loss) of `hidden · lm_headᵀ`. On the CPU in f32 the projection
/// is fused with the loss in row chunks ([module docs](self)); elsewhere the logits are formed and
/// [`distill_loss`](super::distill_loss) runs. Only `total` is differentiable, once.
pub fn distill_loss_from_hidden(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &TeacherTargets,
    labels: &[u32],
    cfg: &LossConfig,
) -> Result<LossParts> {
    loss_in_chunks(hidden, lm_head, targets, labels, cfg, None)
}

fn loss_in_chunks(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &TeacherTargets,
    labels: &[u32],
    cfg: &LossConfig,
    chunk: Option<usize>,
) -> Result<LossParts> {
    cfg.kind.validate()?;
    let d = hidden.dim(D::Minus1)?;
    let h = hidden.reshape(((), d))?;
    let fused = h.device().is_cpu() && h.dtype() == DType::F32 && lm_head.dtype() == DType::F32;
    if !fused {
        let logits = h.matmul(&lm_head.t()?)?;
        return super::distill_loss(&logits, targets, labels, cfg);
    }
    let h = h.contiguous()?;
    let w = lm_head.contiguous()?;
    let (n, v) = (h.dim(0)?, w.dim(0)?);
    check_labels(labels, n)?;
    let tokens = labels.iter().filter(|&&l| l != IGNORE).count();
    let denom = tokens.max(1) as f64;
    let (kd, dense) = kd_op(targets, labels, cfg, v)?;
    let op = LmHeadKd {
        kd,
        w_kd: (cfg.alpha_kd as f64 / denom) as f32,
        w_ce: (cfg.alpha_ce as f64 / denom) as f32,
        need_dh: h.track_op(),
        need_dw: w.track_op(),
        precision: distill_core::ops::autocast_precision(),
        frozen: (!w.track_op()).then(|| w.id()),
        chunk: chunk.unwrap_or_else(|| chunk_rows(v, n)),
        saved: Arc::default(),
    };
    let out = match dense {
        Some(t) => h.apply_op3(&w, &t, op)?,
        None => h.apply_op2(&w, op)?,
    };
    let v = out.to_vec1::<f32>()?;
    Ok(LossParts {
        total: out.narrow(0, 0, 1)?.squeeze(0)?,
        kd: (v[1] as f64 / denom) as f32,
        ce: (v[2] as f64 / denom) as f32,
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::{distill_loss, KdKind};
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, scale: f32, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    fn max_rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
        a.iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    /// The fused loss against logits formed by candle then the (PyTorch-checked) loss op: value,
    /// KD/CE parts and the gradients of hidden states and projection, across chunk boundaries,
    /// with the upstream gradient ≠ 1.
    fn check(targets: &TeacherTargets, v: usize, cfg: &LossConfig, train_w: bool, what: &str) {
        let (n, d) = (23, 12);
        let dev = Device::Cpu;
        let h = Var::from_vec(rand_vec(n * d, 1.0, 1), (n, d), &dev).unwrap();
        let w_t = Tensor::from_vec(rand_vec(v * d, 1.5, 2), (v, d), &dev).unwrap();
        let w_var = Var::from_tensor(&w_t).unwrap();
        let w = if train_w {
            w_var.as_tensor().clone()
        } else {
            w_t.clone()
        };
        let labels: Vec<u32> = (0..n)
            .map(|i| {
                if i % 7 == 3 {
                    IGNORE
                } else {
                    ((i * 13) % v) as u32
                }
            })
            .collect();
        let reference =
            distill_loss(&h.matmul(&w.t().unwrap()).unwrap(), targets, &labels, cfg).unwrap();
        let g_ref = (&reference.total * 0.5).unwrap().backward().unwrap();
        for chunk in [5, 64] {
            let fused =
                loss_in_chunks(h.as_tensor(), &w, targets, &labels, cfg, Some(chunk)).unwrap();
            let (a, b) = (
                fused.total.to_scalar::<f32>().unwrap(),
                reference.total.to_scalar::<f32>().unwrap(),
            );
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{what}: {a} vs {b}"
            );
            assert!((fused.kd - reference.kd).abs() <= 1e-5 * reference.kd.abs().max(1.0));
            assert!((fused.ce - reference.ce).abs() <= 1e-5 * reference.ce.abs().max(1.0));
            assert_eq!(fused.tokens, reference.tokens);
            let g = (&fused.total * 0.5).unwrap().backward().unwrap();
            let dh = g.get(h.as_tensor()).expect("hidden gradient");
            let e = max_rel_err(dh, g_ref.get(h.as_tensor()).unwrap());
            assert!(e <= 1e-5, "{what} chunk {chunk}: dh off by {e}");
            match (train_w, g.get(&w)) {
                (true, Some(dw)) => {
                    let e = max_rel_err(dw, g_ref.get(&w).unwrap());
                    assert!(e <= 1e-5, "{what} chunk {chunk}: dW off by {e}");
                }
                (true, None) => panic!("{what}: a trained projection got no gradient"),
                (false, dw) => assert!(dw.is_none(), "{what}: a frozen projection got a gradient"),
            }
        }
    }

    /// Under `Autocast(Bf16)` the projection's products run on AMX tiles: the loss and the
    /// gradients stay within bf16 rounding of f32 (and differ from it: the tiles ran), and the
    /// loss and dh do not depend on the chunking (each row's products are one fixed sequence).
    #[test]
    fn bf16_autocast_tracks_f32() {
        if !distill_core::ops::bf16::available() {
            eprintln!("skipped: no AMX-BF16 on this CPU");
            return;
        }
        let (n, d, v) = (45, 40, 300);
        let dev = Device::Cpu;
        let h = Var::from_vec(rand_vec(n * d, 1.0, 1), (n, d), &dev).unwrap();
        let w = Var::from_vec(rand_vec(v * d, 0.5, 2), (v, d), &dev).unwrap();
        let t = TeacherTargets::Dense {
            logits: Tensor::from_vec(rand_vec(n * v, 6.0, 3), (n, v), &dev).unwrap(),
        };
        let labels: Vec<u32> = (0..n).map(|i| ((i * 13) % v) as u32).collect();
        let c = cfg(KdKind::ForwardKl, 2.0, 0.3);
        let run = |chunk: usize| {
            let parts =
                loss_in_chunks(h.as_tensor(), w.as_tensor(), &t, &labels, &c, Some(chunk)).unwrap();
            let g = parts.total.backward().unwrap();
            let dh = g.get(h.as_tensor()).unwrap().clone();
            let dw = g.get(w.as_tensor()).unwrap().clone();
            (parts.total.to_scalar::<f32>().unwrap(), dh, dw)
        };
        let (l32, dh32, dw32) = run(64);
        let guard = distill_core::ops::Autocast::new(distill_core::Precision::Bf16).unwrap();
        let (l16, dh16, dw16) = run(64);
        let (l16b, dh16b, _) = run(7);
        drop(guard);
        assert!(
            l16 != l32 && (l16 - l32).abs() <= 1e-2 * l32.abs(),
            "{l16} vs {l32}"
        );
        assert!(max_rel_err(&dh16, &dh32) <= 2e-2);
        assert!(max_rel_err(&dw16, &dw32) <= 2e-2);
        assert_eq!(l16, l16b);
        assert_eq!(max_rel_err(&dh16, &dh16b), 0.0);
    }

    fn cfg(kind: KdKind, tau: f32, alpha_ce: f32) -> LossConfig {
        LossConfig {
            kind,
            temperature: tau,
            alpha_kd: 1.0 - alpha_ce,
            alpha_ce,
            teacher_vocab: None,
        }
    }

    #[test]
    fn fused_lm_head_loss_equals_logits_then_loss() {
        let (n, v) = (23, 41);
        let dev = Device::Cpu;
        let t = rand_vec(n * v, 6.0, 3);
        let dense = TeacherTargets::Dense {
            logits: Tensor::from_vec(t.clone(), (n, v), &dev).unwrap(),
        };
        for train_w in [true, false] {
            check(
                &dense,
                v,
                &cfg(KdKind::ForwardKl, 2.0, 0.3),
                train_w,
                "dense fkl τ=2",
            );
            check(
                &dense,
                v,
                &cfg(KdKind::ReverseKl, 1.0, 0.0),
                train_w,
                "dense rkl",
            );
        }
        // A teacher with fewer ids than the student: the extra ids take no part.
        let narrow = TeacherTargets::Dense {
            logits: Tensor::from_vec(rand_vec(n * (v - 3), 6.0, 4), (n, v - 3), &dev).unwrap(),
        };
        check(
            &narrow,
            v,
            &cfg(KdKind::ForwardKl, 1.0, 0.2),
            true,
            "padded vocabulary",
        );
        // Top-k targets.
        let k = 5;
        let (mut ids, mut lps, mut lses) = (vec![0u32; n * k], vec![0f32; n * k], vec![]);
        for r in 0..n {
            lses.push(distill_core::logits::row_topk(
                &t[r * v..(r + 1) * v],
                &mut ids[r * k..(r + 1) * k],
                &mut lps[r * k..(r + 1) * k],
            ));
        }
        let sparse = TeacherTargets::Sparse {
            ids: Tensor::from_vec(ids, (n, k), &dev).unwrap(),
            logprobs: Tensor::from_vec(lps, (n, k), &dev).unwrap(),
            logsumexp: Tensor::from_vec(lses, n, &dev).unwrap(),
        };
        check(
            &sparse,
            v,
            &cfg(KdKind::Jsd { beta: 0.3 }, 1.0, 0.1),
            true,
            "sparse jsd",
        );
        check(
            &sparse,
            v,
            &cfg(KdKind::ForwardKl, 2.0, 0.0),
            false,
            "sparse fkl τ=2",
        );
    }

    /// A batch of no rows runs no chunk: the trained projection's gradient is zero, not what a
    /// kept scratch buffer held from an earlier step (one is run first to leave one behind).
    #[test]
    fn zero_rows_give_a_zero_projection_gradient() {
        let dev = Device::Cpu;
        let (d, v) = (7, 53);
        let w = Var::from_vec(rand_vec(v * d, 1.0, 8), (v, d), &dev).unwrap();
        let c = cfg(KdKind::ForwardKl, 1.0, 0.0);
        for n in [9, 0] {
            let h = Var::from_vec(rand_vec(n * d, 1.0, 9), (n, d), &dev).unwrap();
            let t = TeacherTargets::Dense {
                logits: Tensor::from_vec(rand_vec(n * v, 3.0, 10), (n, v), &dev).unwrap(),
            };
            let labels = vec![1u32; n];
            let parts =
                distill_loss_from_hidden(h.as_tensor(), w.as_tensor(), &t, &labels, &c).unwrap();
            let g = parts.total.backward().unwrap();
            let dw: Vec<f32> = g
                .get(w.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let nonzero = dw.iter().filter(|&&x| x != 0.0).count();
            assert_eq!(
                nonzero == 0,
                n == 0,
                "{n} rows: {nonzero} non-zero dW entries"
            );
        }
    }

    #[test]
    fn only_the_total_is_differentiable() {
        let dev = Device::Cpu;
        let (n, d, v) = (4, 3, 6);
        let h = Var::from_vec(rand_vec(n * d, 1.0, 5), (n, d), &dev).unwrap();
        let w = Tensor::from_vec(rand_vec(v * d, 1.0, 6), (v, d), &dev).unwrap();
        let t = TeacherTargets::Dense {
            logits: Tensor::from_vec(rand_vec(n * v, 3.0, 7), (n, v), &dev).unwrap(),
        };
        let labels = vec![1, 2, 3, IGNORE];
        let parts = distill_loss_from_hidden(
            h.as_tensor(),
            &w,
            &t,
            &labels,
            &cfg(KdKind::ForwardKl, 1.0, 0.0),
        )
        .unwrap();
        parts.total.backward().unwrap();
        let again = parts.total.backward();
        assert!(
            again.is_err(),
            "a second backward must be refused, not wrong"
        );
    }
}
