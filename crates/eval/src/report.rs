//! The report: `report.md` (a table, one row per model, teacher first, and side-by-side
//! generations), `report.json` (the same numbers), and PNG plots drawn with plotters.

use crate::Report;
use distill_core::fsio::write_atomic;
use distill_core::run_dir::Record;
use distill_core::{Error, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

fn opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map(f).unwrap_or_else(|| "–".into())
}

pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "# distill eval\n\n{} predicted tokens ({} bytes of text) from `{}` split `{}`; {} with {} threads.\n\n",
        r.tokens,
        r.bytes,
        r.tokens_dir.display(),
        r.split,
        r.device,
        r.threads
    ));
    s.push_str("| model | params | non-emb. | size | perplexity | bits/byte | KL(t‖s) | KL own text | top-1 | top-5 | ECE | prefill tok/s | decode tok/s | speed-up |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for m in &r.models {
        let name = if m.is_teacher {
            format!("**{}** (teacher)", m.name)
        } else {
            m.name.clone()
        };
        s.push_str(&format!(
            "| {name} | {:.1}M | {:.1}M | {:.0} MB | {:.2} | {:.3} | {} | {} | {} | {} | {:.3} | {} | {} | {} |\n",
            m.params as f64 / 1e6,
            m.non_embedding_params as f64 / 1e6,
            m.size_on_disk_bytes as f64 / 1e6,
            m.perplexity,
            m.bits_per_byte,
            opt(m.kl_to_teacher, |x| format!("{x:.3}")),
            opt(m.kl_on_own_text, |x| format!("{x:.3}")),
            opt(m.top1_agreement, |x| format!("{:.1}%", 100.0 * x)),
            opt(m.top5_agreement, |x| format!("{:.1}%", 100.0 * x)),
            m.ece,
            opt(m.prefill_tokens_per_second, |x| format!("{x:.0}")),
            opt(m.decode_tokens_per_second, |x| format!("{x:.1}")),
            opt(m.speedup, |x| format!("{x:.1}×")),
        ));
    }
    let notes: Vec<String> = r
        .models
        .iter()
        .filter_map(|m| m.note.as_ref().map(|n| format!("- {}: {n}", m.name)))
        .collect();
    if !notes.is_empty() {
        s.push_str(&format!("\n{}\n", notes.join("\n")));
    }
    s.push_str(
        "\nKL(t‖s): mean KL(teacher‖student) per token at temperature 1 (nats). KL own text: the \
         same on the student's own continuations of held-out prompts (sampled at temperature 1; \
         exposure bias). top-1: the \
         student's most likely token is the teacher's; top-5: it is among the teacher's 5 most \
         likely. ECE: expected calibration error of the top prediction against the actual next \
         token, 15 equal-width bins. Speed: full-sequence prefill at batch 1 and greedy decode \
         with the KV cache, measured in this run.\n",
    );
    if !r.generations.is_empty() {
        s.push_str("\n## Greedy generations\n");
        for g in &r.generations {
            s.push_str(&format!(
                "\n**Prompt:** {}\n\n",
                g.prompt.replace('\n', " ")
            ));
            for (name, text) in &g.completions {
                s.push_str(&format!(
                    "- *{name}*: {}\n",
                    text.trim().replace('\n', " ").replace('|', "\\|")
                ));
            }
        }
    }
    s
}

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is bundled (DejaVu Sans, Bitstream Vera licence): plots render the same on
        // any machine, with no system fonts.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::file(path, format!("drawing plot: {e}"))
}

/// Perplexity against parameters (log–log), one labelled point per model.
pub fn plot_perplexity_vs_params(r: &Report, path: &Path) -> Result<()> {
    register_font();
    // Models at the same point (a run's last checkpoint and its final/) share one label.
    let mut pts: Vec<(f64, f64, String, bool)> = Vec::new();
    for m in &r.models {
        let (x, y) = (m.params as f64, m.perplexity);
        match pts.iter_mut().find(|p| p.0 == x && (p.1 - y).abs() < 1e-9) {
            Some(p) => p.2 = format!("{}, {}", p.2, m.name),
            None => pts.push((x, y, m.name.clone(), m.is_teacher)),
        }
    }
    let (xmin, xmax) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let (ymin, ymax) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Perplexity vs parameters (validation)", ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(
            ((xmin / 2.0)..(xmax * 8.0)).log_scale(),
            ((ymin / 1.5)..(ymax * 1.5)).log_scale(),
        )
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("parameters (log scale)")
        .y_desc("perplexity (log scale)")
        .x_labels(8)
        .y_labels(20)
        .x_label_formatter(&|x| format!("{:.0}M", x / 1e6))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    for (x, y, name, teacher) in &pts {
        let color = if *teacher { RED } else { BLUE };
        chart
            .draw_series(std::iter::once(Circle::new((*x, *y), 6, color.filled())))
            .map_err(|e| plot_err(path, e))?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{name} ({:.1}M, ppl {y:.1})", x / 1e6),
                (*x * 1.08, *y * 1.04),
                ("sans-serif", 14),
            )))
            .map_err(|e| plot_err(path, e))?;
    }
    root.present().map_err(|e| plot_err(path, e))
}

