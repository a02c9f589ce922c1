//! Per-position metrics, accumulated over an evaluation pass: cross-entropy (→ perplexity, bits
//! per byte), KL(teacher‖student), top-1 / top-5 agreement with the teacher and expected
//! calibration error.

use serde::Serialize;

/// Calibration bins (equal-width over the confidence [0, 1]), as in Guo et al. 2017.
pub const ECE_BINS: usize = 15;

/// What one model's rows add up to.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Accumulator {
    pub tokens: u64,
    /// Σ −log q(label), nats.
    pub ce: f64,
    /// Σ KL(p‖q) over positions compared with the teacher.
    pub kl: f64,
    pub compared: u64,
    pub top1: u64,
    pub top5: u64,
    /// Per bin: (count, Σ confidence, Σ correct).
    pub bins: Vec<(u64, f64, f64)>,
}

impl Accumulator {
    pub fn new() -> Self {
        Self {
            bins: vec![(0, 0.0, 0.0); ECE_BINS],
            ..Default::default()
        }
    }

    pub fn merge(&mut self, o: &Accumulator) {
        self.tokens += o.tokens;
        self.ce += o.ce;
        self.kl += o.kl;
        self.compared += o.compared;
        self.top1 += o.top1;
        self.top5 += o.top5;
        for (a, b) in self.bins.iter_mut().zip(&o.bins) {
            a.0 += b.0;
            a.1 += b.1;
            a.2 += b.2;
        }
    }

    /// Adds a prediction with confidence `conf` (the top probability) that was `correct`.
    pub fn add_calibration(&mut self, conf: f64, correct: bool) {
        let b = ((conf * ECE_BINS as f64) as usize).min(ECE_BINS - 1);
        let bin = &mut self.bins[b];
        bin.0 += 1;
        bin.1 += conf;
        bin.2 += correct as u8 as f64;
    }

    pub fn mean_ce(&self) -> f64 {
        self.ce / self.tokens.max(1) as f64
    }

    pub fn perplexity(&self) -> f64 {
        self.mean_ce().exp()
    }

    /// Σ_b (n_b / N) · |accuracy_b − confidence_b|.
    pub fn ece(&self) -> f64 {
        let n: u64 = self.bins.iter().map(|b| b.0).sum();
        if n == 0 {
            return 0.0;
        }
        self.bins
            .iter()
            .filter(|b| b.0 > 0)
            .map(|&(_, conf, correct)| (conf - correct).abs() / n as f64)
            .sum()
    }
}

/// Summary of one row of logits: its logsumexp, argmax, top-5 ids (most likely first).
#[derive(Debug, Clone)]
pub struct RowSummary {
    pub lse: f32,
    pub argmax: u32,
    pub top5: [u32; 5],
}

pub fn summarize(row: &[f32]) -> RowSummary {
    let mut ids = [0u32; 5];
    let mut lps = [0f32; 5];
    let k = row.len().min(5);
    let lse = distill_core::logits::row_topk(row, &mut ids[..k], &mut lps[..k]);
    RowSummary {
        lse,
        argmax: ids[0],
        top5: ids,
    }
}

pub use distill_core::logits::kl_row;

/// Adds one position of a model's logits `s` (label `label`), compared with the teacher's row
/// `t` when given.
pub fn add_row(
    acc: &mut Accumulator,
    s: &[f32],
    label: u32,
    teacher: Option<(&[f32], &RowSummary)>,
) {
    let sum = summarize(s);
    let lab = label as usize;
    let lq = if lab < s.len() {
        s[lab] - sum.lse
    } else {
        f32::NEG_INFINITY
    };
    acc.tokens += 1;
    acc.ce -= lq as f64;
    let conf = (s[sum.argmax as usize] - sum.lse).exp() as f64;
    acc.add_calibration(conf, sum.argmax == label);
    if let Some((t, ts)) = teacher {
        acc.compared += 1;
        acc.kl += kl_row(t, ts.lse, s, sum.lse);
        acc.top1 += (sum.argmax == ts.argmax) as u64;
        acc.top5 += ts.top5.contains(&sum.argmax) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ece_of_hand_built_predictions() {
        // Four predictions: confidence 0.95 right, 0.95 wrong (bin 14: conf 0.95, acc 0.5),
        // 0.30 right, 0.30 right (bin 4: conf 0.30, acc 1.0).
        // ECE = 2/4·|0.5 − 0.95| + 2/4·|1.0 − 0.30| = 0.225 + 0.35 = 0.575.
        let mut a = Accumulator::new();
        a.add_calibration(0.95, true);
        a.add_calibration(0.95, false);
        a.add_calibration(0.30, true);
        a.add_calibration(0.30, true);
        assert!((a.ece() - 0.575).abs() < 1e-12, "{}", a.ece());
        // A perfectly calibrated set has ECE 0: confidence 0.5, half right.
        let mut b = Accumulator::new();
        b.add_calibration(0.5, true);
        b.add_calibration(0.5, false);
        assert_eq!(b.ece(), 0.0);
    }

    #[test]
    fn a_row_against_itself_agrees_fully() {
        let row = [0.1f32, 2.0, -1.0, 0.5, 3.0, 0.0, 1.0];
        let s = summarize(&row);
        assert_eq!(s.argmax, 4);
        assert_eq!(&s.top5, &[4, 1, 6, 3, 0]);
        let mut a = Accumulator::new();
        add_row(&mut a, &row, 4, Some((&row, &s)));
        assert_eq!((a.top1, a.top5, a.compared), (1, 1, 1));
        assert!(a.kl.abs() < 1e-7);
    }
}
