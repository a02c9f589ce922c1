//! Vectorised row kernels, compiled three times (AVX-512, AVX2+FMA, baseline) and chosen at run
//! time: for the KD loss, exponentials of affine maps of a logit row, their sums and the
//! forward-KL value and gradient; for the model's fused ops ([`crate::ops`]), the masked softmax,
//! SwiGLU, RMSNorm and rotary rows, forward and backward. glibc's `expf` is a scalar call per
//! element; here the exponential is a branch-free polynomial that the compiler vectorises with the
//! row loop.
//!
//! `exp` is Cephes' `expf`: `x = n ln2 + r` with `|r| ≤ ln2/2`, a degree-7 polynomial for `e^r`
//! and `2^n` from the exponent bits; relative error ≤ 2 ulp over the clamped range
//! `[-87.3, 88.3]` (the test checks it against f64). Arguments below the range give
//! `e^-87.3 ≈ 1.2e-38` rather than 0 — far below anything the sums can see — and NaN stays NaN.
//! Sums are f32 lanes over blocks of 1,024 elements (64 terms per lane), added in f64.

/// Lanes of the reductions (fixed, so sums are reproducible from run to run and host to host).
const L: usize = 16;
/// Elements per f32 partial sum (64 per lane) before it is added in f64.
const BLOCK: usize = 1024;

/// Round to nearest (ties to even) by adding 1.5·2^23: exact for |x·log2e| < 2^22.
const SHIFT: f32 = 12_582_912.0;

#[inline(always)]
fn exp(x: f32) -> f32 {
    let (e, t) = exp_parts(x);
    // 2^n from t's low mantissa bits, which hold n (|n| ≤ 127 < 2^22): a bit cast and an
    // integer subtraction, where `n as i32` (saturating, NaN to 0) compiles to a scalar
    // conversion per lane and kept the loops from vectorising.
    let n_int = (t.to_bits() as i32).wrapping_sub(SHIFT.to_bits() as i32);
    e * f32::from_bits((n_int.wrapping_add(127) as u32) << 23)
}

/// `(e^r, t)` for the clamped `x = n ln2 + r`, with `t = x·log2e + SHIFT` (so `n = t − SHIFT`).
#[inline(always)]
fn exp_parts(x: f32) -> (f32, f32) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = if x < -87.3 { -87.3 } else { x };
    let x = if x > 88.3 { 88.3 } else { x };
    let t = x * LOG2E + SHIFT;
    let n = t - SHIFT;
    let r = x - n * C1 - n * C2;
    let p = 1.987_569e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    (p * (r * r) + r + 1.0, t)
}

/// `p (lp − lq)` with `p = e^lp`, and 0 where the teacher's probability is below f32's range
/// (a −∞ logit included: 0·log 0 = 0, as the scalar code's convention).
#[inline(always)]
fn fkl_term(lp: f32, lq: f32) -> f32 {
    let term = exp(lp) * (lp - lq);
    if lp > -87.3 {
        term
    } else {
        0.0
    }
}

/// Defines `pub fn $name` over its body three times: with AVX-512, with AVX2+FMA (each behind a
/// run-time check) and without either.
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features v4 was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above, for v3.
                    return unsafe { v3($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

#[inline(always)]
fn max_imp(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; L];
    let chunks = x.chunks_exact(L);
    let rem = chunks.remainder();
    for c in chunks {
        for l in 0..L {
            acc[l] = acc[l].max(c[l]);
        }
    }
    rem.iter().fold(
        acc.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        |m, &v| m.max(v),
    )
}

/// `Σ a·b` in f32 lanes (rows of the fused ops are short: a few hundred to a few thousand).
#[inline(always)]
fn dot_imp(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0f32; L];
    let full = n / L * L;
    for (ca, cb) in a[..full].chunks_exact(L).zip(b[..full].chunks_exact(L)) {
        for l in 0..L {
            acc[l] += ca[l] * cb[l];
        }
    }
    let tail: f32 = (full..n).map(|j| a[j] * b[j]).sum();
    acc.iter().sum::<f32>() + tail
}

/// The logistic function `1 / (1 + e^-x)` (0 < σ ≤ 1; below x ≈ −88 it bottoms out near 1e-38).
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

multiversion! {
    /// The largest element (−∞ for an empty row; NaNs ignored, as `f32::max` does).
    pub fn max(x: &[f32]) -> f32 {
        max_imp(x)
    }
}

