"""Size and cost of a student, measured on the built module.

Plugins can override what the walker measures for their own subtree:
``num_active_params()`` (parameters one token touches, e.g. MoE), ``num_sparse_params()``
(looked-up tables such as Engram's, reported as ``params/sparse``), ``weight_bytes()``
(e.g. packed ternary weights), ``attention_flops_per_token(context)`` and
``kv_cache_elems_per_token()`` (attention plugins).

Definitions (per token, forward pass; training ≈ 3× forward, Kaplan et al. 2020):
    non_embedding = parameters of everything but the token embedding and the head
    weight_bytes/non_embedding = stored bytes of those parameters (the denominator of density per byte)
    flops_per_token = 2 · (active non-embedding params + d · vocab) + Σ attention FLOPs at full context
    kv_bytes_per_token = Σ_layers kv_cache_elems_per_token · bytes per element
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from archlab.model import Student
from archlab.slots import (
    ActiveParams,
    AttentionFlops,
    KVCacheAccounting,
    SparseParams,
    WeightBytes,
    offering,
    offers,
)


def _walk(module: nn.Module, override: type, count: Callable, own: Callable[[nn.Parameter], int]) -> int:
    """Sum ``own`` over parameters, letting a module that offers ``override`` speak for its subtree
    (``count(module)``)."""
    if offers(module, override):
        return int(count(module))
    total = sum(own(p) for p in module.parameters(recurse=False))
    return total + sum(_walk(child, override, count, own) for child in module.children())


def _body(model: Student) -> list[nn.Module]:
    """Every module of the student except the token embedding and the head."""
    return [
        model.position,
        model.sublayers,
        model.norms,
        model.residual,
        model.final_norm,
        model.value_lambdas,
    ]


def parameter_counts(model: Student) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied weights
    non_embedding = sum(p.numel() for m in _body(model) for p in m.parameters())
    active_body = sum(
        _walk(m, ActiveParams, lambda a: a.num_active_params(), nn.Parameter.numel) for m in _body(model)
    )
    return {
        "params/total": total,
        "params/non_embedding": non_embedding,
        "params/active": total - non_embedding + active_body,
        "params/active_non_embedding": active_body,
        "params/sparse": sum(m.num_sparse_params() for m in offering(model.modules(), SparseParams)),
    }


def weight_bytes(module: nn.Module) -> int:
    return _walk(module, WeightBytes, lambda m: m.weight_bytes(), lambda p: p.numel() * p.element_size())


def flops_per_token(model: Student, active_non_embedding: int) -> int:
    d = model.dims
    attention = sum(m.attention_flops_per_token(d.context) for m in offering(model.modules(), AttentionFlops))
    return 2 * (active_non_embedding + d.d_model * d.vocab_size) + attention


def kv_bytes_per_token(model: Student, dtype: torch.dtype) -> int:
    elems = sum(m.kv_cache_elems_per_token() for m in offering(model.modules(), KVCacheAccounting))
    return elems * dtype.itemsize


def model_metrics(model: Student, compute_dtype: torch.dtype) -> dict[str, int]:
    """Every static metric of a run, under the names all loggers use."""
    counts = parameter_counts(model)
    fwd = flops_per_token(model, counts["params/active_non_embedding"])
    return {
        **counts,
        "weight_bytes": weight_bytes(model),
        "weight_bytes/non_embedding": sum(weight_bytes(m) for m in _body(model)),  # density per byte
        "flops_per_token": fwd,
        "train_flops_per_token": 3 * fwd,
        "kv_bytes_per_token": kv_bytes_per_token(model, compute_dtype),
    }
