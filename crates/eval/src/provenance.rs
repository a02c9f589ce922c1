//! Provenance testing: how strong is the evidence that a suspect model was distilled from a
//! candidate teacher? (In the spirit of Nikolić et al., "Model provenance testing for large
//! language models", 2025.)
//!
//! **Signals.** Every model answers the same prompts. White-box (model dirs and token shards):
//! each model's full next-token distribution at every position of held-out sequences, and the
//! similarity of two models on a sequence is `1 − JSD/ln 2` averaged over its positions (1 =
//! identical distributions). Black-box (any OpenAI-compatible endpoint, or a model dir answering
//! the same way): each model's greedy answer; the similarity of two answers is the fraction of the
//! first `words` word positions where both have the same word; when every model's API returned
//! `top_logprobs`, the overlap of the two truncated next-token distributions, `Σ min(p, q)` over
//! the tokens both list, is averaged over the generated positions whose contexts are the same
//! (the first, whose context is the prompt, and each following one while the two answers still
//! agree), and weighed against the text agreement (`BlackBoxOptions::top_weight`: by default the
//! top-logprob overlap alone, as chosen on held-out tuning prompts, see BENCHMARKS.md; the text
//! when some API returns no top logprobs).
//!
//! **Statistic.** Agreement with the teacher alone proves nothing: models trained on the same
//! text, or of one family, agree too. So the suspect is compared with independent *reference*
//! models, per prompt. The null hypothesis is that the suspect is one more reference: a model
//! made like them, without the teacher. Two questions, each a paired difference that the swap of
//! the suspect with a reference negates (so that under the null it is symmetric about 0):
//! 1. for each reference R, `sim(S, T) − sim(R, T)`: the teacher agrees more with the suspect
//!    than with R;
//! 2. for each ordered pair of references (R, O), `[sim(S, T) − sim(S, R)] − [sim(O, T) −
//!    sim(O, R)]`: the suspect leans from R towards the teacher more than the reference O does.
//!    This rejects a suspect that merely agrees with every model more (a stronger model, or one
//!    trained on more of the shared text): it is closer to R as much as to T. It also keeps a
//!    suspect of the references' own family (a model of that family trained on the teacher's
//!    answers) from being excused by its family likeness, which O shares. With one reference
//!    there is no O, and the stricter `sim(S, T) − sim(S, R)` (the suspect agrees more with the
//!    teacher than with R) is asked instead.
//!
//! Each is a one-sided paired sign-flip permutation test on the mean difference over prompts,
//! exact under the null that the suspect and the reference are exchangeable per prompt (with the
//! models held fixed: prompts, not models, are the sample). The single-reference question is not
//! negated by that swap, but the verdict keeps its level through the first question (below). The
//! second question assumes the references are no closer to each other than to a suspect of their
//! kind (references that share a seed or data order make it easier to pass, never the first). The
//! suspect is called derived from T only if every comparison rejects: the p-value is the largest
//! of them (an intersection–union test, valid at level α without correction). With several
//! candidate teachers the p-values are Holm-adjusted across teachers. The effect size is the
//! binding comparison's standardised mean difference (mean / sd of the per-prompt differences).

use crate::logits_rows;
use candle_core::Tensor;
use distill_core::shards::TokenShards;
use distill_core::{CausalLm, Error, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Fewer prompts make a verdict hang on a handful of answers: at n prompts the exact sign-flip
/// test's smallest p-value is 2⁻ⁿ (below 7 it cannot reach 0.01), and with the Monte Carlo
/// version the floor is 1/(permutations + 1) anyway.
pub const MIN_PROMPTS: usize = 20;

/// One model's black-box answers: per prompt the text, and per generated token its top
/// alternatives when the API returned them.
#[derive(Debug, Clone)]
pub struct Answers {
    pub name: String,
    pub texts: Vec<String>,
    /// Per prompt, per generated position, the (token, logprob) alternatives: the token the
    /// model generated first, then the other listed ones.
    pub top: Option<Vec<Vec<TopK>>>,
}

/// The alternatives at one generated position: (token, logprob), the generated token first.
pub type TopK = Vec<(String, f64)>;

/// Fraction of the first `words` word positions (of the longer answer, at most `words`) where
/// the two answers have the same word; two empty answers agree fully.
pub fn text_similarity(a: &str, b: &str, words: usize) -> f64 {
    let wa: Vec<&str> = a.split_whitespace().take(words).collect();
    let wb: Vec<&str> = b.split_whitespace().take(words).collect();
    let n = wa.len().max(wb.len());
    if n == 0 {
        return 1.0;
    }
    wa.iter().zip(&wb).filter(|(x, y)| x == y).count() as f64 / n as f64
}

/// The overlap `Σ min(p, q)` of two answers' listed next-token distributions, averaged over the
/// positions with the same context: the first (the prompt) and each next one while the tokens
/// generated so far agree, up to `positions`. 1 when neither answer has a position.
pub fn top_similarity(a: &[TopK], b: &[TopK], positions: usize) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for (x, y) in a.iter().zip(b).take(positions) {
        let overlap: f64 = x
            .iter()
            .filter_map(|(t, lp)| {
                y.iter()
                    .find(|(u, _)| u == t)
                    .map(|(_, lq)| lp.exp().min(lq.exp()))
            })
            .sum();
        sum += overlap;
        n += 1;
        if x.first().map(|f| &f.0) != y.first().map(|f| &f.0) {
            break; // the answers part here: later positions have other contexts
        }
    }
    match (n, a.is_empty() && b.is_empty()) {
        (0, true) => 1.0,
        (0, false) => 0.0,
        _ => sum / n as f64,
    }
}

