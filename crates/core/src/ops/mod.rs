//! The model's non-matmul ops. On CPU (f32) each is one of [`grad`]'s kernels — one parallel
//! pass forward, and a backward of its own when a gradient flows. Elsewhere, candle's fused kernel
//! when no gradient is needed (teacher, generation, eval) and a composite of differentiable ops
//! when one is (student training): candle's fused `rms_norm`, `rope` and `softmax_last_dim` have
//! no backward and would silently cut the graph (CANDLE-NOTES.md), so the choice is made on the
//! inputs themselves: `Tensor::track_op` is true exactly when a gradient can flow through it.

mod attention;
pub mod bf16;
mod grad;

use crate::model::Precision;
use candle_core::{DType, Result, Tensor, D};

/// The data of a contiguous f32 CPU storage as a slice, for custom ops' kernels; `what` names
/// the input in the error ("kd loss: teacher logits must be f32").
pub fn host_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let data = match s {
        candle_core::CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{what} must be f32"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// [`host_f32`] of each of a custom op's inputs, in order, named by the op in an error.
pub fn host_f32_all<'a, const N: usize>(
    name: &str,
    inputs: [(&'a candle_core::CpuStorage, &candle_core::Layout); N],
) -> Result<[&'a [f32]; N]> {
    let mut out: [&[f32]; N] = [&[]; N];
    for (o, (s, l)) in out.iter_mut().zip(inputs) {
        *o = host_f32(s, l, name)?;
    }
    Ok(out)
}

/// [`host_f32`] of a storage that must be on the CPU: the kernels' inputs, read under the lock
/// their tensor's `storage_and_layout` holds.
fn storage_f32<'a>(
    s: &'a candle_core::Storage,
    l: &candle_core::Layout,
    what: &str,
) -> Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(c) => host_f32(c, l, what),
        _ => candle_core::bail!("{what}: CPU tensors only"),
    }
}

/// The last element a (rows × cols) operand with column stride `cs` and row stride `rs` reaches,
/// plus one: how long its slice must be.
fn span(cs: usize, rs: usize, rows: usize, cols: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// dst (m×n) := [dst +] lhs (m×k) · rhs (k×n), each given by its column and row strides, on
/// `threads` threads (1: this one). The f32 GEMM of the kernels that call gemm themselves: the
/// fused lm-head loss and the causal attention.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    (dst_cs, dst_rs): (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: &[f32],
    (rhs_cs, rhs_rs): (usize, usize),
    threads: usize,
) {
    // The bounds the GEMM writes, checked once so that the raw call below is sound (it checks
    // what it reads).
    assert!(
        dst.len() >= span(dst_cs, dst_rs, m, n),
        "gemm: dst too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: every element of dst the GEMM writes lies inside it (checked above), and dst is
    // borrowed mutably and so does not alias lhs or rhs.
    unsafe {
        gemm_raw(
            (m, n, k),
            dst.as_mut_ptr(),
            (dst_cs, dst_rs),
            accumulate,
            (lhs, lhs_cs, lhs_rs),
            (rhs, rhs_cs, rhs_rs),
            threads,
        )
    }
}

/// gemm's f32 call: `dst := [dst +] lhs · rhs` on `threads` threads.
///
/// Panics when `lhs` or `rhs` is shorter than its strides reach.
///
/// # Safety
/// Every element of `dst` the strides reach must lie in memory it owns, `dst` must not alias
/// `lhs` or `rhs`, and when `accumulate` is set `dst` must be initialised.
unsafe fn gemm_raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_cs, dst_rs): (usize, usize),
    accumulate: bool,
    (lhs, lhs_cs, lhs_rs): (&[f32], usize, usize),
    (rhs, rhs_cs, rhs_rs): (&[f32], usize, usize),
    threads: usize,
) {
    assert!(
        lhs.len() >= span(lhs_cs, lhs_rs, m, k),
        "gemm: lhs too short"
    );
    assert!(
        rhs.len() >= span(rhs_cs, rhs_rs, k, n),
        "gemm: rhs too short"
    );
    let par = match threads {
        0 | 1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs.as_ptr(),
        lhs_cs as isize,
        lhs_rs as isize,
        rhs.as_ptr(),
        rhs_cs as isize,
        rhs_rs as isize,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        par,
    )
}

/// A new (m×n) row-major `lhs (m×k) · rhs (k×n)`: [`gemm_f32`] into fresh memory that is not
/// zero-filled first (every element is written by the product), where a zeroed `Vec` would cost
/// a pass over it — for a layer's activations, or a 50 MB logits chunk, a pass not worth paying.
pub fn gemm_f32_alloc(
    (m, n, k): (usize, usize, usize),
    lhs: &[f32],
    (lhs_cs, lhs_rs): (usize, usize),
    rhs: &[f32],
    (rhs_cs, rhs_rs): (usize, usize),
    threads: usize,
) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    let mut dst: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: (gemm_raw checks that lhs and rhs hold every element it reads.) dst has room for
    // m·n floats at row stride n, which the GEMM writes without reading (`read_dst` false), each
    // of them (k > 0), before `set_len` makes them visible; it aliases nothing.
    unsafe {
        gemm_raw(
            (m, n, k),
            dst.as_mut_ptr(),
            (1, n),
            false,
            (lhs, lhs_cs, lhs_rs),
            (rhs, rhs_cs, rhs_rs),
            threads,
        );
        dst.set_len(m * n);
    }
    dst
}

/// The (cols × rows) row-major transpose of a (rows × cols) row-major matrix, in parallel over
/// bands of 16 output rows (one cache line of each input row per band).
pub fn transpose_f32(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const BAND: usize = 16;
    assert_eq!(
        src.len(),
        rows * cols,
        "transpose: {rows}×{cols} from {}",
        src.len()
    );
    // A large zeroed Vec is fresh zero pages (no pass over it); every element is overwritten.
    let mut dst = vec![0f32; rows * cols];
    if rows == 0 {
        return dst;
    }
    dst.par_chunks_mut(BAND * rows)
        .enumerate()
        .for_each(|(b, band)| {
            let c0 = b * BAND;
            let width = band.len() / rows;
            for (i, row) in src.chunks_exact(cols).enumerate() {
                for (j, &x) in row[c0..c0 + width].iter().enumerate() {
                    band[j * rows + i] = x;
                }
            }
        });
    dst
}

