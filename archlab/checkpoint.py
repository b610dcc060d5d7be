"""Atomic, durable, verified checkpoints: safetensors weights, training state, a manifest of both.

Layout: ``<run_dir>/checkpoints/step_00000100/{model.safetensors,state.pt,manifest.json}``
and a ``LAST`` file naming the newest one. A checkpoint is written into a temporary
directory, fsynced and renamed into place (``archlab.durable``), and ``LAST`` is
replaced after it, so a run killed at any moment, or a machine losing power, leaves
the previous checkpoint intact. ``manifest.json`` holds each file's size and SHA-256:
a checkpoint is used only if it matches, and a damaged newest one gives way to the
previous complete one. Weights with a NaN or Inf are never saved.

A checkpoint of several ranks (``save_sharded``) holds, besides, the model and optimizer state
through ``torch.distributed.checkpoint`` (``.metadata`` and one ``__<rank>_0.distcp`` per rank, all
in the manifest); its ``model.safetensors`` holds the full weights, so every reader of weights
(export, generate, init_from, the report) reads both kinds alike.

``state.pt`` holds only tensors and plain data (optimizer state of one process, scheduler state,
RNG states, the resolved config with enums as strings) and is read with
``torch.load(weights_only=True)``: a crafted checkpoint cannot run code. DCP's files are read by
``dcp.load``, which reads tensors into the state dict it is given and takes only its metadata from
a pickle (``torch.distributed.checkpoint``'s own format).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import shutil
import tempfile
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.state_dict as dcp_state
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta

from archlab import durable
from archlab.errors import ArchlabError, ConfigError, NonFiniteLossError

if TYPE_CHECKING:
    from archlab.distributed import Ranks

log = logging.getLogger(__name__)

KEEP = 2  # how many checkpoints stay on disk (the newest ones)
FILES = ("model.safetensors", "state.pt")
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards (``save_sharded``)


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


def _refuse_non_finite(bad: list[str], ckpt_root: Path, step: int) -> None:
    if bad:
        last = latest(ckpt_root.parent)
        kept = f"the last good checkpoint is kept at {last}" if last else "no checkpoint was written"
        raise NonFiniteLossError(
            f"weights hold NaN/Inf at step {step} ({_listed(bad)}); "
            f"checkpoint not written and training stopped; {kept}"
        )


def _new_tmp(ckpt_root: Path) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=ckpt_root, prefix=".tmp-"))


def save(ckpt_root: Path, step: int, model: nn.Module, state: dict) -> Path:
    """Write checkpoint ``step`` of one process atomically and durably, make it the LAST one, keep the
    newest ``KEEP``. Refuses (``NonFiniteLossError``) weights holding NaN or Inf, so LAST always names
    usable weights."""
    _refuse_non_finite(non_finite_tensors(model), ckpt_root, step)
    tmp = _new_tmp(ckpt_root)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    return _publish(tmp, ckpt_root, step)


def save_sharded(
    ckpt_root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, ranks: Ranks
) -> Path:
    """``save`` on every rank of a process group (a collective; ``ranks``: this process's place in it).

    Model and optimizer go through ``torch.distributed.checkpoint`` (each rank writes its shard, the
    ``__<rank>_0.distcp`` files, and rank 0 the ``.metadata``) into one temporary directory that rank 0
    made; rank 0 adds the full weights gathered to it (``model.safetensors``) and ``state``, writes the
    manifest of every file and publishes the directory as ``save`` does. Every rank returns its path."""
    options = dcp_state.StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors on rank 0
    full = dcp_state.get_model_state_dict(model, options=options)
    bad = [n for n, v in full.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    _refuse_non_finite(ranks.broadcast(bad), ckpt_root, step)
    tmp = Path(ranks.broadcast(str(_new_tmp(ckpt_root)) if ranks.is_main else None))
    model_state, optim_state = dcp_state.get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)  # returns when all wrote
    final = None
    if ranks.is_main:
        save_file(full, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        final = _publish(tmp, ckpt_root, step)
    return Path(ranks.broadcast(str(final)))


def _publish(tmp: Path, ckpt_root: Path, step: int) -> Path:
    """Write the manifest of the finished ``tmp``, rename it to ``step_<step>``, point LAST at it and
    remove all but the newest ``KEEP`` checkpoints."""
    final = ckpt_root / f"step_{step:08d}"
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": durable.sha256_file(path)}
        for path in sorted(tmp.iterdir())
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
        listed = {*FILES, *files}  # a manifest without one of FILES is corrupt
        expected = {name: (int(files[name]["bytes"]), str(files[name]["sha256"])) for name in listed}
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest} is corrupt ({type(exc).__name__}: {exc})") from None
    for name, (size, sha) in sorted(expected.items()):
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} is missing")
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


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a plain pickle (``FileSystemReader.read_metadata`` unpickles it unchecked);
    this one builds only what DCP's metadata holds: its own dataclasses and enums, ``torch.Size``,
    dtypes, layouts and paths. Anything else, i.e. a crafted file's callables, is refused."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}

    def find_class(self, module: str, name: str) -> object:
        named = (module, name) in self.NAMES
        found = super().find_class(module, name) if named or module in (*self.MODULES, "torch") else None
        data = isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, Enum))
        if named or isinstance(found, torch.dtype) or (module in self.MODULES and data):
            return found
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


class _SafeReader(FileSystemReader):
    """``FileSystemReader`` whose metadata is read by ``_MetadataUnpickler``."""

    def read_metadata(self, *args, **kwargs) -> dcp.Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` reading the non-tensor entries (optimizer hyperparameters) with
    ``torch.load(weights_only=True)``, where DCP's own uses ``weights_only=False``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        checked = io.BytesIO()
        torch.save(torch.load(value, weights_only=True), checked)  # plain data, safe to load as DCP does
        checked.seek(0)
        super().load_bytes(read_item, checked)


def is_sharded(ckpt: Path) -> bool:
    """Whether ``ckpt`` holds model and optimizer through DCP (``save_sharded``)."""
    return (ckpt / DCP_METADATA).is_file()


def load_sharded(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state from a ``save_sharded`` checkpoint, at any world size and sharding
    (``dcp.load`` reads each rank's part of every tensor; without a process group, all of it)."""
    check_fits(ckpt, model)
    model_state, optim_state = dcp_state.get_state_dict(model, optimizer)
    both = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(both, storage_reader=_SafeReader(ckpt), planner=_SafePlanner())
    except dcp.CheckpointException as exc:  # a BaseException: every rank's failure, with tracebacks
        raise CheckpointError(f"{ckpt} cannot be loaded: {str(exc).strip().splitlines()[-1]}") from None
    dcp_state.set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"])


def load_full(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, optim_state: dict) -> None:
    """Model and optimizer state from a one-process checkpoint (``save``), into a plain, DDP or FSDP
    model: the full tensors, which ``set_state_dict`` shards. ``optim_state`` is the saved
    ``optimizer.state_dict()``, whose parameters are numbered in ``optimizer``'s order."""
    check_fits(ckpt, model)
    names = {id(p): name for name, p in model.named_parameters()}
    fqns = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {
        "state": {fqns[i]: value for i, value in optim_state["state"].items()},
        "param_groups": [
            {**group, "params": [fqns[i] for i in group["params"]]} for group in optim_state["param_groups"]
        ],
    }
    dcp_state.set_state_dict(
        model,
        optimizer,
        model_state_dict=load_file(str(ckpt / "model.safetensors")),
        optim_state_dict=by_name,
        options=dcp_state.StateDictOptions(full_state_dict=True),
    )


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