/// Per-prompt similarity of every pair of models.
#[derive(Debug, Clone, Serialize)]
pub struct Similarities {
    pub names: Vec<String>,
    pub prompts: usize,
    /// `pairs[i][j]` for i < j: per prompt.
    #[serde(skip)]
    pairs: Vec<Vec<Vec<f64>>>,
    /// The signals the similarities were computed from.
    pub signals: Vec<String>,
}

impl Similarities {
    pub fn new(names: Vec<String>, prompts: usize, signals: Vec<String>) -> Self {
        let n = names.len();
        Self {
            pairs: vec![vec![Vec::new(); n]; n],
            names,
            prompts,
            signals,
        }
    }

    pub fn set(&mut self, a: usize, b: usize, values: Vec<f64>) {
        let (i, j) = (a.min(b), a.max(b));
        self.pairs[i][j] = values;
    }

    /// Per prompt, the similarity of models `a` and `b` (symmetric; a model with itself is 1).
    pub fn get(&self, a: usize, b: usize) -> Vec<f64> {
        if a == b {
            return vec![1.0; self.prompts];
        }
        self.pairs[a.min(b)][a.max(b)].clone()
    }

    pub fn mean(&self, a: usize, b: usize) -> f64 {
        let v = self.get(a, b);
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }
}

/// How two black-box answers are compared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlackBoxOptions {
    /// Words of the greedy answers compared.
    pub words: usize,
    /// The weight of the top-logprob overlap when every model's API returned top logprobs; the
    /// text agreement gets `1 − top_weight` (all of it without top logprobs).
    pub top_weight: f64,
    /// Generated positions whose top logprobs are compared (the first, whose context is the
    /// prompt, and the next ones while the two answers agree).
    pub top_positions: usize,
}

impl Default for BlackBoxOptions {
    fn default() -> Self {
        Self {
            words: 16,
            // Chosen on the speaking zoo's dev prompts (BENCHMARKS.md, "A zoo whose models all
            // speak"): the top-logprob overlap alone found the most derived models there, with
            // no independent one called derived; the greedy words alone found none.
            top_weight: 1.0,
            top_positions: 16,
        }
    }
}