/// A line plot of named series of (x, y) points.
pub fn plot_lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    register_font();
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.iter().copied()).collect();
    if all.is_empty() {
        return Ok(());
    }
    let (xmin, xmax) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let (ymin, ymax) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    let pad = ((ymax - ymin) * 0.08).max(1e-3);
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(xmin..xmax.max(xmin + 1.0), (ymin - pad)..(ymax + pad))
        .map_err(|e| plot_err(path, e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(|e| plot_err(path, e))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
            .map_err(|e| plot_err(path, e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| plot_err(path, e))?;
    root.present().map_err(|e| plot_err(path, e))
}

/// A run's metrics.jsonl as (train loss by step, eval CE by step, eval KL by step).
#[allow(clippy::type_complexity)]
pub fn run_curves(run: &Path) -> Option<(Vec<(f64, f64)>, Vec<(f64, f64)>, Vec<(f64, f64)>)> {
    let run = distill_core::run_dir::RunDir::new(run);
    if !run.metrics_path().exists() {
        return None; // no plot for a dir without metrics (an empty file still gets one)
    }
    let records = run.records().ok()?;
    let (mut train, mut ce, mut kl) = (Vec::new(), Vec::new(), Vec::new());
    for r in records {
        match r {
            Record::Train(m) => train.push((m.step as f64, m.loss as f64)),
            Record::Eval(m) => {
                ce.push((m.step as f64, m.ce));
                if m.kl_to_teacher.is_finite() {
                    kl.push((m.step as f64, m.kl_to_teacher));
                }
            }
        }
    }
    Some((train, ce, kl))
}

/// Writes report.md, report.json and the plots into `out`; returns the files written.
pub fn write_report(r: &Report, out: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut files = vec![out.join("report.md"), out.join("report.json")];
    write_atomic(&files[0], markdown(r).as_bytes())?;
    let json = serde_json::to_string_pretty(r).expect("report serialises");
    write_atomic(&files[1], json.as_bytes())?;
    let p = out.join("perplexity_vs_params.png");
    plot_perplexity_vs_params(r, &p)?;
    files.push(p);

    // Training curves of every run a student belongs to.
    let mut runs: Vec<PathBuf> = r
        .models
        .iter()
        .filter(|m| !m.is_teacher && m.step.is_some())
        .filter_map(|m| m.path.parent().map(Path::to_path_buf))
        .collect();
    runs.sort();
    runs.dedup();
    for run in &runs {
        if let Some((train, ce, kl)) = run_curves(run) {
            let name = run
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into());
            let p = out.join(format!("training_{name}.png"));
            plot_lines(
                &p,
                &format!("Training curves: {name}"),
                "step",
                "nats per token",
                &[
                    ("train loss (KD objective)".into(), train),
                    ("validation cross-entropy".into(), ce),
                    ("validation KL(teacher‖student)".into(), kl),
                ],
            )?;
            files.push(p);
        }
        // Checkpoints of this run evaluated here: KL and perplexity against step.
        let mut ck: Vec<(f64, f64, Option<f64>)> = r
            .models
            .iter()
            .filter(|m| !m.is_teacher && m.path.parent() == Some(run.as_path()))
            .filter_map(|m| m.step.map(|s| (s as f64, m.perplexity, m.kl_to_teacher)))
            .collect();
        ck.sort_by(|a, b| a.0.total_cmp(&b.0));
        ck.dedup_by(|a, b| a.0 == b.0);
        if ck.len() >= 2 {
            let name = run
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into());
            let p = out.join(format!("checkpoints_{name}.png"));
            let mut series = vec![(
                "validation perplexity".to_string(),
                ck.iter().map(|c| (c.0, c.1)).collect::<Vec<_>>(),
            )];
            let kl: Vec<(f64, f64)> = ck.iter().filter_map(|c| c.2.map(|k| (c.0, k))).collect();
            if !kl.is_empty() {
                let p2 = out.join(format!("checkpoints_kl_{name}.png"));
                plot_lines(
                    &p2,
                    &format!("KL(teacher‖student) by checkpoint: {name}"),
                    "step",
                    "nats per token",
                    &[("KL(teacher‖student)".into(), kl)],
                )?;
                files.push(p2);
            }
            plot_lines(
                &p,
                &format!("Perplexity by checkpoint: {name}"),
                "step",
                "perplexity",
                &std::mem::take(&mut series),
            )?;
            files.push(p);
        }
    }
    Ok(files)
}
