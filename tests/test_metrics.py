"""Size and cost metrics against hand-counted formulas for the dense student."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archlab.config import compose
from archlab.metrics import model_metrics
from archlab.model import build_student

D, L, H, T, V = 32, 2, 4, 16, 256
BASE = [f"model.d_model={D}", f"model.n_layers={L}", f"model.n_heads={H}", f"model.context={T}"]


def dense_formula(kv_heads: int, hidden: int) -> int:
    """Per layer: q,k,v,o projections + SwiGLU (gate, up, down) + two norm gains."""
    head_dim = D // H
    attention = D * D + 2 * D * kv_heads * head_dim + D * D
    return L * (attention + 3 * D * hidden + 2 * D) + D  # + final norm


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_counts_flops_and_kv_bytes_match_the_formulas(kv_heads: int) -> None:
    model = build_student(compose([*BASE, f"attention.n_kv_heads={kv_heads}"]))
    m = model_metrics(model, torch.float32)
    body = dense_formula(kv_heads, hidden=88)
    assert m["params/non_embedding"] == body
    assert m["params/total"] == body + V * D  # tied head: the embedding counts once
    assert m["params/active"] == m["params/total"]
    assert m["weight_bytes"] == 4 * m["params/total"]
    assert m["weight_bytes/non_embedding"] == 4 * body
    assert m["kv_bytes_per_token"] == L * 2 * kv_heads * (D // H) * 4
    assert m["flops_per_token"] == 2 * (body + D * V) + L * 4 * T * D
    assert m["train_flops_per_token"] == 3 * m["flops_per_token"]
    assert model_metrics(model, torch.bfloat16)["kv_bytes_per_token"] == m["kv_bytes_per_token"] // 2


def test_untied_head_counts_as_embedding_not_body() -> None:
    tied = model_metrics(build_student(compose(BASE)), torch.float32)
    untied = model_metrics(build_student(compose([*BASE, "head.tied=false"])), torch.float32)
    assert untied["params/total"] == tied["params/total"] + V * D
    assert untied["params/non_embedding"] == tied["params/non_embedding"]


def test_plugins_can_override_active_params_and_weight_bytes() -> None:
    """A sublayer that says only part of it is active (e.g. MoE) or that packs weights is believed."""
    model = build_student(compose(BASE))
    ffn = model.sublayers[1]
    full = sum(p.numel() for p in ffn.parameters())
    ffn.num_active_params = lambda: full // 4
    ffn.weight_bytes = lambda: 10
    m = model_metrics(model, torch.float32)
    assert m["params/active"] == m["params/total"] - full + full // 4
    assert m["weight_bytes"] == 4 * (m["params/total"] - full) + 10
    assert m["weight_bytes/non_embedding"] == 4 * (m["params/non_embedding"] - full) + 10
    assert (
        m["flops_per_token"] < model_metrics(build_student(compose(BASE)), torch.float32)["flops_per_token"]
    )
    assert isinstance(ffn, nn.Module)
