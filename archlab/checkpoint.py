"""Atomic, durable, verified checkpoints: safetensors weights, training state, a manifest of both.

Layout: ``<run_dir>/checkpoints/step_00000100/{model.safetensors,state.pt,manifest.json}``
and a ``LAST`` file naming the newest one. A checkpoint is written into a temporary
directory, fsynced and renamed into place (``archlab.durable``), and ``LAST`` is
replaced after it, so a run killed at any moment, or a machine losing power, leaves
the previous checkpoint intact. ``manifest.json`` holds each file's size and SHA-256:
a checkpoint is used only if it matches, and a damaged newest one gives way to the
previous complete one. Weights with a NaN or Inf are never saved.

``state.pt`` holds only tensors and plain data (optimizer and scheduler state, RNG
states, the resolved config with enums as strings) and is read with
``torch.load(weights_only=True)``: a crafted checkpoint cannot run code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from enum import Enum
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from archlab import durable
from archlab.errors import ArchlabError, ConfigError, NonFiniteLossError

log = logging.getLogger(__name__)

KEEP = 2  # how many checkpoints stay on disk (the newest ones)
FILES = ("model.safetensors", "state.pt")
MANIFEST = "manifest.json"


class CheckpointError(ArchlabError):
    """A checkpoint that is missing, truncated, corrupt, unsafe or does not fit the model."""


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.removeprefix("step_"))


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers that hold a NaN or Inf."""
    return [
        name
        for name, value in model.state_dict().items()
        if value.is_floating_point() and not torch.isfinite(value).all()
    ]


