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


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RoPE(nn.Module):
    @dataclass
    class Config:
        theta: float = 10000.0

    def __init__(self, cfg: Config, dims: ModelDims) -> None:
        super().__init__()
        self.theta = cfg.theta
        self.head_dim = dims.head_dim
        self.max_positions = dims.context
        cos, sin = self._tables()
        self.register_buffer("cos", cos, persistent=False)  # t k
        self.register_buffer("sin", sin, persistent=False)  # t k

    def _tables(self) -> tuple[Tensor, Tensor]:
        k = self.head_dim
        inv_freq = self.theta ** (-torch.arange(0, k, 2, dtype=torch.float64) / k)
        angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float64), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # t k
        return angles.cos().float(), angles.sin().float()

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        cos, sin = self.cos[positions].to(x.dtype), self.sin[positions].to(x.dtype)
        return x * cos + rotate_half(x) * sin


class NoPosition(nn.Module):
    """No positional signal at all (causal masking alone carries order; Kazemnejad et al. 2023)."""

    @dataclass
    class Config:
        pass

    def __init__(self, cfg: Config, dims: ModelDims) -> None:
        super().__init__()

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        return x
