"""Position slot: ``rope`` (RoFormer, Su et al. 2021, arXiv 2104.09864) and ``none`` (NoPE).

A position plugin rotates queries and keys: ``rotate(x: (b, h, t, k), positions: (t,))``.
RoPE here uses the rotate-half convention (GPT-NeoX / Llama): dimension i is paired
with i + k/2, and the pair is rotated by angle pos · θ^(−2i/k):
    rotate(x) = x · cos + rotate_half(x) · sin,   rotate_half([x1, x2]) = [−x2, x1]
so q·k after rotation depends on positions only through their difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from archlab.context import ModelDims
from archlab.hf_export import ANY, HFPart


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [−x2, x1] over the last dim: the rotation RoPE applies as x·cos + rotate_half(x)·sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(dim: int, positions: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin ``(positions, dim)`` of rotate-half RoPE: pair (i, i + dim/2) turns by pos · θ^(−2i/dim).
    Computed in float64, returned as float32."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # t dim
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x · cos + rotate_half(x) · sin`` with the tables cast to x's dtype (rows: x's positions)."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class RoPE(nn.Module):
    @dataclass
    class Config:
        theta: float = 10000.0

    def __init__(self, cfg: Config, dims: ModelDims) -> None:
        super().__init__()
        self.theta = cfg.theta
        cos, sin = rope_tables(dims.head_dim, dims.context, cfg.theta)
        self.register_buffer("cos", cos, persistent=False)  # t k
        self.register_buffer("sin", sin, persistent=False)  # t k

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        return apply_rotary(x, self.cos[positions], self.sin[positions])

    def hf_export(self) -> HFPart:
        """transformers' default RoPE: rotate-half, inv_freq = θ^(−2i/k) over the head dim."""
        return HFPart({ANY: {"rope_parameters": {"rope_type": "default", "rope_theta": self.theta}}})


class NoPosition(nn.Module):
    """No positional signal at all (causal masking alone carries order; Kazemnejad et al. 2023)."""

    @dataclass
    class Config:
        pass

    def __init__(self, cfg: Config, dims: ModelDims) -> None:
        super().__init__()

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        return x
