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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

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
}