impl BlackBoxOptions {
    /// Refuses weights outside [0, 1] and a top-logprob signal that compares no position.
    pub fn check(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.top_weight) {
            return Err(Error::Msg(format!(
                "top-weight {}: expected a weight in [0, 1]",
                self.top_weight
            )));
        }
        if self.top_positions == 0 && self.top_weight > 0.0 {
            return Err(Error::Msg(
                "top-positions 0 with a positive top-weight: compare at least the first \
                 generated position, or give top-weight 0"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Black-box similarities of `answers` (one per model, the same prompts in the same order).
pub fn black_box_similarities(answers: &[Answers], opts: BlackBoxOptions) -> Result<Similarities> {
    let n = answers.first().map_or(0, |a| a.texts.len());
    if let Some(a) = answers.iter().find(|a| a.texts.len() != n) {
        return Err(Error::Msg(format!(
            "{} answered {} prompts, {} answered {n}",
            a.name,
            a.texts.len(),
            answers[0].name
        )));
    }
    opts.check()?;
    let with_top = answers.iter().all(|a| a.top.is_some());
    // The weight the text gets: all of it when some API returned no top logprobs.
    let w_top = if with_top { opts.top_weight } else { 0.0 };
    let mut signals = Vec::new();
    if w_top < 1.0 {
        signals.push(format!(
            "greedy answers (first {} words; weight {:.2})",
            opts.words,
            1.0 - w_top
        ));
    }
    if with_top && w_top > 0.0 {
        signals.push(format!(
            "top_logprobs (overlap of the listed next-token distributions at the first {} \
             generated position(s) while the contexts agree; weight {w_top:.2})",
            opts.top_positions
        ));
    }
    if !with_top {
        signals.push("not every model returned top_logprobs: text only".into());
    }
    let names = answers.iter().map(|a| a.name.clone()).collect();
    let mut sims = Similarities::new(names, n, signals);
    for i in 0..answers.len() {
        for j in i + 1..answers.len() {
            let (a, b) = (&answers[i], &answers[j]);
            let v = (0..n)
                .map(|p| {
                    let t = if w_top < 1.0 {
                        text_similarity(&a.texts[p], &b.texts[p], opts.words)
                    } else {
                        0.0
                    };
                    match (&a.top, &b.top) {
                        (Some(ta), Some(tb)) if w_top > 0.0 => {
                            (1.0 - w_top) * t
                                + w_top * top_similarity(&ta[p], &tb[p], opts.top_positions)
                        }
                        _ => t,
                    }
                })
                .collect();
            sims.set(i, j, v);
        }
    }
    Ok(sims)
}

/// `1 − JSD(p, q)/ln 2` of two logit rows (over the first `min(len)` ids).
fn js_similarity(a: &[f32], b: &[f32]) -> f64 {
    let v = a.len().min(b.len());
    let lse = |r: &[f32]| {
        let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        m as f64 + r.iter().map(|&x| ((x - m) as f64).exp()).sum::<f64>().ln()
    };
    let (la, lb) = (lse(&a[..v]), lse(&b[..v]));
    let mut js = 0.0;
    for k in 0..v {
        let p = (a[k] as f64 - la).exp();
        let q = (b[k] as f64 - lb).exp();
        let m = 0.5 * (p + q);
        if p > 0.0 {
            js += 0.5 * p * (p / m).ln();
        }
        if q > 0.0 {
            js += 0.5 * q * (q / m).ln();
        }
    }
    (1.0 - js / std::f64::consts::LN_2).clamp(0.0, 1.0)
}

/// White-box similarities: every model's next-token distributions on the first `sequences`
/// sequences of `shards`; one "prompt" per sequence. The models must share a tokenizer (the
/// caller checks).
pub fn white_box_similarities(
    models: &[(String, &CausalLm)],
    shards: &TokenShards,
    sequences: usize,
    device: &candle_core::Device,
) -> Result<Similarities> {
    let n = sequences.min(shards.len());
    let t = shards.seq_len();
    let names = models.iter().map(|m| m.0.clone()).collect();
    let mut sims = Similarities::new(
        names,
        n,
        vec![format!(
            "next-token distributions at every position of {n} held-out sequences of {t} tokens"
        )],
    );
    let m = models.len();
    let mut per: Vec<Vec<Vec<f64>>> = vec![vec![Vec::with_capacity(n); m]; m];
    for s in 0..n {
        let input = Tensor::from_vec(shards.sequence(s).to_vec(), (1, t), device)?;
        let rows: Vec<(Vec<f32>, usize)> = models
            .iter()
            .map(|(_, model)| logits_rows(model, &input))
            .collect::<Result<_>>()?;
        for i in 0..m {
            for j in i + 1..m {
                let (a, va) = (&rows[i].0, rows[i].1);
                let (b, vb) = (&rows[j].0, rows[j].1);
                let mean = (0..t)
                    .into_par_iter()
                    .map(|r| js_similarity(&a[r * va..(r + 1) * va], &b[r * vb..(r + 1) * vb]))
                    .sum::<f64>()
                    / t as f64;
                per[i][j].push(mean);
            }
        }
    }
    for (i, row) in per.into_iter().enumerate() {
        for (j, v) in row.into_iter().enumerate() {
            if j > i {
                sims.set(i, j, v);
            }
        }
    }
    Ok(sims)
}

/// One-sided paired sign-flip permutation test of mean(d) > 0: the share of `permutations`
/// random sign patterns (seeded) whose mean is at least the observed one, with the observed
/// pattern counted (so p ≥ 1/(permutations + 1)).
pub fn sign_flip_p(d: &[f64], permutations: usize, seed: u64) -> f64 {
    use rand::{Rng, SeedableRng};
    let observed: f64 = d.iter().sum();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut at_least = 0usize;
    for _ in 0..permutations {
        let s: f64 = d
            .iter()
            .map(|&x| if rng.random::<bool>() { x } else { -x })
            .sum();
        // A tolerance for float sums of the same values in another order.
        if s >= observed - 1e-12 * (1.0 + observed.abs()) {
            at_least += 1;
        }
    }
    (1 + at_least) as f64 / (1 + permutations) as f64
}

/// Holm's step-down adjustment of p-values (same order as given).
pub fn holm(p: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let m = p.len();
    let mut out = vec![0.0; m];
    let mut running: f64 = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p[i]).min(1.0));
        out[i] = running;
    }
    out
}

/// One comparison of the suspect against one reference.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub reference: String,
    /// `teacher-closer-to-suspect` (sim(S,T) − sim(R,T)); `suspect-leans-to-teacher`
    /// ([sim(S,T) − sim(S,R)] − [sim(O,T) − sim(O,R)], the reference named "R (against O)"); or,
    /// with a single reference, `suspect-closer-to-teacher` (sim(S,T) − sim(S,R)).
    pub question: String,
    pub mean_difference: f64,
    pub effect_size: f64,
    pub p_value: f64,
}

