"""Objective slot ``ce``: next-token cross-entropy, mean over tokens, in nats."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


class CrossEntropy:
    @dataclass
    class Config:
        pass

    def __init__(self, cfg: Config) -> None:
        pass

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        """logits: (b, t, v), targets: (b, t) -> scalar"""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
