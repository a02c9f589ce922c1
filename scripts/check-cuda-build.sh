#!/usr/bin/env bash
# Builds distill with `--features cuda` on a machine without a GPU or a CUDA install, from the
# CUDA 13.0 compiler, headers and libraries published as PyPI wheels, so the CUDA path keeps
# compiling. The venv lives in the cache dir and is reused (≈ 650 MB of wheels once).
#
# Run with: scripts/check-cuda-build.sh            (then target/cuda/release/distill)
# Env: DISTILL_CACHE (venv location; default ~/.cache/distill),
#      DISTILL_CUDA_TARGET_DIR (cargo target dir; default target/cuda — CI points it into the
#      cache so that a fresh clone on the same machine rebuilds only the workspace crates).
# To run the binary on a GPU machine: LD_LIBRARY_PATH="$(scripts/check-cuda-build.sh --print-lib-dir)"
#
# CUDA 13.0, not newer: the lent GPU machines run driver 580 (CUDA 13.0) and reject newer PTX.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cache="${DISTILL_CACHE:-$HOME/.cache/distill}"
venv="$cache/cuda13-venv"
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35)
stamp="$venv/.distill-wheels"

if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "${wheels[*]}" ]]; then
  echo "check-cuda-build: installing the CUDA 13.0 wheels into $venv" >&2
  rm -rf "$venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian's python3 keeps venv in its own package.
    rm -rf "$venv"
    command -v apt-get >/dev/null 2>&1 && { apt-get update -qq && apt-get install -y -qq python3-venv; }
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --no-deps "${wheels[@]}"
  echo "${wheels[*]}" >"$stamp"
fi
cu="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
if [[ "${1:-}" == "--print-lib-dir" ]]; then
  echo "$cu/lib"
  exit 0
fi

# The wheels ship versioned libraries only; the linker wants libX.so.
for lib in "$cu"/lib/lib*.so.*; do
  base="${lib%%.so.*}.so"
  [[ -e "$base" ]] || ln -s "$(basename "$lib")" "$base"
done

# No wheel has the driver library: link against a stub with the driver API's names and soname
# libcuda.so.1, so the real driver is the one loaded at run time.
stubs="$cu/lib/stubs"
if [[ ! -f "$stubs/libcuda.so" ]]; then
  mkdir -p "$stubs"
  # Ask cargo where the locked cudarc's source is: `cargo metadata` downloads it first on a machine
  # that has never built the CUDA feature (the CPU builds never fetch it), wherever CARGO_HOME is.
  cudarc_manifest="$(cargo metadata --format-version 1 --locked --features cuda \
    --manifest-path "$root/crates/cli/Cargo.toml" |
    python3 -c 'import json, sys
pkgs = [p for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"]
if not pkgs: sys.exit("check-cuda-build: cudarc is not among the dependencies of --features cuda")
print(pkgs[0]["manifest_path"])')"
  sys="$(dirname "$cudarc_manifest")/src/driver/sys/mod.rs"
  [[ -f "$sys" ]] || {
    echo "check-cuda-build: $sys: not found (cudarc's driver bindings moved?)" >&2
    exit 1
  }
  grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$sys" | sed 's/pub unsafe fn //' | sort -u |
    sed 's/.*/int &(void) { return 999; }/' >"$stubs/libcuda-stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda-stub.c"
fi

export PATH="$cu/bin:$PATH"
export CUDA_ROOT="$cu" CUDA_HOME="$cu" CUDA_PATH="$cu"
export NVCC="$cu/bin/nvcc"
export CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$cu/lib:$stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
nvcc --version | tail -1
target="${DISTILL_CUDA_TARGET_DIR:-target/cuda}"
CARGO_TARGET_DIR="$target" cargo build --release -p distill-cli --features cuda
# Every crate that touches tensors must pass `cuda` through to candle: the feature must reach
# candle-core's cuda backend in the binary we just built.
CARGO_TARGET_DIR="$target" cargo tree -p distill-cli --features cuda -e features -i candle-core 2>/dev/null |
  grep -q 'candle-core feature "cuda"' || {
  echo "check-cuda-build: candle-core was built without its cuda feature" >&2
  exit 1
}
echo "check-cuda-build: ok → $target/release/distill (compute capability $CUDA_COMPUTE_CAP)"
