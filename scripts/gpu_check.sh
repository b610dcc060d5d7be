#!/usr/bin/env bash
# The GPU check (issue 20): kernels, cached decoding, eager vs compiled bf16 steps, DDP and a distilled
# run on this machine's GPU, each PASS / FAIL / SKIP with its numbers; exits non-zero on any FAIL.
#   scripts/gpu_check.sh          on a CUDA machine (<= 8 minutes on one H100)
#   scripts/gpu_check.sh --cpu    the CPU-meaningful parts at toy sizes; CI runs it (scripts/test.sh)
# Installs nothing: it runs the Python of .venv (scripts/setup.sh) or $PYTHON, which must hold archlab
# and its wheels (torch, xformers); see benchmarks/gpu_check.py for what each section checks.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
if ! "$python" -c "import archlab, torch" 2>/dev/null; then
  echo "gpu_check: $python cannot import archlab and torch; run scripts/setup.sh (or set PYTHON)" >&2
  exit 2
fi
export WANDB_MODE=offline PYTHONUNBUFFERED=1
exec "$python" benchmarks/gpu_check.py "$@"