thread_local! {
    static AUTOCAST: std::cell::Cell<Precision> = const { std::cell::Cell::new(Precision::F32) };
}

/// The precision of the products of the trainable linear ops ([`linear`], [`linear_add`],
/// [`swiglu_linear`], and the lm-head loss that reads [`autocast_precision`]) built on this
/// thread while the guard lives — forward and, since each op keeps it, backward. Like
/// `torch.autocast(dtype=bfloat16)`: at bf16 both operands of each product are rounded to bf16
/// (round to nearest even) and multiplied on AMX tiles with f32 sums; weights, gradients,
/// optimizer state, norms, attention and the loss stay f32. Dropping the guard restores the
/// precision it found.
#[must_use = "the precision holds only while the guard lives"]
pub struct Autocast {
    prev: Precision,
}

impl Autocast {
    /// Sets this thread's product precision; bf16 without AMX-BF16 is an error.
    pub fn new(precision: Precision) -> Result<Self> {
        if !precision.is_f32() {
            bf16::require(&candle_core::Device::Cpu)?;
        }
        Ok(Self {
            prev: AUTOCAST.replace(precision),
        })
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        AUTOCAST.set(self.prev);
    }
}

/// This thread's product precision for trainable ops ([`Autocast`]; f32 outside one).
pub fn autocast_precision() -> Precision {
    AUTOCAST.get()
}

/// `dst` (m×n, row-major) := [dst +] lhs (m×k) · rhs (k×n), operands given by their column and
/// row strides as in [`gemm_f32`], at `precision`: f32 through [`gemm_f32`]; bf16 with `rhs`
/// packed into AMX tiles for this call and `lhs` rounded row by row ([`bf16::gemm_strided`]).
#[allow(clippy::too_many_arguments)]
pub fn product(
    precision: Precision,
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    threads: usize,
) {
    match precision {
        Precision::F32 => gemm_f32(
            m,
            n,
            k,
            dst,
            (1, n),
            accumulate,
            lhs,
            lhs_strides,
            rhs,
            rhs_strides,
            threads,
        ),
        Precision::Bf16 => {
            let w = bf16::PackedBf16::pack_strided(rhs, k, n, rhs_strides);
            bf16::gemm_strided(m, lhs, lhs_strides, &w, &mut dst[..m * n], accumulate);
        }
    }
}

/// [`product`] into fresh row-major memory (not zero-filled first: every element is written).
pub fn product_alloc(
    precision: Precision,
    (m, n, k): (usize, usize, usize),
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    threads: usize,
) -> Vec<f32> {
    match precision {
        Precision::F32 => gemm_f32_alloc((m, n, k), lhs, lhs_strides, rhs, rhs_strides, threads),
        Precision::Bf16 => {
            let w = bf16::PackedBf16::pack_strided(rhs, k, n, rhs_strides);
            bf16::gemm_strided_alloc(m, lhs, lhs_strides, &w)
        }
    }
}

fn needs_grad(xs: &[&Tensor]) -> bool {
    xs.iter().any(|x| x.track_op())
}

/// Whether [`grad`]'s CPU kernels can take these tensors.
fn cpu_f32(xs: &[&Tensor]) -> bool {
    xs.iter()
        .all(|x| x.device().is_cpu() && x.dtype() == DType::F32)
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * weight`, in f32.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if cpu_f32(&[x, weight]) {
        x.contiguous()?
            .apply_op2(&weight.contiguous()?, grad::RmsNorm { eps: eps as f32 })
    } else if needs_grad(&[x, weight]) {
        candle_nn::ops::rms_norm_slow(x, weight, eps as f32)
    } else {
        candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32)
    }
}

/// Half-split rotary embedding (HF Llama's `rotate_half` layout), times `scale` (the attention's
/// 1/√d for queries, 1 for keys). `x`: (B, H, T, D); `cos`, `sin`: (T, D/2) for the positions of
/// `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, scale: f64) -> Result<Tensor> {
    if cpu_f32(&[x, cos, sin]) {
        return x.contiguous()?.apply_op1(grad::Rope {
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
            scale: scale as f32,
        });
    }
    let y = if needs_grad(&[x]) {
        candle_nn::rotary_emb::rope_slow(x, cos, sin)?
    } else {
        candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?
    };
    if scale == 1.0 {
        Ok(y)
    } else {
        y * scale
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if needs_grad(&[x]) {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// Softmax over the last dimension of `att + mask` for attention scores `att` (…, R, S) whose R
/// rows cycle through T query positions (row `r` is position `r mod T`, R a multiple of T) and an
/// additive mask (T, S), −∞ where hidden; masked entries come out exactly 0. None when the inputs
/// are not non-empty f32 CPU tensors of that kind: the caller then adds the mask and calls
/// [`softmax_last_dim`].
pub fn masked_softmax(att: &Tensor, mask: &Tensor) -> Result<Option<Tensor>> {
    let fits = cpu_f32(&[att, mask])
        && !needs_grad(&[mask])
        && mask.rank() == 2
        && att.rank() >= 2
        && att.elem_count() > 0
        && att.dims().last() == mask.dims().last()
        && mask.dim(0)? > 0
        && att.dim(D::Minus2)? % mask.dim(0)? == 0;
    if !fits {
        return Ok(None);
    }
    Ok(Some(att.contiguous()?.apply_op1(grad::MaskedSoftmax {
        mask: mask.contiguous()?,
    })?))
}

/// Whether [`linear`]'s op takes `x` (…, in) and `W` (out, in): f32 CPU tensors of those shapes,
/// and more than one row or a gradient to compute (one row without is [`cpu_gemv`]'s).
fn linear_fits(x: &Tensor, w: &Tensor, grad: bool) -> Result<bool> {
    Ok(cpu_f32(&[x, w])
        && w.rank() == 2
        && w.dim(1)? > 0
        && x.rank() >= 1
        && x.dims().last() == Some(&w.dim(1)?)
        && (x.elem_count() / w.dim(1)?.max(1) > 1 || grad))
}

/// `x Wᵀ` over the last dimension of `x` (…, in) for a weight (out, in) → (…, out), as one op
/// forward and backward: the GEMMs called directly, where candle's graph for it (reshape, a
/// transposed weight, matmul, reshape) adds a zero-filled gradient accumulator and a pass for
/// each of those nodes to every step's backward. None unless both are f32 CPU tensors of those
/// shapes, or for a single row that needs no gradient ([`cpu_gemv`] serves that).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !linear_fits(x, w, needs_grad(&[x, w]))? {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op2(
        &w.contiguous()?,
        grad::Linear {
            precision: autocast_precision(),
        },
    )?))
}

