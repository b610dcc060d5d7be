"""Evaluation on the fixed validation windows: held-out loss and bits per byte, agreement with the
teacher, the metrics plugins report, and the residual plugin's depth weights for the plots.

    bpb = Σ nats / ln 2 / Σ UTF-8 bytes of the windows' targets

The windows are the first ``trainer.eval_tokens`` of the validation split, in ``trainer.batch_size``
batches (``archlab.data.val_batches``), the same at every eval of every run of a corpus. Under
``trainer.parallel=fsdp`` a forward gathers each layer's shards from every rank, so every rank runs
every eval forward on the same batches (and gets the same numbers); rank 0 logs them.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from archlab import plots
from archlab.baselines.objective import teacher_agreement
from archlab.config import TrainerConfig
from archlab.data import TokenSplit, n_val_windows, val_batches
from archlab.model import Student
from archlab.slots import DepthWeightsReport, offers
from archlab.soft_targets import TargetCache


class Evaluation:
    """Called, the student's validation metrics now; ``depth_weights()``, its residual plugin's mixing
    over depth on the first validation batch (None if it reports none)."""

    def __init__(
        self,
        model: Student,
        split: TokenSplit,
        t: TrainerConfig,
        targets: TargetCache | None,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager],
    ) -> None:
        self.model, self.split, self.t, self.targets = model, split, t, targets
        self.device, self.autocast = device, autocast
        n_val = n_val_windows(split.val, model.dims.context, t.eval_tokens)
        self.val_bytes = split.val_window_bytes(model.dims.context, n_val)

    def batches(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        """(first window, inputs, targets) of each validation batch."""
        return val_batches(
            self.split.val,
            batch_size=self.t.batch_size,
            context=self.model.dims.context,
            max_tokens=self.t.eval_tokens,
        )

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        """Held-out loss on the fixed validation windows (bits per byte = nats / ln 2 / UTF-8 bytes);
        with a teacher also KL(teacher ‖ student) and top-1 agreement on the same windows, and the
        metrics plugins report through ``ctx`` (e.g. extra heads' accuracy), averaged over tokens."""
        model = self.model
        model.eval()
        sums: dict[str, float] = defaultdict(float)
        for first, x, y in self.batches():
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast():
                ctx = model.new_context(x)
                logits = model(x, ctx).float()
                model.aux_losses(ctx, y)
            for name, value in ctx.metrics.items():
                sums[name] += value * y.numel()
            sums["nats"] += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            sums["count"] += y.numel()
            sums["bytes"] += float(self.val_bytes[first : first + len(x)].sum())
            if self.targets:
                soft = self.targets.val(first, len(x)).to(self.device)
                for name, value in teacher_agreement(logits, soft).items():
                    sums[name] += value * y.numel()
        model.train()
        count, n_bytes, nats = sums.pop("count"), sums.pop("bytes"), sums.pop("nats")
        agreement = {f"val/{k}": v / count for k, v in sums.items()}
        return {"val/loss": nats / count, "val/bpb": nats / n_bytes / math.log(2), **agreement}

    def depth_weights(self) -> plots.DepthWeights | None:
        """The residual plugin's depth weights on the first validation batch (``archlab.plots``)."""
        if not offers(self.model.residual, DepthWeightsReport):
            return None
        _, x, _ = next(self.batches())
        with self.autocast():
            return plots.record_depth_weights(self.model, x.to(self.device))