multiversion! {
    /// Softmax of `a + m` (`m` an additive mask row, −∞ where hidden) into `out`. Masked entries,
    /// and any below e^-87.3 of the row's largest, are exactly 0; a row with nothing visible is
    /// all zeros. A NaN makes the whole row NaN, as candle's softmax does (a diverging model
    /// shows, rather than being silently masked).
    pub fn softmax_masked(a: &[f32], m: &[f32], out: &mut [f32]) {
        let n = out.len().min(a.len()).min(m.len());
        let out = &mut out[..n];
        for j in 0..n {
            out[j] = a[j] + m[j];
        }
        let mx = max_imp(out);
        if mx == f32::NEG_INFINITY {
            // Nothing visible, or nothing but NaN (which `max` skips).
            let fill = if out.iter().any(|v| v.is_nan()) { f32::NAN } else { 0.0 };
            out.fill(fill);
            return;
        }
        let mut acc = [0f32; L];
        let full = n / L * L;
        for c in out[..full].chunks_exact_mut(L) {
            for l in 0..L {
                let z = c[l] - mx;
                // NaN fails `<=` and goes through `exp`, which keeps it NaN.
                let e = if z <= -87.3 { 0.0 } else { exp(z) };
                c[l] = e;
                acc[l] += e;
            }
        }
        let mut tail = 0f32;
        for v in out[full..].iter_mut() {
            let z = *v - mx;
            *v = if z <= -87.3 { 0.0 } else { exp(z) };
            tail += *v;
        }
        let inv = 1.0 / (acc.iter().sum::<f32>() + tail);
        for v in out.iter_mut() {
            *v *= inv;
        }
    }
}

multiversion! {
    /// The softmax's backward: `out = y ⊙ (dy − Σ y·dy)`.
    pub fn softmax_grad(y: &[f32], dy: &[f32], out: &mut [f32]) {
        let d = dot_imp(y, dy);
        for ((o, &y), &g) in out.iter_mut().zip(y).zip(dy) {
            *o = y * (g - d);
        }
    }
}

/// f32 → bf16 bits, rounded to nearest even, NaN kept a (quiet) NaN of the same sign; branch-free,
/// so [`to_bf16`]'s loop vectorises.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    if nan {
        ((b >> 16) | 0x40) as u16
    } else {
        rounded
    }
}

multiversion! {
    /// [`bf16_bits`] of each `x[i]` into `out[i]`.
    pub fn to_bf16(x: &[f32], out: &mut [u16]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = bf16_bits(v);
        }
    }
}

multiversion! {
    /// bf16 pairs for AMX operands: `out[i]` holds [`bf16_bits`] of `lo[i]` in its low half (the
    /// lower address) and of `hi[i]` in its high half.
    pub fn to_bf16_pairs(lo: &[f32], hi: &[f32], out: &mut [u32]) {
        for ((o, &a), &b) in out.iter_mut().zip(lo).zip(hi) {
            *o = bf16_bits(a) as u32 | (bf16_bits(b) as u32) << 16;
        }
    }
}

multiversion! {
    /// SwiGLU: `out = silu(g) · u`, `silu(g) = g σ(g)`.
    pub fn swiglu(g: &[f32], u: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            *o = g * sigmoid(g) * u;
        }
    }
}

multiversion! {
    /// SwiGLU's backward: `dg = dy · u · σ(g)(1 + g(1 − σ(g)))`, `du = dy · silu(g)`.
    pub fn swiglu_grad(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        let n = g.len().min(u.len()).min(dy.len()).min(dg.len()).min(du.len());
        for j in 0..n {
            let s = sigmoid(g[j]);
            dg[j] = dy[j] * u[j] * s * (1.0 + g[j] * (1.0 - s));
            du[j] = dy[j] * g[j] * s;
        }
    }
}

multiversion! {
    /// RMSNorm of one row: `out = x · r · w` with `r = 1/√(mean(x²) + eps)`; returns `r`.
    pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) -> f32 {
        let r = 1.0 / (dot_imp(x, x) / x.len() as f32 + eps).sqrt();
        for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
            *o = x * r * w;
        }
        r
    }
}

