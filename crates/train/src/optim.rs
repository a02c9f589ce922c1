//! AdamW with state that can be saved and restored (candle-nn's keeps its moments private), the
//! learning-rate schedule, and global gradient-norm clipping.
//!
//! On the CPU in f32 the update is one fused pass per parameter over flat buffers (moments kept as
//! host vectors, the weights updated in place, clipping folded in as a gradient scale): the same
//! arithmetic, in the same order and precision, as the ~10 tensor ops per parameter it replaces
//! (which the other devices still run), without their temporaries.

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Storage, Tensor, Var};
use candle_nn::VarMap;
use distill_core::vexp::{self, AdamStep};
use distill_core::Result;
use rayon::prelude::*;
use std::cell::RefCell;
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
    moments: Moments,
}

/// First and second moments: host vectors for a CPU f32 parameter (the fused path), tensors on
/// the parameter's device otherwise.
enum Moments {
    Host { m: Vec<f32>, v: Vec<f32> },
    Device { m: Tensor, v: Tensor },
}

fn is_host_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Runs `f` on a CPU f32 tensor's contiguous data; `None` for any other tensor.
fn with_host_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) => Some(f(&data[a..b])),
        _ => None,
    }
}

/// Elements per parallel work item of the fused passes (fixed, so sums are reproducible).
const CHUNK: usize = 1 << 14;

/// One AdamW step on a parameter's data in place (`InplaceOp2`: the weights, then the gradient).
struct AdamKernel<'a> {
    m: RefCell<&'a mut [f32]>,
    v: RefCell<&'a mut [f32]>,
    k: AdamStep,
}

impl InplaceOp2 for AdamKernel<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(
        &self,
        w: &mut CpuStorage,
        lw: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<()> {
        let (w, g) = match (w, g) {
            (CpuStorage::F32(w), CpuStorage::F32(g)) => (w, g),
            _ => candle_core::bail!("adamw: parameters and gradients must be f32"),
        };
        let (Some((wa, wb)), Some((ga, gb))) = (lw.contiguous_offsets(), lg.contiguous_offsets())
        else {
            candle_core::bail!("adamw: parameters and gradients must be contiguous");
        };
        let (w, g) = (&mut w[wa..wb], &g[ga..gb]);
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        if w.len() != g.len() || m.len() != w.len() || v.len() != w.len() {
            candle_core::bail!("adamw: {} weights, {} gradients", w.len(), g.len());
        }
        // The scalars, copied out: the closure runs on several threads, the RefCells may not.
        let k = self.k;
        w.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((w, g), m), v)| vexp::adamw(w, g, m, v, k));
        Ok(())
    }
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
                let t = var.as_tensor();
                let moments = if is_host_f32(t) {
                    let n = t.elem_count();
                    Moments::Host {
                        m: vec![0f32; n],
                        v: vec![0f32; n],
                    }
                } else {
                    let zeros = t.zeros_like()?;
                    Moments::Device {
                        m: zeros.clone(),
                        v: zeros,
                    }
                };
                Ok(Param {
                    decay: decays(&name),
                    name,
                    moments,
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
        self.step_scaled(grads, lr, 1.0)
    }

    /// One update with every gradient multiplied by `grad_scale` first (clipping: see
    /// [`clip_scale`]).
    pub fn step_scaled(
        &mut self,
        grads: &HashMap<String, Tensor>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
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
            let decay = p.decay && c.weight_decay > 0.0;
            match &mut p.moments {
                Moments::Host { m, v } => {
                    let g = if g.is_contiguous() {
                        g
                    } else {
                        g.contiguous()?
                    };
                    let kernel = AdamKernel {
                        m: RefCell::new(m.as_mut_slice()),
                        v: RefCell::new(v.as_mut_slice()),
                        k: AdamStep {
                            beta1: c.beta1 as f32,
                            beta2: c.beta2 as f32,
                            one_minus_beta1: (1.0 - c.beta1) as f32,
                            one_minus_beta2: (1.0 - c.beta2) as f32,
                            inv_bc1: (1.0 / bc1) as f32,
                            inv_bc2: (1.0 / bc2) as f32,
                            eps: c.eps as f32,
                            lr: lr as f32,
                            decay: decay.then_some((1.0 - lr * c.weight_decay) as f32),
                            grad_scale: grad_scale as f32,
                        },
                    };
                    p.var.as_tensor().inplace_op2(&g, &kernel)?;
                }
                Moments::Device { m, v } => {
                    let g = if grad_scale != 1.0 {
                        (g * grad_scale)?
                    } else {
                        g
                    };
                    *m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
                    *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                    let m_hat = (&*m / bc1)?;
                    let v_hat = (&*v / bc2)?;
                    let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
                    let w = p.var.as_tensor();
                    let w = if decay {
                        (w * (1.0 - lr * c.weight_decay))?
                    } else {
                        w.clone()
                    };
                    p.var.set(&(w - (update * lr)?)?)?;
                }
            }
        }
        Ok(())
    }

    /// Moments by name (`m.NAME`, `v.NAME`), for `optimizer.safetensors`.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for p in &self.params {
            let (m, v) = match &p.moments {
                Moments::Host { m, v } => {
                    let t = p.var.as_tensor();
                    (
                        Tensor::from_slice(m, t.shape(), t.device())?,
                        Tensor::from_slice(v, t.shape(), t.device())?,
                    )
                }
                Moments::Device { m, v } => (m.clone(), v.clone()),
            };
            out.insert(format!("m.{}", p.name), m);
            out.insert(format!("v.{}", p.name), v);
        }
        Ok(out)
    }

    /// Restores moments saved by [`Self::state_tensors`] and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for p in &mut self.params {
            let shape = p.var.as_tensor().shape().clone();
            let device = p.var.as_tensor().device().clone();
            for key in ["m", "v"] {
                let name = format!("{key}.{}", p.name);
                let t = tensors.get(&name).ok_or_else(|| {
                    distill_core::Error::Msg(format!("optimizer state has no tensor {name}"))
                })?;
                if t.shape() != &shape {
                    return Err(distill_core::Error::Msg(format!(
                        "optimizer state {name} is {:?}, the parameter is {:?}",
                        t.dims(),
                        shape.dims()
                    )));
                }
                let t = t.to_dtype(DType::F32)?.to_device(&device)?;
                match (&mut p.moments, key) {
                    (Moments::Host { m, .. }, "m") => *m = t.flatten_all()?.to_vec1()?,
                    (Moments::Host { v, .. }, _) => *v = t.flatten_all()?.to_vec1()?,
                    (Moments::Device { m, .. }, "m") => *m = t,
                    (Moments::Device { v, .. }, _) => *v = t,
                }
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
        let g = &grads[n];
        // CPU f32: per fixed chunk, f32 lanes over blocks added in f64 (`vexp::sum_squares`), the
        // chunks added in order (reproducible, no temporaries).
        let host = with_host_slice(g, |x| {
            x.par_chunks(CHUNK)
                .map(|c| match vexp::sum_squares(c) {
                    s if s.is_finite() => s,
                    // A square past f32's range (|g| > 1.8e19): the chunk again in f64.
                    _ => c.iter().map(|&v| v as f64 * v as f64).sum::<f64>(),
                })
                .collect::<Vec<f64>>()
                .iter()
                .sum::<f64>()
        });
        sum += match host {
            Some(s) => s,
            None => g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?,
        };
    }
    Ok(sum.sqrt())
}

