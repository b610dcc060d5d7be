"""ffn=moe and its routers against independent computations (per-token loops in float64, the papers'
formulas written out), plus discovery, causality, accounting, config errors and the sweep's pairing."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from archlab_plugins.ffn.moe import MixtureOfExperts as MoE
from archlab_plugins.ffn.moe import expert_width
from archlab_plugins.ffn.routers import (
    AuxLossFree,
    ExpertChoice,
    SoftmaxTopK,
    expert_capacity,
    load_balance_loss,
    router_z_loss,
)
from torch import Tensor

from archlab import cli, registry
from archlab.baselines.linear import DenseLinear
from archlab.config import compose
from archlab.context import ForwardContext, KVCache, ModelDims
from archlab.errors import ArchlabError, ConfigError
from archlab.generate import generate
from archlab.metrics import model_metrics
from archlab.model import Choice, LinearFactory, build_student

DIMS = ModelDims(d_model=32, n_layers=2, n_heads=2, context=32)
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.context=32", "ffn=moe"]
ROUTERS = {"softmax_topk": SoftmaxTopK, "aux_free": AuxLossFree, "expert_choice": ExpertChoice}
TOKEN_CHOICE = ["softmax_topk", "aux_free"]


def assert_close_report(actual: Tensor, expected: Tensor, atol: float) -> None:
    diff = (actual.double() - expected.double()).abs()
    assert diff.max() <= atol, f"max |Δ| = {diff.max():.3g}, mean |Δ| = {diff.mean():.3g} (atol {atol})"


def make(dtype: torch.dtype = torch.float64, **fields) -> MoE:
    """A small MoE (8 experts of width 16, top-2) with O(1) weights, so routing is far from uniform."""
    torch.manual_seed(0)
    fields = {"n_experts": 8, "top_k": 2, "granularity": 1, "hidden_dim": 16, **fields}
    cfg = MoE.Config(**fields)
    cfg.validate(DIMS)
    module = MoE(cfg, DIMS, linear=LinearFactory(Choice(DenseLinear, DenseLinear.Config()), {}, n_layers=2))
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p.shape[-2] if name.startswith("w_") else p.shape[-1]
            p.normal_(std=fan_in**-0.5)
    return module.to(dtype)


def context() -> ForwardContext:
    return ForwardContext(positions=torch.arange(1), rotate=None, attend=None)


def expert_ffn(module: MoE, e: int, x: Tensor) -> Tensor:
    """SwiGLU expert e on rows x (r, d), written out: (SiLU(x W_g) ⊙ x W_u) W_d."""
    f, w = module.expert_dim, module.w_gate_up[e].double()
    g, u = x.double() @ w[:, :f], x.double() @ w[:, f:]
    return (g * torch.sigmoid(g) * u) @ module.w_down[e].double()


def shared_ffn(module: MoE, x: Tensor) -> Tensor:
    if not hasattr(module, "shared_up"):
        return torch.zeros_like(x, dtype=torch.float64)
    h = x.double() @ module.shared_up.weight.double().T
    g, u = h.chunk(2, dim=-1)
    return (g * torch.sigmoid(g) * u) @ module.shared_down.weight.double().T


def per_token_sum(module: MoE, x: Tensor, routing) -> Tensor:
    """Σ_j g_j · E_{expert_j}(x_{token_j}) + shared, one assignment at a time: (b, t, d) float64."""
    x_nd = x.reshape(-1, x.shape[-1]).double()
    y = shared_ffn(module, x_nd)
    assignments = zip(routing.token.tolist(), routing.expert.tolist(), routing.gate.tolist(), strict=True)
    for token, expert, gate in assignments:
        y[token] += gate * expert_ffn(module, expert, x_nd[token : token + 1])[0]
    return y.view(x.shape)


# --------------------------------------------------------------------------- discovery


def test_discovered_through_entry_points(capsys) -> None:
    plugin = registry.plugins("ffn")["moe"]
    assert plugin.distribution.startswith("archlab-plugins ") and plugin.load() is MoE
    for name, cls in ROUTERS.items():
        assert registry.plugins("router")[name].load() is cls
        assert registry.get("router", name) is cls
    assert cli.main(["plugins"]) == 0
    listing = capsys.readouterr().out.split("router:")[1]
    assert all(name in listing for name in ROUTERS)


# --------------------------------------------------------------------------- dispatch


def test_softmax_topk_layer_equals_its_equations() -> None:
    """y = shared(x) + Σ_k softmax(x W_r)_k / Σ_top-k · E_k(x), token by token, nothing from the router."""
    module = make(n_shared_experts=1)
    x = torch.randn(2, 5, DIMS.d_model, dtype=torch.float64)
    expected = torch.zeros(10, DIMS.d_model, dtype=torch.float64)
    for i, row in enumerate(x.reshape(10, -1)):
        p = torch.softmax(module.router.gate.weight.double() @ row, dim=0)
        top = sorted(range(8), key=lambda e: -p[e])[:2]
        for e in top:
            expected[i] += p[e] / p[top].sum() * expert_ffn(module, e, row[None])[0]
        expected[i] += shared_ffn(module, row[None])[0]
    assert_close_report(module(x, None), expected.view(2, 5, -1), atol=1e-12)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_sorted_dispatch_equals_a_per_token_sum(router: str, capacity_factor: float | None) -> None:
    module = make(router=router, capacity_factor=capacity_factor, n_shared_experts=1)
    x = torch.randn(3, 7, DIMS.d_model, dtype=torch.float64)
    expected = per_token_sum(module, x, module.router(x))
    assert_close_report(module(x, None), expected, atol=1e-12)


def test_grouped_mm_equals_the_per_expert_loop() -> None:
    outputs, grads = {}, {}
    x = torch.randn(2, 16, DIMS.d_model)
    for grouped in (True, False):
        module = make(torch.float32, grouped_mm=grouped)
        assert module.grouped_mm_fits("cpu", torch.float32)  # d 32 and f 16 are 16-byte aligned rows
        y = module(x, None)
        y.square().sum().backward()
        outputs[grouped], grads[grouped] = y, module.w_gate_up.grad
    assert_close_report(outputs[True], outputs[False], atol=1e-5)
    assert_close_report(grads[True], grads[False], atol=1e-4)


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_identical_experts_give_the_expert_times_the_gate_sum(router: str) -> None:
    module = make(router=router, renormalize=False, n_shared_experts=0)
    with torch.no_grad():
        module.w_gate_up.copy_(module.w_gate_up[:1].expand_as(module.w_gate_up))
        module.w_down.copy_(module.w_down[:1].expand_as(module.w_down))
    x = torch.randn(2, 6, DIMS.d_model, dtype=torch.float64)
    routing = module.router(x)
    gate_sum = torch.zeros(12, dtype=torch.float64).index_add(0, routing.token, routing.gate)
    expected = expert_ffn(module, 0, x.reshape(12, -1)) * gate_sum[:, None]
    assert_close_report(module(x, None), expected.view(2, 6, -1), atol=1e-12)


@pytest.mark.parametrize("router", TOKEN_CHOICE)
def test_renormalised_gates_sum_to_route_scale(router: str) -> None:
    module = make(router=router, route_scale=2.5)
    routing = module.router(torch.randn(2, 6, DIMS.d_model, dtype=torch.float64))
    gate_sum = torch.zeros(12, dtype=torch.float64).index_add(0, routing.token, routing.gate)
    torch.testing.assert_close(gate_sum, torch.full_like(gate_sum, 2.5))


# --------------------------------------------------------------------------- losses


def test_equal_router_logits_give_aux_loss_alpha_and_collapse_gives_alpha_n() -> None:
    module = make(aux_loss_weight=0.01, z_loss_weight=0.0)
    with torch.no_grad():
        module.router.gate.weight.zero_()
    ctx = context()
    module(torch.randn(2, 8, DIMS.d_model, dtype=torch.float64), ctx)
    value, weight = ctx.losses["moe/load_balance"]
    assert weight * float(value.detach()) == pytest.approx(0.01, rel=1e-12)
    assert math.isclose(ctx.add_aux_losses(torch.tensor(0.0)).item(), 0.01, rel_tol=1e-12)
    probs = torch.tensor([[1.0 - 7e-9] + [1e-9] * 7] * 16)  # every token on expert 0, p ≈ 1
    assert float(load_balance_loss(probs, probs.topk(1).indices)) == pytest.approx(8.0, rel=1e-6)


def test_aux_loss_counts_pre_drop_assignments_and_skips_padding() -> None:
    module = make(capacity_factor=0.25, z_loss_weight=0.0)
    x = torch.randn(2, 8, DIMS.d_model, dtype=torch.float64)
    ctx = context()
    module(x, ctx)
    probs = torch.softmax(x.reshape(16, -1) @ module.router.gate.weight.double().T, dim=-1)
    counts = torch.zeros(8, dtype=torch.float64)
    for row in probs:  # f_i from the full top-2 choice, before any token is dropped
        counts[row.topk(2).indices] += 1
    expected = 8 * (counts / (2 * 16) * probs.mean(0)).sum()
    torch.testing.assert_close(ctx.losses["moe/load_balance"][0], expected)
    assert ctx.metrics["moe/drop_rate"] > 0
    mask = torch.tensor([True] * 10 + [False] * 6)  # padding rows change nothing
    padded = torch.cat([probs[:10], torch.rand(6, 8, dtype=torch.float64)])
    torch.testing.assert_close(
        load_balance_loss(padded, padded.topk(2).indices, mask),
        load_balance_loss(probs[:10], probs[:10].topk(2).indices),
    )


def test_z_loss_is_the_squared_logsumexp() -> None:
    logits = torch.full((4, 8), -math.log(8.0))  # logsumexp = 0
    assert float(router_z_loss(logits)) == pytest.approx(0.0, abs=1e-12)
    assert float(router_z_loss(logits + 3.0)) == pytest.approx(9.0, rel=1e-6)
    module = make(aux_loss_weight=0.0, z_loss_weight=1e-3)
    x = torch.randn(2, 5, DIMS.d_model, dtype=torch.float64)
    ctx = context()
    module(x, ctx)
    lse = torch.logsumexp(x @ module.router.gate.weight.detach().T, dim=-1)
    value, weight = ctx.losses["moe/router_z"]
    assert float(value.detach()) == pytest.approx(float(lse.square().mean())) and weight == 1e-3


# --------------------------------------------------------------------------- aux_free


@pytest.mark.parametrize("renormalize", [False, True])
def test_aux_free_bias_selects_but_never_gates(renormalize: bool) -> None:
    module = make(router="aux_free", renormalize=renormalize, seq_aux_loss_weight=1e-4)
    router = module.router
    x = torch.randn(2, 8, DIMS.d_model, dtype=torch.float64)
    s = torch.sigmoid(x.reshape(16, -1) @ router.gate.weight.detach().T)  # unbiased scores
    before = router(x)
    with torch.no_grad():
        router.expert_bias[3] = 10.0  # expert 3 now wins every token
    after = router(x)
    chosen = {
        (t, e): g
        for t, e, g in zip(*(r.tolist() for r in (after.token, after.expert, after.gate)), strict=True)
    }
    kept = set(zip(before.token.tolist(), before.expert.tolist(), strict=True))
    assert all(e == 3 for (t, e) in chosen if (t, e) not in kept)
    assert {t for t, e in chosen if e == 3} == set(range(16)), "the bias did not change the selection"
    for (t, e), g in chosen.items():
        selected = [e2 for (t2, e2) in chosen if t2 == t]
        expected = s[t, e] / s[t, selected].sum() if renormalize else s[t, e]
        assert g == pytest.approx(float(expected), rel=1e-12), "gate must come from the unbiased score"
    ctx = context()
    ctx.add_aux_losses(module(x, ctx).sum()).backward()  # output and the sequence-wise loss
    assert router.expert_bias.grad is None and not router.expert_bias.requires_grad
    assert "router.expert_bias" in module.state_dict()
    assert all(p is not router.expert_bias for p in module.parameters())
    assert make(torch.float32, router="aux_free").router.expert_bias.dtype == torch.float32


def test_bias_updates_reduce_the_load_ratio_of_a_skewed_router() -> None:
    module = make(torch.float32, router="aux_free", bias_update_rate=0.01, seq_aux_loss_weight=0.0)
    router = module.router
    with torch.no_grad():
        router.gate.weight[:, 0] = torch.linspace(2, -2, 8)  # feature 0 is constant: expert 0 favoured
    x = torch.randn(4, 64, DIMS.d_model)
    x[..., 0] = 1.0
    ratios = []
    for _ in range(100):
        counts = torch.bincount(router(x).expert, minlength=8).float()
        ratios.append(float(counts.max() / counts.mean()))
        router.on_step_end()
    assert ratios[0] > 2.0, ratios[0]
    assert ratios[40] < ratios[20] < ratios[10] < ratios[0], ratios[:41:10]
    assert max(ratios[50:]) <= 1.25, ratios[50:]


def test_bias_update_sums_the_step_and_ignores_eval() -> None:
    router = make(router="aux_free", bias_update_rate=0.5).router
    x = torch.randn(1, 8, DIMS.d_model, dtype=torch.float64)
    router.eval()
    router(x)
    router.on_step_end()
    assert not router.expert_bias.any(), "an eval forward moved the bias"
    router.train()
    loads = [torch.bincount(router(x).expert, minlength=8) for _ in range(2)]  # two micro-batches
    router.on_step_end()
    load = (loads[0] + loads[1]).double()
    torch.testing.assert_close(router.expert_bias, 0.5 * torch.sign(load.mean() - load))
    assert not router.step_load.any()


# --------------------------------------------------------------------------- capacity, expert choice


@pytest.mark.parametrize("router", TOKEN_CHOICE)
def test_capacity_bound_holds_and_dropped_tokens_output_zero(router: str) -> None:
    module = make(router=router, capacity_factor=0.5, n_shared_experts=0)
    x = torch.randn(3, 16, DIMS.d_model, dtype=torch.float64)
    routing = module.router(x)
    capacity = math.ceil(0.5 * 2 * 16 / 8)
    for b in range(3):
        in_row = (routing.token >= 16 * b) & (routing.token < 16 * (b + 1))
        assert torch.bincount(routing.expert[in_row], minlength=8).max() <= capacity
    dropped = torch.bincount(routing.token, minlength=48) == 0
    assert dropped.any(), "capacity 0.5 should drop some token entirely"
    y = module(x, None).reshape(48, -1)
    assert torch.equal(y[dropped], torch.zeros_like(y[dropped]))


def test_expert_choice_fills_every_expert_exactly_to_capacity() -> None:
    module = make(router="expert_choice", capacity_factor=2.0)
    x = torch.randn(3, 12, DIMS.d_model, dtype=torch.float64)
    routing = module.router(x)
    capacity = expert_capacity(12, 2, 8, 2.0)
    assert capacity == 6
    for b in range(3):
        in_row = (routing.token >= 12 * b) & (routing.token < 12 * (b + 1))
        assert torch.bincount(routing.expert[in_row], minlength=8).tolist() == [capacity] * 8
    assert module.is_causal is False and module.experts_per_token == 4.0  # capacity_factor · top_k


# --------------------------------------------------------------------------- causality, generation


CAUSAL = [
    {"router": "softmax_topk"},
    {"router": "aux_free"},
    {"router": "softmax_topk", "capacity_factor": 0.5},
]


@pytest.mark.parametrize("fields", CAUSAL)
def test_check_causal_token_choice(fields: dict) -> None:
    module = make(n_shared_experts=1, **fields)
    x = torch.randn(2, 12, DIMS.d_model, dtype=torch.float64)
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 6, DIMS.d_model, dtype=torch.float64)
    before, after = module(x, None), module(changed, None)
    # not bit-exact: BLAS may block an expert's slice differently when its row count changes
    assert_close_report(after[:, :6], before[:, :6], atol=1e-12)
    assert module.is_causal is True
    alone = module(x[1:], None)  # capacity counts per sequence: a row alone equals the row in a batch
    assert_close_report(alone, before[1:], atol=1e-12)


def test_generate_refuses_expert_choice_and_decodes_token_choice() -> None:
    torch.manual_seed(0)
    prompt = torch.randint(0, 256, (1, 4))
    student = build_student(compose([*SMALL, "ffn.router=expert_choice"]))
    with pytest.raises(ArchlabError, match="not causal"):
        generate(student, prompt, 3)
    student = build_student(compose([*SMALL, "ffn.router=aux_free"])).eval()
    tokens = torch.randint(0, 256, (2, 10))
    cache = KVCache()
    with torch.no_grad():
        full = student(tokens)
        steps = torch.stack([student(tokens[:, i : i + 1], cache=cache)[:, 0] for i in range(10)], 1)
    assert_close_report(steps, full, atol=1e-5)
    assert generate(student, prompt, 3).shape == (1, 7)


# --------------------------------------------------------------------------- accounting, metrics, config


def test_num_active_params_against_the_formula() -> None:
    tiny = ModelDims(d_model=128, n_layers=4, n_heads=4, context=256)
    cfg = MoE.Config()
    f = expert_width(cfg, 128)
    assert f == 88  # 8/3 · 128 / 4 = 85.3, rounded up to a multiple of 8
    linear = LinearFactory(Choice(DenseLinear, DenseLinear.Config()), {}, n_layers=4)
    module = MoE(cfg, tiny, linear=linear)
    # router 128·16, shared 3·128·88, 3 of 16 routed experts of 3·128·88
    assert module.num_active_params() == cfg.num_active_params(tiny) == 2048 + 33792 + 3 * 33792 == 137216
    assert sum(p.numel() for p in module.parameters()) == cfg.num_params(tiny) == 2048 + 17 * 33792
    ec = MoE.Config(router="expert_choice", capacity_factor=2.0)
    assert MoE(ec, tiny, linear=linear).num_active_params() == ec.num_active_params(tiny) == 2048 + 7 * 33792
    counts = model_metrics(build_student(compose(["ffn=moe"])), torch.float32)
    dense = model_metrics(build_student(compose([])), torch.float32)
    # 4 layers: the MoE adds 4 · (137,216 − 3·128·344) active parameters to the dense student
    assert counts["params/active_non_embedding"] - dense["params/non_embedding"] == 4 * (137216 - 132096)
    assert counts["params/non_embedding"] - dense["params/non_embedding"] == 4 * (2048 + 17 * 33792 - 132096)


def test_routing_metrics_and_losses_reach_the_context() -> None:
    student = build_student(compose([*SMALL, "ffn.capacity_factor=1.0"]))
    ctx = student.new_context(torch.zeros(2, 16, dtype=torch.long))
    student(torch.randint(0, 256, (2, 16)), ctx)
    metrics = ctx.metrics
    for name in ("load_max_over_mean", "drop_rate", "unrouted", "router_entropy", "load_balance", "router_z"):
        assert f"moe/{name}" in metrics and f"moe/layer1/{name}" in metrics, name
    assert metrics["moe/load_max_over_mean"] >= 1.0 and 0 <= metrics["moe/drop_rate"] < 1
    assert metrics["moe/router_entropy"] <= math.log(16) + 1e-6
    assert set(ctx.losses) == {"moe/load_balance", "moe/router_z"}
    assert ctx.losses["moe/load_balance"][1] == 1e-2 and ctx.losses["moe/router_z"][1] == 1e-3


def test_bf16_autocast_keeps_the_router_in_fp32() -> None:
    module = make(torch.float32, router="aux_free")
    x = torch.randn(2, 8, DIMS.d_model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x, context())
        routing = module.router(x)
    assert torch.isfinite(y).all() and routing.gate.dtype == torch.float32


def test_state_dict_roundtrip_keeps_the_bias() -> None:
    module = make(router="aux_free")
    with torch.no_grad():
        module.router.expert_bias.uniform_(-1, 1)
    fresh = make(router="aux_free")
    fresh.load_state_dict(module.state_dict())
    x = torch.randn(2, 6, DIMS.d_model, dtype=torch.float64)
    assert torch.equal(fresh(x, None), module(x, None))


BAD = [
    ("router", "nope", "aux_free, expert_choice, softmax_topk"),
    ("n_experts", 0, "positive"),
    ("top_k", 9, "at most ffn.n_experts=8"),
    ("n_shared_experts", -1, "0 or more"),
    ("granularity", 0, "positive"),
    ("aux_loss_weight", -1.0, ">= 0"),
    ("capacity_factor", 0.0, "positive"),
    ("route_scale", -2.0, "positive"),
]


@pytest.mark.parametrize(("key", "value", "allowed"), BAD)
def test_config_errors_name_the_key(key: str, value, allowed: str) -> None:
    with pytest.raises(ConfigError, match=allowed) as err:
        MoE.Config(**{"n_experts": 8, "top_k": 2, key: value}).validate(DIMS)
    assert err.value.key == f"ffn.{key}"
    with pytest.raises(ConfigError) as err:
        MoE.Config(router_options={"gain": 2.0}).validate(DIMS)
    assert err.value.key == "ffn.router_options.gain"


def test_a_third_party_router_plugs_in_with_its_own_options(tmp_path: Path, monkeypatch) -> None:
    """An entry point and a class: no edit to the MoE layer. ``first`` sends every token to expert 0."""
    info = tmp_path / "first_router-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: first-router\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[archlab.router]\nfirst = first_router:First\n")
    (tmp_path / "first_router.py").write_text(
        textwrap.dedent("""
        from dataclasses import dataclass
        import torch
        from archlab_plugins.ffn.routers import Routing

        class First(torch.nn.Module):
            @dataclass
            class Config:
                route_scale: float = 1.0
                gain: float = 1.0

            @staticmethod
            def experts_per_token(cfg):
                return 1

            def __init__(self, cfg, *, d_model, n_experts, linear):
                super().__init__()
                self.cfg, self.n_experts = cfg, n_experts

            def forward(self, x):
                n = x.shape[0] * x.shape[1]
                token = torch.arange(n)
                gate = torch.full((n,), self.cfg.gain * self.cfg.route_scale)
                probs = torch.eye(self.n_experts)[torch.zeros(n, dtype=torch.long)]
                return Routing(token, torch.zeros_like(token), gate, probs, n)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.clear_cache()
    try:
        module = make(router="first", route_scale=0.5, router_options={"gain": 3.0}, n_shared_experts=0)
        x = torch.randn(2, 4, DIMS.d_model, dtype=torch.float64)
        expected = 1.5 * expert_ffn(module, 0, x.reshape(8, -1)).view(2, 4, -1)
        assert_close_report(module(x, None), expected, atol=1e-12)
        assert module.num_active_params() == 32 * 3 * 16 * 1  # no router weights, one expert
    finally:
        sys.modules.pop("first_router", None)
        registry.clear_cache()


