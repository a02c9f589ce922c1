//! `distill prune`.

use anyhow::{bail, Result};
use clap::Args;
use distill_prune::{prune, PruneOptions, TargetSpec, REPORT_MD};
use std::path::PathBuf;

#[derive(Args)]
pub struct PruneArgs {
    /// The model dir to cut (HF layout).
    #[arg(long)]
    teacher: PathBuf,
    /// Token shards made with the teacher's tokenizer; calibration reads their train split.
    #[arg(long)]
    tokens: PathBuf,
    /// Output model dir (replaced only once the new one is complete).
    #[arg(long)]
    out: PathBuf,
    /// Parameter budget: a ratio of the teacher (0.6), a count (80000000) or 80M; the best of
    /// several measured cuts (depth-only, width-only, mixed) is kept.
    #[arg(long, conflicts_with_all = ["layers", "hidden", "heads", "kv_heads", "intermediate"])]
    target_params: Option<String>,
    /// Explicit shape (unset fields keep the teacher's): layers kept.
    #[arg(long)]
    layers: Option<usize>,
    /// Hidden size.
    #[arg(long)]
    hidden: Option<usize>,
    /// Query heads.
    #[arg(long)]
    heads: Option<usize>,
    /// Key/value heads.
    #[arg(long)]
    kv_heads: Option<usize>,
    /// MLP intermediate size.
    #[arg(long)]
    intermediate: Option<usize>,
    /// Calibration sequences for the activation statistics.
    #[arg(long, default_value_t = 8)]
    calib_sequences: usize,
    /// Of those, how many every KL (drop-one per layer, each candidate) is measured on; more
    /// give a steadier choice and a longer prune.
    #[arg(long, default_value_t = 2)]
    kl_sequences: usize,
    #[arg(long, default_value_t = 2)]
    batch_size: usize,
    #[command(flatten)]
    device: crate::DeviceArg,
}

pub fn run(a: PruneArgs) -> Result<()> {
    let shape_given = a.layers.is_some()
        || a.hidden.is_some()
        || a.heads.is_some()
        || a.kv_heads.is_some()
        || a.intermediate.is_some();
    let target = match (a.target_params, shape_given) {
        (Some(t), _) => TargetSpec::Params(t),
        (None, true) => TargetSpec::Shape {
            layers: a.layers,
            hidden: a.hidden,
            heads: a.heads,
            kv_heads: a.kv_heads,
            intermediate: a.intermediate,
        },
        (None, false) => bail!(
            "give --target-params (e.g. 0.6) or a shape (--layers, --hidden, --heads, \
             --kv-heads, --intermediate)"
        ),
    };
    let opts = PruneOptions {
        teacher: a.teacher,
        tokens: a.tokens,
        out: a.out.clone(),
        target,
        calib_sequences: a.calib_sequences,
        kl_sequences: a.kl_sequences,
        batch_size: a.batch_size,
        device: distill_core::parse_device(&a.device.device)?,
    };
    let report = prune(&opts, &mut |line| eprintln!("prune: {line}"))?;
    let imp = &report.importance;
    let normalised = |v: &[f64]| {
        let max = v.iter().cloned().fold(f64::MIN, f64::max).max(1e-12);
        v.iter()
            .enumerate()
            .map(|(i, x)| (i as f64, x / max))
            .collect::<Vec<_>>()
    };
    let plot = a.out.join("layer-importance.png");
    distill_eval::report::plot_lines(
        &plot,
        "layer importance (each ÷ its largest)",
        "teacher layer",
        "relative importance",
        &[
            ("block influence".into(), normalised(&imp.block_influence)),
            ("drop-one KL".into(), normalised(&imp.drop_one_kl)),
        ],
    )?;
    println!("{}", report.markdown().lines().next().unwrap_or_default());
    println!(
        "{} → {} parameters in {:.0} s → {} (report: {}, {})",
        report.teacher_params,
        report.params,
        report.seconds,
        a.out.display(),
        a.out.join(REPORT_MD).display(),
        plot.display()
    );
    Ok(())
}