/// The factor that brings a global gradient norm `norm` to at most `max` (1 when `max ≤ 0` or
/// the norm is already within it), for [`AdamW::step_scaled`].
pub fn clip_scale(norm: f64, max: f64) -> f64 {
    if max > 0.0 && norm > max {
        max / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Scales the gradients so their global norm is at most `max` (no-op when `max ≤ 0`).
pub fn clip_grads(grads: &mut HashMap<String, Tensor>, norm: f64, max: f64) -> Result<()> {
    let scale = clip_scale(norm, max);
    if scale != 1.0 {
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

    /// The global norm against an f64 sum, over tensors longer than one chunk and not a
    /// multiple of the lanes.
    #[test]
    fn grad_norm_matches_f64() {
        let dev = candle_core::Device::Cpu;
        let a: Vec<f32> = (0..40_001).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..77).map(|i| i as f32 * 1e-3).collect();
        let want = a
            .iter()
            .chain(&b)
            .map(|&x| x as f64 * x as f64)
            .sum::<f64>()
            .sqrt();
        let grads = HashMap::from([
            ("a".to_string(), Tensor::new(a.as_slice(), &dev).unwrap()),
            ("b".to_string(), Tensor::new(b.as_slice(), &dev).unwrap()),
        ]);
        let got = grad_norm(&grads).unwrap();
        assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
        // Squares past f32's range still give a finite norm (clipping can take it).
        let huge = HashMap::from([(
            "h".to_string(),
            Tensor::new(&[3e20f32, -4e20], &dev).unwrap(),
        )]);
        let got = grad_norm(&huge).unwrap();
        assert!((got - 5e20).abs() <= 1e-6 * 5e20, "{got}");
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
