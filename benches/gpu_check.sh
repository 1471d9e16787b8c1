#!/usr/bin/env bash
# The prepared GPU check (issue 14), one command on a machine with one NVIDIA GPU and a Python
# that has the project's dependencies (torch, triton, transformers, accelerate, datasets, ...),
# scikit-build-core, pybind11, cmake and ninja:
#
#     bash benches/gpu_check.sh [OUT_DIR [CHECK_ARGS...]]   (default: gpu_check_out/; PYTHON=python3)
#
# It installs the project from this tree into a fresh folder (pip, no build isolation, no
# network: the CUDA build where nvcc is found), then runs benches/gpu_check.py from that install:
# ops, KV kernels, paged attention, engine greedy vs generate, throughput against the measured
# ceilings, one pipeline round, benches/gpu_ops.py. It writes OUT_DIR/gpu_check.json and
# OUT_DIR/gpu_check.md and exits non-zero on any mismatch. Without a GPU the GPU checks are
# skipped. SHAPES_FROM names the model folder whose config and tokenizer the random-weight model
# takes (default: the converted default model in the cai_fast cache).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
out=$(realpath -m "${1:-gpu_check_out}")
shift $(( $# > 0 ? 1 : 0 ))  # the rest goes to gpu_check.py (--only CHECK...)
shapes=$(realpath -m "${SHAPES_FROM:-${CAI_FAST_CACHE:-$HOME/.cache/cai_fast}/smollm2-135m-instruct}")
site=$(mktemp -d)/site
start=$(date +%s)
echo "[gpu_check] installing the project into $site"
expect=()
if command -v nvcc >/dev/null || ls /usr/local/cuda*/bin/nvcc >/dev/null 2>&1; then expect=(--expect-cuda-build); fi
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PYTHON" -m pip install -q --no-build-isolation --no-deps --no-cache-dir \
  --target "$site" . 2>&1 | grep -v "^\s*$" || true
[ -d "$site/cai_fast" ] || { echo "[gpu_check] FAILED: pip install did not install cai_fast" >&2; exit 1; }
echo "[gpu_check] installed in $(( $(date +%s) - start )) s: $(ls "$site"/cai_fast/*.so | xargs -n1 basename | tr '\n' ' ')"
# the tree's own cai_fast must not shadow the install: run from benches/ with the install first
cd benches
TRITON_INTERPRET=0 PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" gpu_check.py --out "$out" \
  --shapes-from "$shapes" "${expect[@]}" "$@"
echo "[gpu_check] done in $(( $(date +%s) - start )) s"
