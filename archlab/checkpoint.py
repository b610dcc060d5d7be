"""Atomic checkpoints: safetensors weights + a torch file with optimizer, scheduler, RNG and data state.

Layout: ``<run_dir>/checkpoints/step_00000100/{model.safetensors,state.pt}`` and a
``LAST`` file naming the newest one. A checkpoint is written into a temporary
directory and renamed into place, and ``LAST`` is replaced atomically after it,
so a run killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from archlab.errors import ArchlabError

KEEP = 2  # how many checkpoints stay on disk (the newest ones)


def save(ckpt_root: Path, step: int, model: nn.Module, state: dict) -> Path:
    """Write checkpoint ``step`` atomically and make it the LAST one; keep the newest ``KEEP``."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=".tmp-"))
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer = ckpt_root / ".LAST.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, ckpt_root / "LAST")
    for old in sorted(ckpt_root.glob("step_*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find(path: str | Path) -> Path:
    """A checkpoint directory from itself, its checkpoints root or a run dir."""
    path = Path(path).expanduser()
    for root in (path, path / "checkpoints"):
        if (root / "LAST").exists():
            return root / (root / "LAST").read_text().strip()
    if (path / "state.pt").exists():
        return path
    raise ArchlabError(f"trainer.resume: no checkpoint found at {path}")


def latest(run_dir: Path) -> Path | None:
    try:
        return find(run_dir)
    except ArchlabError:
        return None


def load_weights(ckpt: Path, model: nn.Module) -> None:
    """Load the checkpoint's weights into ``model``, which must have exactly its parameters."""
    missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ArchlabError(
            f"checkpoint {ckpt} does not fit this model: missing {missing}, unexpected {unexpected}"
        )


def load(ckpt: Path, model: nn.Module) -> dict:
    """Load weights into ``model`` and return the saved training state."""
    load_weights(ckpt, model)
    return torch.load(ckpt / "state.pt", weights_only=False)


def saved_config(ckpt: Path):
    """The resolved archlab config stored with checkpoint ``ckpt``. A model slot added to archlab after the
    checkpoint was written (``memory``, for example) is absent from it: it gets the slot's baseline,
    which is what the saved model had."""
    from omegaconf import OmegaConf

    from archlab.config import compose
    from archlab.registry import MODEL_SLOTS

    saved = OmegaConf.create(torch.load(ckpt / "state.pt", weights_only=False, map_location="cpu")["config"])
    missing = [slot for slot in MODEL_SLOTS if slot not in saved]
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
    model.kernel = select_kernel("auto", device, torch.float32, model.dims.head_dim)
    return model.to(device).eval().requires_grad_(False)