def _listed(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def warn_non_finite(model: nn.Module, source: Path | str) -> None:
    """One warning naming the tensors of ``model``, loaded from ``source``, that hold NaN or Inf."""
    bad = non_finite_tensors(model)
    if bad:
        log.warning(
            "%s: weights hold NaN/Inf (%s); the model's outputs are not meaningful", source, _listed(bad)
        )


def save(ckpt_root: Path, step: int, model: nn.Module, state: dict) -> Path:
    """Write checkpoint ``step`` atomically and durably, make it the LAST one, keep the newest ``KEEP``.

    Refuses (``NonFiniteLossError``) weights holding NaN or Inf, so LAST always names usable weights.
    """
    bad = non_finite_tensors(model)
    if bad:
        last = latest(ckpt_root.parent)
        kept = f"the last good checkpoint is kept at {last}" if last else "no checkpoint was written"
        raise NonFiniteLossError(
            f"weights hold NaN/Inf at step {step} ({_listed(bad)}); "
            f"checkpoint not written and training stopped; {kept}"
        )
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=".tmp-"))
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    files = {
        name: {"bytes": (tmp / name).stat().st_size, "sha256": durable.sha256_file(tmp / name)}
        for name in FILES
    }
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
    if final.exists():  # the same step written again: move the old one aside first
        os.rename(final, Path(tempfile.mkdtemp(dir=ckpt_root, prefix=".tmp-")) / final.name)
    durable.publish_dir(tmp, final)
    durable.write_atomic(ckpt_root / "LAST", final.name.encode())
    others = sorted((c for c in ckpt_root.glob("step_*") if c != final), key=step_of)
    for old in others[: max(0, len(others) - (KEEP - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    remove_partial(ckpt_root)
    return final


def remove_partial(ckpt_root: Path) -> None:
    """Delete the ``.tmp-*`` directories that a save killed part-way left behind."""
    for tmp in ckpt_root.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def verify(ckpt: Path) -> None:
    """Raise ``CheckpointError`` naming the file unless ``ckpt`` is complete and matches its manifest."""
    for name in FILES:
        if not (ckpt / name).is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} is missing")
    manifest = ckpt / MANIFEST
    if not manifest.exists():
        return  # written before manifests existed: the readers below still reject garbage
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = {name: (int(files[name]["bytes"]), str(files[name]["sha256"])) for name in FILES}
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest} is corrupt ({type(exc).__name__}: {exc})") from None
    for name, (size, sha) in expected.items():
        path = ckpt / name
        if path.stat().st_size != size:
            raise CheckpointError(f"{path} is truncated: {path.stat().st_size} bytes, {MANIFEST} says {size}")
        if durable.sha256_file(path) != sha:
            raise CheckpointError(f"{path} is corrupt: its SHA-256 does not match {MANIFEST}")


def newest(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint under ``ckpt_root``: the one LAST names, or, if that one is missing
    or damaged, the newest that verifies (saying so). None if the root holds no checkpoint at all."""
    candidates = sorted(ckpt_root.glob("step_*"), key=step_of, reverse=True)
    pointer = ckpt_root / "LAST"
    named = ckpt_root / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and named.is_dir():
        candidates = [named, *(c for c in candidates if c != named)]
    if not candidates:
        return None
    problems = []
    for ckpt in candidates:
        try:
            verify(ckpt)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if ckpt != named:
            why = (
                "; ".join(problems)
                or f"LAST names {named.name if named else 'nothing'}, which does not exist"
            )
            log.warning("%s; using the newest complete checkpoint, %s", why, ckpt)
        return ckpt
    raise CheckpointError(f"no usable checkpoint in {ckpt_root}: {'; '.join(problems)}")


def find(path: str | Path, key: str = "trainer.resume") -> Path:
    """A verified checkpoint directory from itself, its checkpoints root or a run dir; ``key`` is the
    option that named ``path``, for the error message."""
    path = Path(path).expanduser()
    if any((path / name).exists() for name in FILES):
        verify(path)
        return path
    for root in (path, path / "checkpoints"):
        found = newest(root) if root.is_dir() else None
        if found is not None:
            return found
    raise ConfigError(key, str(path), "a run dir, its checkpoints/ dir or one checkpoint dir")


def latest(run_dir: Path) -> Path | None:
    """The run's newest complete checkpoint, or None if it has none (raises if all are damaged)."""
    root = Path(run_dir) / "checkpoints"
    return newest(root) if root.is_dir() else None


def check_fits(ckpt: Path, model: nn.Module) -> None:
    """Raise ``CheckpointError`` naming every tensor whose name or shape differs between ``ckpt`` and
    ``model``."""
    path = ckpt / "model.safetensors"
    own = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for garbage
        raise CheckpointError(f"{path} cannot be read: {exc}") from None
    problems = [
        f"{n}: checkpoint {saved[n]}, model {own[n]}" for n in own if n in saved and saved[n] != own[n]
    ]
    problems += [f"{n}: missing from the checkpoint" for n in own if n not in saved]
    problems += [f"{n}: not in this model" for n in saved if n not in own]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise CheckpointError(f"checkpoint {ckpt} does not fit this model: {shown}")


def load_weights(ckpt: Path, model: nn.Module) -> None:
    """Load the checkpoint's weights into ``model``, which must have exactly its tensors and shapes."""
    check_fits(ckpt, model)
    load_model(model, str(ckpt / "model.safetensors"), strict=True)


def config_enums() -> list[type[Enum]]:
    """The enums of archlab's and the installed plugins' configs (their defaults' types): checkpoints
    written before configs were stored with enums as strings hold them, and rebuilding an enum member
    from its value runs no other code."""
    from archlab import config, registry, slots

    found = {config.LoggerBackend, config.Precision, config.Schedule}
    for slot in slots.names():
        for plugin in registry.loadable(slot).values():
            defaults = [getattr(plugin.Config, f.name, None) for f in dataclasses.fields(plugin.Config)]
            found.update(type(value) for value in defaults if isinstance(value, Enum))
    return sorted(found, key=lambda e: f"{e.__module__}.{e.__qualname__}")


def read_state(ckpt: Path) -> dict:
    """``state.pt`` read safely: tensors and plain data only (``weights_only=True``), and config enums
    in checkpoints of earlier archlab versions."""
    path = ckpt / "state.pt"
    try:
        with torch.serialization.safe_globals(config_enums()):
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - unpickling raises many types; all mean "do not trust it"
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        why = next((line for line in lines if "WeightsUnpickler error" in line), lines[0])
        raise CheckpointError(
            f"{path} cannot be loaded safely (torch.load with weights_only=True refuses it): {why}"
        ) from None


def load(ckpt: Path, model: nn.Module) -> dict:
    """Load weights into ``model`` and return the saved training state."""
    load_weights(ckpt, model)
    return read_state(ckpt)


def saved_config(ckpt: Path):
    """The resolved archlab config stored with checkpoint ``ckpt``. A model slot added to archlab after the
    checkpoint was written (``memory``, for example) is absent from it: it gets the slot's baseline,
    which is what the saved model had."""
    from omegaconf import OmegaConf

    from archlab.config import compose
    from archlab.slots import names

    saved = OmegaConf.create(read_state(ckpt)["config"])
    missing = [slot for slot in names("sublayer", "model") if slot not in saved]
    if missing:
        baseline = compose([])
        for slot in missing:
            saved[slot] = baseline[slot]
    return saved


def load_student(ckpt: Path, device: torch.device):
    """The archlab student saved in checkpoint ``ckpt`` (built from the config stored with it), frozen."""
    from archlab.kernels import select_kernel
    from archlab.model import build_student

    model = build_student(saved_config(ckpt))
    load_weights(ckpt, model)  # weights only: the optimizer state in state.pt is not needed here
    warn_non_finite(model, ckpt)
    model.kernel = select_kernel("auto", device, torch.float32, model.dims.head_dim)
    return model.to(device).eval().requires_grad_(False)
