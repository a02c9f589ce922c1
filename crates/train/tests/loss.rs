//! Loss values and gradients against PyTorch (float64), dense and sparse, several kinds, τ and
//! α/β; the fused op against the composite one on a bigger random case; masking and vocabulary
//! padding.
//!
//! The constants below were produced by this script (torch 2.15, float64):
//! ```python
//! import math, torch
//! torch.set_default_dtype(torch.float64)
//! N, V, K = 4, 7, 3
//! IGN = -1
//! s0 = torch.tensor([[math.sin(1.3*r + 0.7*j)*3 for j in range(V)] for r in range(N)])
//! t = torch.tensor([[math.cos(0.9*r + 1.1*j)*4 for j in range(V)] for r in range(N)])
//! labels = torch.tensor([2, 5, IGN, 0])
//! mask = (labels != IGN).double()
//! lpt = torch.log_softmax(t, -1)
//! top = lpt.topk(K, -1)
//! ids, lps, lse = top.indices, top.values, torch.logsumexp(t, -1)
//!
//! def kl(lx, ly):  # sum x (lx - ly), 0 log 0 = 0
//!     x = lx.exp()
//!     return torch.where(x > 0, x * (lx - ly), torch.zeros_like(x)).sum(-1)
//!
//! def kd_rows(logp, logq, kind, a):
//!     p, q = logp.exp(), logq.exp()
//!     if kind == "fkl": return kl(logp, logq)
//!     if kind == "rkl": return kl(logq, logp)
//!     if kind == "jsd":
//!         lm = torch.log(a * p + (1 - a) * q)
//!         return a * kl(logp, lm) + (1 - a) * kl(logq, lm)
//!     if kind == "skl": return kl(logp, torch.log(a * p + (1 - a) * q))
//!     if kind == "srkl": return kl(logq, torch.log(a * q + (1 - a) * p))
//!     if kind == "tvd": return 0.5 * (p - q).abs().sum(-1)
//!
//! def loss(kind, a, tau, akd, ace, sparse):
//!     s = s0.clone().requires_grad_(True)
//!     logq = torch.log_softmax(s / tau, -1)
//!     if sparse:
//!         tail = (1 - lps.exp().sum(-1)).clamp(min=0)
//!         nt = V - K
//!         lg = torch.cat([(lps + lse[:, None]) / tau, (math.log(nt) + (torch.log(tail / nt) + lse) / tau)[:, None]], -1)
//!         logp = lg - torch.logsumexp(lg, -1, keepdim=True)
//!         kept = logq.gather(1, ids)
//!         qt = torch.log((1 - kept.exp().sum(-1)).clamp(min=1e-30))
//!         logq = torch.cat([kept, qt[:, None]], -1)
//!     else:
//!         logp = torch.log_softmax(t / tau, -1)
//!     kd = kd_rows(logp, logq, kind, a) * tau * tau
//!     ce = -torch.log_softmax(s, -1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
//!     n = mask.sum()
//!     total = akd * (kd * mask).sum() / n + ace * (ce * mask).sum() / n
//!     total.backward()
//!     return total.item(), s.grad
//!
//! cases = [("fkl",0,1,1,0,False), ("fkl",0,2,0.7,0.3,False), ("rkl",0,2,1,0,False), ("jsd",0.5,1,1,0,False),
//!          ("skl",0.1,1,1,0,False), ("srkl",0.1,2,1,0,False), ("tvd",0,1,1,0,False),
//!          ("fkl",0,1,1,0,True), ("fkl",0,2,0.5,0.5,True), ("rkl",0,2,1,0,True), ("jsd",0.5,1,1,0,True), ("tvd",0,2,1,0,True)]
//! for c in cases:
//!     v, g = loss(*c)
//!     print("    // %s" % (c,))
//!     print("    (%r, %r, %r, %r, %r, %s, %.9e, [%s])," % (c[0], c[1], c[2], c[3], c[4], str(c[5]).lower(), v, ", ".join("%.9e" % x for x in g.flatten().tolist())))
//! ```

use candle_core::{Device, Tensor, Var};
use distill_core::TeacherTargets;
use distill_train::loss::{composite_loss, distill_loss, KdKind, LossConfig, IGNORE};

const N: usize = 4;
const V: usize = 7;
const K: usize = 3;

