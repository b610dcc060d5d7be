#!/usr/bin/env bash
# The main job: set up, then train the default student on the embedded corpus (W&B offline).
# Extra arguments are Hydra overrides, e.g. ./scripts/main.sh attention.n_kv_heads=2
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/archlab train "$@"
