"""Baseline plugins against independent computations: the papers' equations, torch references, invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from archlab.baselines.attention import MultiHeadAttention
from archlab.baselines.ffn import MLP, Activation
from archlab.baselines.linear import DenseLinear
from archlab.baselines.norm import LayerNorm, RMSNorm
from archlab.baselines.position import NoPosition, RoPE
from archlab.config import compose
from archlab.context import ForwardContext, ModelDims
from archlab.kernels import eager_attention
from archlab.model import Choice, LinearFactory, build_student

DIMS = ModelDims(d_model=32, n_layers=2, n_heads=4, context=16)
LINEAR = LinearFactory(Choice(DenseLinear, DenseLinear.Config()), {}, n_layers=2)


def context(t: int, position=None) -> ForwardContext:
    position = position or NoPosition(NoPosition.Config(), DIMS)
    return ForwardContext(positions=torch.arange(t), rotate=position.rotate, attend=eager_attention)


def test_mha_matches_torch_multihead_attention() -> None:
    """With no position signal, `mha` is torch.nn.MultiheadAttention with a causal mask."""
    torch.manual_seed(0)
    ours = MultiHeadAttention(MultiHeadAttention.Config(), DIMS, linear=LINEAR)
    ref = nn.MultiheadAttention(DIMS.d_model, DIMS.n_heads, bias=False, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.out_proj.weight.copy_(ours.out.weight)
    x = torch.randn(2, 9, DIMS.d_model)
    mask = torch.ones(9, 9, dtype=torch.bool).triu(1)
    expected, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(ours(x, context(9)), expected, atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_shared_kv_heads() -> None:
    """GQA with g KV heads = MHA whose K/V weights repeat each KV head h/g times."""
    torch.manual_seed(0)
    gqa = MultiHeadAttention(MultiHeadAttention.Config(n_kv_heads=2), DIMS, linear=LINEAR)
    mha = MultiHeadAttention(MultiHeadAttention.Config(), DIMS, linear=LINEAR)
    d, k = DIMS.d_model, DIMS.head_dim
    wq, wk, wv = gqa.qkv.weight.split((d, 2 * k, 2 * k))
    repeat = lambda w: w.view(2, k, d).repeat_interleave(2, dim=0).reshape(d, d)  # noqa: E731
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat((wq, repeat(wk), repeat(wv))))
        mha.out.weight.copy_(gqa.out.weight)
    rope = RoPE(RoPE.Config(), DIMS)
    x = torch.randn(2, 11, d)
    torch.testing.assert_close(gqa(x, context(11, rope)), mha(x, context(11, rope)), atol=1e-5, rtol=1e-5)


def test_rope_rotates_pairs_like_complex_multiplication() -> None:
    """Rotate-half RoPE: (x_i, x_{i+k/2}) as a complex number times exp(i·pos·θ^(−2i/k))."""
    rope = RoPE(RoPE.Config(theta=10000.0), DIMS)
    x = torch.randn(1, 1, 16, DIMS.head_dim, dtype=torch.float64)
    half = DIMS.head_dim // 2
    z = torch.complex(x[..., :half], x[..., half:])
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / DIMS.head_dim)
    z = z * torch.polar(torch.ones(16, half, dtype=torch.float64), torch.arange(16.0)[:, None] * freqs)
    expected = torch.cat((z.real, z.imag), dim=-1)
    torch.testing.assert_close(
        rope.rotate(x.float(), torch.arange(16)), expected.float(), atol=1e-5, rtol=1e-5
    )


def test_rope_scores_depend_only_on_relative_position() -> None:
    rope = RoPE(RoPE.Config(), DIMS)
    q, k = torch.randn(DIMS.head_dim), torch.randn(DIMS.head_dim)

    def score(m: int, n: int) -> float:
        qm = rope.rotate(q.view(1, 1, 1, -1), torch.tensor([m]))
        kn = rope.rotate(k.view(1, 1, 1, -1), torch.tensor([n]))
        return float((qm * kn).sum())

    assert score(3, 1) == pytest.approx(score(12, 10), abs=1e-4)
    assert score(5, 5) == pytest.approx(float(q @ k), abs=1e-4)


def test_rmsnorm_and_layernorm_match_their_equations() -> None:
    x = torch.randn(3, 5, 32)
    rms = RMSNorm(RMSNorm.Config(eps=1e-6), 32)
    nn.init.normal_(rms.weight)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * rms.weight
    torch.testing.assert_close(rms(x), expected, atol=1e-5, rtol=1e-5)
    ln = LayerNorm(LayerNorm.Config(eps=1e-5), 32)
    nn.init.normal_(ln.weight), nn.init.normal_(ln.bias)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(ln(x), (x - mean) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias)


@pytest.mark.parametrize("activation", list(Activation))
def test_mlp_matches_its_equation(activation: Activation) -> None:
    mlp = MLP(MLP.Config(activation=activation), DIMS, linear=LINEAR)
    x = torch.randn(2, 3, DIMS.d_model)
    if activation is Activation.swiglu:
        w_gate, w_up = mlp.up.weight.chunk(2)
        assert w_gate.shape[0] == 88  # 8/3 · 32 rounded up to a multiple of 8
        expected = (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ mlp.down.weight.T
    else:
        assert mlp.up.weight.shape[0] == 4 * DIMS.d_model
        expected = F.gelu(x @ mlp.up.weight.T) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x, context(3)), expected, atol=1e-5, rtol=1e-5)


def test_linear_factory_overrides_by_role_prefix_and_scales_residual_outputs() -> None:
    class Marked(DenseLinear):
        pass

    factory = LinearFactory(
        Choice(DenseLinear, DenseLinear.Config()), {"ffn": Choice(Marked, Marked.Config())}, n_layers=8
    )
    assert type(factory(4, 4, role="ffn.up")) is Marked
    assert type(factory(4, 4, role="attention.qkv")) is DenseLinear
    assert type(factory(4, 4, role="ffnx.up")) is DenseLinear  # prefixes match whole role parts
    assert factory(4, 4, role="attention.out").init_std == pytest.approx(0.02 / math.sqrt(16))
    assert factory(4, 4, role="attention.qkv").init_std == 0.02


VARIANTS = [
    [],
    ["attention.n_kv_heads=1", "norm=layernorm", "position=none"],
    ["ffn=relu2", "head.tied=false", "ffn.bias=true"],
    ["ffn.activation=gelu", "attention.n_kv_heads=2"],
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(o) or "default")
def test_student_is_causal(overrides: list[str]) -> None:
    """Changing tokens after position t leaves the logits at positions ≤ t unchanged."""
    torch.manual_seed(0)
    cfg = compose(["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.context=16", *overrides])
    model = build_student(cfg).eval()
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 9:] = torch.randint(0, 256, (2, 7))
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_student_forward_is_the_prenorm_equation() -> None:
    """h ← h + f_i(norm_i(h)) over sublayers, logits = final_norm(h) Eᵀ (tied head)."""
    cfg = compose(["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.context=16"])
    model = build_student(cfg)
    tokens = torch.randint(0, 256, (2, 10))
    ctx = model.new_context(tokens)
    h = model.embed.weight[tokens]
    for norm, sublayer in zip(model.norms, model.sublayers, strict=True):
        h = h + sublayer(norm(h), ctx)
    expected = model.final_norm(h) @ model.embed.weight.T
    torch.testing.assert_close(model(tokens), expected)


def test_tied_head_shares_the_embedding_and_untied_does_not() -> None:
    base = ["model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.context=16"]
    tied, untied = build_student(compose(base)), build_student(compose([*base, "head.tied=false"]))
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == 256 * 32
    assert "head.proj.weight" in untied.state_dict() and not any(
        k.startswith("head") for k in tied.state_dict()
    )


def test_context_longer_than_model_context_is_refused() -> None:
    model = build_student(compose(["model.d_model=32", "model.n_layers=1", "model.context=8"]))
    with pytest.raises(ValueError, match="exceed model.context=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