/// The verdict for one candidate teacher.
#[derive(Debug, Clone, Serialize)]
pub struct TeacherVerdict {
    pub teacher: String,
    /// Mean sim(S, T) and, per reference, mean sim(R, T).
    pub suspect_similarity: f64,
    pub reference_similarity: Vec<(String, f64)>,
    /// The largest p-value of the comparisons (intersection–union test).
    pub p_value: f64,
    /// Holm-adjusted across the candidate teachers.
    pub p_adjusted: f64,
    /// The binding comparison's standardised mean difference.
    pub effect_size: f64,
    pub derived: bool,
    pub comparisons: Vec<Comparison>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProvenanceReport {
    pub suspect: String,
    pub references: Vec<String>,
    pub mode: String,
    pub signals: Vec<String>,
    pub prompts: usize,
    pub alpha: f64,
    pub permutations: usize,
    pub teachers: Vec<TeacherVerdict>,
    /// Per-prompt similarities behind the verdicts (suspect–teacher, reference–teacher), for
    /// the plot and for anyone re-analysing.
    pub distributions: Vec<(String, Vec<f64>)>,
}

fn mean_sd(d: &[f64]) -> (f64, f64) {
    let n = d.len().max(1) as f64;
    let mean = d.iter().sum::<f64>() / n;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// Options of [`test`].
#[derive(Debug, Clone, Copy)]
pub struct TestOptions {
    pub alpha: f64,
    pub permutations: usize,
    pub seed: u64,
}

impl Default for TestOptions {
    fn default() -> Self {
        Self {
            alpha: 0.01,
            permutations: 9999,
            seed: 0,
        }
    }
}

/// Tests whether model `suspect` derives from each of `teachers` (indices into `sims`), against
/// the independent `references`. Refuses without references or with fewer than [`MIN_PROMPTS`]
/// prompts.
pub fn test(
    sims: &Similarities,
    teachers: &[usize],
    suspect: usize,
    references: &[usize],
    mode: &str,
    opts: TestOptions,
) -> Result<ProvenanceReport> {
    if references.is_empty() {
        return Err(Error::Msg(
            "no --reference models: agreement with the teacher alone cannot tell distillation \
             from shared training data or a shared model family; give at least one independent \
             reference model (two or more make the test stronger)"
                .into(),
        ));
    }
    if sims.prompts < MIN_PROMPTS {
        return Err(Error::Msg(format!(
            "too few prompts: {} answered, the test needs at least {MIN_PROMPTS} (a few hundred \
             for a useful power)",
            sims.prompts
        )));
    }
    if !(opts.alpha > 0.0 && opts.alpha < 1.0) {
        return Err(Error::Msg(format!(
            "--alpha {}: expected a significance level in (0, 1)",
            opts.alpha
        )));
    }
    let name = |i: usize| sims.names[i].clone();
    // A NaN similarity (NaN logits, a broken answer) would pass every comparison as "at least
    // as large": refuse it instead of reporting a tiny p-value.
    for &a in std::iter::once(&suspect).chain(teachers).chain(references) {
        for &b in teachers.iter().chain(references) {
            if let Some(i) = sims.get(a, b).iter().position(|v| !v.is_finite()) {
                return Err(Error::Msg(format!(
                    "the similarity of {} and {} is not finite on prompt {} (NaN logits or \
                     log-probabilities?)",
                    name(a),
                    name(b),
                    i + 1
                )));
            }
        }
    }
    let mut verdicts = Vec::new();
    let mut distributions = Vec::new();
    for (ti, &t) in teachers.iter().enumerate() {
        let st = sims.get(suspect, t);
        distributions.push((format!("{} – {}", name(suspect), name(t)), st.clone()));
        let mut comparisons = Vec::new();
        let mut reference_similarity = Vec::new();
        let mut k = 0u64;
        let mut compare = |reference: String, question: &str, d: Vec<f64>| {
            let (mean, sd) = mean_sd(&d);
            k += 1;
            Comparison {
                reference,
                question: question.into(),
                mean_difference: mean,
                // Every prompt the same difference: an unbounded effect (0 when none).
                effect_size: match (sd > 0.0, mean == 0.0) {
                    (true, _) => mean / sd,
                    (false, true) => 0.0,
                    (false, false) => mean.signum() * f64::INFINITY,
                },
                p_value: sign_flip_p(&d, opts.permutations, opts.seed ^ (ti as u64 * 1000 + k)),
            }
        };
        let minus =
            |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x - y).collect() };
        for &r in references {
            let rt = sims.get(r, t);
            reference_similarity.push((name(r), sims.mean(r, t)));
            distributions.push((format!("{} – {}", name(r), name(t)), rt.clone()));
            comparisons.push(compare(
                name(r),
                "teacher-closer-to-suspect",
                minus(&st, &rt),
            ));
        }
        match references {
            [r] => {
                let sr = sims.get(suspect, *r);
                comparisons.push(compare(
                    name(*r),
                    "suspect-closer-to-teacher",
                    minus(&st, &sr),
                ));
            }
            _ => {
                for &r in references {
                    let lean = minus(&st, &sims.get(suspect, r));
                    for &o in references.iter().filter(|&&o| o != r) {
                        let other = minus(&sims.get(o, t), &sims.get(o, r));
                        comparisons.push(compare(
                            format!("{} (against {})", name(r), name(o)),
                            "suspect-leans-to-teacher",
                            minus(&lean, &other),
                        ));
                    }
                }
            }
        }
        let binding = comparisons
            .iter()
            .max_by(|a, b| {
                a.p_value
                    .total_cmp(&b.p_value)
                    .then(b.effect_size.total_cmp(&a.effect_size))
            })
            .expect("at least one reference");
        verdicts.push(TeacherVerdict {
            teacher: name(t),
            suspect_similarity: sims.mean(suspect, t),
            reference_similarity,
            p_value: binding.p_value,
            p_adjusted: binding.p_value,
            effect_size: binding.effect_size,
            derived: false,
            comparisons,
        });
    }
    let adjusted = holm(&verdicts.iter().map(|v| v.p_value).collect::<Vec<_>>());
    for (v, p) in verdicts.iter_mut().zip(adjusted) {
        v.p_adjusted = p;
        // Every comparison must favour the teacher (a positive mean), not only be "significant".
        v.derived = p <= opts.alpha && v.comparisons.iter().all(|c| c.mean_difference > 0.0);
    }
    Ok(ProvenanceReport {
        suspect: name(suspect),
        references: references.iter().map(|&r| name(r)).collect(),
        mode: mode.into(),
        signals: sims.signals.clone(),
        prompts: sims.prompts,
        alpha: opts.alpha,
        permutations: opts.permutations,
        teachers: verdicts,
        distributions,
    })
}