multiversion! {
    /// RMSNorm's backward for one row: `dx = r·g − x·r³·(Σ g·x)/n` with `g = dy ⊙ w` and `r` as
    /// [`rms_norm`] computes it, and `dw += dy ⊙ x · r` when `dw` is given.
    pub fn rms_norm_grad(
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        eps: f32,
        dx: &mut [f32],
        dw: Option<&mut [f32]>,
    ) {
        let n = x.len().min(w.len()).min(dy.len()).min(dx.len());
        let (x, w, dy) = (&x[..n], &w[..n], &dy[..n]);
        let r = 1.0 / (dot_imp(x, x) / n as f32 + eps).sqrt();
        let mut acc = [0f32; L];
        let full = n / L * L;
        let lanes = x[..full].chunks_exact(L).zip(w[..full].chunks_exact(L));
        for ((cx, cw), cg) in lanes.zip(dy[..full].chunks_exact(L)) {
            for l in 0..L {
                acc[l] += cg[l] * cw[l] * cx[l];
            }
        }
        let tail: f32 = (full..n).map(|j| dy[j] * w[j] * x[j]).sum();
        let c = r * r * r * (acc.iter().sum::<f32>() + tail) / n as f32;
        for j in 0..n {
            dx[j] = r * dy[j] * w[j] - x[j] * c;
        }
        if let Some(dw) = dw {
            for j in 0..n.min(dw.len()) {
                dw[j] += dy[j] * x[j] * r;
            }
        }
    }
}

multiversion! {
    /// One position's half-split rotation (HF Llama's `rotate_half`) times `scale`:
    /// `out₁ = (x₁ c − s·x₂ sn)·scale`, `out₂ = (x₂ c + s·x₁ sn)·scale`, with `s` = +1 (forward)
    /// or −1 (the inverse rotation: the backward).
    pub fn rope_row(x: &[f32], cos: &[f32], sin: &[f32], sign: f32, scale: f32, out: &mut [f32]) {
        let half = cos.len().min(sin.len()).min(x.len() / 2).min(out.len() / 2);
        let (x1, x2) = x.split_at(half);
        let (o1, o2) = out.split_at_mut(half);
        for i in 0..half {
            let (c, s) = (cos[i], sign * sin[i]);
            o1[i] = (x1[i] * c - x2[i] * s) * scale;
            o2[i] = (x2[i] * c + x1[i] * s) * scale;
        }
    }
}

/// `Σ exp(a·x + b)`, f32 lanes over blocks of [`BLOCK`] elements, blocks added in f64; with
/// `STORE` each exponential is also written to `out` (as long as `x`). One body for [`sum_exp`]
/// and [`exp_sum_into`], so the two sums are the same by construction.
#[inline(always)]
fn exp_sum_imp<const STORE: bool>(x: &[f32], a: f32, b: f32, out: &mut [f32]) -> f64 {
    let mut total = 0f64;
    for (k, xb) in x.chunks(BLOCK).enumerate() {
        let ob: &mut [f32] = if STORE {
            &mut out[k * BLOCK..k * BLOCK + xb.len()]
        } else {
            &mut []
        };
        let mut acc = [0f32; L];
        let full = xb.len() / L * L;
        for (i, c) in xb[..full].chunks_exact(L).enumerate() {
            let mut e = [0f32; L];
            for l in 0..L {
                e[l] = exp(a * c[l] + b);
                acc[l] += e[l];
            }
            if STORE {
                ob[i * L..(i + 1) * L].copy_from_slice(&e);
            }
        }
        let mut tail = 0f32;
        for (j, &v) in xb[full..].iter().enumerate() {
            let e = exp(a * v + b);
            if STORE {
                ob[full + j] = e;
            }
            tail += e;
        }
        total += acc.iter().map(|&v| v as f64).sum::<f64>() + tail as f64;
    }
    total
}

multiversion! {
    /// `Σ exp(a·x + b)`: f32 lanes over blocks of [`BLOCK`] elements, blocks added in f64.
    pub fn sum_exp(x: &[f32], a: f32, b: f32) -> f64 {
        exp_sum_imp::<false>(x, a, b, &mut [])
    }
}

multiversion! {
    /// `out = c · exp(a·x + b)`.
    pub fn exp_into(x: &[f32], a: f32, b: f32, c: f32, out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = c * exp(a * v + b);
        }
    }
}