struct Case {
    kind: &'static str,
    a: f64,
    tau: f64,
    alpha_kd: f64,
    alpha_ce: f64,
    sparse: bool,
    loss: f64,
    grad: [f64; N * V],
}

#[rustfmt::skip]
const CASES: &[Case] = &[
    Case { kind: "fkl", a: 0.0, tau: 1.0, alpha_kd: 1.0, alpha_ce: 0.0, sparse: false, loss: 3.830505734e+00, grad: [-1.404281836e-01, 3.615016707e-02, 1.466942517e-01, 1.017858428e-01, 2.008527667e-02, -4.350365128e-02, -1.207837033e-01, 1.085729423e-01, 1.347277136e-01, 3.184865756e-02, 3.519025576e-03, -3.814834284e-02, -2.246367687e-01, -1.588322750e-02, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 9.982617300e-04, 2.357184118e-04, -1.016524362e-02, -2.368447128e-01, -4.976948140e-02, 1.313614160e-01, 1.641840417e-01] },
    Case { kind: "fkl", a: 0.0, tau: 2.0, alpha_kd: 0.7, alpha_ce: 0.3, sparse: false, loss: 5.530984576e+00, grad: [-1.239210099e-01, 4.899727320e-02, 8.178031646e-02, 1.477148287e-01, 4.901981404e-02, -6.861059271e-02, -1.349806298e-01, 1.218723861e-01, 1.858951894e-01, 8.217706300e-02, 1.819441789e-02, -7.250474769e-02, -2.941292735e-01, -4.150503523e-02, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, -9.097669362e-02, 2.024601115e-03, -3.938282205e-02, -2.129738244e-01, -5.521668027e-02, 1.781887682e-01, 2.183366511e-01] },
    Case { kind: "rkl", a: 0.0, tau: 2.0, alpha_kd: 1.0, alpha_ce: 0.0, sparse: false, loss: 6.992801737e+00, grad: [-1.655642562e-01, -1.806660070e-01, 2.338567177e-01, 3.001710075e-01, -3.138613493e-02, -9.625605867e-02, -6.015526842e-02, -2.196729200e-01, 2.458052615e-01, 1.676512930e-01, -1.980875026e-02, -5.792232287e-02, -5.911832633e-02, -5.693423502e-02, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, -1.888706555e-02, -2.088597604e-02, -5.511318962e-02, -1.536856190e-01, -2.610052364e-01, 7.505224684e-02, 4.345248398e-01] },
    Case { kind: "jsd", a: 0.5, tau: 1.0, alpha_kd: 1.0, alpha_ce: 0.0, sparse: false, loss: 5.333767051e-01, grad: [-1.095272226e-02, -3.324873530e-03, 1.075200458e-02, 7.514249146e-03, 1.156631738e-03, -3.680869075e-03, -1.464420600e-03, -9.074222623e-03, 1.066398027e-02, 2.567381048e-03, 5.757952412e-05, -1.441826334e-03, -1.352234769e-03, -1.420657115e-03, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 3.485373786e-05, -4.909161892e-05, -9.519924775e-04, -7.683778944e-03, -1.686157330e-02, 1.105434138e-02, 1.445724122e-02] },
    Case { kind: "skl", a: 0.1, tau: 1.0, alpha_kd: 1.0, alpha_ce: 0.0, sparse: false, loss: 1.792432873e+00, grad: [-4.502294186e-02, -2.653528508e-03, 3.711764572e-02, 2.584890488e-02, 4.520267158e-03, -1.511895446e-02, -4.691392935e-03, -1.733765329e-02, 2.625025225e-02, 6.294658784e-03, 2.347021235e-04, -5.669978512e-03, -3.855557835e-03, -5.916423516e-03, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 1.974992855e-04, -7.376862010e-05, -3.907782992e-03, -2.929914507e-02, -5.287155330e-02, 3.771382180e-02, 4.824092889e-02] },
    Case { kind: "srkl", a: 0.1, tau: 2.0, alpha_kd: 1.0, alpha_ce: 0.0, sparse: false, loss: 4.319342627e+00, grad: [-1.018826838e-01, -4.704884558e-02, 1.232758700e-01, 1.085477373e-01, 1.833503672e-02, -5.870077640e-02, -4.252633813e-02, -6.867731086e-02, 1.287882973e-01, 6.874156461e-02, -9.605112836e-04, -4.223104304e-02, -4.683351601e-02, -3.882748068e-02, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, -9.901226434e-04, -6.849343435e-03, -3.383088080e-02, -1.039539839e-01, -1.317669633e-01, 1.104037521e-01, 1.669875420e-01] },
    Case { kind: "tvd", a: 0.0, tau: 1.0, alpha_kd: 1.0, alpha_ce: 0.0, sparse: false, loss: 8.801633151e-01, grad: [-7.393501098e-03, 1.721679111e-03, 4.792231503e-03, 3.321030346e-03, 6.808668117e-04, -2.581193016e-03, -5.411136583e-04, 1.087842743e-03, 9.244228560e-04, 2.177651010e-04, 2.806867025e-05, -7.554979948e-04, -4.430641795e-04, -1.059537196e-03, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 1.186171845e-04, 4.737652425e-05, -6.603135808e-04, -3.467782698e-03, -2.701282232e-02, 1.384008174e-02, 1.713484315e-02] },
    Case { kind: "fkl", a: 0.0, tau: 1.0, alpha_kd: 1.0, alpha_ce: 0.0, sparse: true, loss: 3.718669725e+00, grad: [-1.404281836e-01, 4.988892801e-02, 1.388640258e-01, 9.623317309e-02, 1.972941133e-02, -4.350365128e-02, -1.207837033e-01, 1.085729423e-01, 1.210643208e-01, 2.851896605e-02, 3.675930856e-03, -3.814834284e-02, -2.246367687e-01, 9.529514929e-04, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 1.130446464e-03, 4.515081400e-04, -1.016524362e-02, -2.368447128e-01, -4.976948140e-02, 1.318988605e-01, 1.632986227e-01] },
    Case { kind: "fkl", a: 0.0, tau: 2.0, alpha_kd: 0.5, alpha_ce: 0.5, sparse: true, loss: 4.644621100e+00, grad: [-7.828384737e-02, 7.258502105e-02, -1.613245465e-02, 1.150675836e-01, 3.948493144e-02, -4.375139977e-02, -8.896983428e-02, 1.373312738e-01, 1.358869698e-01, 4.902665570e-02, 1.392794187e-02, -4.745314534e-02, -2.952969846e-01, 6.577288695e-03, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, -1.569605064e-01, 6.001911342e-03, -2.747888720e-02, -1.489454727e-01, -2.962955510e-02, 1.650481450e-01, 1.919643650e-01] },
    Case { kind: "rkl", a: 0.0, tau: 2.0, alpha_kd: 1.0, alpha_ce: 0.0, sparse: true, loss: 4.038042858e+00, grad: [-1.166096826e-01, 4.926312445e-02, 8.218919803e-02, 6.841987397e-02, 3.097968022e-02, -6.733072069e-02, -4.691147342e-02, -9.016411913e-03, 5.740780844e-02, 2.786312165e-02, 1.000337500e-02, -4.337399682e-02, -4.797718489e-02, 5.093288542e-03, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 1.613103007e-02, 1.019459302e-02, -4.733459358e-02, -1.358596954e-01, -2.112531744e-01, 1.742439159e-01, 1.938779245e-01] },
    Case { kind: "jsd", a: 0.5, tau: 1.0, alpha_kd: 1.0, alpha_ce: 0.0, sparse: true, loss: 4.949816611e-01, grad: [-1.093300000e-02, 2.631021464e-03, 7.323353038e-03, 5.075104919e-03, 1.040481461e-03, -3.673983708e-03, -1.462977172e-03, -5.950339822e-03, 6.846238711e-03, 1.612759631e-03, 2.078754497e-04, -1.426926857e-03, -1.343496924e-03, 5.388981128e-05, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 9.711075843e-05, 3.878670888e-05, -9.519379523e-04, -7.683492593e-03, -1.685934272e-02, 1.133074302e-02, 1.402813278e-02] },
    Case { kind: "tvd", a: 0.0, tau: 2.0, alpha_kd: 1.0, alpha_ce: 0.0, sparse: true, loss: 2.466258404e+00, grad: [-4.084856145e-02, 1.622569899e-02, 2.707049547e-02, 2.253532013e-02, 1.020371671e-02, -2.413581323e-02, -1.105085661e-02, 1.087963560e-02, 1.002920775e-02, 4.867718227e-03, 1.747600698e-03, -1.609124960e-02, -1.232271583e-02, 8.898031523e-04, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 0.000000000e+00, 4.998805893e-03, 3.159177775e-03, -1.261750161e-02, -2.891506626e-02, -8.070180254e-02, 5.399602566e-02, 6.008036109e-02] },
];

