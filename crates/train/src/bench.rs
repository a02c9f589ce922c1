//! `distill bench train`: trained tokens/s and peak RSS of full training steps (student forward,
//! KD loss, backward, grad norm + clipping, AdamW) on a fixed batch with fixed teacher targets,
//! so that only the student's training is timed. Not part of the test suite; the PyTorch peer is
//! `scripts/bench_pytorch.py train`.

use crate::loss::{distill_loss, distill_loss_from_hidden, next_token_labels, KdKind, LossConfig};
use crate::optim::{clip_grads, clip_scale, grad_norm, AdamW, AdamWConfig};
use candle_core::{Device, Tensor};
use distill_core::{CausalLm, Config, Result, TeacherTargets};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct TrainBenchOptions {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub temperature: f32,
    /// 0 = dense targets (full-vocabulary teacher logits), else top-k sparse targets.
    pub top_k: usize,
    pub steps: usize,
    /// The unfused path, for comparison: logits formed as a (B, T, V) tensor, then the loss op;
    /// clipping as its own tensor pass. (The AdamW kernel is the same either way.)
    pub unfused: bool,
    /// Train this model dir (e.g. a pruned teacher) instead of a new model of the shape above.
    pub student: Option<std::path::PathBuf>,
    /// Freeze the (tied) embeddings, as `student.freeze_embeddings` does.
    pub freeze_embeddings: bool,
    /// The products' precision in the forward and backward (`train.precision`).
    pub precision: distill_core::Precision,
}

