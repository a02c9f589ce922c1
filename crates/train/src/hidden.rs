//! Hidden-state distillation (TinyBERT, MiniLM, DistillKit's hidden-state mode, Minitron's
//! healing): the residual stream after student layer `s` is pulled towards the teacher's after
//! layer `t`, for each pair `(s, t)` of a layer map. Where the widths differ, the student's states
//! go through a learned linear projection `W` (teacher width × student width) first; the
//! projections are trained with the student and saved in the checkpoint, never in the model dir.
//!
//! Per pair, over all B·T positions (p = W h_s, or h_s when the widths agree; t the teacher's):
//! - `cosine`: mean of `1 − p·t / (max(‖p‖, ε) · max(‖t‖, ε))`, ε = 1e-8 (scale-free: the
//!   residual stream's outlier channels do not dominate it),
//! - `mse`: mean of `(p − t)²` over positions and channels (`F.mse_loss`).
//!
//! The term is the mean over pairs, times `hidden.weight`, added to the KD loss.

use crate::config::RunConfig;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use distill_core::{Config, Error, Result};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenKind {
    Cosine,
    Mse,
}

/// The resolved hidden-state loss of a run.
#[derive(Debug, Clone)]
pub struct HiddenSpec {
    pub kind: HiddenKind,
    pub weight: f32,
    /// (student layer, teacher layer).
    pub pairs: Vec<(usize, usize)>,
    /// The teacher channel behind each student channel (a prune plan's hidden channels): the
    /// projections start as that selection. None: seeded random.
    pub channels: Option<Vec<usize>>,
}

impl HiddenSpec {
    pub fn student_layers(&self) -> Vec<usize> {
        self.pairs.iter().map(|p| p.0).collect()
    }

    pub fn teacher_layers(&self) -> Vec<usize> {
        self.pairs.iter().map(|p| p.1).collect()
    }
}

/// The hidden-state loss a config asks for (None when `hidden.weight` is 0): the layer map from
/// `hidden.layers`, else from the prune report of the student's start dir; every index checked
/// against both models.
pub fn resolve(cfg: &RunConfig, student: &Config, teacher: &Config) -> Result<Option<HiddenSpec>> {
    let h = &cfg.hidden;
    if h.weight == 0.0 {
        return Ok(None);
    }
    let kind = match h.kind.as_str() {
        "cosine" => HiddenKind::Cosine,
        "mse" => HiddenKind::Mse,
        other => {
            return Err(Error::Msg(format!(
                "hidden.kind = \"{other}\": expected cosine or mse"
            )))
        }
    };
    let plan = match &cfg.student.model {
        Some(dir) if dir.join(distill_prune::REPORT_JSON).is_file() => {
            Some(distill_prune::PruneReport::read(dir)?.plan)
        }
        _ => None,
    };
    let pairs: Vec<(usize, usize)> =
        match (&h.layers, &plan) {
            (Some(l), _) => l.iter().map(|p| (p[0], p[1])).collect(),
            (None, Some(plan)) => plan.layers.iter().copied().enumerate().collect(),
            (None, None) => return Err(Error::Msg(
                "hidden.weight > 0 needs a layer map: hidden.layers = [[student, teacher], ...], \
                 or a student.model written by `distill prune` (its prune-report.json holds one)"
                    .into(),
            )),
        };
    if pairs.is_empty() {
        return Err(Error::Msg("hidden.layers is empty".into()));
    }
    for &(s, t) in &pairs {
        if s >= student.num_hidden_layers || t >= teacher.num_hidden_layers {
            return Err(Error::Msg(format!(
                "hidden.layers pair [{s}, {t}]: the student has {} layers and the teacher {}",
                student.num_hidden_layers, teacher.num_hidden_layers
            )));
        }
    }
    let channels = plan
        .map(|p| p.hidden)
        .filter(|c| c.len() == student.hidden_size && c.iter().all(|&i| i < teacher.hidden_size));
    Ok(Some(HiddenSpec {
        kind,
        weight: h.weight,
        pairs,
        channels,
    }))
}

/// The learned projections (one per pair, `hidden_proj.K.weight`, teacher × student width) in a
/// VarMap of their own; none when the widths agree.
pub struct Projections {
    pub varmap: VarMap,
    weights: Vec<Option<Tensor>>,
}

