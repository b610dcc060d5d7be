#!/usr/bin/env bash
# The main job: set up, then run a small end-to-end study on the embedded corpus (W&B offline): a dense
# reference ladder and a few plugin students distilled from one shared teacher, the ladder fitted, every
# student's capability density computed, and an HTML report whose path is the last line printed.
# Arguments go to `archlab study`: --quick for the ~3-minute version, --out DIR, Hydra overrides for every
# run, e.g. ./scripts/main.sh --quick trainer.max_steps=40
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/archlab study "$@"
