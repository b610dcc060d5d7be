"""One optimizer step, as a unit the trainer (and wrappers of it) call: forward, loss, backward over
the micro-batches of the step, gradient clipping, the optimizer and scheduler, post-step hooks.

Where the micro-batches come from (the training stream, another rank's shard, the student's
own samples) is the caller's business; so is what a non-finite step means for the run. The
unit never steps the optimizer on a non-finite loss or gradient norm: it raises
``NonFiniteStep`` first, leaving the weights as they were. A subclass may change how the
micro-batches accumulate and how ranks agree (``archlab.distributed.DataParallelStep``).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from archlab.slots import StepEndHook, offering


@dataclass
class MicroBatch:
    """Inputs ``x`` and labels ``y`` (b, t); the teacher's soft targets of the same windows, or None;
    ``mask`` (b, t), True where the loss counts (None: everywhere; on-policy batches count only the
    student's sampled positions)."""

    x: Tensor
    y: Tensor
    soft: object | None = None
    mask: Tensor | None = None


class NonFiniteStep(Exception):
    """The loss or the gradient norm of a step was NaN/Inf; the optimizer did not step."""


class OptimizerStep:
    """``step(micro_batches)``: accumulate gradients over the micro-batches (each loss divided by their
    number), clip to ``grad_clip`` (0 = only measure the norm), step; returns the mean metrics."""

    def __init__(
        self,
        model: nn.Module,
        objective: Callable,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        grad_clip: float,
        autocast: Callable[[], contextlib.AbstractContextManager],
    ) -> None:
        self.model, self.objective, self.optimizer, self.scheduler = model, objective, optimizer, scheduler
        self.grad_clip, self.autocast = grad_clip, autocast
        self.forward: Callable[..., Tensor] = model  # the model's forward, or a wrapper's (DDP)
        # updates outside the optimizer, after it (e.g. MoE balancing biases)
        self.hooks: Sequence[nn.Module] = list(offering(model.modules(), StepEndHook))

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Context of one micro-batch's forward and backward (``last``: the step's last one)."""
        return contextlib.nullcontext()

    def across_ranks(self, sums: dict[str, float]) -> dict[str, float]:
        """The step's metrics (and any state the ranks must share) combined over ranks: one process's."""
        return sums

    def clip_gradients(self) -> Tensor:
        """Scale the gradients to norm ``grad_clip`` if above it; returns their norm before. Under FSDP2
        the gradients are DTensor shards and their norm a DTensor over all of them; its ``full_tensor``
        is the global norm (as in torchtitan's ``clip_grad_norm_``), so every rank clips alike."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip if self.grad_clip > 0 else math.inf, norm)
        return norm

    def __call__(self, micro_batches: Iterable[MicroBatch]) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        batches = list(micro_batches)
        sums: dict[str, float] = defaultdict(float)  # objective, total and reported metrics
        for i, batch in enumerate(batches):
            with self.accumulating(last=i == len(batches) - 1):
                with self.autocast():
                    ctx = self.model.new_context(batch.x)
                    logits = self.forward(batch.x, ctx)
                    self.model.aux_losses(ctx, batch.y, batch.soft)
                    loss = self.objective(logits, batch.y, batch.soft, batch.mask)
                    total = ctx.add_aux_losses(loss)
                (total / len(batches)).backward()
            for name, value in {"loss": loss.detach(), "total_loss": total.detach(), **ctx.metrics}.items():
                sums[name] += float(value) / len(batches)
        sums = self.across_ranks(dict(sums))
        if not math.isfinite(sums["total_loss"]):
            raise NonFiniteStep(f"loss is {sums['total_loss']}")
        grad_norm = self.clip_gradients()
        if not math.isfinite(grad_norm):  # stepping would write NaN into every weight
            raise NonFiniteStep(f"gradient norm is {float(grad_norm)} (loss {sums['total_loss']:.4g})")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        for module in self.hooks:
            module.on_step_end()
        return {**sums, "lr": lr, "grad_norm": float(grad_norm)}
