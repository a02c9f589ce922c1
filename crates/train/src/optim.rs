//! AdamW with state that can be saved and restored (candle-nn's keeps its moments private), the
//! learning-rate schedule, and global gradient-norm clipping.

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use distill_core::Result;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

struct Param {
    name: String,
    var: Var,
    /// Decoupled weight decay applies to matrices, not to norms or biases.
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// AdamW (Loshchilov & Hutter), the PyTorch formulation: `p ← p − lr·wd·p`, then the Adam step
/// with bias correction.
pub struct AdamW {
    params: Vec<Param>,
    pub cfg: AdamWConfig,
    /// Optimizer steps taken so far.
    pub step: u64,
}

/// Whether a parameter gets weight decay (norm weights and biases do not).
pub fn decays(name: &str) -> bool {
    !(name.ends_with("norm.weight") || name.ends_with(".bias"))
}

impl AdamW {
    pub fn new(varmap: &VarMap, cfg: AdamWConfig) -> Result<Self> {
        Self::over(&[varmap], cfg)
    }

    /// AdamW over the variables of several VarMaps (e.g. a student and its hidden-state
    /// projections), whose names must not collide.
    pub fn over(varmaps: &[&VarMap], cfg: AdamWConfig) -> Result<Self> {
        let mut vars: Vec<(String, Var)> = Vec::new();
        for vm in varmaps {
            let data = vm.data().lock().expect("varmap lock");
            vars.extend(data.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = vars.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(distill_core::Error::Msg(format!(
                "two optimizer parameters are named {}",
                w[0].0
            )));
        }
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?;
                Ok(Param {
                    decay: decays(&name),
                    name,
                    m: zeros.clone(),
                    v: zeros,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            cfg,
            step: 0,
        })
    }

    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// One update with gradients by parameter name (every parameter must have one).
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for p in &mut self.params {
            let g = grads.get(&p.name).ok_or_else(|| {
                distill_core::Error::Msg(format!("no gradient for parameter {}", p.name))
            })?;
            let g = g.to_dtype(DType::F32)?;
            p.m = ((&p.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&p.m / bc1)?;
            let v_hat = (&p.v / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let w = p.var.as_tensor();
            let w = if p.decay && c.weight_decay > 0.0 {
                (w * (1.0 - lr * c.weight_decay))?
            } else {
                w.clone()
            };
            p.var.set(&(w - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Moments by name (`m.NAME`, `v.NAME`), for `optimizer.safetensors`.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for p in &self.params {
            out.insert(format!("m.{}", p.name), p.m.clone());
            out.insert(format!("v.{}", p.name), p.v.clone());
        }
        out
    }

    /// Restores moments saved by [`Self::state_tensors`] and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for p in &mut self.params {
            for (key, slot) in [("m", &mut p.m), ("v", &mut p.v)] {
                let name = format!("{key}.{}", p.name);
                let t = tensors.get(&name).ok_or_else(|| {
                    distill_core::Error::Msg(format!("optimizer state has no tensor {name}"))
                })?;
                if t.shape() != slot.shape() {
                    return Err(distill_core::Error::Msg(format!(
                        "optimizer state {name} is {:?}, the parameter is {:?}",
                        t.dims(),
                        slot.dims()
                    )));
                }
                *slot = t.to_dtype(DType::F32)?.to_device(slot.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Global L2 norm of the gradients.
pub fn grad_norm(grads: &HashMap<String, Tensor>) -> Result<f64> {
    let mut names: Vec<&String> = grads.keys().collect();
    names.sort(); // a fixed summation order: bit-identical runs
    let mut sum = 0f64;
    for n in names {
        sum += grads[n]
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// Scales the gradients so their global norm is at most `max` (no-op when `max ≤ 0`).
pub fn clip_grads(grads: &mut HashMap<String, Tensor>, norm: f64, max: f64) -> Result<()> {
    if max > 0.0 && norm > max {
        let scale = max / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(())
}

/// Linear warmup from 0 to `peak` over `warmup` steps, then cosine decay to `floor` at `total`.
/// `step` counts from 1.
pub fn lr_at(step: u64, peak: f64, floor: f64, warmup: u64, total: u64) -> f64 {
    if warmup > 0 && step <= warmup {
        return peak * step as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup.min(step)) as f64 / span).min(1.0);
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        assert_eq!(lr_at(1, 1e-3, 1e-4, 10, 110), 1e-4);
        assert!((lr_at(10, 1e-3, 1e-4, 10, 110) - 1e-3).abs() < 1e-12);
        assert!((lr_at(60, 1e-3, 1e-4, 10, 110) - 5.5e-4).abs() < 1e-12);
        assert!((lr_at(110, 1e-3, 1e-4, 10, 110) - 1e-4).abs() < 1e-12);
        assert!((lr_at(500, 1e-3, 1e-4, 10, 110) - 1e-4).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_pytorch() {
        // torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), two
        // steps on p = [1.0, -2.0, 0.5] with grads [0.5, -1.0, 0.0] then [0.1, 0.2, -0.3]:
        //   import torch
        //   p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        //   o = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        //   for g in ([0.5, -1.0, 0.0], [0.1, 0.2, -0.3]):
        //       p.grad = torch.tensor(g, dtype=torch.float64); o.step()
        //   print(p.tolist())
        let want = [0.7998471188087057, -1.8094936200644078, 0.5635459968093104];
        let varmap = VarMap::new();
        let dev = candle_core::Device::Cpu;
        let p = varmap
            .get(3, "w.weight", candle_nn::Init::Const(0.0), DType::F32, &dev)
            .unwrap();
        varmap.data().lock().unwrap()["w.weight"]
            .set(&Tensor::new(&[1.0f32, -2.0, 0.5], &dev).unwrap())
            .unwrap();
        let mut opt = AdamW::new(
            &varmap,
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
            },
        )
        .unwrap();
        for g in [[0.5f32, -1.0, 0.0], [0.1, 0.2, -0.3]] {
            let grads = HashMap::from([("w.weight".to_string(), Tensor::new(&g, &dev).unwrap())]);
            opt.step(&grads, 0.1).unwrap();
        }
        let _ = p;
        let got: Vec<f32> = varmap.data().lock().unwrap()["w.weight"]
            .as_tensor()
            .to_vec1()
            .unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }
}
