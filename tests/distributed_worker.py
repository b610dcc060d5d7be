"""Run by ``tests/test_distributed.py`` under torchrun: a few DDP (or FSDP) steps of an aux_free MoE
student, twice, first with the router's per-expert load summed over ranks as it declares
(``rank_summed_buffers``), then with that declaration removed. Rank 0 writes every rank's expert
biases of both runs as JSON.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_worker.py \
        OUT.json STEPS RUN_DIR OVERRIDES...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from archlab_plugins.ffn.routers import AuxLossFree

from archlab import distributed
from archlab.config import compose
from archlab.loggers import RunInfo
from archlab.trainer import Trainer


def biases_after(steps: int, run_dir: Path, overrides: list[str]) -> list[list[list[float]]]:
    """Every rank's expert biases (rank, layer, expert) after ``steps`` optimizer steps."""
    trainer = Trainer(compose(overrides), RunInfo(run_dir=run_dir, name="worker"))
    for _ in range(steps):
        trainer.train_step()
    mine = [b.tolist() for name, b in trainer.model.named_buffers() if name.endswith("expert_bias")]
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def main(out: str, steps: str, run_dir: str, *overrides: str) -> None:
    with distributed.process_group("ddp", torch.device("cpu")) as ranks:
        summed = biases_after(int(steps), Path(run_dir), list(overrides))
        AuxLossFree.rank_summed_buffers = ()  # a router that does not declare its tally
        unsummed = biases_after(int(steps), Path(run_dir), list(overrides))
        if ranks.is_main:
            Path(out).write_text(json.dumps({"summed": summed, "unsummed": unsummed}))


if __name__ == "__main__":
    main(*sys.argv[1:])
