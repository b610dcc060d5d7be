"""Run by ``tests/test_distributed.py`` under torchrun: every first-party plugin's student trains under
``trainer.parallel=fsdp`` at the world size torchrun gives, a few steps and one eval each, and rank 0
trains the same student in one process with the same global batch, each rank's batch one
micro-batch of it (so that auxiliary losses of a batch, as MoE's balance loss, see the same batches).
Rank 0 writes, per plugin, both runs' training losses and eval bpb as JSON.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/fsdp_plugins_worker.py \
        OUT.json STEPS RUN_DIR OVERRIDES...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from archlab import distributed, registry, slots
from archlab.config import compose
from archlab.loggers import RunInfo
from archlab.trainer import Trainer

FIRST_PARTY = ("archlab", "archlab-plugins")


def first_party_plugins() -> list[str]:
    """``slot=name`` of every first-party plugin that is not its slot's default (the default student,
    every slot at its default, is its own case: ``default``)."""
    defaults = compose([])
    found = []
    for slot in slots.names("sublayer", "model"):
        for name, plugin in sorted(registry.plugins(slot).items()):
            dist_ = plugin.entry_point.dist
            if dist_ is not None and dist_.name in FIRST_PARTY and name != defaults[slot].plugin:
                found.append(f"{slot}={name}")
    return ["default", *found]


def curve(steps: int, run_dir: Path, overrides: list[str]) -> dict[str, list[float] | float]:
    """Training losses of ``steps`` steps and the eval bpb after them."""
    trainer = Trainer(compose(overrides), RunInfo(run_dir=run_dir, name="worker"))
    losses = [trainer.train_step()["train/loss"] for _ in range(steps)]
    return {"losses": losses, "val/bpb": trainer.evaluate()["val/bpb"]}


def main(out: str, steps: str, run_dir: str, *overrides: str) -> None:
    results = {}
    with distributed.process_group("fsdp", torch.device("cpu")) as ranks:
        for case in first_party_plugins():
            plugin = [] if case == "default" else [case]
            sharded = curve(int(steps), Path(run_dir), [*overrides, *plugin, "trainer.parallel=fsdp"])
            if ranks.is_main:  # a rank's batch as a micro-batch: per-batch aux losses (MoE balance) alike
                single = [
                    *overrides,
                    *plugin,
                    "trainer.parallel=none",
                    f"trainer.grad_accum={ranks.world_size}",
                ]
                results[case] = {"fsdp": sharded, "single": curve(int(steps), Path(run_dir), single)}
            dist.barrier()
        if ranks.is_main:
            Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
