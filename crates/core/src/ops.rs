//! The model's non-matmul ops, each in two versions: candle's fused kernel when no gradient is
//! needed (teacher, generation, eval), and a composite of differentiable ops when one is (student
//! training). candle's fused `rms_norm`, `rope` and `softmax_last_dim` have no backward and would
//! silently cut the graph (CANDLE-NOTES.md), so the choice is made on the inputs themselves:
//! `Tensor::track_op` is true exactly when a gradient can flow through the tensor.

use candle_core::{Result, Tensor, D};

fn needs_grad(xs: &[&Tensor]) -> bool {
    xs.iter().any(|x| x.track_op())
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * weight`, in f32.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if needs_grad(&[x, weight]) {
        candle_nn::ops::rms_norm_slow(x, weight, eps as f32)
    } else {
        candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32)
    }
}

/// Half-split rotary embedding (HF Llama's `rotate_half` layout). `x`: (B, H, T, D); `cos`, `sin`:
/// (T, D/2) for the positions of `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if needs_grad(&[x]) {
        candle_nn::rotary_emb::rope_slow(x, cos, sin)
    } else {
        candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)
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

    /// The fused and the differentiable versions compute the same numbers.
    #[test]
    fn fast_and_differentiable_paths_agree() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 5, 8), &dev)?;
        let w = Tensor::randn(0f32, 1., 8, &dev)?;
        let xv = Var::from_tensor(&x)?;
        assert!(
            max_diff(
                &rms_norm(&x, &w, 1e-5)?,
                &rms_norm(xv.as_tensor(), &w, 1e-5)?
            ) < 1e-5
        );
        let cos = Tensor::randn(0f32, 1., (5, 4), &dev)?;
        let sin = Tensor::randn(0f32, 1., (5, 4), &dev)?;
        assert!(max_diff(&rope(&x, &cos, &sin)?, &rope(xv.as_tensor(), &cos, &sin)?) < 1e-5);
        assert!(max_diff(&softmax_last_dim(&x)?, &softmax_last_dim(xv.as_tensor())?) < 1e-6);
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
