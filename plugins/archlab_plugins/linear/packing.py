"""Ternary weights packed 2 bits each, 4 per byte (techniques.md §4, "Packing").

    code = q + 1 ∈ {0, 1, 2}        (00 → −1, 01 → 0, 10 → +1; 11 is never written)
    byte j = code[4j] | code[4j+1] << 2 | code[4j+2] << 4 | code[4j+3] << 6
The flat length is padded with zeros (code 01) to a multiple of 4, so n weights take ceil(n/4) bytes.
NOTE: this is archlab's own layout, not bitnet.cpp's I2_S (which interleaves blocks of 128); convert
before handing a file to those kernels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Bits a packed ternary weight occupies, and the information it carries (log2 3).
STORAGE_BITS = 2.0
INFORMATION_BITS = math.log2(3)
SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def packed_nbytes(n: int) -> int:
    """Bytes that ``n`` packed ternary weights take: ceil(n / 4)."""
    return -(-n // 4)


def pack_ternary(q: Tensor) -> Tensor:
    """Any-shape tensor of values in {−1, 0, +1} -> uint8 (ceil(n/4),), 4 weights per byte."""
    codes = (q.detach().flatten().to(torch.int16) + 1).to(torch.uint8)
    if codes.numel() and (codes > 2).any():
        raise ValueError("pack_ternary: values must be in {-1, 0, +1}")
    pad = packed_nbytes(codes.numel()) * 4 - codes.numel()
    codes = torch.cat([codes, torch.ones(pad, dtype=torch.uint8, device=codes.device)])
    groups = codes.view(-1, 4) << SHIFTS.to(codes.device)  # j 4
    return groups[:, 0] | groups[:, 1] | groups[:, 2] | groups[:, 3]


def unpack_ternary(packed: Tensor, n: int) -> Tensor:
    """uint8 (ceil(n/4),) -> int8 (n,) in {−1, 0, +1}; the inverse of ``pack_ternary`` (padding dropped)."""
    if packed.numel() != packed_nbytes(n):
        raise ValueError(f"unpack_ternary: {n} weights need {packed_nbytes(n)} bytes, got {packed.numel()}")
    codes = (packed.view(-1, 1) >> SHIFTS.to(packed.device)) & 3  # j 4
    return codes.flatten()[:n].to(torch.int8) - 1
