#!/usr/bin/env bash
# Set up, check the import contracts, run the whole test suite (slow end-to-end tests included), then
# the GPU check's CPU parts (scripts/gpu_check.sh --cpu). CI runs exactly this; set -e makes a failing
# pytest the script's exit code, before the check runs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export ARCHLAB_STRICT_PLUGINS=1 WANDB_MODE=offline
.venv/bin/lint-imports --no-cache  # import contracts (pyproject.toml [tool.importlinter])
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$(mktemp -d)"  # docs: links, API docstrings
.venv/bin/python -m pytest -n auto "$@"
exec ./scripts/gpu_check.sh --cpu
