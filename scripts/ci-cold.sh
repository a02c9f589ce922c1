#!/usr/bin/env bash
# Runs `.ci/run` as a machine that has never built distill would: a fresh clone of the committed
# HEAD, an empty cargo home (no crate registry, no git checkouts), an empty distill cache (no
# teacher wheel, no CUDA venv) and empty target dirs, all under one temporary dir that is removed
# afterwards unless --keep. The rustup toolchain itself is reused. Prints the wall time.
#
# Run with: scripts/ci-cold.sh [--keep]          (≈ 50 min on 2 cores; log in $tmp/ci.log)
# Use it before a landing whenever scripts/ or .ci/ changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
keep=0
[[ "${1:-}" == "--keep" ]] && keep=1
tmp="$(mktemp -d /tmp/distill-cold.XXXXXX)"
[[ $keep == 1 ]] || trap 'rm -rf "$tmp"' EXIT
git clone -q "$root" "$tmp/clone"
mkdir -p "$tmp/cargo-home" "$tmp/cache"
echo "ci-cold: $(git -C "$tmp/clone" log -1 --format='%h %s') in $tmp (log: $tmp/ci.log)"
start=$(date +%s)
rc=0
(
  cd "$tmp/clone"
  # Only the toolchain's binaries stay on PATH; cargo's registry and git dirs start empty.
  env CI=true CARGO_HOME="$tmp/cargo-home" PATH="$HOME/.cargo/bin:$PATH" \
    DISTILL_CACHE="$tmp/cache" DISTILL_CUDA_TARGET_DIR="$tmp/cuda-target" \
    bash .ci/run </dev/null
) >"$tmp/ci.log" 2>&1 || rc=$?
secs=$(($(date +%s) - start))
tail -5 "$tmp/ci.log"
echo "ci-cold: .ci/run exited $rc after $((secs / 60)) min $((secs % 60)) s"
exit $rc
