#!/usr/bin/env bash
# The test suite, as CI runs it: installs what a fresh machine lacks, fetches the real teacher
# (tests on it fail rather than skip under CI=true), then fmt, clippy, every test, the
# transformers check (torch + transformers 5 and 4 in a cached venv), every example on small
# fixtures, and the CUDA build check (`--features cuda` against the CUDA 13.0 PyPI wheels; no GPU
# needed).
#
# Set DISTILL_SKIP_CUDA_BUILD=1 to leave the CUDA build out of a local run (CI never does).
#
# Run with: scripts/test.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

step() { printf '\n==> %s\n' "$*"; }

# A clean clone builds once: incremental caches would only add gigabytes to the target dir.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step "toolchain"
if ! command -v cargo >/dev/null 2>&1; then
  echo "test.sh: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi
if ! command -v python3 >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq python3 python3-pip
fi
cargo --version

step "cargo fmt --check"
cargo fmt --all -- --check

step "build (dev profile; dependencies optimised)"
cargo build --workspace --all-targets

step "fetch the teacher (SmolLM2-135M-Instruct)"
DISTILL_BIN="$root/target/debug/distill" scripts/fetch-teacher.sh

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test"
cargo test --workspace

step "transformers 5 and 4 open what distill writes (ids, logits, model cards, GGUF export)"
DISTILL_BIN="$root/target/debug/distill" scripts/check-transformers.sh

step "every example, on small fixtures"
DISTILL_BIN="$root/target/debug/distill" scripts/check-examples.sh

if [[ "${DISTILL_SKIP_CUDA_BUILD:-0}" == "1" && "${CI:-}" != "true" ]]; then
  step "CUDA build check skipped (DISTILL_SKIP_CUDA_BUILD=1)"
else
  step "CUDA build check (--features cuda, CUDA 13.0 wheels)"
  # The venv and the target dir live in the cache dir, so a later clean clone on this machine
  # rebuilds only the workspace crates; a fresh machine builds everything (≈ 18 min on 2 cores).
  DISTILL_CUDA_TARGET_DIR="${DISTILL_CUDA_TARGET_DIR:-${DISTILL_CACHE:-$HOME/.cache/distill}/cuda-target}" \
    scripts/check-cuda-build.sh
fi
