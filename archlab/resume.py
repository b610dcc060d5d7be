"""What a resumed run may change: the checkpoint's config against the new one, key by key.

Resuming continues *one* run, so whatever fixes the run's model, data stream or
teacher (``model.*``, the slots, ``seed``, ``trainer.batch_size``, ``data.*``, ...)
must be the same; a change there is refused, naming each key. The optimisation
schedule may be changed on purpose (a lower lr after a spike, more steps): those
keys are applied from the resumed step on and recorded in ``resumes.jsonl``.
Bookkeeping (logging, progress, device, where the cache lives) may change freely.
"""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path

from archlab.errors import ArchlabError

#: Keys taken from the new config from the resumed step on (the optimizer and schedule read them).
APPLIED = tuple(
    f"trainer.{k}"
    for k in (
        "lr",
        "min_lr_ratio",
        "warmup_fraction",
        "schedule",
        "decay_fraction",
        "max_steps",
        "weight_decay",
        "beta1",
        "beta2",
        "grad_clip",
        "precision",
    )
)
#: Keys (or key prefixes ending in '.') that do not change what is trained.
FREE = (
    "logger.",
    "density.",
    "data.cache_dir",
    "distill.build_batch_size",
    "distill.lock_timeout",
    "trainer.resume",
    "trainer.init_from",
    "trainer.progress",
    "trainer.device",
    "trainer.compile",  # the same model and step, compiled or not (up to float rounding)
    "trainer.log_every",
    "trainer.eval_every",
    "trainer.eval_tokens",
    "trainer.ckpt_every",
)


class ResumeError(ArchlabError):
    """A resume whose new settings would change what the run trains."""


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Dotted keys of a nested config; enums as their names, so old and new checkpoints compare."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value.name if isinstance(value, Enum) else value
    return out


def _free(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in FREE)


def changes(saved: dict, new: dict) -> dict[str, tuple[object, object]]:
    """Every key whose value differs between the saved and the new config (bookkeeping excepted).
    A key the saved config lacks (a field added to archlab since) is not a change."""
    old_flat, new_flat = flatten(saved), flatten(new)
    return {
        key: (old_flat[key], value)
        for key, value in new_flat.items()
        if key in old_flat and old_flat[key] != value and not _free(key)
    }


def check(ckpt: Path, saved: dict, new: dict) -> dict[str, tuple[object, object]]:
    """The changes a resume from ``ckpt`` applies; raises ``ResumeError`` naming any it cannot."""
    changed = changes(saved, new)
    refused = {k: v for k, v in changed.items() if k not in APPLIED}
    if refused:
        listed = ", ".join(f"{k}={old!r} (now {now!r})" for k, (old, now) in sorted(refused.items()))
        raise ResumeError(
            f"trainer.resume: checkpoint {ckpt} was trained with {listed}; these fix the model, data or "
            "teacher and cannot change within a run. Resume with the checkpoint's values, or start a new "
            f"run (a new hydra.run.dir; trainer.init_from={ckpt} starts from its weights)"
        )
    return changed


def record(run_dir: Path, step: int, ckpt: Path, changed: dict[str, tuple[object, object]]) -> None:
    """Append what this resume started from and which settings it changed to ``resumes.jsonl``."""
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "step": step,
        "checkpoint": str(ckpt),
        "changed": {k: {"checkpoint": old, "now": new} for k, (old, new) in sorted(changed.items())},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "resumes.jsonl").open("a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