/// Whether `r` is an f32 CPU residual stream for a product of `x` (…, in) with `out` outputs:
/// shape (…, out), the same leading dimensions as `x`.
fn residual_fits(x: &Tensor, r: &Tensor, out: usize) -> bool {
    cpu_f32(&[r])
        && x.rank() >= 1
        && r.rank() == x.rank()
        && r.dims()[..r.rank() - 1] == x.dims()[..x.rank() - 1]
        && r.dims().last() == Some(&out)
}

/// `r + x·Wᵀ` for a residual stream `r` (…, out), `x` (…, in), `W` (out, in), as one op
/// ([`linear`]'s GEMMs with `r` as the product's initial value; its gradient is the output's).
/// None where [`linear`] declines or `r` is not an f32 CPU tensor of the output's shape.
pub fn linear_add(x: &Tensor, w: &Tensor, r: &Tensor) -> Result<Option<Tensor>> {
    let fits = linear_fits(x, w, needs_grad(&[x, w, r]))? && residual_fits(x, r, w.dim(0)?);
    if !fits {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &r.contiguous()?,
        grad::LinearAdd {
            precision: autocast_precision(),
        },
    )?))
}

/// Causal self-attention at positions 0..T: `softmax(q kᵀ + mask) v` with `q` (B, h, T, D)
/// rotated and already scaled, `k`, `v` (B, kvh, T, D), query head `i` reading KV head
/// `i / (h / kvh)`, and position `p` seeing keys `p − window < j ≤ p` (`window` None: all up to
/// `p`) → (B, T, h·D), the heads side by side as the output projection reads them. One op
/// forward and backward ([`attention`]), where the op-by-op graph builds (B·h·T·T) scores, a mask
/// sum, a softmax and two batched products, each with its backward. None when the inputs are not
/// f32 CPU tensors of those shapes (the caller keeps that graph).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: Option<usize>,
) -> Result<Option<Tensor>> {
    let fits = cpu_f32(&[q, k, v])
        && q.rank() == 4
        && k.rank() == 4
        && k.dims() == v.dims()
        && q.dim(0)? == k.dim(0)?
        && q.dim(2)? == k.dim(2)?
        && q.dim(3)? == k.dim(3)?
        && k.dim(1)? > 0
        && q.dim(1)? % k.dim(1)? == 0
        && q.elem_count() > 0
        && window != Some(0);
    if !fits {
        return Ok(None);
    }
    let op = attention::CausalAttention {
        window,
        keep: needs_grad(&[q, k, v]),
        saved: std::sync::Mutex::new(None),
    };
    Ok(Some(q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        op,
    )?))
}

/// [`causal_attention`] straight from the packed projection `[q | k | v]` (B, T, (h + 2·kvh)·D)
/// of positions 0..T, rotating queries (times `q_scale`) and keys with `cos`, `sin` (T, D/2)
/// inside the op: no narrowed, transposed or rotated copies of q, k and v, forward or backward.
/// `heads`: (h, kvh). None where [`causal_attention`] would decline, or for tables of other sizes.
pub fn attention_packed(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    q_scale: f64,
    (h, kvh): (usize, usize),
    window: Option<usize>,
) -> Result<Option<Tensor>> {
    let fits = cpu_f32(&[qkv, cos, sin])
        && qkv.rank() == 3
        && qkv.elem_count() > 0
        && kvh > 0
        && h % kvh == 0
        && qkv.dim(2)? % (h + 2 * kvh) == 0
        && window != Some(0);
    if !fits {
        return Ok(None);
    }
    let (t, d) = (qkv.dim(1)?, qkv.dim(2)? / (h + 2 * kvh));
    if d % 2 != 0 || cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] {
        return Ok(None);
    }
    let op = attention::PackedAttention {
        h,
        kvh,
        window,
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        q_scale: q_scale as f32,
        keep: needs_grad(&[qkv]),
        saved: std::sync::Mutex::new(None),
    };
    Ok(Some(qkv.contiguous()?.apply_op1(op)?))
}

/// `silu(x W_gᵀ) · (x W_uᵀ)` for x (…, in) and trained weights W_g, W_u (width, in) → (…, width),
/// as one op ([`grad::SwiGluLinear`]): the trained MLP's gate and up projections and their
/// activation without the concatenated weight or the packed product in the graph. None when the
/// inputs are not f32 CPU tensors of those shapes.
pub fn swiglu_linear(x: &Tensor, w_gate: &Tensor, w_up: &Tensor) -> Result<Option<Tensor>> {
    let fits = cpu_f32(&[x, w_gate, w_up])
        && x.rank() >= 1
        && w_gate.rank() == 2
        && w_gate.dims() == w_up.dims()
        && w_gate.dim(0)? > 0
        && w_gate.dim(1)? > 0
        && x.dims().last() == Some(&w_gate.dim(1)?);
    if !fits {
        return Ok(None);
    }
    let op = grad::SwiGluLinear {
        precision: autocast_precision(),
        keep: needs_grad(&[x, w_gate, w_up]),
        saved: std::sync::Mutex::new(None),
    };
    Ok(Some(x.contiguous()?.apply_op3(
        &w_gate.contiguous()?,
        &w_up.contiguous()?,
        op,
    )?))
}