fn kind(name: &str, a: f64) -> KdKind {
    match name {
        "fkl" => KdKind::ForwardKl,
        "rkl" => KdKind::ReverseKl,
        "jsd" => KdKind::Jsd { beta: a as f32 },
        "skl" => KdKind::SkewForwardKl { alpha: a as f32 },
        "srkl" => KdKind::SkewReverseKl { alpha: a as f32 },
        "tvd" => KdKind::Tvd,
        _ => unreachable!(),
    }
}

fn inputs() -> (Vec<f32>, Vec<f32>, Vec<u32>) {
    let s = (0..N * V)
        .map(|i| ((1.3 * (i / V) as f64 + 0.7 * (i % V) as f64).sin() * 3.0) as f32)
        .collect();
    let t = (0..N * V)
        .map(|i| ((0.9 * (i / V) as f64 + 1.1 * (i % V) as f64).cos() * 4.0) as f32)
        .collect();
    (s, t, vec![2, 5, IGNORE, 0])
}

/// Top-k sparse targets of teacher logits rows (as `distill cache` stores them, in f32).
fn sparse_targets(t: &[f32], rows: usize, v: usize, k: usize, dev: &Device) -> TeacherTargets {
    let (mut ids, mut lps, mut lses) = (vec![0u32; rows * k], vec![0f32; rows * k], vec![]);
    for r in 0..rows {
        let lse = distill_core::logits::row_topk(
            &t[r * v..(r + 1) * v],
            &mut ids[r * k..(r + 1) * k],
            &mut lps[r * k..(r + 1) * k],
        );
        lses.push(lse);
    }
    TeacherTargets::Sparse {
        ids: Tensor::from_vec(ids, (rows, k), dev).unwrap(),
        logprobs: Tensor::from_vec(lps, (rows, k), dev).unwrap(),
        logsumexp: Tensor::from_vec(lses, rows, dev).unwrap(),
    }
}

