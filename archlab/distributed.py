"""Data-parallel and sharded training (``trainer.parallel=ddp|fsdp``): the process group, the ranks, and
the step under DDP or FSDP2.

Under ``torchrun --nproc_per_node=N -m archlab.cli train ... trainer.parallel=ddp`` each process
joins the group torchrun describes (env://: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
over nccl on CUDA and gloo on CPU. A SLURM step of several tasks (``srun``, or a
``hydra/launcher=submitit_slurm`` job with ``tasks_per_node``) is one rank per task: its variables are
translated to torchrun's (``slurm_env``). Without either, ``ddp`` runs as world size 1 in this process
(an in-process store): the same code path, nothing to launch.

What the ranks must agree on, and how they do:

- **weights**: DDP broadcasts rank 0's at construction and averages the gradients in the last
  micro-batch's backward (``no_sync`` before it), so every rank steps to the same weights. FSDP2
  (``torch.distributed.fsdp.fully_shard``, on a 1-D device mesh of all ranks) shards parameters,
  gradients and optimizer state: each transformer layer (its sublayers and their pre-norms) is one
  unit, all-gathered for its forward and backward, the rest (embedding, residual plugin, final norm,
  head) is the root's unit. Every rank builds the same initial weights from the seed before sharding;
  gradients are reduce-scattered in the last micro-batch's backward
  (``set_requires_gradient_sync(False)`` before it) and the clipping norm is taken over the shards
  (``archlab.step``). On CUDA with ``trainer.precision=bf16`` parameters are gathered in bf16 and
  gradients reduced in fp32 (``MixedPrecisionPolicy``); on CPU everything stays fp32;
- **data**: rank r of W reads windows [r·b, (r+1)·b) of each global micro-batch of W·b
  (``archlab.trainer``), the windows one process of batch W·b would read, in the same order;
- **step metrics** are averaged over ranks (equal batches: the mean over the global batch);
- **buffers a plugin tallies from its own batch** are summed over ranks after the backward and
  before ``on_step_end``, when it declares them (``SumsAcrossRanks``); DDP runs with
  ``forward_sync_buffers=False`` (rank 0's buffers are copied at construction only), so a buffer that
  changes in training and is not declared drifts apart across ranks.

Every rank runs the same evaluation forwards on the same validation batches (under FSDP each forward
all-gathers weights, a collective every rank must join) and takes part in writing checkpoints
(``torch.distributed.checkpoint``: each rank its shard, ``archlab.train_state``); rank 0 alone logs,
plots and publishes them.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from archlab.errors import ArchlabError, ConfigError
from archlab.slots import SumsAcrossRanks, offering
from archlab.step import OptimizerStep


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank ``rank`` of ``world_size``, training on ``device``."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def joined(cls, device: torch.device) -> Ranks:
        """This process's place in the process group it has joined, training on ``device``."""
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the ranks (every rank passes the same keys)."""
        if self.world_size == 1:
            return values
        names = sorted(values)
        summed = torch.tensor([values[k] for k in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(summed)
        return {k: float(v) / self.world_size for k, v in zip(names, summed.tolist(), strict=True)}

    def broadcast(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)  # nccl: through the current device, which is ours
        return box[0]

    def shared_dir(self, own: Path) -> Path:
        """Rank 0's run dir on every rank. Each process resolves Hydra's ``${now:...}`` itself; a rank
        whose own dir differs removes it when Hydra left it empty (its ranks write nothing there)."""
        shared = Path(self.broadcast(str(own)))
        if shared != own:
            with contextlib.suppress(OSError):
                own.rmdir()
        return shared


#: One group of a SLURM node list: ``node07``, ``node[01-04,07]``, ``rack[1-2]-n[3-4]``.
_NODE_GROUP = r"(?:[\w.\-]+|\[[\d,\-]+\])+"


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[01-04,07],gpu1`` gives ``node01``, ``a,b`` gives ``a``."""
    if not re.fullmatch(rf"{_NODE_GROUP}(?:,{_NODE_GROUP})*", nodelist):
        raise ConfigError("SLURM_JOB_NODELIST", nodelist, "a SLURM node list such as node[01-04] or a,b")
    return re.sub(r"\[(\d+)[^\]]*\]", r"\1", re.match(_NODE_GROUP, nodelist)[0])  # each range's first


def slurm_env(env: MutableMapping[str, str] = os.environ) -> None:
    """Sets torchrun's env:// variables in ``env`` from a SLURM step of several tasks, one rank per task:
    SLURM_PROCID → RANK, SLURM_NTASKS → WORLD_SIZE, SLURM_LOCALID → LOCAL_RANK, the node list's first
    host → MASTER_ADDR, SLURM_JOB_ID → MASTER_PORT (in [20000, 60000), the same on every task of the
    job). Torchrun's variables win: nothing is set under WORLD_SIZE, and a MASTER_* already set stays.

    NOTE: SLURM_NTASKS is the job's task count in a batch script too, outside ``srun``: a plain
    ``archlab train`` there is rank 0 of ranks that never start (``ddp`` waits for them, ``none`` is
    refused). Start it with ``srun``, or through submitit, which runs one process per task."""
    if "WORLD_SIZE" in env or int(env.get("SLURM_NTASKS", "1")) < 2:
        return
    try:
        port = 20000 + int(env["SLURM_JOB_ID"]) % 40000
    except (KeyError, ValueError):
        raise ConfigError(
            "SLURM_JOB_ID", env.get("SLURM_JOB_ID"), "the job's number, as SLURM sets it"
        ) from None
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST", "")))
    env.setdefault("MASTER_PORT", str(port))
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env["SLURM_LOCALID"])


