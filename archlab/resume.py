"""What a resumed run may change: the checkpoint's config against the new one, key by key.

Resuming continues *one* run, so whatever fixes the run's model, data stream or
teacher (``model.*``, the slots, ``seed``, ``trainer.batch_size``, ``data.*``, ...)
must be the same; a change there is refused, naming each key. The optimisation
schedule may be changed on purpose (a lower lr after a spike, more steps): those
keys are applied from the resumed step on and recorded in ``resumes.jsonl``.
Bookkeeping (logging, progress, device, where the cache lives) may change freely.

How the global batch is split over ranks (``trainer.batch_size``, ``trainer.grad_accum``, the world
size, ``trainer.parallel``) may change when the global batch itself, batch_size × grad_accum × world
size windows per step, stays the checkpoint's: step s then reads the same windows of the training
stream (``archlab.trainer``), so the run continues its stream exactly (up to float rounding of the
gradient's sum in another order). A resume that changes the global batch is refused before training
(``ConfigError`` naming ``trainer.batch_size``, with the value that would fit): it would jump to
other windows of the stream, and of the teacher's cached soft targets.
"""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path

from archlab.errors import ArchlabError, ConfigError

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
#: Keys that split the global batch over ranks: they may change if the global batch stays.
LAYOUT = ("trainer.batch_size", "trainer.grad_accum", "trainer.parallel")
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


def check(
    ckpt: Path, saved: dict, new: dict, saved_world: int = 1, world: int = 1
) -> dict[str, tuple[object, object]]:
    """The changes a resume from ``ckpt`` (trained on ``saved_world`` ranks) on ``world`` ranks applies,
    a changed world size among them; raises ``ResumeError`` naming any it cannot, and ``ConfigError``
    if the global batch would change."""
    changed = changes(saved, new)
    refused = {k: v for k, v in changed.items() if k not in APPLIED + LAYOUT}
    if refused:
        listed = ", ".join(f"{k}={old!r} (now {now!r})" for k, (old, now) in sorted(refused.items()))
        raise ResumeError(
            f"trainer.resume: checkpoint {ckpt} was trained with {listed}; these fix the model, data or "
            "teacher and cannot change within a run. Resume with the checkpoint's values, or start a new "
            f"run (a new hydra.run.dir; trainer.init_from={ckpt} starts from its weights)"
        )
    check_global_batch(ckpt, saved["trainer"], saved_world, new["trainer"], world)
    if saved_world != world:
        changed["world_size"] = (saved_world, world)
    return changed


def check_global_batch(ckpt: Path, saved: dict, saved_world: int, new: dict, world: int) -> None:
    """``ConfigError`` unless ``new`` trainer settings on ``world`` ranks take the global batch of the
    ``saved`` ones on ``saved_world`` ranks; it names ``trainer.batch_size`` and the value that fits."""
    global_batch = saved["batch_size"] * saved["grad_accum"] * saved_world
    per_rank_step = new["grad_accum"] * world
    if new["batch_size"] * per_rank_step == global_batch:
        return
    was = f"{saved['batch_size']} x grad_accum {saved['grad_accum']} x {saved_world} rank(s)"
    fits = (
        f"{global_batch // per_rank_step}"
        if global_batch % per_rank_step == 0
        else f"none ({global_batch} windows do not split into grad_accum x world size = {per_rank_step}; "
        "change trainer.grad_accum or the number of processes)"
    )
    allowed = (
        f"{fits}: resuming {ckpt} at world size {world} with grad_accum {new['grad_accum']} continues its "
        f"stream only with its global batch of {global_batch} windows a step ({was})"
    )
    raise ConfigError("trainer.batch_size", new["batch_size"], allowed)


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
