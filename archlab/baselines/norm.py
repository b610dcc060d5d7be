"""Norm slot: ``rmsnorm`` (Zhang & Sennrich 2019, arXiv 1910.07467) and ``layernorm`` (Ba et al. 2016).

RMSNorm:   y = x / sqrt(mean(x²) + eps) · g
LayerNorm: y = (x − mean(x)) / sqrt(var(x) + eps) · g + b
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.hf_export import ANY, HFPart


class RMSNorm(nn.Module):
    """The ``rmsnorm`` norm: y = x / sqrt(mean(x²) + eps) · g, with a learnable gain g (init 1)."""

    @dataclass
    class Config:
        eps: float = 1e-6

    def __init__(self, cfg: Config, dim: int) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)  # bf16 autocast: one dtype

    def hf_export(self) -> HFPart:
        """transformers' RMSNorm (x · rsqrt(mean(x²) + rms_norm_eps) · weight) in every model type."""
        return HFPart({ANY: {"rms_norm_eps": self.eps}}, {"weight": self.weight})


class LayerNorm(nn.Module):
    @dataclass
    class Config:
        eps: float = 1e-5
        bias: bool = True

    def __init__(self, cfg: Config, dim: int) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if cfg.bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
