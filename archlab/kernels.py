"""One entry point for causal attention: xformers on CUDA, PyTorch SDPA elsewhere, eager as reference.

Inputs are ``q: (b, h, t, k)``, ``k: (b, g, t, k)`` and ``v: (b, g, t, kv)`` with ``g``
KV heads dividing ``h`` (GQA; Ainslie et al. 2023, arXiv 2305.13245); v's head size may
differ (MLA). The softmax scale is 1/sqrt(k). The kernel is chosen once per
run by ``select_kernel`` and logged; xformers is imported only on CUDA, so CPU
runs never see its "can't load C++/CUDA extensions" warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from archlab.errors import ConfigError

log = logging.getLogger(__name__)
BACKENDS = ("auto", "xformers", "sdpa", "eager")


def causal_mask(t_q: int, t_k: int, device: torch.device | None = None) -> Tensor:
    """(t_q, t_k) bool, True where query i may see key j: j ≤ t_k − t_q + i (bottom-right aligned, so
    the last query sees every key: the layout of cached decoding)."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(t_k - t_q)


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Reference: softmax(q kᵀ / sqrt(k) + causal mask) v in float32.

    Query i of t_q sees keys 0..t_k − t_q + i (bottom-right aligned, for cached decoding).
    ``mask`` (t_q, t_k) bool, True = may attend, replaces the causal mask (tree verification)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # b h t t
    t_q, t_k = q.shape[2], k.shape[2]
    if mask is None:
        mask = causal_mask(t_q, t_k, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """PyTorch's fused scaled-dot-product attention (any device).

    SDPA's ``is_causal`` aligns the mask top-left; with cached keys (t_q < t_k) the mask
    must be aligned bottom-right, so one query sees every key and longer blocks get an
    explicit mask. An explicit ``mask`` (t_q, t_k), True = may attend, replaces the causal one.
    """
    t_q, t_k, gqa = q.shape[2], k.shape[2], k.shape[1] != q.shape[1]
    if mask is None and (t_q == t_k or t_q == 1):
        return F.scaled_dot_product_attention(q, k, v, is_causal=t_q > 1, enable_gqa=gqa)
    if mask is None:
        mask = causal_mask(t_q, t_k, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def xformers_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """xformers memory-efficient attention in its 4-D layout (b, t, h, k).

    Grouped K/V heads are repeated to one per query head (head i reads KV head i // (h/g), the
    ``(g r)`` grouping of ``eager_attention``): xformers' 5-D grouped layout has forward operators
    only, so training would silently leave xformers. Cached decoding (fewer queries than keys)
    takes the bottom-right-aligned causal bias, like ``causal_mask``.
    """
    from xformers.ops import memory_efficient_attention
    from xformers.ops.fmha.attn_bias import LowerTriangularFromBottomRightMask, LowerTriangularMask

    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    q4, k4, v4 = (rearrange(x, "b h t k -> b t h k") for x in (q, k, v))
    bias = LowerTriangularFromBottomRightMask() if k.shape[2] != q.shape[2] else LowerTriangularMask()
    y = memory_efficient_attention(q4, k4, v4, attn_bias=bias)
    return rearrange(y, "b t h k -> b h t k")


_UNSUPPORTED_BY_XFORMERS: set[tuple] = set()


def xformers_or_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """xformers where it supports these shapes (e.g. MLA's q/k and v head sizes differ), else SDPA.

    The run's probe checks one shape; a plugin may call with others. The first refusal
    per shape is logged once and that shape goes to SDPA from then on. Calls with an
    explicit ``mask`` (tree verification) go to SDPA.
    """
    if mask is not None:
        return sdpa_attention(q, k, v, mask)
    key = (q.shape[-1], v.shape[-1], q.dtype, q.shape[2] == k.shape[2], q.requires_grad)
    if key not in _UNSUPPORTED_BY_XFORMERS:
        try:
            return xformers_attention(q, k, v)
        except (NotImplementedError, ValueError) as exc:
            _UNSUPPORTED_BY_XFORMERS.add(key)
            log.warning("xformers does not support %s; using SDPA for it: %s", key, str(exc).splitlines()[0])
    return sdpa_attention(q, k, v)


_FUNCTIONS = {"xformers": xformers_or_sdpa, "sdpa": sdpa_attention, "eager": eager_attention}


@dataclass
class Kernel:
    """The attention function of a run, with why it was chosen."""

    name: str
    reason: str
    fn: Callable[..., Tensor] = field(init=False, repr=False)  # (q, k, v, mask=None) -> y

    def __post_init__(self) -> None:
        self.fn = _FUNCTIONS[self.name]

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.fn(q, k, v, mask)


def _xformers_problem(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None if xformers runs these inputs on ``device``, else why not."""
    if device.type != "cuda":
        return f"xformers has no kernels for device {device.type}"
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: not usable here
        return f"xformers does not import: {exc}"
    probe = torch.zeros(1, 1, 2, head_dim, device=device, dtype=dtype)
    try:
        xformers_attention(probe, probe, probe)
    except Exception as exc:  # noqa: BLE001 - NotImplementedError when no operator fits
        return f"xformers does not support these inputs: {str(exc).splitlines()[0]}"
    return None


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError("model.attention_backend", backend, f"one of {', '.join(BACKENDS)}")


def select_kernel(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> Kernel:
    """Choose the attention kernel: ``auto`` prefers xformers where it works, else SDPA.

    Asking for ``xformers`` where it cannot run is an error, not a silent switch of numerics.
    """
    check_backend(backend)
    if backend in ("sdpa", "eager"):
        return Kernel(backend, "requested")
    problem = _xformers_problem(device, dtype, head_dim)
    if problem is None:
        return Kernel("xformers", "CUDA and supported inputs")
    if backend == "xformers":
        raise ConfigError("model.attention_backend", backend, f"auto, sdpa or eager ({problem})")
    return Kernel("sdpa", problem)