fn cfg(kind: KdKind, tau: f64, alpha_kd: f64, alpha_ce: f64) -> LossConfig {
    LossConfig {
        kind,
        temperature: tau as f32,
        alpha_kd: alpha_kd as f32,
        alpha_ce: alpha_ce as f32,
        teacher_vocab: None,
    }
}

/// Loss value and gradient w.r.t. the student logits, fused or composite.
fn value_and_grad(
    s: &[f32],
    shape: (usize, usize),
    targets: &TeacherTargets,
    labels: &[u32],
    c: &LossConfig,
    fused: bool,
) -> (f32, Vec<f32>) {
    let var =
        Var::from_tensor(&Tensor::from_vec(s.to_vec(), shape, &Device::Cpu).unwrap()).unwrap();
    let parts = if fused {
        distill_loss(var.as_tensor(), targets, labels, c).unwrap()
    } else {
        composite_loss(var.as_tensor(), targets, labels, c).unwrap()
    };
    let grads = parts.total.backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .expect("the student logits get a gradient");
    (
        parts.total.to_scalar::<f32>().unwrap(),
        g.flatten_all().unwrap().to_vec1().unwrap(),
    )
}

#[test]
fn fused_and_composite_match_pytorch() {
    let (s, t, labels) = inputs();
    let dev = Device::Cpu;
    for case in CASES {
        let targets = if case.sparse {
            sparse_targets(&t, N, V, K, &dev)
        } else {
            TeacherTargets::Dense {
                logits: Tensor::from_vec(t.clone(), (N, V), &dev).unwrap(),
            }
        };
        let c = cfg(
            kind(case.kind, case.a),
            case.tau,
            case.alpha_kd,
            case.alpha_ce,
        );
        for fused in [true, false] {
            let (loss, grad) = value_and_grad(&s, (N, V), &targets, &labels, &c, fused);
            let what = format!(
                "{} a={} τ={} sparse={} fused={fused}",
                case.kind, case.a, case.tau, case.sparse
            );
            assert!(
                (loss as f64 - case.loss).abs() <= 2e-5 * case.loss.abs().max(1.0),
                "{what}: loss {loss} vs PyTorch {}",
                case.loss
            );
            for (i, (&g, &want)) in grad.iter().zip(case.grad.iter()).enumerate() {
                assert!(
                    (g as f64 - want).abs() <= 2e-5 + 1e-4 * want.abs(),
                    "{what}: grad[{i}] {g} vs PyTorch {want}"
                );
            }
            // The ignored row gets no gradient at all.
            assert!(grad[2 * V..3 * V].iter().all(|&g| g == 0.0), "{what}");
        }
    }
}

