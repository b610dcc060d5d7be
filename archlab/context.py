"""What every sublayer receives besides its input: dimensions at build time, a context per forward."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from archlab.errors import ConfigError


@dataclass(frozen=True)
class ModelDims:
    """The student's shape, shared by every plugin of one model."""

    d_model: int
    n_layers: int
    n_heads: int
    context: int
    vocab_size: int = 256

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        for key in ("d_model", "n_layers", "n_heads", "context", "vocab_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}", getattr(self, key), "a positive integer")
        if self.d_model % self.n_heads:
            raise ConfigError("model.n_heads", self.n_heads, f"a divisor of model.d_model={self.d_model}")


class KVCache:
    """Decode state of one generation: what each attention module keeps per token, and the offset.

    An attention plugin calls ``ctx.cache.append(self, *tensors)`` with the tensors it
    keeps for the new tokens, shaped ``(..., t, x)``; it gets back the full tensors
    ``(..., offset + t, x)`` for every token so far. Buffers grow by doubling, so decoding
    n tokens copies O(n) elements, not O(n²), and never beyond ``max_tokens`` (the model's
    context, when given). ``offset`` (tokens already cached) is
    advanced by the student after each forward.
    """

    def __init__(self, max_tokens: int | None = None) -> None:
        self.offset, self.max_tokens = 0, max_tokens
        self._buffers: dict[int, list[Tensor]] = {}
        self._lengths: dict[int, int] = {}

    def append(self, module: object, *new: Tensor) -> tuple[Tensor, ...]:
        key, t = id(module), new[0].shape[-2]
        length = self._lengths.get(key, 0)
        buffers = self._buffers.get(key)
        if buffers is None or length + t > buffers[0].shape[-2]:
            capacity = max(length + t, 2 * (buffers[0].shape[-2] if buffers else 32))
            capacity = min(capacity, max(self.max_tokens or capacity, length + t))
            grown = [x.new_empty(*x.shape[:-2], capacity, x.shape[-1]) for x in new]
            for old, buf in zip(buffers or [], grown, strict=False):
                buf[..., :length, :] = old[..., :length, :]
            buffers = self._buffers[key] = grown
        for buf, x in zip(buffers, new, strict=True):
            buf[..., length : length + t, :] = x
        self._lengths[key] = length + t
        return tuple(buf[..., : length + t, :] for buf in buffers)

    def keep(self, first: int, indices: Tensor) -> None:
        """Of the tokens cached from position ``first`` on, keep those at ``indices`` (ascending, relative
        to ``first``) and drop the rest, in every module's buffers; ``offset`` becomes
        ``first + len(indices)``. Speculative decoding rolls the cache back to the accepted path with it."""
        rows = first + indices.to(torch.long)
        for key, buffers in self._buffers.items():
            for buf in buffers:
                kept = buf.index_select(-2, rows.to(buf.device))  # a copy, so overlapping moves are safe
                buf[..., first : first + len(rows), :] = kept
            self._lengths[key] = first + len(rows)
        self.offset = first + len(rows)

    def elements_per_token(self) -> int:
        """Cached elements per token per sequence, summed over modules (for checking accounting)."""
        return sum(
            math.prod(buf.shape[1:-2]) * buf.shape[-1] for bufs in self._buffers.values() for buf in bufs
        )


@dataclass
class ForwardContext:
    """Per-forward state handed to every sublayer.

    ``rotate`` applies the position plugin to queries/keys at ``positions``;
    ``attend`` is the attention kernel chosen for this run (see ``archlab.kernels``);
    it is causal, aligned so the last query sees every key. ``cache`` is set while
    generating: attention plugins append what they keep per token to it.
    ``attn_mask`` (t, s) bool, True = may attend, is set only to verify a token tree
    (``archlab.speculative``): ``attend`` then already applies it instead of the causal
    mask, and a plugin that computes attention itself must use it and declare
    ``supports_tree_mask = True``. A loss that needs the labels is the ``AuxLoss``
    capability (``archlab.slots``), not a field here. ``tokens`` are the input ids (b, t)
    of this forward (the new ones only, with a cache). ``value_lambdas`` holds the
    student's value-residual weights, None when that option is off (attention plugins opt
    in by calling ``value_residual``). ``layer`` is the index of the transformer layer whose
    sublayer is running (set by the student before each call), for per-layer state and names.
    Sublayers report auxiliary losses with ``add_loss(name, value, weight)``: the
    trainer adds ``weight * value`` to the objective and logs each name. Metrics
    reported with ``add_metric`` are averaged over the sublayers that report them.
    """

    positions: Tensor
    rotate: Callable[[Tensor, Tensor], Tensor]
    attend: Callable[[Tensor, Tensor, Tensor], Tensor]
    cache: KVCache | None = None
    attn_mask: Tensor | None = None
    tokens: Tensor | None = None
    value_lambdas: Sequence[Tensor] | None = None
    layer: int = 0
    losses: dict[str, tuple[Tensor, float]] = field(default_factory=dict)
    _metrics: dict[str, list[float | Tensor]] = field(default_factory=lambda: defaultdict(list))
    _first_values: Tensor | None = None

    @property
    def targets(self) -> None:
        """Gone in API 1: the labels reach a plugin through the ``AuxLoss`` capability."""
        raise AttributeError(
            "ctx.targets and ctx.soft are gone (archlab API 1): offer "
            "aux_loss(ctx, targets, soft) instead (archlab.api.AuxLoss, docs/plugins.md)"
        )

    soft = targets

    def add_loss(self, name: str, value: Tensor, weight: float = 1.0) -> None:
        if name in self.losses:
            prev, prev_weight = self.losses[name]
            if prev_weight != weight:
                raise ValueError(f"aux loss {name!r} reported with weights {prev_weight} and {weight}")
            value = prev + value
        self.losses[name] = (value, weight)

    def value_residual(self, v: Tensor) -> Tensor:
        """Value residual learning (ResFormer, Zhou et al., arXiv 2410.17897), per attention layer n:

            V'_1 = V_1,    V'_n = λ_{n,1} V_n + λ_{n,2} V_1   (n ≥ 2; learnable λ owned by the student)

        Every attention layer calls it once per forward, on its values (any shape, the same in every
        layer, e.g. (b, g, t, k) with g KV heads); n is ``layer``; identity when the option is off.
        """
        if self.value_lambdas is None:
            return v
        n = self.layer
        if n == 0:
            self._first_values = v
            return v
        lam = self.value_lambdas[n - 1].to(v.dtype)
        return lam[0] * v + lam[1] * self._first_values

    def add_metric(self, name: str, value: float | Tensor) -> None:
        self._metrics[name].append(value.detach() if isinstance(value, Tensor) else value)

    def add_aux_losses(self, objective: Tensor) -> Tensor:
        """``objective + Σ weight · value`` over the reported auxiliary losses."""
        for value, weight in self.losses.values():
            objective = objective + weight * value
        return objective

    @property
    def metrics(self) -> dict[str, float]:
        out = {f"aux/{k}": float(v.detach()) for k, (v, _) in self.losses.items()}
        out.update({k: float(sum(v)) / len(v) for k, v in self._metrics.items()})
        return out


def positions_for(tokens: Tensor, offset: int = 0) -> Tensor:
    """Positions offset..offset+t-1 of a (b, t) batch, on its device."""
    return torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
