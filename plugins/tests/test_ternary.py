"""linear=ternary (BitNet b1.58) against independent computations: the quantisers written another way, a plain
linear with the quantised weight for the STE gradients, an int32 matmul, the byte layout worked by hand, and
the student built with and without the block pre-norms (techniques.md §4e)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from archlab_plugins.linear.packing import INFORMATION_BITS, STORAGE_BITS, pack_ternary, unpack_ternary
from archlab_plugins.linear.ternary import TernaryLinear, quantize_activations, ternarize
from torch import Tensor, nn

from archlab import registry
from archlab.baselines.linear import DenseLinear
from archlab.baselines.norm import RMSNorm
from archlab.config import compose
from archlab.errors import ConfigError
from archlab.metrics import model_metrics
from archlab.model import build_student

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.context=16"]
EPS = 1e-5


def assert_close_report(actual: Tensor, expected: Tensor, atol: float) -> None:
    diff = (actual.double() - expected.double()).abs()
    assert diff.max() <= atol, f"max |Δ| = {diff.max():.3g}, mean |Δ| = {diff.mean():.3g} (atol {atol})"


def make(bias: bool = False, role: str = "ffn.up", **fields) -> TernaryLinear:
    torch.manual_seed(0)
    layer = TernaryLinear(TernaryLinear.Config(**fields), 24, 12, bias=bias, init_std=0.3, role=role)
    with torch.no_grad():
        if bias:
            layer.bias.normal_()
        if layer.norm is not None:
            layer.norm.weight.uniform_(0.5, 1.5)
    return layer


def rms_norm(x: Tensor, g: Tensor, eps: float = 1e-6) -> Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g


def absmean_ternary(w: Tensor) -> Tensor:
    """W̃ by thresholds: ±1 where |W| >= (γ + ε)/2 (round half away; ties have probability 0), else 0."""
    gamma = w.abs().sum() / w.numel()
    return torch.where(w.abs() >= (gamma + EPS) / 2, torch.sign(w), torch.zeros_like(w))


def reference(layer: TernaryLinear, x: Tensor) -> Tensor:
    """The fake-quant output written out in float64: norm, absmax int8, absmean ternary, plain linear."""
    x = x.double()
    x_hat = rms_norm(x, layer.norm.weight.double()) if layer.norm is not None else x
    s = 127 / x_hat.abs().amax(-1, keepdim=True)
    x_q = torch.round(x_hat * s) / s
    w = layer.weight.double()
    y = x_q @ (absmean_ternary(w) * w.abs().mean()).T
    return y + layer.bias.double() if layer.bias is not None else y


def test_discovery() -> None:
    assert registry.get("linear", "ternary") is TernaryLinear


def test_weights_are_ternary_and_dequantise_to_q_times_absmean() -> None:
    w = torch.randn(64, 48) * 0.05
    q, gamma = ternarize(w, EPS)
    assert set(q.unique().tolist()) <= {-1.0, 0.0, 1.0} and {-1.0, 1.0} <= set(q.unique().tolist())
    assert torch.equal(q, absmean_ternary(w))
    assert gamma.item() == pytest.approx(w.abs().mean().item(), rel=1e-6)
    layer = make()
    x = torch.randn(3, 5, 24)
    assert_close_report(layer(x), reference(layer, x), 1e-5)  # dequantised weight = W̃ · mean|W|


def test_activation_quantisation_maps_the_largest_magnitude_to_127() -> None:
    x = torch.randn(4, 7, 33) * torch.logspace(-3, 2, 7)[:, None]  # tokens of very different scales
    x_int, s = quantize_activations(x, 127, EPS)
    assert torch.equal(x_int, x_int.round()) and x_int.min() >= -128 and x_int.max() <= 127
    peak = x.abs().argmax(-1, keepdim=True)
    assert torch.equal(x_int.gather(-1, peak), 127 * torch.sign(x.gather(-1, peak)))
    assert ((x_int / s - x).abs() <= 0.5 / s + 1e-6 * x.abs()).all()


def test_ste_gradient_equals_plain_linear_with_quantised_weight() -> None:
    layer = make(bias=True)
    x = torch.randn(2, 6, 24, requires_grad=True)
    upstream = torch.randn(2, 6, 12)
    (layer(x) * upstream).sum().backward()

    x_ref = x.detach().clone().requires_grad_()
    g = layer.norm.weight.detach().clone().requires_grad_()
    x_hat = rms_norm(x_ref, g)
    s = 127 / x_hat.abs().amax(-1, keepdim=True)
    x_q = x_hat + (torch.round(x_hat * s) / s - x_hat).detach()  # identity backward through the quantiser
    w = layer.weight.detach()
    w_q = (absmean_ternary(w) * w.abs().mean()).requires_grad_()
    (F.linear(x_q, w_q, layer.bias.detach()) * upstream).sum().backward()

    assert_close_report(layer.weight.grad, w_q.grad, 1e-5)  # = upstreamᵀ x_q, passed unchanged to W
    assert_close_report(x.grad, x_ref.grad, 1e-5)
    assert_close_report(layer.norm.weight.grad, g.grad, 1e-5)


def test_integer_path_matches_fake_quant() -> None:
    layer = make(bias=True)
    x = torch.randn(3, 9, 24) * 4
    assert_close_report(layer.integer_forward(x), layer(x), 1e-5)


def test_quantisation_is_float32_under_bf16_autocast(monkeypatch) -> None:
    import archlab_plugins.linear.ternary as module

    seen = []
    for name in ("quantize_activations", "ternarize"):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda t, *a, f=original: seen.append(t.dtype) or f(t, *a))
    layer = make()
    x = torch.randn(2, 5, 24).bfloat16()
    with torch.no_grad():
        expected = F.linear(  # quantised in float64 (exact for these values), matmul in bf16 as autocast does
            reference_input(layer, x.double()).bfloat16(),
            (absmean_ternary(layer.weight.double()) * layer.weight.double().abs().mean()).bfloat16(),
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = layer(x)
    assert actual.dtype == torch.bfloat16 and seen == [torch.float32, torch.float32]
    assert_close_report(actual, expected, 1e-2)


def reference_input(layer: TernaryLinear, x: Tensor) -> Tensor:
    x_hat = rms_norm(x, layer.norm.weight.double())
    s = 127 / x_hat.abs().amax(-1, keepdim=True)
    return torch.round(x_hat * s) / s


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 13, 1001])
def test_pack_unpack_roundtrip_any_length(n: int) -> None:
    t = torch.randint(-1, 2, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.int8)
    packed = pack_ternary(t)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 4)
    assert torch.equal(unpack_ternary(packed, n), t)


def test_byte_layout_by_hand() -> None:
    # codes q+1: [-1, 0, 1, 0] -> 0, 1, 2, 1 -> 0 | 1<<2 | 2<<4 | 1<<6 = 100; [1] -> 2, padded with code 1s
    packed = pack_ternary(torch.tensor([-1, 0, 1, 0, 1]))
    assert packed.tolist() == [100, 2 | 1 << 2 | 1 << 4 | 1 << 6]
    with pytest.raises(ValueError, match="-1, 0, \\+1"):
        pack_ternary(torch.tensor([2]))


def test_packed_state_roundtrip_freezes_the_scale_and_counts_bytes() -> None:
    layer = make(bias=True)
    state = layer.packed_state()
    n = layer.weight.numel()
    assert state["weight.packed"].numel() == math.ceil(n / 4) and state["weight.scale"].numel() == 1
    assert layer.weight_bytes() == math.ceil(n / 4) + 4 + 4 * (24 + 12)  # W̃, γ, norm gain, bias (fp32)
    fresh = TernaryLinear(TernaryLinear.Config(), 24, 12, bias=True, init_std=0.3, role="ffn.up")
    fresh.load_packed_state(state)
    x = torch.randn(2, 3, 24)
    assert_close_report(fresh(x), layer(x), 1e-6)
    assert set(fresh.weight.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert fresh.frozen_scale.item() == layer.weight.abs().mean().item()  # not mean|W̃·γ|
    assert fresh.weight_bytes() == layer.weight_bytes()


def test_bits_per_weight() -> None:
    assert STORAGE_BITS == 8 * pack_ternary(torch.zeros(4096)).numel() / 4096 == 2.0
    assert abs(INFORMATION_BITS - 1.585) < 1e-3


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="activation_bits"):
        make(activation_bits=9)
    with pytest.raises(ConfigError, match="linear.eps"):
        make(eps=0.0)


# --------------------------------------------------------------------------- in the student


def norm_kinds(overrides: list[str]) -> list[str]:
    return [type(n).__name__ for n in build_student(compose([*SMALL, *overrides])).norms]


def test_pre_norm_is_dropped_only_where_every_projection_normalises_its_input() -> None:
    assert norm_kinds(["linear=ternary"]) == ["Identity"] * 4
    assert norm_kinds(["linear=ternary", "linear.subln=true"]) == ["RMSNorm"] * 4  # 2B4T: pre-norm stays
    assert norm_kinds(["model.linear_overrides={ffn: ternary}"]) == ["RMSNorm", "Identity"] * 2
    assert (
        norm_kinds(["linear=ternary", "model.linear_overrides={attention: dense}"])
        == ["RMSNorm", "Identity"] * 2
    )
    if "moe" in registry.plugins("ffn"):  # the router reads the stream itself: its pre-norm must stay
        assert norm_kinds(["linear=ternary", "ffn=moe"]) == ["Identity", "RMSNorm"] * 2


def test_subln_puts_norms_before_out_and_down_only() -> None:
    model = build_student(compose([*SMALL, "linear=ternary", "linear.subln=true"]))
    attention, ffn = model.sublayers[0], model.sublayers[1]
    assert [m.norm is not None for m in (attention.qkv, attention.out, ffn.up, ffn.down)] == [0, 1, 0, 1]


def test_head_stays_full_precision_unless_named() -> None:
    untied = [*SMALL, "head.tied=false", "linear=ternary"]
    assert type(build_student(compose(untied)).head.proj) is DenseLinear
    named = build_student(compose([*untied, "model.linear_overrides={head: ternary}"]))
    assert type(named.head.proj) is TernaryLinear


def test_overrides_share_the_slot_config_when_they_name_its_plugin() -> None:
    cfg = compose(
        [*SMALL, "linear=ternary", "linear.activation_bits=4", "model.linear_overrides={ffn.up: ternary}"]
    )
    ffn = build_student(cfg).sublayers[1]
    assert ffn.up.q_max == ffn.down.q_max == 7


def test_dropping_the_pre_norm_changes_nothing_at_unit_gains() -> None:
    """Built both ways: with identity pre-norms, and with RMSNorm pre-norms put back (normalising twice).
    RMSNorm(RMSNorm(x)) = RMSNorm(x) while the gains are 1 (eps ~ 0, so no int8 rounding flips), so the
    logits agree; the identity build is the one that normalises once."""
    torch.manual_seed(0)
    cfg = compose([*SMALL, "linear=ternary", "linear.norm_eps=1e-30", "norm.eps=1e-30"])
    single, double = build_student(cfg), build_student(cfg)
    double.load_state_dict(single.state_dict())
    double.norms = nn.ModuleList(RMSNorm(RMSNorm.Config(1e-30), 32) for _ in double.norms)
    tokens = torch.randint(0, 256, (2, 16))
    assert_close_report(single(tokens), double(tokens), 1e-4)


def test_weight_bytes_of_a_ternary_student_are_packed() -> None:
    dense = model_metrics(build_student(compose(SMALL)), torch.float32)
    ternary_model = build_student(compose([*SMALL, "linear=ternary"]))
    ternary = model_metrics(ternary_model, torch.float32)
    linears = [m for m in ternary_model.modules() if isinstance(m, TernaryLinear)]
    n = sum(m.weight.numel() for m in linears)
    gains = sum(m.norm.weight.numel() for m in linears)
    assert ternary["params/total"] - dense["params/total"] == gains - 4 * 32  # own gains replace pre-norms
    expected = (
        dense["weight_bytes"] - 4 * n - 4 * 4 * 32 + sum(math.ceil(m.weight.numel() / 4) + 4 for m in linears)
    )
    assert ternary["weight_bytes"] == expected + 4 * gains