multiversion! {
    /// `out = exp(a·x + b)` over the first `min(|x|, |out|)` elements, returning their sum as
    /// [`sum_exp`] forms it (the same body): a softmax in one exponential pass where `lse` then
    /// `exp_into` take two.
    pub fn exp_sum_into(x: &[f32], a: f32, b: f32, out: &mut [f32]) -> f64 {
        let n = x.len().min(out.len());
        exp_sum_imp::<true>(&x[..n], a, b, &mut out[..n])
    }
}

multiversion! {
    /// `Σ x²`: f32 lanes over blocks of [`BLOCK`] elements, blocks added in f64 (as [`sum_exp`]).
    pub fn sum_squares(x: &[f32]) -> f64 {
        let mut total = 0f64;
        for xb in x.chunks(BLOCK) {
            let mut acc = [0f32; L];
            let full = xb.len() / L * L;
            for c in xb[..full].chunks_exact(L) {
                for l in 0..L {
                    acc[l] += c[l] * c[l];
                }
            }
            let tail: f32 = xb[full..].iter().map(|v| v * v).sum();
            total += acc.iter().map(|&v| v as f64).sum::<f64>() + tail as f64;
        }
        total
    }
}

/// The scalars of one AdamW step, as the optimizer's tensor path forms them (distill-train's
/// `optim`): the fused kernel [`adamw`] repeats that path's arithmetic in the same order.
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub beta1: f32,
    pub beta2: f32,
    /// `1 − β`, formed in f64 as the tensor path's scalar is.
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    /// `1/bc1`, `1/bc2`: candle's tensor ÷ scalar is a multiply by the reciprocal.
    pub inv_bc1: f32,
    pub inv_bc2: f32,
    pub eps: f32,
    pub lr: f32,
    /// `1 − lr·wd`, or `None` without decay.
    pub decay: Option<f32>,
    pub grad_scale: f32,
}

multiversion! {
    /// One AdamW step in place over the first `min` of the slices' lengths: g·s;
    /// m·β1 + g·(1−β1); v·β2 + g²·(1−β2); (m·(1/bc1)) / (√(v·(1/bc2)) + ε); w·(1 − lr·wd);
    /// w − update·lr. Vectorised, each lane the same IEEE operations as the scalar loop
    /// (`sqrt` and `/` are correctly rounded in every instruction set; no contraction to FMA).
    pub fn adamw(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: AdamStep) {
        let decay = k.decay;
        let lanes = w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut());
        for (((w, &g), m), v) in lanes {
            let gi = g * k.grad_scale;
            *m = *m * k.beta1 + gi * k.one_minus_beta1;
            *v = *v * k.beta2 + gi * gi * k.one_minus_beta2;
            let update = (*m * k.inv_bc1) / ((*v * k.inv_bc2).sqrt() + k.eps);
            let wi = match decay {
                Some(f) => *w * f,
                None => *w,
            };
            *w = wi - update * k.lr;
        }
    }
}

multiversion! {
    /// `out *= c`.
    pub fn scale(out: &mut [f32], c: f32) {
        for o in out.iter_mut() {
            *o *= c;
        }
    }
}

multiversion! {
    /// `out += c · exp(a·x + b)`.
    pub fn add_exp(x: &[f32], a: f32, b: f32, c: f32, out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o += c * exp(a * v + b);
        }
    }
}

multiversion! {
    /// Forward KL of one row, `Σ p (lp − lq)` with `lp = a·t + bt`, `lq = a·s + bs`, `p = e^lp`
    /// (f32 lanes over blocks, blocks added in f64).
    pub fn fkl_value(s: &[f32], t: &[f32], a: f32, bs: f32, bt: f32) -> f64 {
        let n = s.len().min(t.len());
        let mut total = 0f64;
        for (bs_, bt_) in s[..n].chunks(BLOCK).zip(t[..n].chunks(BLOCK)) {
            let mut acc = [0f32; L];
            let full = bs_.len() / L * L;
            for (cs, ct) in bs_[..full].chunks_exact(L).zip(bt_[..full].chunks_exact(L)) {
                for l in 0..L {
                    acc[l] += fkl_term(a * ct[l] + bt, a * cs[l] + bs);
                }
            }
            let mut tail = 0f32;
            for j in full..bs_.len() {
                tail += fkl_term(a * bt_[j] + bt, a * bs_[j] + bs);
            }
            total += acc.iter().map(|&v| v as f64).sum::<f64>() + tail as f64;
        }
        total
    }
}

