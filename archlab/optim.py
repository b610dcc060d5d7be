"""What a run trains and how: AdamW's parameter groups, the learning-rate schedule, a frozen backbone
(``trainer.train_only``) and a warm start (``trainer.init_from``).

AdamW with decoupled weight decay (Loshchilov & Hutter 2019, arXiv 1711.05101) on matrices only (norm
gains and biases are not decayed); linear warmup, then cosine decay to ``min_lr_ratio`` or
warmup-stable-decay (WSD, as in MiniCPM: Hu et al. 2024, arXiv 2404.06395).
"""

from __future__ import annotations

import logging
import math

import torch

from archlab import checkpoint
from archlab.config import Schedule, TrainerConfig
from archlab.errors import ConfigError

log = logging.getLogger(__name__)


def lr_factor(step: int, t: TrainerConfig) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps: linear warmup, then cosine or WSD."""
    warmup = round(t.warmup_fraction * t.max_steps)
    if step < warmup:
        return (step + 1) / warmup
    floor = t.min_lr_ratio
    if t.schedule is Schedule.cosine:
        progress = (step - warmup) / max(1, t.max_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = t.max_steps - int(t.decay_fraction * t.max_steps)
    if step < decay_start:
        return 1.0
    return 1 - (1 - floor) * (step - decay_start) / max(1, t.max_steps - decay_start)


def freeze_except(model: torch.nn.Module, prefixes: list[str]) -> None:
    """Train only parameters under the module-name ``prefixes`` (``trainer.train_only``); [] trains all."""
    if not prefixes:
        return
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(name == prefix or name.startswith(prefix + ".") for name in names):
            modules = sorted({name.split(".")[0] for name in names})
            allowed = f"module-name prefixes such as {', '.join(modules)}"
            raise ConfigError("trainer.train_only", prefix, allowed)
    for name, p in model.named_parameters():
        p.requires_grad_(any(name == q or name.startswith(q + ".") for q in prefixes))


def init_from(model: torch.nn.Module, path: str) -> None:
    """``trainer.init_from``: copy another run's tensors whose names and shapes match; the rest keep their
    init (e.g. new heads on a trained backbone, with ``trainer.train_only`` to freeze the backbone)."""
    from safetensors.torch import load_file

    ckpt = checkpoint.find(path, key="trainer.init_from")
    own = model.state_dict()
    saved = load_file(str(ckpt / "model.safetensors"))
    matched = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ConfigError("trainer.init_from", path, "a checkpoint sharing parameter names with this student")
    model.load_state_dict(matched, strict=False)
    log.info("initialised %d of %d tensors from %s", len(matched), len(own), ckpt)


def make_optimizer(model: torch.nn.Module, t: TrainerConfig) -> torch.optim.AdamW:
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))