def test_moe_sweep_pairs_dense_and_moe_at_equal_active_parameters() -> None:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from archlab.config import register_configs

    register_configs()
    sweeps = Path(__file__).resolve().parents[2] / "sweeps"
    active, routers = {}, {}
    with initialize_config_dir(str(sweeps), version_base="1.3"):
        for arch in ("dense", "softmax_topk", "aux_free", "expert_choice"):
            overrides = ["hydra.searchpath=[pkg://archlab.conf]", f"moe_arch={arch}"]
            cfg = hydra_compose("moe", overrides=overrides)
            routers[arch] = cfg.ffn.get("router")
            active[arch] = model_metrics(build_student(cfg), torch.float32)["params/active_non_embedding"]
    assert routers == {"dense": None, **{name: name for name in ROUTERS}}
    for arch, count in active.items():
        assert abs(count / active["dense"] - 1) <= 0.01, f"{arch}: {count:,} vs dense {active['dense']:,}"


@pytest.mark.slow
def test_archlab_train_aux_free_writes_routing_metrics(train_cli) -> None:
    summary = train_cli("ffn=moe", "ffn.router=aux_free")
    for key in ("moe/load_max_over_mean", "moe/layer0/router_entropy", "aux/moe/seq_balance"):
        assert f"train/{key}" in summary, key
    assert summary["params/active"] < summary["params/total"]