fn proj_name(k: usize) -> String {
    format!("hidden_proj.{k}.weight")
}

impl Projections {
    /// New projections for `spec`: the prune plan's channel selection when known, else seeded
    /// normal(0, 1/√student width).
    pub fn new(
        spec: &HiddenSpec,
        student: usize,
        teacher: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let mut weights = Vec::new();
        if student == teacher {
            weights.resize(spec.pairs.len(), None);
            return Ok(Self { varmap, weights });
        }
        for k in 0..spec.pairs.len() {
            let init: Vec<f32> = match &spec.channels {
                Some(ch) => {
                    let mut w = vec![0f32; teacher * student];
                    for (j, &c) in ch.iter().enumerate() {
                        w[c * student + j] = 1.0;
                    }
                    w
                }
                None => {
                    use rand::SeedableRng;
                    use rand_distr::Distribution;
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (k as u64 + 1));
                    let normal = rand_distr::Normal::new(0f32, 1.0 / (student as f32).sqrt())
                        .expect("a positive std");
                    (0..teacher * student)
                        .map(|_| normal.sample(&mut rng))
                        .collect()
                }
            };
            let t = Tensor::from_vec(init, (teacher, student), device)?;
            let var = candle_core::Var::from_tensor(&t)?;
            weights.push(Some(var.as_tensor().clone()));
            varmap
                .data()
                .lock()
                .expect("varmap lock")
                .insert(proj_name(k), var);
        }
        Ok(Self { varmap, weights })
    }

    pub fn is_empty(&self) -> bool {
        self.weights.iter().all(Option::is_none)
    }

    /// Loads saved projections (a checkpoint's) into these, checking names and shapes.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        distill_core::weights::check_safetensors(path)?;
        let tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::file(path, e))?;
        let data = self.varmap.data().lock().expect("varmap lock");
        for (name, var) in data.iter() {
            let t = tensors
                .get(name)
                .ok_or_else(|| Error::file(path, format!("no tensor {name}")))?;
            if t.dims() != var.as_tensor().dims() {
                return Err(Error::file(
                    path,
                    format!(
                        "{name} is {:?}, the run needs {:?}",
                        t.dims(),
                        var.as_tensor().dims()
                    ),
                ));
            }
            var.set(
                &t.to_dtype(DType::F32)?
                    .to_device(var.as_tensor().device())?,
            )?;
        }
        Ok(())
    }

    pub fn tensors(&self) -> HashMap<String, Tensor> {
        distill_core::weights::varmap_tensors(&self.varmap)
    }

    /// The hidden-state term: mean over pairs of the per-pair loss (unweighted).
    pub fn loss(&self, kind: HiddenKind, student: &[Tensor], teacher: &[Tensor]) -> Result<Tensor> {
        if student.len() != teacher.len() || student.len() != self.weights.len() {
            return Err(Error::Msg(format!(
                "hidden-state loss: {} student and {} teacher states for {} pairs",
                student.len(),
                teacher.len(),
                self.weights.len()
            )));
        }
        let mut total: Option<Tensor> = None;
        for ((s, t), w) in student.iter().zip(teacher).zip(&self.weights) {
            let l = pair_loss(s, t, w.as_ref(), kind)?;
            total = Some(match total {
                Some(acc) => (acc + l)?,
                None => l,
            });
        }
        let total = total.expect("at least one pair");
        Ok((total / student.len() as f64)?)
    }
}

