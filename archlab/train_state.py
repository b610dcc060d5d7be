"""What a run saves and restores: its checkpoints, where a run resumes, and what a resume may change.

A checkpoint holds the model, the optimizer, the scheduler, the RNG state and the resolved config
(``archlab.checkpoint`` writes and verifies it). One process (``trainer.parallel=none``) writes
``model.safetensors`` and a ``state.pt`` holding the optimizer. Several ranks (``ddp``, ``fsdp``)
write model and optimizer through ``torch.distributed.checkpoint`` (DCP), each rank its shard, plus
the full weights gathered to rank 0 in ``model.safetensors`` (what export, generate, init_from and
the report read) and rank 0's ``state.pt``.

Resume reads either kind at any world size: DCP reshards on load (the checkpoint's metadata records
each tensor's global shape, every rank reads the pieces of its own shard); a one-process checkpoint
is loaded as full tensors that FSDP shards. The RNG state is rank 0's on every rank, as at the start
of a run, where every rank draws from the same seed. The data stream continues where it stopped when
the global batch (batch_size × grad_accum × world size) is the checkpoint's (``archlab.resume``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from archlab import checkpoint, resume
from archlab.config import TrainerConfig
from archlab.distributed import Ranks
from archlab.errors import ArchlabError

log = logging.getLogger(__name__)


class TrainState:
    """The checkpoints of one run in ``run_dir``: ``save`` the trainer's state at a step, ``restore`` it.

    ``lr_factor(step, t)`` is the schedule's multiplier of the peak lr (``archlab.optim``)."""

    def __init__(
        self,
        cfg: DictConfig,
        t: TrainerConfig,
        run_dir: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        ranks: Ranks,
        lr_factor: Callable[[int, TrainerConfig], float],
    ) -> None:
        self.cfg, self.t, self.run_dir, self.ranks = cfg, t, run_dir, ranks
        self.model, self.optimizer, self.scheduler, self.lr_factor = model, optimizer, scheduler, lr_factor
        self.ckpt_root = run_dir / "checkpoints"
        #: more of the run's state, saved in each checkpoint's state.pt under its key: objects offering
        #: ``state_dict()`` (tensors and plain data) and ``load_state_dict(state)`` (the EMA teacher's θ_T)
        self.extras: dict[str, Any] = {}

    def save(self, step: int, wandb_id: str | None) -> Path:
        """Checkpoint ``step``: on every rank of a ``ddp``/``fsdp`` run (a collective), else this process."""
        state = {
            "step": step,
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "wandb_id": wandb_id,
            "world_size": self.ranks.world_size,
            "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
            **{key: part.state_dict() for key, part in self.extras.items()},
        }
        if self.t.parallel == "none":
            state["optimizer"] = self.optimizer.state_dict()
            return checkpoint.save(self.ckpt_root, step, self.model, state)
        return checkpoint.save_sharded(self.ckpt_root, step, self.model, self.optimizer, state, self.ranks)

    def restore(self, ckpt: Path, state: dict) -> tuple[int, str | None]:
        """Load checkpoint ``ckpt`` (its ``state.pt`` already read: ``read_resumable``) into model,
        optimizer, scheduler and RNG; returns its step and W&B id."""
        changed = _changes(ckpt, state, self.cfg, self.ranks.world_size)
        if checkpoint.is_sharded(ckpt):
            checkpoint.load_sharded(ckpt, self.model, self.optimizer)
        else:
            checkpoint.load_full(ckpt, self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for key, part in self.extras.items():
            if key not in state:
                why = f"{ckpt}/state.pt holds no {key!r} state, which this run needs to resume"
                raise checkpoint.CheckpointError(why)
            part.load_state_dict(state[key])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        step = state["step"]
        self._set_hyperparameters(step)
        for key, (old, now) in sorted(changed.items()):
            log.warning("resume: %s changed from %r to %r; applied from step %d on", key, old, now, step)
        if self.ranks.is_main:
            resume.record(self.run_dir, step, ckpt, changed)
        log.info("resumed from %s at step %d", ckpt, step)
        return step, state["wandb_id"]

    def _set_hyperparameters(self, step: int) -> None:
        """lr, betas and weight decay from this run's config, over those a checkpoint restored (the
        schedule itself reads ``t``), so that a resume applies a changed setting rather than
        ignoring it; with unchanged settings the values are bitwise those the run had."""
        t, groups = self.t, self.optimizer.param_groups
        for group, decay in zip(groups, (t.weight_decay, 0.0), strict=True):
            group.update(initial_lr=t.lr, lr=t.lr * self.lr_factor(step, t), betas=(t.beta1, t.beta2))
            group["weight_decay"] = decay
        self.scheduler.base_lrs = [t.lr] * len(groups)
        self.scheduler._last_lr = [group["lr"] for group in groups]

    def finished_summary(self, step: int) -> dict | None:
        """The summary of a run resumed at its last step, if it has one (nothing is left to train)."""
        path = self.run_dir / "summary.json"
        if step < self.t.max_steps or not path.is_file():
            return None
        try:
            summary = json.loads(path.read_text())
        except ValueError:
            return None
        return summary if isinstance(summary, dict) and "val/bpb" in summary else None


def resume_point(t: TrainerConfig, run_dir: Path) -> Path | None:
    """The checkpoint a run in ``run_dir`` resumes from; refuses to start afresh over an earlier run's
    results."""
    if t.resume is None:
        summary = run_dir / "summary.json"
        earlier = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
        earlier += ["summary.json"] * summary.exists()
        if earlier:
            raise ArchlabError(
                f"run dir {run_dir} already holds an earlier run ({', '.join(earlier)}); "
                "pass trainer.resume=auto to continue it, or a new hydra.run.dir for a new run"
            )
        return None
    if t.resume == "auto":
        return checkpoint.latest(run_dir)
    return checkpoint.find(t.resume)


def _changes(ckpt: Path, state: dict, cfg: DictConfig, world: int) -> dict[str, tuple[object, object]]:
    new = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    saved_world = state.get("world_size", 1)  # checkpoints before trainer.parallel: one process
    return resume.check(ckpt, state["config"], new, saved_world, world)


def read_resumable(ckpt: Path, cfg: DictConfig, world: int) -> dict:
    """``ckpt``'s state.pt, once ``archlab.resume`` accepts resuming it with ``cfg`` on ``world`` ranks
    (``ResumeError`` or ``ConfigError`` otherwise): called before the run builds its teacher's targets,
    so that a resume it cannot make costs no teacher work."""
    state = checkpoint.read_state(ckpt)
    _changes(ckpt, state, cfg, world)
    return state
