"""model.value_residual (ResFormer, arXiv 2410.17897) against a plainly written 2-layer forward.

The reference below recomputes attention by hand (explicit GQA head repetition, causal mask,
softmax) and mixes layer 1's values into layer 2 as V'_2 = λ_1 V_2 + λ_2 V_1.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from archlab.baselines.attention import MultiHeadAttention
from archlab.config import compose, validate
from archlab.context import KVCache
from archlab.errors import ConfigError
from archlab.generate import generate
from archlab.metrics import model_metrics
from archlab.model import Student, build_student

SHAPE = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.context=24"]
GQA = ["attention.n_kv_heads=2"]


def student(*overrides: str, lambdas: tuple[float, float] | None = None) -> Student:
    """A 2-layer student with O(1) random weights, so that a 1e-5 tolerance is a real one."""
    torch.manual_seed(0)
    model = build_student(compose([*SHAPE, *overrides])).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(std=p.shape[1] ** -0.5)
        if lambdas is not None:
            model.value_lambdas[0].copy_(torch.tensor(lambdas))
    return model


def attention_by_hand(model: Student, i: int, a: Tensor, v_first: Tensor | None, lam: Tensor) -> tuple:
    """Sublayer i (mha) on its normed input a (b, t, d): returns (output, this layer's raw values)."""
    attn, (b, t, _) = model.sublayers[i], a.shape
    h, g, k = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, key, v = (a @ attn.qkv.weight.T).split((h * k, g * k, g * k), dim=-1)
    q, key, v = (x.view(b, t, -1, k).transpose(1, 2) for x in (q, key, v))  # b heads t k
    positions = torch.arange(t)
    q, key = model.position.rotate(q, positions), model.position.rotate(key, positions)
    mixed = v if v_first is None else lam[0] * v + lam[1] * v_first
    key, mixed = key.repeat_interleave(h // g, dim=1), mixed.repeat_interleave(h // g, dim=1)
    scores = q @ key.transpose(-1, -2) / math.sqrt(k)
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    y = (scores.softmax(-1) @ mixed).transpose(1, 2).reshape(b, t, h * k)
    return y @ attn.out.weight.T, v


def plain_forward(model: Student, tokens: Tensor) -> Tensor:
    """Pre-norm residual stream over (attention, ffn) × 2 with the value residual in layer 2."""
    x, v_first = model.embed(tokens), None
    ctx = model.new_context(tokens)
    lam = model.value_lambdas[0]
    for layer in range(2):
        y, v = attention_by_hand(model, 2 * layer, model.norms[2 * layer](x), v_first, lam)
        v_first = v if layer == 0 else v_first
        x = x + y
        x = x + model.sublayers[2 * layer + 1](model.norms[2 * layer + 1](x), ctx)
    return model.head(model.final_norm(x), ctx)


@pytest.mark.parametrize("variant", [[], GQA])
def test_matches_the_plainly_written_mixture(variant: list[str]) -> None:
    model = student("model.value_residual=true", *variant, lambdas=(0.3, 1.7))
    tokens = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        expected = plain_forward(model, tokens)
        torch.testing.assert_close(model(tokens), expected, atol=1e-5, rtol=1e-5)
        model.value_lambdas[0].copy_(torch.tensor([1.0, 0.0]))  # a different mixture is seen
        assert (model(tokens) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("variant", [[], GQA])
def test_lambdas_one_zero_are_the_model_without_value_residual(variant: list[str]) -> None:
    tokens = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        off = student(*variant)(tokens)
        on = student("model.value_residual=true", *variant, lambdas=(1.0, 0.0))(tokens)
    torch.testing.assert_close(on, off, atol=1e-6, rtol=1e-6)


def test_cached_decoding_equals_the_full_forward() -> None:
    model = student("model.value_residual=true", *GQA, lambdas=(0.6, 0.8))
    tokens = torch.randint(0, 256, (2, 14))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache()
        steps = [model(tokens[:, :6], cache=cache)]  # a prefill, then one token at a time
        steps += [model(tokens[:, i : i + 1], cache=cache) for i in range(6, 14)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    prompt = tokens[:, :4]
    torch.testing.assert_close(generate(model, prompt, 8), generate(model, prompt, 8, use_cache=False))


def test_lambdas_learn_and_count_as_non_embedding_parameters() -> None:
    model = student("model.value_residual=true", lambdas=(0.5, 0.5))
    tokens = torch.randint(0, 256, (2, 9))
    model(tokens).square().mean().backward()
    assert model.value_lambdas[0].grad.abs().min() > 0
    on, off = model_metrics(model, torch.float32), model_metrics(student(), torch.float32)
    for key in ("params/total", "params/non_embedding", "params/active_non_embedding"):
        assert on[key] - off[key] == 2, key  # (λ_1, λ_2) of layer 2


def test_default_init_is_half_half() -> None:
    torch.manual_seed(0)
    model = build_student(compose([*SHAPE, "model.value_residual=true"]))
    assert [p.tolist() for p in model.value_lambdas] == [[0.5, 0.5]]


def test_an_attention_plugin_that_does_not_opt_in_is_a_config_error(monkeypatch) -> None:
    monkeypatch.delattr(MultiHeadAttention, "supports_value_residual")
    with pytest.raises(ConfigError) as err:
        validate(compose([*SHAPE, "model.value_residual=true"]))
    assert err.value.key == "model.value_residual" and "attention=mha" in str(err.value)
