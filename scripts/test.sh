#!/usr/bin/env bash
# Set up, check the import contracts, then run the whole test suite (slow end-to-end tests included).
# CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export ARCHLAB_STRICT_PLUGINS=1 WANDB_MODE=offline
.venv/bin/lint-imports --no-cache  # import contracts (pyproject.toml [tool.importlinter])
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$(mktemp -d)"  # docs: links, API docstrings
exec .venv/bin/python -m pytest "$@"