pub fn markdown(r: &ProvenanceReport) -> String {
    let mut s = format!(
        "# Provenance: is `{}` distilled from …?\n\n{} test on {} prompts; signals: {}. \
         References (independent models): {}. Significance level α = {}; sign-flip permutation \
         tests with {} permutations; p-values Holm-adjusted across {} candidate teacher(s).\n\n",
        r.suspect,
        r.mode,
        r.prompts,
        r.signals.join("; "),
        r.references
            .iter()
            .map(|x| format!("`{x}`"))
            .collect::<Vec<_>>()
            .join(", "),
        r.alpha,
        r.permutations,
        r.teachers.len()
    );
    s.push_str("| candidate teacher | sim(suspect, teacher) | sim(reference, teacher) | p | p (Holm) | effect size | verdict |\n|---|---:|---|---:|---:|---:|---|\n");
    for v in &r.teachers {
        let refs: Vec<String> = v
            .reference_similarity
            .iter()
            .map(|(n, x)| format!("{n}: {x:.3}"))
            .collect();
        s.push_str(&format!(
            "| {} | {:.3} | {} | {:.2e} | {:.2e} | {:.2} | {} |\n",
            v.teacher,
            v.suspect_similarity,
            refs.join(", "),
            v.p_value,
            v.p_adjusted,
            v.effect_size,
            if v.derived {
                "**derived**"
            } else {
                "not shown to be derived"
            }
        ));
    }
    s.push_str("\n## Comparisons\n\n| teacher | reference | question | mean difference | effect size | p |\n|---|---|---|---:|---:|---:|\n");
    for v in &r.teachers {
        for c in &v.comparisons {
            s.push_str(&format!(
                "| {} | {} | {} | {:+.4} | {:.2} | {:.2e} |\n",
                v.teacher, c.reference, c.question, c.mean_difference, c.effect_size, c.p_value
            ));
        }
    }
    s.push_str(
        "\n\"Derived\" means: on these prompts the teacher agrees with the suspect more than with \
         every reference, and the suspect leans towards the teacher (away from each reference) \
         more than the other references do (with one reference: agrees more with the teacher \
         than with it), beyond chance at level α. It \
         does not say how (distillation, fine-tuning from its weights, or training on its \
         outputs), and \"not shown\" is not proof of independence: a student fine-tuned \
         elsewhere after distillation, collection through paraphrased prompts, or references \
         that are themselves derived all weaken the test. See README's section on provenance.\n",
    );
    s
}

