//! Running the `distill` binary in tests, and the shape every bad-input failure must have.
#![allow(dead_code)] // each test binary uses its own subset

use std::process::Command;

/// Runs the binary; (exit code, stdout, stderr).
pub fn distill(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(args)
        .output()
        .expect("the distill binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A failure: non-zero exit, no panic, stderr one line `error: …` containing every `expect`.
pub fn check_failure(code: i32, err: &str, expect: &[&str]) -> String {
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    check_failure_after_progress(code, err, expect)
}

/// As [`check_failure`] for commands that print progress lines first: the last line is the
/// only `error: …` line.
pub fn check_failure_after_progress(code: i32, err: &str, expect: &[&str]) -> String {
    assert_ne!(code, 0, "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "not one error line: {err:?}"
    );
    for e in expect {
        assert!(last.contains(e), "{last:?} should contain {e:?}");
    }
    last.to_string()
}