multiversion! {
    /// Forward KL of one row and its gradient in one pass: returns [`fkl_value`]'s sum and writes
    /// `out = c · (q − p)`, `q = e^(a·s + bs)`, `p = e^(a·t + bt)` (two exponentials an element).
    pub fn fkl_value_grad(
        s: &[f32],
        t: &[f32],
        a: f32,
        bs: f32,
        bt: f32,
        c: f32,
        out: &mut [f32],
    ) -> f64 {
        let n = s.len().min(t.len()).min(out.len());
        let mut total = 0f64;
        let blocks = s[..n].chunks(BLOCK).zip(t[..n].chunks(BLOCK));
        for ((bs_, bt_), bo) in blocks.zip(out[..n].chunks_mut(BLOCK)) {
            let mut acc = [0f32; L];
            let full = bs_.len() / L * L;
            let lanes = bs_[..full].chunks_exact(L).zip(bt_[..full].chunks_exact(L));
            for ((cs, ct), co) in lanes.zip(bo[..full].chunks_exact_mut(L)) {
                for l in 0..L {
                    let (lp, lq) = (a * ct[l] + bt, a * cs[l] + bs);
                    let (p, q) = (exp(lp), exp(lq));
                    acc[l] += if lp > -87.3 { p * (lp - lq) } else { 0.0 };
                    co[l] = c * (q - p);
                }
            }
            let mut tail = 0f32;
            for j in full..bs_.len() {
                let (lp, lq) = (a * bt_[j] + bt, a * bs_[j] + bs);
                tail += fkl_term(lp, lq);
                bo[j] = c * (exp(lq) - exp(lp));
            }
            total += acc.iter().map(|&v| v as f64).sum::<f64>() + tail as f64;
        }
        total
    }
}

multiversion! {
    /// [`fkl_value_grad`] from exponentials already taken: `rows = (s, t)`; `out` holds `e^(a·s − ms)` on entry
    /// and `et` holds `e^(a·t − mt)`, `inv = (1/Σ out, 1/Σ et)`, so `q = out·inv.0`,
    /// `p = et·inv.1`; `b = (bs, bt)` are the rows' `−lse`. Returns `Σ p (lp − lq)` and writes
    /// `out = c · (q − p)`, with no exponential.
    pub fn fkl_value_grad_exp(
        rows: (&[f32], &[f32]),
        et: &[f32],
        a: f32,
        b: (f32, f32),
        inv: (f32, f32),
        c: f32,
        out: &mut [f32],
    ) -> f64 {
        let ((s, t), (bs, bt), (inv_s, inv_t)) = (rows, b, inv);
        let n = s.len().min(t.len()).min(et.len()).min(out.len());
        let mut total = 0f64;
        let blocks = s[..n].chunks(BLOCK).zip(t[..n].chunks(BLOCK)).zip(et[..n].chunks(BLOCK));
        for (((bs_, bt_), be), bo) in blocks.zip(out[..n].chunks_mut(BLOCK)) {
            let mut acc = [0f32; L];
            let full = bs_.len() / L * L;
            let lanes = bs_[..full].chunks_exact(L).zip(bt_[..full].chunks_exact(L));
            let lanes = lanes.zip(be[..full].chunks_exact(L));
            for (((cs, ct), ce), co) in lanes.zip(bo[..full].chunks_exact_mut(L)) {
                for l in 0..L {
                    let (lp, lq) = (a * ct[l] + bt, a * cs[l] + bs);
                    let (p, q) = (ce[l] * inv_t, co[l] * inv_s);
                    acc[l] += if lp > -87.3 { p * (lp - lq) } else { 0.0 };
                    co[l] = c * (q - p);
                }
            }
            let mut tail = 0f32;
            for j in full..bs_.len() {
                let (lp, lq) = (a * bt_[j] + bt, a * bs_[j] + bs);
                let (p, q) = (be[j] * inv_t, bo[j] * inv_s);
                tail += if lp > -87.3 { p * (lp - lq) } else { 0.0 };
                bo[j] = c * (q - p);
            }
            total += acc.iter().map(|&v| v as f64).sum::<f64>() + tail as f64;
        }
        total
    }
}