/// One pair's loss: `student` (…, ds), `teacher` (…, dt), `proj` (dt, ds) when ds ≠ dt.
pub fn pair_loss(
    student: &Tensor,
    teacher: &Tensor,
    proj: Option<&Tensor>,
    kind: HiddenKind,
) -> Result<Tensor> {
    let ds = student.dim(D::Minus1)?;
    let dt = teacher.dim(D::Minus1)?;
    let s = student.reshape(((), ds))?;
    let t = teacher.reshape(((), dt))?.detach();
    let p = match proj {
        Some(w) => s.matmul(&w.t()?)?,
        None if ds == dt => s,
        None => {
            return Err(Error::Msg(format!(
                "hidden-state loss: student width {ds} and teacher width {dt} need a projection"
            )))
        }
    };
    Ok(match kind {
        HiddenKind::Mse => (p - t)?.sqr()?.mean_all()?,
        HiddenKind::Cosine => {
            const EPS: f64 = 1e-8;
            let dot = (&p * &t)?.sum(D::Minus1)?;
            let np = p.sqr()?.sum(D::Minus1)?.sqrt()?.clamp(EPS, f64::INFINITY)?;
            let nt = t.sqr()?.sum(D::Minus1)?.sqrt()?.clamp(EPS, f64::INFINITY)?;
            let cos = (dot / (np * nt)?)?;
            cos.affine(-1.0, 1.0)?.mean_all()?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// The PyTorch reference (torch 2.15, float64):
    /// ```python
    /// import math, torch
    /// F = torch.nn.functional
    /// seq = lambda n, f: torch.tensor([f(i) for i in range(n)], dtype=torch.float64)
    /// s = seq(24, lambda i: math.sin(0.7*i+0.3)).reshape(2,3,4).requires_grad_()
    /// t = seq(30, lambda i: 1.5*math.cos(0.45*i)).reshape(2,3,5)
    /// w = seq(20, lambda i: 0.5*math.sin(1.3*i)).reshape(5,4).requires_grad_()
    /// p = s @ w.T
    /// mse = F.mse_loss(p, t)
    /// cos = (1 - F.cosine_similarity(p, t, dim=-1, eps=1e-8)).mean()
    /// for l in (mse, cos): print(l.item(), torch.autograd.grad(l, [s, w], retain_graph=True))
    /// t4 = seq(24, lambda i: 1.5*math.cos(0.45*i)).reshape(2,3,4)   # same width, no projection
    /// for l in (F.mse_loss(s, t4), (1 - F.cosine_similarity(s, t4, dim=-1, eps=1e-8)).mean()):
    ///     print(l.item(), torch.autograd.grad(l, [s]))
    /// ```
    const MSE: f64 = 1.731_148_985;
    const MSE_DS: [f32; 24] = [
        0.037187, 0.0065808, -0.0336662, -0.0245922, 0.0082322, -0.0575753, -0.0390348, 0.0366918,
        -0.0828068, 0.0748393, 0.1228456, -0.0091172, 0.1386078, -0.0335834, -0.1565749,
        -0.0501838, -0.1367209, -0.0471323, 0.1115052, 0.1067874, 0.0758866, 0.1172294, -0.0131691,
        -0.1242748,
    ];
    const MSE_DW: [f32; 20] = [
        -0.125691, -0.1000135, -0.0272981, 0.058256, -0.3180692, -0.177814, 0.04607, 0.2482865,
        -0.3501354, -0.2547968, -0.0396233, 0.1941857, -0.1586059, -0.2553871, -0.2320558,
        -0.099585, 0.1117125, -0.1464971, -0.3358069, -0.3671814,
    ];
    const COS: f64 = 1.110_125_988;
    const COS_DS: [f32; 24] = [
        0.0203188, 0.0241465, -0.0074005, -0.0281057, -0.013346, -0.039483, -0.0077773, 0.0353222,
        0.0022653, 0.0658322, 0.0329548, -0.0482014, 0.0139224, -0.0646269, -0.0484976, 0.0386808,
        -0.0076158, 0.0159011, 0.0161228, -0.0072755, -0.0159497, 0.0189697, 0.0260985, -0.0050071,
    ];
    const COS_DW: [f32; 20] = [
        -0.1804155, -0.1246321, -0.0102322, 0.10898, -0.0762263, -0.1045223, -0.0836599,
        -0.0234509, -0.0250015, -0.132683, -0.1779616, -0.1395421, -0.052013, -0.1770187,
        -0.2187697, -0.1576299, -0.0785017, -0.1569385, -0.1615647, -0.0902045,
    ];
    const NOPROJ_MSE: f64 = 1.586_506_467;
    const NOPROJ_MSE_DS: [f32; 24] = [
        -0.1003733, -0.0424333, 0.0049375, 0.0289128, 0.0318653, 0.0275335, 0.0315482, 0.0513744,
        0.0809384, 0.1028371, 0.0972192, 0.0530238, -0.0240892, -0.1113895, -0.1770716, -0.1933705,
        -0.1489983, -0.0551737, 0.0577326, 0.1517427, 0.1961223, 0.1791509, 0.1118125, 0.0220316,
    ];
    const NOPROJ_COS: f64 = 1.006_877_489;
    const NOPROJ_COS_DS: [f32; 24] = [
        -0.056521, -0.0160819, 0.0137513, 0.024574, 0.0205328, 0.0005828, -0.0066552, 0.0079267,
        0.0907682, 0.0683579, 0.0314283, -0.0142395, -0.0734203, -0.0660112, -0.0451752,
        -0.0225021, 0.0017971, 0.0069743, 0.0014785, 0.0041756, 0.0193894, 0.0414671, 0.0635249,
        0.0730353,
    ];

    fn seq(n: usize, f: impl Fn(f64) -> f64, shape: &[usize]) -> Tensor {
        let v: Vec<f32> = (0..n).map(|i| f(i as f64) as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn close(got: &Tensor, want: &[f32], what: &str) {
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 2e-6, "{what}[{i}]: {g} vs PyTorch {w}");
        }
    }

    #[test]
    fn values_and_gradients_match_pytorch() {
        let s = Var::from_tensor(&seq(24, |i| (0.7 * i + 0.3).sin(), &[2, 3, 4])).unwrap();
        let t = seq(30, |i| 1.5 * (0.45 * i).cos(), &[2, 3, 5]);
        let w = Var::from_tensor(&seq(20, |i| 0.5 * (1.3 * i).sin(), &[5, 4])).unwrap();
        for (kind, value, ds, dw) in [
            (HiddenKind::Mse, MSE, &MSE_DS, &MSE_DW),
            (HiddenKind::Cosine, COS, &COS_DS, &COS_DW),
        ] {
            let l = pair_loss(s.as_tensor(), &t, Some(w.as_tensor()), kind).unwrap();
            let v = l.to_scalar::<f32>().unwrap() as f64;
            assert!((v - value).abs() < 1e-5, "{kind:?}: {v} vs PyTorch {value}");
            let g = l.backward().unwrap();
            close(g.get(s.as_tensor()).unwrap(), ds, "d student");
            close(g.get(w.as_tensor()).unwrap(), dw, "d projection");
        }
        let t4 = seq(24, |i| 1.5 * (0.45 * i).cos(), &[2, 3, 4]);
        for (kind, value, ds) in [
            (HiddenKind::Mse, NOPROJ_MSE, &NOPROJ_MSE_DS),
            (HiddenKind::Cosine, NOPROJ_COS, &NOPROJ_COS_DS),
        ] {
            let l = pair_loss(s.as_tensor(), &t4, None, kind).unwrap();
            let v = l.to_scalar::<f32>().unwrap() as f64;
            assert!((v - value).abs() < 1e-5, "{kind:?}: {v} vs PyTorch {value}");
            close(
                l.backward().unwrap().get(s.as_tensor()).unwrap(),
                ds,
                "d student",
            );
        }
        // Widths that differ without a projection are refused, not broadcast.
        let err = pair_loss(s.as_tensor(), &t, None, HiddenKind::Mse).unwrap_err();
        assert!(err.to_string().contains("need a projection"), "{err}");
    }

    #[test]
    fn projections_start_as_the_prune_plans_channel_selection() {
        let spec = HiddenSpec {
            kind: HiddenKind::Mse,
            weight: 1.0,
            pairs: vec![(0, 1)],
            channels: Some(vec![4, 0, 2]),
        };
        let p = Projections::new(&spec, 3, 5, 0, &Device::Cpu).unwrap();
        let w = p.tensors()["hidden_proj.0.weight"].clone();
        assert_eq!(w.dims(), &[5, 3]);
        // A student state that is the teacher's restricted to the kept channels projects back to
        // the teacher's on those channels and 0 elsewhere: the loss starts where the cut left it.
        let h = Tensor::new(&[[7f32, 8., 9.]], &Device::Cpu).unwrap();
        let back: Vec<f32> = h
            .matmul(&w.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(back, [8., 0., 9., 0., 7.]);
        // Equal widths: no projection, no variables.
        let same = Projections::new(&spec, 5, 5, 0, &Device::Cpu).unwrap();
        assert!(same.is_empty() && same.tensors().is_empty());
    }
}