/// SwiGLU of packed rows `[gate | up]` (…, 2·width) → (…, width): the output of one gate-and-up
/// GEMM.
pub fn swiglu_packed(gate_up: &Tensor, width: usize) -> Result<Tensor> {
    if cpu_f32(&[gate_up]) {
        gate_up
            .contiguous()?
            .apply_op1(grad::SwiGluPacked { width })
    } else {
        gate_up.narrow(D::Minus1, 0, width)?.silu()? * gate_up.narrow(D::Minus1, width, width)?
    }
}

/// `x Wᵀ` for a single row `x` (1, in) and a contiguous f32 CPU weight (out, in), the shape of
/// every matmul in batch-1 decoding. That product is memory-bound (the weights are read once per
/// token); gemm's fork/join per call costs more than it saves there, so this streams the rows
/// in parallel chunks with a dot product compiled for AVX2+FMA when the CPU has it.
/// Returns None when the inputs are not of that kind (the caller uses a matmul).
pub fn cpu_gemv(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    if !x.device().is_cpu()
        || x.dtype() != candle_core::DType::F32
        || w.dtype() != candle_core::DType::F32
        || needs_grad(&[x, w])
    {
        return Ok(None);
    }
    let (out, inp) = w.dims2()?;
    if x.elem_count() != inp {
        return Ok(None);
    }
    let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let wdata = &cpu.as_slice::<f32>()?[start..end];
    let mut y = vec![0f32; out];
    const ROWS: usize = 64;
    y.par_chunks_mut(ROWS).enumerate().for_each(|(c, chunk)| {
        for (j, yj) in chunk.iter_mut().enumerate() {
            let r = c * ROWS + j;
            *yj = dot(&wdata[r * inp..(r + 1) * inp], &xv);
        }
    });
    Ok(Some(Tensor::from_vec(y, (1, out), x.device())?))
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { dot_avx2_fma(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_fma(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

/// Sixteen independent accumulators so the compiler vectorises without reassociating a sum.
#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::testing::max_abs_diff as max_diff;

    /// Value and gradients of `f` at `args` (as Vars) under the loss Σ f(args) ⊙ r for fixed
    /// weights `r`: what a kernel and its candle composite must agree on.
    fn value_and_grads(
        args: &[&Tensor],
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let vars: Vec<Var> = args
            .iter()
            .map(|a| Var::from_tensor(a))
            .collect::<Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts)?;
        let weights = Tensor::arange(0f32, y.elem_count() as f32, y.device())?
            .reshape(y.shape())?
            .affine(0.37, 0.0)?
            .sin()?;
        let grads = (&y * &weights)?.sum_all()?.backward()?;
        let gs = vars
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .expect("every argument gets a gradient")
            })
            .collect();
        Ok((y.detach(), gs))
    }

    /// Runs `run` on pools of 1 and 3 threads and asserts every output bit-identical; returns
    /// how many outputs there were.
    fn same_on_1_and_3_threads(
        run: impl Fn() -> Result<Vec<Tensor>> + Send + Sync,
    ) -> Result<usize> {
        let pool = |threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a thread pool")
        };
        let one = pool(1).install(&run)?;
        let three = pool(3).install(&run)?;
        for (i, (a, b)) in one.iter().zip(&three).enumerate() {
            assert_eq!(
                max_diff(a, b),
                0.0,
                "output {i} differs between 1 and 3 threads"
            );
        }
        Ok(one.len())
    }

    fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.0);
        let d = max_diff(a, b);
        assert!(d <= tol * scale, "{what}: max |Δ| {d} (scale {scale})");
    }

    /// Each CPU kernel against candle's differentiable composite: values and gradients.
    #[test]
    fn kernels_match_candle_composites_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        // 3 × 37 rows: two tasks of ROWS_PER_TASK and a short one; widths with remainders.
        let x = Tensor::randn(0f32, 1., (3, 37, 40), &dev)?;
        let w = (Tensor::randn(0f32, 1., 40, &dev)? + 1.0)?;
        let (y, g) = value_and_grads(&[&x, &w], |a| rms_norm(&a[0], &a[1], 1e-5))?;
        let (y0, g0) = value_and_grads(&[&x, &w], |a| {
            candle_nn::ops::rms_norm_slow(&a[0], &a[1], 1e-5)
        })?;
        assert_close("rms_norm", &y, &y0, 1e-5);
        assert_close("rms_norm dx", &g[0], &g0[0], 1e-4);
        assert_close("rms_norm dw", &g[1], &g0[1], 1e-4);

        let q = Tensor::randn(0f32, 1., (2, 3, 21, 16), &dev)?;
        let table = Tensor::randn(0f32, 1., (30, 8), &dev)?;
        let (cos, sin) = (
            table.cos()?.narrow(0, 5, 21)?,
            table.sin()?.narrow(0, 5, 21)?,
        );
        let (y, g) = value_and_grads(&[&q], |a| rope(&a[0], &cos, &sin, 0.25))?;
        let (y0, g0) = value_and_grads(&[&q], |a| {
            candle_nn::rotary_emb::rope_slow(&a[0], &cos, &sin)? * 0.25
        })?;
        assert_close("rope", &y, &y0, 1e-6);
        assert_close("rope dx", &g[0], &g0[0], 1e-6);
        // Without a gradient, the kernel equals candle's fused rope.
        let fused =
            (candle_nn::rotary_emb::rope(&q, &cos.contiguous()?, &sin.contiguous()?)? * 0.25)?;
        assert_close("rope (no grad)", &rope(&q, &cos, &sin, 0.25)?, &fused, 1e-6);

        // Scores (B, kvh, rep·T, S) with a causal mask, as attention makes them (T = 7, S = 9).
        let att = Tensor::randn(0f32, 2., (2, 3, 2 * 7, 9), &dev)?;
        let mask = crate::model::causal_mask(7, 2, None, &dev)?;
        let (y, g) = value_and_grads(&[&att], |a| {
            Ok(masked_softmax(&a[0], &mask)?.expect("f32 CPU scores take the kernel"))
        })?;
        let (y0, g0) = value_and_grads(&[&att], |a| {
            let m = a[0].reshape((2, 3, 2, 7, 9))?.broadcast_add(&mask)?;
            candle_nn::ops::softmax(&m.reshape((2, 3, 14, 9))?, D::Minus1)
        })?;
        assert_close("masked softmax", &y, &y0, 1e-6);
        assert_close("masked softmax dx", &g[0], &g0[0], 1e-5);
        // Hidden entries are exactly zero (candle's exp(−∞) is too).
        let hidden = y.reshape((12, 7, 9))?.narrow(1, 0, 1)?.narrow(2, 3, 6)?;
        assert_eq!(hidden.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        // A mask that does not fit the scores is declined.
        assert!(masked_softmax(&att, &Tensor::zeros((5, 9), DType::F32, &dev)?)?.is_none());

        // 45 rows: a parallel task of 32 and a short one.
        let gate = Tensor::randn(0f32, 3., (45, 37), &dev)?;
        let up = Tensor::randn(0f32, 1., (45, 37), &dev)?;
        let packed = Tensor::cat(&[&gate, &up], 1)?;
        let (y, g) = value_and_grads(&[&packed], |a| swiglu_packed(&a[0], 37))?;
        let (y0, g0) = value_and_grads(&[&gate, &up], |a| a[0].silu()? * &a[1])?;
        assert_close("swiglu", &y, &y0, 1e-6);
        let g0 = Tensor::cat(&[&g0[0], &g0[1]], 1)?;
        assert_close("swiglu d[gate|up]", &g[0], &g0, 1e-5);
        Ok(())
    }

    /// A product into fresh memory equals the one into zeroed memory, transposed operands and an
    /// empty inner dimension included.
    #[test]
    fn gemm_into_fresh_memory_equals_gemm_into_zeros() {
        let (m, n, k) = (37, 53, 29);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        for (threads, a_strides, b_strides) in [(1, (1, k), (1, n)), (2, (m, 1), (k, 1))] {
            let mut want = vec![0f32; m * n];
            gemm_f32(
                m,
                n,
                k,
                &mut want,
                (1, n),
                false,
                &a,
                a_strides,
                &b,
                b_strides,
                threads,
            );
            let got = gemm_f32_alloc((m, n, k), &a, a_strides, &b, b_strides, threads);
            assert_eq!(got, want);
        }
        assert_eq!(
            gemm_f32_alloc((3, 4, 0), &[], (1, 0), &[], (1, 4), 1),
            vec![0f32; 12]
        );
    }

    /// The transpose against candle's `t()`: bands that end early (cols not a multiple of 16),
    /// one row, one column, and the empty matrix.
    #[test]
    fn transpose_matches_candle() -> Result<()> {
        for (rows, cols) in [(37, 53), (5, 16), (1, 40), (33, 1), (0, 7), (7, 0)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let want = Tensor::from_vec(src.clone(), (rows, cols), &Device::Cpu)?
                .t()?
                .flatten_all()?
                .to_vec1::<f32>()?;
            assert_eq!(transpose_f32(&src, rows, cols), want, "{rows}×{cols}");
        }
        Ok(())
    }

    /// The one-op linear against candle's reshape, transpose and matmul: values, both gradients,
    /// and a frozen weight (no weight gradient asked for).
    #[test]
    fn linear_matches_candle_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (3, 37, 40), &dev)?;
        let w = Tensor::randn(0f32, 1., (29, 40), &dev)?;
        let (y, g) = value_and_grads(&[&x, &w], |a| Ok(linear(&a[0], &a[1])?.expect("f32 CPU")))?;
        let (y0, g0) = value_and_grads(&[&x, &w], |a| {
            a[0].reshape((111, 40))?
                .matmul(&a[1].t()?)?
                .reshape((3, 37, 29))
        })?;
        assert_eq!(y.dims(), &[3, 37, 29]);
        assert_close("linear", &y, &y0, 1e-5);
        assert_close("linear dx", &g[0], &g0[0], 1e-5);
        assert_close("linear dw", &g[1], &g0[1], 1e-5);
        let xv = Var::from_tensor(&x)?;
        let y = linear(xv.as_tensor(), &w)?.expect("f32 CPU");
        let grads = y.sum_all()?.backward()?;
        assert!(grads.get(&w).is_none(), "a frozen weight gets no gradient");
        assert!(grads.get(xv.as_tensor()).is_some());
        // One row without a gradient is the GEMV's; a mismatched width is declined.
        assert!(linear(&x.narrow(1, 0, 1)?.narrow(0, 0, 1)?, &w)?.is_none());
        assert!(linear(&x, &w.narrow(1, 0, 39)?)?.is_none());
        Ok(())
    }

    /// The gate-and-up op against the two products, their concatenation and the packed SwiGLU:
    /// values and the three gradients; frozen weights get none; a backward with nothing kept
    /// (two backwards of one forward) recomputes the product; mismatched weights are declined.
    #[test]
    fn swiglu_linear_matches_projections_then_swiglu() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 37, 40), &dev)?;
        let wg = Tensor::randn(0f32, 0.3, (29, 40), &dev)?;
        let wu = Tensor::randn(0f32, 0.3, (29, 40), &dev)?;
        let (y, g) = value_and_grads(&[&x, &wg, &wu], |a| {
            Ok(swiglu_linear(&a[0], &a[1], &a[2])?.expect("f32 CPU"))
        })?;
        let (y0, g0) = value_and_grads(&[&x, &wg, &wu], |a| {
            let gate = a[0].broadcast_matmul(&a[1].t()?)?;
            let up = a[0].broadcast_matmul(&a[2].t()?)?;
            gate.silu()? * up
        })?;
        assert_eq!(y.dims(), &[2, 37, 29]);
        assert_close("swiglu_linear", &y, &y0, 1e-5);
        for (i, what) in ["dx", "dw_gate", "dw_up"].iter().enumerate() {
            assert_close(what, &g[i], &g0[i], 1e-5);
        }
        let xv = Var::from_tensor(&x)?;
        let y = swiglu_linear(xv.as_tensor(), &wg, &wu)?.expect("f32 CPU");
        let loss = y.sum_all()?;
        let first = loss.backward()?;
        assert!(first.get(&wg).is_none() && first.get(&wu).is_none());
        let again = loss.backward()?;
        assert_close(
            "recomputed backward",
            again.get(xv.as_tensor()).expect("dx"),
            first.get(xv.as_tensor()).expect("dx"),
            0.0,
        );
        // Trained weights, an input without a gradient (and not contiguous): no dx.
        let (wgv, wuv) = (Var::from_tensor(&wg)?, Var::from_tensor(&wu)?);
        let xt = x.transpose(0, 1)?;
        let y = swiglu_linear(&xt, wgv.as_tensor(), wuv.as_tensor())?.expect("f32 CPU");
        let y0 = (xt.broadcast_matmul(&wg.t()?)?.silu()? * xt.broadcast_matmul(&wu.t()?)?)?;
        assert_close("transposed input", &y, &y0, 1e-5);
        let grads = y.sum_all()?.backward()?;
        assert!(grads.get(&xt).is_none());
        assert!(grads.get(wgv.as_tensor()).is_some() && grads.get(wuv.as_tensor()).is_some());
        assert!(swiglu_linear(&x, &wg, &wu.narrow(0, 0, 28)?)?.is_none());
        assert!(swiglu_linear(&x, &wg.narrow(1, 0, 39)?, &wu.narrow(1, 0, 39)?)?.is_none());
        Ok(())
    }

    /// The residual-adding linear against candle's matmul then add: values and the three
    /// gradients (the residual's is the output's); a frozen weight gets none; shapes that do not
    /// match are declined.
    #[test]
    fn linear_add_matches_matmul_plus_residual() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (3, 37, 40), &dev)?;
        let w = Tensor::randn(0f32, 1., (29, 40), &dev)?;
        let r = Tensor::randn(0f32, 1., (3, 37, 29), &dev)?;
        let (y, g) = value_and_grads(&[&x, &w, &r], |a| {
            Ok(linear_add(&a[0], &a[1], &a[2])?.expect("f32 CPU"))
        })?;
        let (y0, g0) = value_and_grads(&[&x, &w, &r], |a| {
            &a[2]
                + a[0]
                    .reshape((111, 40))?
                    .matmul(&a[1].t()?)?
                    .reshape((3, 37, 29))?
        })?;
        assert_eq!(y.dims(), &[3, 37, 29]);
        assert_close("linear_add", &y, &y0, 1e-5);
        for (i, what) in ["dx", "dw", "dr"].iter().enumerate() {
            assert_close(what, &g[i], &g0[i], 1e-5);
        }
        let (xv, rv) = (Var::from_tensor(&x)?, Var::from_tensor(&r)?);
        let y = linear_add(xv.as_tensor(), &w, rv.as_tensor())?.expect("f32 CPU");
        let grads = y.sum_all()?.backward()?;
        assert!(grads.get(&w).is_none(), "a frozen weight gets no gradient");
        assert!(grads.get(xv.as_tensor()).is_some() && grads.get(rv.as_tensor()).is_some());
        assert!(linear_add(&x, &w, &r.narrow(2, 0, 28)?)?.is_none());
        assert!(linear_add(&x, &w, &r.narrow(1, 0, 36)?)?.is_none());
        Ok(())
    }

    /// Under `Autocast(Bf16)` the trainable linear ops multiply bf16-rounded operands: values
    /// and gradients within bf16 rounding of f32 (and not equal to it: the tiles ran), each op
    /// keeping its precision for a backward run after the guard is gone; the guard restores the
    /// precision it found.
    #[test]
    fn autocast_runs_the_trainable_products_in_bf16() -> Result<()> {
        if !bf16::available() {
            assert!(Autocast::new(Precision::Bf16).is_err());
            eprintln!("skipped: no AMX-BF16 on this CPU");
            return Ok(());
        }
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (3, 37, 40), &dev)?;
        let w = Tensor::randn(0f32, 0.3, (29, 40), &dev)?;
        let w2 = Tensor::randn(0f32, 0.3, (29, 40), &dev)?;
        let r = Tensor::randn(0f32, 1., (3, 37, 29), &dev)?;
        type Op = fn(&[Tensor]) -> Result<Tensor>;
        let ops: [(&str, Op, Vec<&Tensor>); 3] = [
            (
                "linear",
                |a| Ok(linear(&a[0], &a[1])?.expect("fits")),
                vec![&x, &w],
            ),
            (
                "linear_add",
                |a| Ok(linear_add(&a[0], &a[1], &a[2])?.expect("fits")),
                vec![&x, &w, &r],
            ),
            (
                "swiglu_linear",
                |a| Ok(swiglu_linear(&a[0], &a[1], &a[2])?.expect("fits")),
                vec![&x, &w, &w2],
            ),
        ];
        for (name, op, args) in ops {
            let (y32, g32) = value_and_grads(&args, op)?;
            let guard = Autocast::new(Precision::Bf16)?;
            assert_eq!(autocast_precision(), Precision::Bf16);
            let (y16, g16) = value_and_grads(&args, op)?;
            // Forward under the guard, backward after it.
            let vars: Vec<Var> = args
                .iter()
                .map(|a| Var::from_tensor(a))
                .collect::<Result<_>>()?;
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = op(&ts)?;
            drop(guard);
            assert_eq!(autocast_precision(), Precision::F32);
            let weights = Tensor::arange(0f32, y.elem_count() as f32, &dev)?
                .reshape(y.shape())?
                .affine(0.37, 0.0)?
                .sin()?;
            let late = (&y * &weights)?.sum_all()?.backward()?;
            assert_close(&format!("{name} bf16"), &y16, &y32, 2e-2);
            assert!(max_diff(&y16, &y32) > 0.0, "{name}: the bf16 path ran");
            for (i, (a, b)) in g16.iter().zip(&g32).enumerate() {
                assert_close(&format!("{name} grad {i} bf16"), a, b, 2e-2);
                let l = late.get(vars[i].as_tensor()).expect("a gradient");
                assert_eq!(max_diff(l, a), 0.0, "{name} grad {i}: the op kept bf16");
            }
        }
        // Guards nest and restore what they found.
        let outer = Autocast::new(Precision::Bf16)?;
        {
            let _inner = Autocast::new(Precision::F32)?;
            assert_eq!(autocast_precision(), Precision::F32);
        }
        assert_eq!(autocast_precision(), Precision::Bf16);
        drop(outer);
        assert_eq!(autocast_precision(), Precision::F32);
        Ok(())
    }

    /// The attention the model builds op by op: (B, kvh, rep·T, S) scores through the masked
    /// softmax, then the values, heads moved back beside each other.
    fn attention_composite(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let (b, h, t, d) = q.dims4()?;
        let kvh = k.dim(1)?;
        let mask = crate::model::causal_mask(t, 0, window, q.device())?;
        let att = q.reshape((b, kvh, h / kvh * t, d))?.matmul(&k.t()?)?;
        let att = masked_softmax(&att, &mask)?.expect("f32 CPU scores take the kernel");
        att.matmul(v)?
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, h * d))
    }

    /// The one-op causal attention against the op-by-op graph, values and gradients: grouped
    /// heads, a last block shorter than the others, a window that starts inside a block and one
    /// longer than the sequence, and a single position.
    #[test]
    fn causal_attention_matches_the_op_by_op_graph() -> Result<()> {
        let dev = Device::Cpu;
        for (b, h, kvh, t, d, window) in [
            (2, 6, 2, 150, 16, None),
            (1, 4, 4, 150, 8, Some(40)),
            (2, 2, 1, 70, 8, Some(300)),
            (3, 3, 1, 1, 8, None),
        ] {
            let q = Tensor::randn(0f32, 1., (b, h, t, d), &dev)?;
            let k = Tensor::randn(0f32, 1., (b, kvh, t, d), &dev)?;
            let v = Tensor::randn(0f32, 1., (b, kvh, t, d), &dev)?;
            let what = format!("attention {:?}", (b, h, kvh, t, d, window));
            let (y, g) = value_and_grads(&[&q, &k, &v], |a| {
                Ok(causal_attention(&a[0], &a[1], &a[2], window)?
                    .expect("f32 CPU inputs take the op"))
            })?;
            let (y0, g0) = value_and_grads(&[&q, &k, &v], |a| {
                attention_composite(&a[0], &a[1], &a[2], window)
            })?;
            assert_eq!(y.dims(), &[b, t, h * d]);
            assert_close(&what, &y, &y0, 1e-5);
            for (name, (a, a0)) in ["dq", "dk", "dv"].iter().zip(g.iter().zip(&g0)) {
                assert_close(&format!("{what} {name}"), a, a0, 1e-4);
            }
            // Without a gradient (the teacher's forward) the value is the same.
            let plain = causal_attention(&q, &k, &v, window)?.expect("f32 CPU inputs take the op");
            assert_eq!(
                max_diff(&plain, &y),
                0.0,
                "{what}: with and without a gradient"
            );
        }
        // What the op cannot take is declined: kv heads that do not divide the query heads, an
        // empty window, another dtype.
        let q = Tensor::randn(0f32, 1., (1, 3, 5, 4), &dev)?;
        let k = Tensor::randn(0f32, 1., (1, 2, 5, 4), &dev)?;
        assert!(causal_attention(&q, &k, &k, None)?.is_none());
        let k1 = k.narrow(1, 0, 1)?;
        assert!(causal_attention(&q, &k1, &k1, Some(0))?.is_none());
        let q64 = q.to_dtype(DType::F64)?;
        assert!(causal_attention(
            &q64,
            &k1.to_dtype(DType::F64)?,
            &k1.to_dtype(DType::F64)?,
            None
        )?
        .is_none());
        Ok(())
    }

    /// The packed op against splitting, rotating and the op-by-op attention, values and the
    /// packed gradient.
    #[test]
    fn packed_attention_matches_split_rotate_and_attend() -> Result<()> {
        let dev = Device::Cpu;
        for (b, h, kvh, t, d, window) in [(2, 6, 2, 150, 16, None), (1, 2, 2, 70, 8, Some(30))] {
            let qkv = Tensor::randn(0f32, 1., (b, t, (h + 2 * kvh) * d), &dev)?;
            let table = Tensor::randn(0f32, 1., (t, d / 2), &dev)?;
            let (cos, sin) = (table.cos()?, table.sin()?);
            let what = format!("packed attention {:?}", (b, h, kvh, t, d, window));
            let (y, g) = value_and_grads(&[&qkv], |a| {
                Ok(attention_packed(&a[0], &cos, &sin, 0.3, (h, kvh), window)?
                    .expect("f32 CPU inputs take the op"))
            })?;
            let (y0, g0) = value_and_grads(&[&qkv], |a| {
                let x = a[0].reshape((b, t, h + 2 * kvh, d))?;
                let heads =
                    |from: usize, n: usize| x.narrow(2, from, n)?.transpose(1, 2)?.contiguous();
                let q = (candle_nn::rotary_emb::rope_slow(&heads(0, h)?, &cos, &sin)? * 0.3)?;
                let k = candle_nn::rotary_emb::rope_slow(&heads(h, kvh)?, &cos, &sin)?;
                attention_composite(&q, &k, &heads(h + kvh, kvh)?, window)
            })?;
            assert_close(&what, &y, &y0, 1e-5);
            assert_close(&format!("{what} d[q|k|v]"), &g[0], &g0[0], 1e-4);
        }
        // Tables that do not fit the positions are declined.
        let qkv = Tensor::randn(0f32, 1., (1, 5, 3 * 8), &dev)?;
        let short = Tensor::zeros((4, 4), DType::F32, &dev)?;
        assert!(attention_packed(&qkv, &short, &short, 1.0, (1, 1), None)?.is_none());
        Ok(())
    }

    /// What a position cannot see does not reach it, NaN included; a NaN it sees makes it NaN.
    #[test]
    fn causal_attention_keeps_hidden_nans_out_and_visible_ones_in() -> Result<()> {
        let dev = Device::Cpu;
        let (t, d) = (130, 8);
        let q = Tensor::randn(0f32, 1., (1, 1, t, d), &dev)?;
        // A NaN key at position 100: positions before it (in earlier blocks) are finite, it and
        // every later position NaN.
        let mut kv = Tensor::randn(0f32, 1., (t, d), &dev)?.to_vec2::<f32>()?;
        kv[100][3] = f32::NAN;
        let k = Tensor::new(kv, &dev)?.reshape((1, 1, t, d))?;
        let v = Tensor::randn(0f32, 1., (1, 1, t, d), &dev)?;
        let y = causal_attention(&q, &k, &v, None)?
            .expect("the op")
            .to_vec3::<f32>()?;
        for (p, row) in y[0].iter().enumerate() {
            assert_eq!(row.iter().any(|x| x.is_nan()), p >= 100, "position {p}");
        }
        Ok(())
    }

    /// The attention's values and gradients do not depend on the thread count.
    #[test]
    fn causal_attention_is_deterministic_across_thread_counts() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 6, 130, 16), &dev)?;
        let k = Tensor::randn(0f32, 1., (2, 3, 130, 16), &dev)?;
        let v = Tensor::randn(0f32, 1., (2, 3, 130, 16), &dev)?;
        let run = || -> Result<Vec<Tensor>> {
            let (y, g) = value_and_grads(&[&q, &k, &v], |a| {
                Ok(causal_attention(&a[0], &a[1], &a[2], Some(100))?.expect("the op"))
            })?;
            Ok(std::iter::once(y).chain(g).collect())
        };
        same_on_1_and_3_threads(run)?;
        Ok(())
    }

    /// Every kernel's value and gradients, on inputs of several tasks' rows.
    fn all_kernels(dev: &Device) -> Result<Vec<Tensor>> {
        let x = Tensor::arange(0f32, 300. * 64., dev)?
            .reshape((300, 64))?
            .affine(0.013, 0.)?
            .sin()?;
        let w = x.narrow(0, 7, 1)?.squeeze(0)?;
        let (y1, g1) = value_and_grads(&[&x, &w], |a| rms_norm(&a[0], &a[1], 1e-5))?;
        let q = x.reshape((2, 3, 50, 64))?;
        let table = x.narrow(0, 0, 50)?.narrow(1, 0, 32)?;
        let (y2, g2) = value_and_grads(&[&q], |a| rope(&a[0], &table, &table.cos()?, 0.5))?;
        let mask = crate::model::causal_mask(50, 14, None, dev)?;
        let att = x.narrow(1, 0, 64)?.reshape((2, 3, 50, 64))?;
        let (y3, g3) = value_and_grads(&[&att], |a| {
            Ok(masked_softmax(&a[0], &mask)?.expect("f32 CPU scores take the kernel"))
        })?;
        let (y4, g4) = value_and_grads(&[&x], |a| swiglu_packed(&a[0], 32))?;
        Ok([y1, y2, y3, y4]
            .into_iter()
            .chain(g1)
            .chain(g2)
            .chain(g3)
            .chain(g4)
            .collect())
    }

    /// The kernels' results do not depend on the thread count (resumed runs stay bit-identical).
    #[test]
    fn kernels_are_deterministic_across_thread_counts() -> Result<()> {
        let dev = Device::Cpu;
        assert_eq!(same_on_1_and_3_threads(|| all_kernels(&dev))?, 9);
        Ok(())
    }

    #[test]
    fn masked_softmax_keeps_nan_zeroes_hidden_rows_and_declines_empty_scores() -> Result<()> {
        let dev = Device::Cpu;
        let mut scores = vec![0.5f32; 2 * 3 * 4];
        scores[4] = f32::NAN; // row 1, visible under the mask below
        let att = Tensor::from_vec(scores, (2, 3, 4), &dev)?;
        // Row 0 sees nothing; rows 1 and 2 see their first two keys.
        let ninf = f32::NEG_INFINITY;
        let m = [[ninf; 4], [0., 0., ninf, ninf], [0., 0., ninf, ninf]];
        let mask = Tensor::new(&m, &dev)?;
        let y = masked_softmax(&att, &mask)?.expect("f32 CPU scores take the kernel");
        let y = y.to_vec3::<f32>()?;
        assert_eq!(y[0][0], vec![0.0; 4], "a fully hidden row is zeros");
        assert!(
            y[0][1].iter().all(|v| v.is_nan()),
            "a NaN spreads over its row"
        );
        assert_eq!(y[0][2], vec![0.5, 0.5, 0.0, 0.0]);
        let empty = Tensor::zeros((2, 0, 4), DType::F32, &dev)?;
        assert!(masked_softmax(&empty, &mask)?.is_none());
        Ok(())
    }

    #[test]
    fn gemv_equals_matmul_and_declines_what_it_cannot_do() -> Result<()> {
        let dev = Device::Cpu;
        // 37 columns: two 16-wide blocks and a remainder; 130 rows: three chunks, the last short.
        let x = Tensor::randn(0f32, 1., (1, 37), &dev)?;
        let w = Tensor::randn(0f32, 1., (130, 37), &dev)?;
        let y = cpu_gemv(&x, &w)?.expect("f32 CPU inputs take the gemv path");
        assert_eq!(y.dims(), &[1, 130]);
        assert!(max_diff(&y, &x.matmul(&w.t()?)?) < 1e-5);
        // A weight that needs a gradient goes through candle's matmul (which has a backward).
        let wv = Var::from_tensor(&w)?;
        assert!(cpu_gemv(&x, wv.as_tensor())?.is_none());
        // A transposed (non-contiguous) weight is declined too.
        let wt = Tensor::randn(0f32, 1., (37, 130), &dev)?.t()?;
        assert!(cpu_gemv(&x, &wt)?.is_none());
        Ok(())
    }
}