/// `ln Σ exp(a·x)` of a row (−∞ for an empty or all −∞ row).
pub fn lse(x: &[f32], a: f32) -> f32 {
    // a > 0 (an inverse temperature), so the largest a·x is a times the largest x.
    let m = a * max(x);
    if m == f32::NEG_INFINITY {
        return m;
    }
    m + sum_exp(x, a, -m).ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_squares_matches_f64_and_squared_half_exponentials_give_the_lse() {
        // 2,500 values: two full blocks and a remainder past the 16-lane chunks.
        let x: Vec<f32> = (0..2500).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let want: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        assert!((sum_squares(&x) - want).abs() <= 1e-6 * want);
        // exp(x/2 − max/2)² summed is the logsumexp at 1 (the loss's τ = 2 shortcut).
        let m = 0.5 * max(&x);
        let mut e = vec![0f32; x.len()];
        exp_sum_into(&x, 0.5, -m, &mut e);
        let shortcut = 2.0 * m + sum_squares(&e).ln() as f32;
        assert!(
            (shortcut - lse(&x, 1.0)).abs() <= 2e-6,
            "{shortcut} vs {}",
            lse(&x, 1.0)
        );
    }

    /// The vectorised AdamW step equals the scalar loop bit for bit (with and without decay,
    /// a length that is no multiple of the lanes, clipping's gradient scale).
    #[test]
    fn adamw_equals_the_scalar_loop() {
        let n = 1000;
        let w0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.71).sin()).collect();
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.13).cos() * 0.01).collect();
        let m0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.29).sin() * 1e-3).collect();
        let v0: Vec<f32> = (0..n)
            .map(|i| (i as f32 * 0.37).cos().abs() * 1e-5)
            .collect();
        for decay in [Some(0.9999f32), None] {
            let k = AdamStep {
                beta1: 0.9,
                beta2: 0.95,
                one_minus_beta1: (1.0 - 0.9f64) as f32,
                one_minus_beta2: (1.0 - 0.95f64) as f32,
                inv_bc1: (1.0 / (1.0 - 0.9f64.powi(3))) as f32,
                inv_bc2: (1.0 / (1.0 - 0.95f64.powi(3))) as f32,
                eps: 1e-8,
                lr: 1e-3,
                decay,
                grad_scale: 0.5,
            };
            let (mut w, mut m, mut v) = (w0.clone(), m0.clone(), v0.clone());
            adamw(&mut w, &g, &mut m, &mut v, k);
            for i in 0..n {
                let gi = g[i] * k.grad_scale;
                let mi = m0[i] * k.beta1 + gi * k.one_minus_beta1;
                let vi = v0[i] * k.beta2 + gi * gi * k.one_minus_beta2;
                let update = (mi * k.inv_bc1) / ((vi * k.inv_bc2).sqrt() + k.eps);
                let wi = decay.map_or(w0[i], |f| w0[i] * f) - update * k.lr;
                assert_eq!(
                    (w[i].to_bits(), m[i].to_bits(), v[i].to_bits()),
                    (wi.to_bits(), mi.to_bits(), vi.to_bits()),
                    "element {i}, decay {decay:?}"
                );
            }
        }
    }

    /// The exponent from the shifted sum's bits is the cast's `n as i32`, bit for bit, over
    /// the whole clamped range and beyond it (and NaN stays NaN).
    #[test]
    fn exp_from_bits_equals_the_cast_form() {
        fn cast_form(x: f32) -> f32 {
            let (e, t) = exp_parts(x);
            let n = t - SHIFT;
            e * f32::from_bits(((n as i32 + 127) as u32) << 23)
        }
        let mut x = -100.0f32;
        while x < 100.0 {
            assert_eq!(exp(x).to_bits(), cast_form(x).to_bits(), "x = {x}");
            x += 0.000_37;
        }
        for x in [
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN,
            0.0,
            -0.0,
        ] {
            assert_eq!(exp(x).to_bits(), cast_form(x).to_bits(), "x = {x}");
        }
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64_over_its_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst <= 2.0 * f32::EPSILON as f64, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn kernels_match_scalar_code() {
        let x: Vec<f32> = (0..1003).map(|i| ((i as f32) * 0.37).sin() * 9.0).collect();
        let t: Vec<f32> = (0..1003).map(|i| ((i as f32) * 0.11).cos() * 7.0).collect();
        let (a, b) = (0.5f32, -3.0f32);
        let want: f64 = x.iter().map(|&v| ((a * v + b) as f64).exp()).sum();
        assert!((sum_exp(&x, a, b) - want).abs() <= 1e-6 * want);
        assert_eq!(max(&x), x.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let want_lse = {
            let m = x
                .iter()
                .map(|&v| (a * v) as f64)
                .fold(f64::NEG_INFINITY, f64::max);
            m + x
                .iter()
                .map(|&v| ((a * v) as f64 - m).exp())
                .sum::<f64>()
                .ln()
        };
        assert!((lse(&x, a) as f64 - want_lse).abs() <= 1e-5);
        assert_eq!(lse(&[], 1.0), f32::NEG_INFINITY);
        // One pass: the same sum as sum_exp, bit for bit (the tail of 1003 = 16·62 + 11 too),
        // and each element exp(a·x + b); then scaled.
        let mut e = vec![0f32; x.len()];
        assert_eq!(exp_sum_into(&x, a, b, &mut e), sum_exp(&x, a, b));
        let mut one = vec![0f32; x.len()];
        exp_into(&x, a, b, 1.0, &mut one);
        assert_eq!(e, one);
        scale(&mut e, 0.25);
        assert!(e.iter().zip(&one).all(|(s, o)| *s == 0.25 * o));
        // The KL and its gradient from exponentials already taken, against the direct kernel:
        // rows over several blocks (the f64 block sums), the teacher with −∞ (padded) entries.
        {
            let x: Vec<f32> = (0..2500).map(|i| ((i as f32) * 0.37).sin() * 9.0).collect();
            let mut t: Vec<f32> = (0..2500).map(|i| ((i as f32) * 0.11).cos() * 7.0).collect();
            for j in (0..2500).step_by(97) {
                t[j] = f32::NEG_INFINITY;
            }
            let mut e = vec![0f32; x.len()];
            assert_eq!(exp_sum_into(&x, a, b, &mut e), sum_exp(&x, a, b));
            let (ls, lt) = (lse(&x, a), lse(&t, a));
            let (mut q, mut et) = (vec![0f32; x.len()], vec![0f32; t.len()]);
            let ss = exp_sum_into(&x, a, -a * max(&x), &mut q);
            let st = exp_sum_into(&t, a, -a * max(&t), &mut et);
            let inv = ((1.0 / ss) as f32, (1.0 / st) as f32);
            let got = fkl_value_grad_exp((&x, &t), &et, a, (-ls, -lt), inv, 0.3, &mut q);
            let mut want_g = vec![0f32; x.len()];
            let want = fkl_value_grad(&x, &t, a, -ls, -lt, 0.3, &mut want_g);
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{got} vs {want}"
            );
            for (g, w) in q.iter().zip(&want_g) {
                assert!((g - w).abs() <= 1e-6 + 1e-5 * w.abs(), "{g} vs {w}");
            }
        }
        let mut out = vec![1f32; x.len()];
        add_exp(&x, a, b, 2.0, &mut out);
        for (o, &v) in out.iter().zip(&x) {
            let w = 1.0 + 2.0 * ((a * v + b) as f64).exp();
            assert!((*o as f64 - w).abs() <= 4e-7 * w);
        }
        let (bs, bt) = (-lse(&x, a), -lse(&t, a));
        let want: f64 = x
            .iter()
            .zip(&t)
            .map(|(&s, &t)| {
                let (lp, lq) = ((a * t + bt) as f64, (a * s + bs) as f64);
                lp.exp() * (lp - lq)
            })
            .sum();
        assert!((fkl_value(&x, &t, a, bs, bt) - want).abs() <= 1e-5 * want.abs().max(1.0));
        // A teacher logit of −∞ (probability 0) adds nothing, not −∞ or NaN.
        let mut t_inf = t.clone();
        t_inf[5] = f32::NEG_INFINITY;
        let v = fkl_value(&x, &t_inf, a, bs, bt);
        assert!(
            v.is_finite() && (v - want).abs() <= 0.05 * want.abs().max(1.0),
            "{v} vs {want}"
        );
        let mut g = vec![0f32; x.len()];
        let v = fkl_value_grad(&x, &t, a, bs, bt, 3.0, &mut g);
        assert_eq!(v, fkl_value(&x, &t, a, bs, bt), "one pass, the same sum");
        for ((o, &s), &t) in g.iter().zip(&x).zip(&t) {
            let w = 3.0 * (((a * s + bs) as f64).exp() - ((a * t + bt) as f64).exp());
            assert!((*o as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()));
        }
    }
}