/// Writes `report.md`, `report.json` and `agreement.png` (the per-prompt similarity
/// distributions as empirical CDFs) into `out`.
pub fn write_report(r: &ProvenanceReport, out: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let md = out.join("report.md");
    distill_core::fsio::write_atomic(&md, markdown(r).as_bytes())?;
    let json = out.join("report.json");
    distill_core::fsio::write_atomic(
        &json,
        serde_json::to_string_pretty(r)
            .expect("the report serialises")
            .as_bytes(),
    )?;
    let png = out.join("agreement.png");
    let mut seen = std::collections::HashSet::new();
    let series: Vec<(String, Vec<(f64, f64)>)> = r
        .distributions
        .iter()
        .filter(|(n, _)| seen.insert(n.clone()))
        .map(|(n, v)| {
            let mut v = v.clone();
            v.sort_by(f64::total_cmp);
            let k = v.len().max(1) as f64;
            (
                n.clone(),
                v.iter()
                    .enumerate()
                    .map(|(i, &x)| (x, (i + 1) as f64 / k))
                    .collect(),
            )
        })
        .collect();
    crate::report::plot_lines(
        &png,
        "Per-prompt agreement (empirical CDF)",
        "similarity",
        "fraction of prompts ≤ x",
        &series,
    )?;
    Ok(vec![md, json, png])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn text_and_top_similarities_of_hand_built_answers() {
        assert_eq!(text_similarity("the cat sat", "the cat ran", 8), 2.0 / 3.0);
        assert_eq!(text_similarity("a b", "a b c d", 8), 0.5);
        assert_eq!(text_similarity("", "", 8), 1.0);
        assert_eq!(text_similarity("x y z", "x q z w", 2), 0.5);
        let ln = f64::ln;
        let a: Vec<TopK> = vec![
            vec![("x".into(), ln(0.6)), ("y".into(), ln(0.3))],
            vec![("z".into(), ln(0.9))],
            vec![("q".into(), ln(0.5))],
        ];
        let b: Vec<TopK> = vec![
            vec![("x".into(), ln(0.5)), ("w".into(), ln(0.4))],
            vec![("z".into(), ln(0.7)), ("y".into(), ln(0.2))],
            vec![("r".into(), ln(0.5))],
        ];
        // Position 0 (same prompt): min(0.6, 0.5) = 0.5; both chose x, so position 1 shares its
        // context: min(0.9, 0.7) = 0.7; both chose z: position 2 counts (0), then they part.
        assert!((top_similarity(&a, &b, 8) - (0.5 + 0.7 + 0.0) / 3.0).abs() < 1e-12);
        assert!((top_similarity(&a, &b, 1) - 0.5).abs() < 1e-12);
        let c: Vec<TopK> = vec![vec![("y".into(), ln(0.8))], vec![("z".into(), ln(0.9))]];
        // c chose y, a chose x at position 0: only position 0 is comparable.
        assert!((top_similarity(&a, &c, 8) - 0.3).abs() < 1e-12);
    }

    #[test]
    fn holm_and_the_sign_flip_test() {
        let adj = holm(&[0.01, 0.04, 0.03]);
        assert!((adj[0] - 0.03).abs() < 1e-12 && (adj[2] - 0.06).abs() < 1e-12);
        assert!((adj[1] - 0.06).abs() < 1e-12, "{adj:?}");
        // All positive differences: only the identity pattern (and any equal one) reaches them.
        let p = sign_flip_p(&[1.0; 30], 999, 1);
        assert!(p < 0.01, "{p}");
        // Symmetric differences: not significant.
        let d: Vec<f64> = (0..40)
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        assert!(sign_flip_p(&d, 999, 1) > 0.3);
    }

    fn words(words: usize) -> BlackBoxOptions {
        BlackBoxOptions {
            words,
            ..Default::default()
        }
    }

    /// How one model of a synthetic world answers, word by word: the teacher's word with
    /// probability `copy` (a derived model), else its family's with probability `family` (a
    /// shared base model), else the common word every model trained on the same text tends to
    /// give with probability `common`, else a word of its own.
    #[derive(Clone, Copy)]
    struct Kind {
        copy: f64,
        family: f64,
        common: f64,
    }

    const PLAIN: Kind = Kind {
        copy: 0.0,
        family: 0.0,
        common: 0.5,
    };

    /// A synthetic world of `n` prompts of 10 words: model 0 is the teacher (plain), model 1 the
    /// suspect, then the references.
    fn world_of(
        rng: &mut rand_chacha::ChaCha8Rng,
        suspect: Kind,
        refs: &[Kind],
        n: usize,
    ) -> Vec<Answers> {
        let words = 10;
        let draw = |rng: &mut rand_chacha::ChaCha8Rng| -> Vec<Vec<u32>> {
            (0..n)
                .map(|_| (0..words).map(|_| rng.random_range(0..40)).collect())
                .collect()
        };
        let (common, family) = (draw(rng), draw(rng));
        let answer =
            |rng: &mut rand_chacha::ChaCha8Rng, k: Kind, teacher: Option<&Vec<Vec<u32>>>| {
                (0..n)
                    .map(|p| {
                        (0..words)
                            .map(|w| match teacher {
                                Some(t) if rng.random::<f64>() < k.copy => t[p][w],
                                _ if rng.random::<f64>() < k.family => family[p][w],
                                _ if rng.random::<f64>() < k.common => common[p][w],
                                _ => rng.random_range(0..40),
                            })
                            .collect::<Vec<u32>>()
                    })
                    .collect::<Vec<_>>()
            };
        let teacher = answer(rng, PLAIN, None);
        let suspect = answer(rng, suspect, Some(&teacher));
        let mut out = vec![teacher, suspect];
        for &k in refs {
            out.push(answer(rng, k, None));
        }
        out.into_iter()
            .enumerate()
            .map(|(i, a)| Answers {
                name: format!("m{i}"),
                texts: a
                    .iter()
                    .map(|ws| {
                        ws.iter()
                            .map(|w| format!("w{w}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .collect(),
                top: None,
            })
            .collect()
    }

    /// Plain models: a derived one copies the teacher's words with probability `copy`.
    fn world(rng: &mut rand_chacha::ChaCha8Rng, refs: usize, copy: f64, n: usize) -> Vec<Answers> {
        world_of(rng, Kind { copy, ..PLAIN }, &vec![PLAIN; refs], n)
    }

    /// The share of `trials` worlds in which the suspect is called derived from model 0 against
    /// the references (models 2…).
    fn called_derived(
        trials: usize,
        opts: TestOptions,
        mut make: impl FnMut(&mut rand_chacha::ChaCha8Rng) -> Vec<Answers>,
    ) -> f64 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let mut hits = 0;
        for _ in 0..trials {
            let a = make(&mut rng);
            let refs: Vec<usize> = (2..a.len()).collect();
            let sims = black_box_similarities(&a, words(10)).unwrap();
            hits += test(&sims, &[0], 1, &refs, "black-box", opts)
                .unwrap()
                .teachers[0]
                .derived as usize;
        }
        hits as f64 / trials as f64
    }

    #[test]
    fn a_suspect_of_the_references_family_is_judged_by_its_lean_not_its_likeness() {
        let opts = TestOptions {
            alpha: 0.05,
            permutations: 499,
            seed: 5,
        };
        let fam = Kind {
            family: 0.5,
            ..PLAIN
        };
        let refs = [fam, fam];
        // The references' family, trained on the teacher's answers (API distillation into
        // another family): closer to its own family than to the teacher, and still derived.
        let copier = Kind { copy: 0.3, ..fam };
        let found = called_derived(100, opts, |rng| world_of(rng, copier, &refs, 60));
        assert!(found > 0.9, "found {found}");
        // One more model of that family, without the teacher: the null.
        let fpr = called_derived(200, opts, |rng| world_of(rng, fam, &refs, 60));
        assert!(fpr <= opts.alpha, "false-positive rate {fpr}");
        // A model that agrees with everyone more (more of the shared text): the teacher agrees
        // more with it than with the references, but it leans to no one.
        let agreeable = Kind {
            common: 0.8,
            ..PLAIN
        };
        let agreeable_fpr = called_derived(200, opts, |rng| {
            world_of(rng, agreeable, &[PLAIN, PLAIN], 60)
        });
        eprintln!(
            "family copier found {found}; family null {fpr}; agreeable {agreeable_fpr} called derived"
        );
        assert!(
            agreeable_fpr <= opts.alpha,
            "agreeable model called derived in {agreeable_fpr}"
        );
    }

    #[test]
    fn under_the_null_the_false_positive_rate_is_at_most_alpha_and_a_copy_is_found() {
        let opts = TestOptions {
            alpha: 0.05,
            permutations: 499,
            seed: 3,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (trials, mut false_pos, mut found) = (200, 0, 0);
        for _ in 0..trials {
            // Null: the "suspect" is one more independent model (copy = 0), as references are
            // to each other.
            let a = world(&mut rng, 2, 0.0, 60);
            let sims = black_box_similarities(&a, words(10)).unwrap();
            let r = test(&sims, &[0], 1, &[2, 3], "black-box", opts).unwrap();
            false_pos += r.teachers[0].derived as usize;
            // A student that copies 30% of the teacher's words.
            let a = world(&mut rng, 2, 0.3, 60);
            let sims = black_box_similarities(&a, words(10)).unwrap();
            found += test(&sims, &[0], 1, &[2, 3], "black-box", opts)
                .unwrap()
                .teachers[0]
                .derived as usize;
        }
        let fpr = false_pos as f64 / trials as f64;
        eprintln!(
            "null: {false_pos} of {trials} called derived; 30% copies: {found} of {trials} found"
        );
        assert!(
            fpr <= opts.alpha,
            "false-positive rate {fpr} at α = {}",
            opts.alpha
        );
        assert!(
            found as f64 / trials as f64 > 0.9,
            "found {found} of {trials}"
        );
    }

    #[test]
    fn no_references_or_too_few_prompts_are_refused() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let a = world(&mut rng, 1, 0.5, 30);
        let sims = black_box_similarities(&a, words(10)).unwrap();
        let err = test(&sims, &[0], 1, &[], "black-box", TestOptions::default()).unwrap_err();
        assert!(err.to_string().contains("no --reference"), "{err}");
        let few = black_box_similarities(
            &a.iter()
                .map(|x| Answers {
                    texts: x.texts[..5].to_vec(),
                    ..x.clone()
                })
                .collect::<Vec<_>>(),
            words(10),
        )
        .unwrap();
        let err = test(&few, &[0], 1, &[2], "black-box", TestOptions::default()).unwrap_err();
        assert!(err.to_string().contains("too few prompts"), "{err}");
        // Signal weights that compare nothing, or out of range.
        for (w, k) in [(0.5, 0), (1.5, 4), (-0.1, 4)] {
            let o = BlackBoxOptions {
                words: 10,
                top_weight: w,
                top_positions: k,
            };
            assert!(black_box_similarities(&a, o).is_err(), "{o:?}");
        }
        // A NaN similarity (say, NaN logits) is refused, not counted as agreement.
        let mut bad = sims.clone();
        let mut v = bad.get(1, 2);
        v[4] = f64::NAN;
        bad.set(1, 2, v);
        let err = test(&bad, &[0], 1, &[2], "black-box", TestOptions::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("m1 and m2 is not finite on prompt 5"),
            "{err}"
        );
    }

    #[test]
    fn identical_differences_on_every_prompt_are_an_unbounded_effect() {
        let names: Vec<String> = ["t", "s", "r"].iter().map(|n| n.to_string()).collect();
        let mut sims = Similarities::new(names, 30, vec!["text".into()]);
        sims.set(0, 1, vec![0.9; 30]);
        sims.set(0, 2, vec![0.4; 30]);
        sims.set(1, 2, vec![0.4; 30]);
        let r = test(&sims, &[0], 1, &[2], "black-box", TestOptions::default()).unwrap();
        let v = &r.teachers[0];
        assert!(v.derived, "{v:?}");
        assert!(v.comparisons.iter().all(|c| c.effect_size == f64::INFINITY));
    }
}
