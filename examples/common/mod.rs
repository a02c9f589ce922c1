//! Where the examples read and write. The defaults are the quickstart's paths; CI
//! (scripts/check-examples.sh) points them at small fixtures so that every example runs on every
//! commit without touching a user's runs:
//!
//! - `DISTILL_EXAMPLE_TOKENS`: token shards (default `data/tokens/corpus`);
//! - `DISTILL_EXAMPLE_PROMPTS`: chat prompts, JSONL with `messages` (default
//!   `data/raw/prompts/chatterbot.jsonl`);
//! - `DISTILL_EXAMPLE_OUT`: the dir that holds the examples' `runs/` and `cache/` (default `.`).
#![allow(dead_code)] // each example uses some of these

use std::path::PathBuf;

pub const TEACHER: &str = "models/smollm2-135m-instruct";

fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

pub fn tokens() -> PathBuf {
    env_path("DISTILL_EXAMPLE_TOKENS", "data/tokens/corpus")
}

pub fn prompts() -> PathBuf {
    env_path(
        "DISTILL_EXAMPLE_PROMPTS",
        "data/raw/prompts/chatterbot.jsonl",
    )
}

/// `rel` (e.g. `runs/example`) under `DISTILL_EXAMPLE_OUT`.
pub fn out(rel: &str) -> PathBuf {
    env_path("DISTILL_EXAMPLE_OUT", ".").join(rel)
}