#[test]
fn jsd_endpoints_are_forward_and_reverse_kl() {
    let (s, t, labels) = inputs();
    let targets = TeacherTargets::Dense {
        logits: Tensor::from_vec(t, (N, V), &Device::Cpu).unwrap(),
    };
    for (beta, same) in [(0.0, KdKind::ForwardKl), (1.0, KdKind::ReverseKl)] {
        let a = value_and_grad(
            &s,
            (N, V),
            &targets,
            &labels,
            &cfg(KdKind::Jsd { beta }, 2.0, 1.0, 0.0),
            true,
        );
        let b = value_and_grad(
            &s,
            (N, V),
            &targets,
            &labels,
            &cfg(same, 2.0, 1.0, 0.0),
            true,
        );
        assert_eq!(a, b, "β={beta}");
    }
}

/// A seeded random case at a realistic scale (vocab 1000, 64 positions): the fused op equals
/// the composite candle graph for every kind, dense and sparse.
#[test]
fn fused_equals_composite_on_a_bigger_random_case() {
    use rand::{Rng, SeedableRng};
    let (n, v, k) = (64, 1000, 16);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let s: Vec<f32> = (0..n * v).map(|_| rng.random_range(-6.0..6.0)).collect();
    let t: Vec<f32> = (0..n * v).map(|_| rng.random_range(-8.0..8.0)).collect();
    let labels: Vec<u32> = (0..n)
        .map(|i| {
            if i % 9 == 8 {
                IGNORE
            } else {
                rng.random_range(0..v as u32)
            }
        })
        .collect();
    let dev = Device::Cpu;
    let kinds = [
        KdKind::ForwardKl,
        KdKind::ReverseKl,
        KdKind::Jsd { beta: 0.3 },
        KdKind::SkewForwardKl { alpha: 0.2 },
        KdKind::SkewReverseKl { alpha: 0.2 },
        KdKind::Tvd,
    ];
    for sparse in [false, true] {
        let targets = if sparse {
            sparse_targets(&t, n, v, k, &dev)
        } else {
            TeacherTargets::Dense {
                logits: Tensor::from_vec(t.clone(), (n, v), &dev).unwrap(),
            }
        };
        for kind in kinds {
            for tau in [1.0, 2.0] {
                let c = cfg(kind, tau, 0.8, 0.2);
                let (lf, gf) = value_and_grad(&s, (n, v), &targets, &labels, &c, true);
                let (lc, gc) = value_and_grad(&s, (n, v), &targets, &labels, &c, false);
                let what = format!("{} τ={tau} sparse={sparse}", kind.name());
                assert!(
                    (lf - lc).abs() <= 1e-4 * lc.abs().max(1.0),
                    "{what}: {lf} vs {lc}"
                );
                let gmax = gc.iter().fold(0f32, |m, x| m.max(x.abs()));
                let err = gf
                    .iter()
                    .zip(&gc)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    err <= 1e-4 * gmax.max(1e-3),
                    "{what}: max |Δgrad| {err} (max |grad| {gmax})"
                );
            }
        }
    }
}

#[test]
fn padded_teacher_vocabulary_is_masked() {
    // A teacher with 3 padded ids (huge logits there would dominate if they were not masked):
    // the loss equals the one on the shared ids only.
    let (s, t, labels) = inputs();
    let vt = V + 3;
    let padded: Vec<f32> = t
        .chunks(V)
        .flat_map(|row| row.iter().copied().chain([50.0, 50.0, 50.0]))
        .collect();
    let dev = Device::Cpu;
    let c = cfg(KdKind::ForwardKl, 2.0, 1.0, 0.0);
    let a = value_and_grad(
        &s,
        (N, V),
        &TeacherTargets::Dense {
            logits: Tensor::from_vec(padded, (N, vt), &dev).unwrap(),
        },
        &labels,
        &c,
        true,
    );
    let b = value_and_grad(
        &s,
        (N, V),
        &TeacherTargets::Dense {
            logits: Tensor::from_vec(t, (N, V), &dev).unwrap(),
        },
        &labels,
        &c,
        true,
    );
    assert_eq!(a, b);
}
