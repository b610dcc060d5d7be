"""archlab's own lm-eval tasks: YAML configs and their JSONL data, shipped with the package so that
``archlab eval`` runs offline (``TaskManager(include_path=TASKS_DIR)``). The data is made by
``scripts/make_eval_tasks.py`` from the stdlib corpus's held-out documents."""

from __future__ import annotations

import json
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
#: The tasks this package ships (``task:`` of each YAML here).
SHIPPED = ("archlab_stdlib_choice", "archlab_stdlib_perplexity")


def jsonl_dataset(file: str, **metadata: object):
    """lm-eval's ``custom_dataset``: the rows of ``file`` (one JSON object a line; relative paths are
    relative to this package) as the ``test`` split of a ``datasets.DatasetDict``, read without the
    ``datasets`` cache. ``metadata``: what lm-eval passes besides (the task's version), unused."""
    import datasets

    path = Path(file) if Path(file).is_absolute() else TASKS_DIR / file
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
