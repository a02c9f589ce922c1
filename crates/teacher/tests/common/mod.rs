//! Locating the real teacher for the tests that need it. Locally a missing teacher skips those
//! tests with a note; in CI (`CI=true`) it fails them, since CI fetches the teacher first.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn require(path: PathBuf, what: &str) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{what} missing at {}: CI must run scripts/fetch-teacher.sh before the tests",
            path.display()
        );
    }
    eprintln!(
        "skipping: {what} not found at {} (run scripts/fetch-teacher.sh)",
        path.display()
    );
    None
}

/// The converted SmolLM2-135M-Instruct dir (`$DISTILL_TEACHER` or models/smollm2-135m-instruct).
pub fn teacher_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("DISTILL_TEACHER")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models/smollm2-135m-instruct"));
    require(dir, "the converted teacher")
}

/// The GGUF scripts/fetch-teacher.sh extracted (`$DISTILL_CACHE` or ~/.cache/distill).
pub fn teacher_gguf() -> Option<PathBuf> {
    let cache = std::env::var_os("DISTILL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/distill")
        });
    require(
        cache.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
        "the teacher GGUF",
    )
}