impl Default for TrainBenchOptions {
    fn default() -> Self {
        Self {
            layers: 4,
            hidden: 256,
            heads: 4,
            intermediate: 768,
            vocab: 49152,
            batch: 8,
            seq_len: 256,
            temperature: 2.0,
            top_k: 0,
            steps: 3,
            unfused: false,
            student: None,
            freeze_embeddings: false,
            precision: distill_core::Precision::F32,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainBench {
    pub tokens_per_second: f64,
    pub peak_rss_bytes: u64,
    pub batch: usize,
    pub seq_len: usize,
    pub loss_kind: String,
    pub targets: String,
    pub params: usize,
    pub steps: usize,
    pub threads: usize,
    pub device: String,
    pub precision: distill_core::Precision,
}

/// Seeded normal(0, σ) values (candle's CPU RNG cannot be seeded).
fn randn(n: usize, std: f32, seed: u64) -> Vec<f32> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let d = rand_distr::Normal::new(0f32, std).expect("valid std");
    (0..n).map(|_| d.sample(&mut rng)).collect()
}

pub fn bench_train(o: &TrainBenchOptions, device: &Device) -> Result<TrainBench> {
    let new_cfg = Config {
        vocab_size: o.vocab,
        hidden_size: o.hidden,
        intermediate_size: o.intermediate,
        num_hidden_layers: o.layers,
        num_attention_heads: o.heads,
        num_key_value_heads: o.heads,
        head_dim: o.hidden / o.heads,
        tie_word_embeddings: true,
        max_position_embeddings: o.seq_len.max(2048),
        ..Config::tiny()
    };
    if !o.precision.is_f32() {
        distill_core::ops::bf16::require(device)?;
    }
    let (student, varmap, cfg) = match &o.student {
        Some(dir) => crate::student::student_from_dir(dir, dir, 0, device)?,
        None => {
            let (m, vm) = CausalLm::init_seeded(&new_cfg, 0, device)?;
            (m, vm, new_cfg)
        }
    };
    let student = if o.freeze_embeddings {
        crate::student::freeze(&cfg, &varmap, &[crate::student::EMBEDDINGS], device)?.0
    } else {
        student
    };
    let mut opt = AdamW::new(&varmap, AdamWConfig::default())?;
    let (b, t, v) = (o.batch, o.seq_len, cfg.vocab_size);
    let ids: Vec<u32> = {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        (0..b * t).map(|_| rng.random_range(0..v as u32)).collect()
    };
    let input = Tensor::from_vec(ids.clone(), (b, t), device)?;
    let labels = next_token_labels(&ids, b, t);
    let teacher_logits = randn(b * t * v, 4.0, 2);
    let targets = if o.top_k == 0 {
        TeacherTargets::Dense {
            logits: Tensor::from_vec(teacher_logits, (b, t, v), device)?,
        }
    } else {
        let k = o.top_k;
        let (mut kid, mut klp, mut lse) = (vec![0u32; b * t * k], vec![0f32; b * t * k], vec![]);
        for r in 0..b * t {
            lse.push(distill_core::logits::row_topk(
                &teacher_logits[r * v..(r + 1) * v],
                &mut kid[r * k..(r + 1) * k],
                &mut klp[r * k..(r + 1) * k],
            ));
        }
        drop(teacher_logits);
        TeacherTargets::Sparse {
            ids: Tensor::from_vec(kid, (b, t, k), device)?,
            logprobs: Tensor::from_vec(klp, (b, t, k), device)?,
            logsumexp: Tensor::from_vec(lse, (b, t), device)?,
        }
    };
    let loss_cfg = LossConfig {
        kind: KdKind::ForwardKl,
        temperature: o.temperature,
        alpha_kd: 1.0,
        alpha_ce: 0.0,
        teacher_vocab: None,
    };
    let step = |opt: &mut AdamW| -> Result<f32> {
        let autocast = distill_core::ops::Autocast::new(o.precision)?;
        let parts = if o.unfused {
            let logits = student.forward(&input)?;
            distill_loss(&logits, &targets, &labels, &loss_cfg)?
        } else {
            let hidden = student.hidden_states(&input)?;
            distill_loss_from_hidden(
                &hidden,
                student.lm_head_weight(),
                &targets,
                &labels,
                &loss_cfg,
            )?
        };
        let g = parts.total.backward()?;
        drop(autocast);
        let mut grads: HashMap<String, Tensor> = opt
            .vars()
            .map(|(n, var)| {
                (
                    n.to_string(),
                    g.get(var.as_tensor()).cloned().expect("gradient"),
                )
            })
            .collect();
        drop(g);
        let norm = grad_norm(&grads)?;
        if o.unfused {
            clip_grads(&mut grads, norm, 1.0)?;
            opt.step(&grads, 1e-3)?;
        } else {
            opt.step_scaled(&grads, 1e-3, clip_scale(norm, 1.0))?;
        }
        Ok(parts.kd)
    };
    step(&mut opt)?; // warm-up
    let start = Instant::now();
    for _ in 0..o.steps {
        step(&mut opt)?;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(TrainBench {
        tokens_per_second: (o.steps * b * t) as f64 / secs,
        peak_rss_bytes: distill_core::device::peak_rss_bytes().unwrap_or(0),
        batch: b,
        seq_len: t,
        loss_kind: format!(
            "forward_kl τ={}{}",
            o.temperature,
            if o.unfused { " (unfused)" } else { "" }
        ),
        targets: if o.top_k == 0 {
            "dense".into()
        } else {
            format!("sparse k={}", o.top_k)
        },
        params: cfg.num_params(),
        steps: o.steps,
        threads: distill_core::device::cpu_threads(),
        device: distill_core::device::device_name(device),
        precision: o.precision,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub gflops: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GemmBench {
    pub shapes: Vec<GemmShape>,
    /// Total FLOPs over total time: the rate a workload of these shapes in these proportions gets.
    pub gflops: f64,
    pub threads: usize,
    pub precision: distill_core::Precision,
}

/// `(m×k)·(k×n)` products, `iters` timed after one warm-up per shape: 2·m·n·k FLOPs each. f32
/// through candle's matmul (the path every layer takes); bf16 on AMX tiles with `B` packed once
/// (as a frozen weight) and `A` rounded per product: the teacher's products at
/// `--teacher-precision bf16`, and an upper bound for the student's at `train.precision =
/// "bf16"` (which packs B per product too).
pub fn bench_gemm(
    shapes: &[(usize, usize, usize)],
    iters: usize,
    precision: distill_core::Precision,
) -> Result<GemmBench> {
    let dev = Device::Cpu;
    let (mut flops, mut secs) = (0f64, 0f64);
    let mut out = Vec::new();
    if !precision.is_f32() {
        distill_core::ops::bf16::require(&dev)?;
    }
    for (i, &(m, n, k)) in shapes.iter().enumerate() {
        let (av, bv) = (
            randn(m * k, 1.0, 10 + i as u64),
            randn(k * n, 1.0, 20 + i as u64),
        );
        let s = match precision {
            distill_core::Precision::F32 => {
                let a = Tensor::from_vec(av, (m, k), &dev)?;
                let b = Tensor::from_vec(bv, (k, n), &dev)?;
                a.matmul(&b)?; // warm-up
                let start = Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(a.matmul(&b)?);
                }
                start.elapsed().as_secs_f64()
            }
            distill_core::Precision::Bf16 => {
                use distill_core::ops::bf16;
                let packed = bf16::PackedBf16::pack_strided(&bv, k, n, (1, n));
                bf16::gemm_alloc(&av, m, &packed); // warm-up
                let start = Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(bf16::gemm_alloc(&av, m, &packed));
                }
                start.elapsed().as_secs_f64()
            }
        };
        let f = 2.0 * (m * n * k) as f64 * iters as f64;
        out.push(GemmShape {
            m,
            n,
            k,
            gflops: f / s / 1e9,
        });
        flops += f;
        secs += s;
    }
    Ok(GemmBench {
        shapes: out,
        gflops: flops / secs / 1e9,
        threads: distill_core::device::cpu_threads(),
        precision,
    })
}