def sweep_device(name: str, job_num: int | None) -> str:
    """``trainer.device`` for job ``job_num`` of a launcher that runs jobs side by side (joblib): on a
    machine of several GPUs, ``auto`` or ``cuda`` becomes ``cuda:<job_num mod the GPU count>``, so
    concurrent jobs spread over the GPUs (``CUDA_VISIBLE_DEVICES`` is the pool they are drawn from).
    ``name`` is kept for one GPU, a device of its own (``cuda:N``, ``cpu``), a sequential launcher
    (``job_num`` None) and the ranks of torchrun or SLURM (LOCAL_RANK picks their GPU)."""
    if job_num is None or _launched() or name not in ("auto", "cuda") or not torch.cuda.is_available():
        return name
    count = torch.cuda.device_count()
    return f"cuda:{job_num % count}" if count > 1 else name


def _launched() -> bool:
    """Whether this process was started by torchrun (or anything else that sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def _local_device(device: torch.device) -> torch.device:
    """``device`` for this process: an accelerator's index is torchrun's LOCAL_RANK."""
    if device.type == "cpu" or not _launched():
        return device
    return torch.device(device.type, int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def process_group(parallel: str, device: torch.device) -> Iterator[Ranks]:
    """The ranks of a run of ``trainer.parallel``: joins (and finally leaves) torch.distributed's process
    group for ``ddp`` and ``fsdp``, from torchrun's variables or, without them, as world size 1; ``none``
    is one rank, and refused under a torchrun of several processes (each would train the whole run on its
    own). A SLURM step's variables are translated to torchrun's first (``slurm_env``, idempotent:
    ``archlab train`` calls it before Hydra too; a submitit task reaches this without its entry)."""
    slurm_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none":
        if world > 1:
            raise ConfigError(
                "trainer.parallel",
                parallel,
                f"ddp or fsdp under torchrun or SLURM tasks (WORLD_SIZE={world})",
            )
        yield Ranks(device=device)
        return
    device = _local_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if _launched():
        dist.init_process_group(backend, init_method="env://")
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield Ranks.joined(device)
    finally:
        dist.destroy_process_group()


def current(parallel: str, device: torch.device) -> Ranks:
    """The ranks a ``Trainer`` of ``trainer.parallel`` trains on: one for ``none`` (a teacher trained inside
    a DDP run included); for ``ddp`` and ``fsdp``, the process group that ``process_group`` joined."""
    if parallel == "none":
        return Ranks(device=device)
    if not dist.is_initialized():
        raise ArchlabError(
            f"trainer.parallel={parallel} needs torch.distributed's process group: train through "
            "`archlab train` (under torchrun for several processes) or inside "
            "archlab.distributed.process_group()"
        )
    return Ranks.joined(_local_device(device))


def shard(model: nn.Module, device: torch.device, bf16: bool) -> None:
    """FSDP2 on ``model`` in place: each transformer layer's sublayers and pre-norms one ``fully_shard``
    unit, then the root (embedding, residual plugin, final norm, head, and what else is left), over a
    1-D mesh of every rank. bf16 parameters with fp32 gradient reduction on CUDA when ``bf16``."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy()  # fp32: the parameters' own dtype
    if bf16 and device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in sorted(set(model.sublayer_layers)):
        units = [i for i, owner in enumerate(model.sublayer_layers) if owner == layer]
        block = [m for i in units for m in (model.sublayers[i], model.norms[i])]
        if any(True for m in block for _ in m.parameters()):  # a layer of parameters of its own
            fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


class RanksStep(OptimizerStep):
    """``OptimizerStep`` on several ranks: step metrics averaged and declared buffers (``SumsAcrossRanks``)
    summed over them, after the backward and before ``on_step_end``."""

    def __init__(self, model: nn.Module, *args, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        self.ranks = Ranks.joined(next(model.parameters()).device)
        self.summed = [
            module.get_buffer(name)
            for module in offering(model.modules(), SumsAcrossRanks)
            for name in module.rank_summed_buffers
        ]

    def across_ranks(self, sums: dict[str, float]) -> dict[str, float]:
        for buffer in self.summed:
            dist.all_reduce(buffer)
        return self.ranks.mean(sums)


class DataParallelStep(RanksStep):
    """``RanksStep`` under DistributedDataParallel: gradients averaged over ranks in the last
    micro-batch's backward."""

    def __init__(self, model: nn.Module, *args, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        device_ids = None if self.ranks.device.type == "cpu" else [self.ranks.device.index]
        self.forward = DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.forward.no_sync()


class ShardedStep(RanksStep):
    """``RanksStep`` on a model that ``shard`` wrapped (FSDP2): gradients reduce-scattered over ranks in
    the last micro-batch's backward only; the earlier ones accumulate unsharded gradients locally."""

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
