//! Progress reporting: an indicatif bar on a terminal, plain log lines every few seconds otherwise
//! (CI logs, pipes), so long stages are visible either way.

use std::io::IsTerminal;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Tokens,
}

fn human(n: f64, unit: Unit) -> String {
    match unit {
        Unit::Bytes => format!("{:.1} MB", n / 1e6),
        Unit::Tokens if n >= 1e6 => format!("{:.2}M tok", n / 1e6),
        Unit::Tokens if n >= 1e3 => format!("{:.1}k tok", n / 1e3),
        Unit::Tokens => format!("{n:.0} tok"),
    }
}

/// A progress callback over `total` units: call it with the amount done so far. The total may be
/// updated by calling with a done count only (see [`bar`]); the bar finishes at `done >= total`.
pub fn bar(total: u64, unit: Unit, what: &str) -> impl FnMut(u64) {
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::new(total);
    if tty {
        let template = match unit {
            Unit::Bytes => "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            Unit::Tokens => "{msg} [{bar:30}] {human_pos}/{human_len} tok {per_sec} ETA {eta}",
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(template)
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut last_log = Instant::now();
    let mut logged_end = false;
    let what = what.to_string();
    move |done: u64| {
        bar.set_position(done);
        let end = done >= total && !logged_end;
        if !tty && (last_log.elapsed().as_secs() >= 5 || end) {
            logged_end |= end;
            last_log = Instant::now();
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            let rate = done as f64 / secs;
            let eta = if rate > 0.0 {
                format!(", ETA {:.0}s", total.saturating_sub(done) as f64 / rate)
            } else {
                String::new()
            };
            eprintln!(
                "{what}: {}/{} ({}/s{eta})",
                human(done as f64, unit),
                human(total as f64, unit),
                human(rate, unit),
            );
        }
        if done >= total {
            bar.finish_and_clear();
        }
    }
}
