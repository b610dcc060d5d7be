"""The MoE benchmark still runs end to end (tiny settings, no timing assertions)."""

from __future__ import annotations

import json

import pytest

from archlab.testing import requires_plugin

BENCHMARK = "moe"
pytestmark = requires_plugin("ffn", "moe")
TINY = [
    "--steps",
    "2",
    "--warmup",
    "1",
    "--batch-size",
    "2",
    "--override",
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.context=32",
    "--moe",
    "ffn.n_experts=4",
    "ffn.top_k=2",
    "ffn.granularity=2",
]


@pytest.mark.parametrize("router", ["softmax_topk", "aux_free"])
def test_benchmark_runs_matches_active_params_and_writes_json(bench, tmp_path, capsys, router):
    out = tmp_path / "result.json"
    results = bench.main([*TINY, "--router", router, "--json", str(out)])

    params = results["params"]
    assert abs(params["dense_active"] / params["moe_active"] - 1) < 0.02
    assert params["moe_total"] > params["dense_total"]
    assert results["ratio"] > 0 and results["tokens_per_step"] == 2 * 32
    assert {"sorted+loop", "naive"} <= set(results["dispatch_ms"])
    assert max(results["dispatch"]["max_abs_diff_vs_naive"].values()) <= bench.DISPATCH_ATOL
    assert json.loads(out.read_text())["ratio"] == pytest.approx(results["ratio"])
    printed = capsys.readouterr().out
    assert "ratio moe/dense" in printed and "target ratio <= 1.5" in printed


def test_naive_and_sorted_dispatch_agree_with_capacity_dropping(bench):
    args = bench.parse_args([*TINY, "ffn.capacity_factor=0.5"])  # TINY ends in --moe
    cfg = bench.compose_student(args, bench.moe_overrides(args))
    layer = bench.build_student(cfg).sublayers[1]
    import torch

    _, meta = bench.dispatch_fns(layer, torch.randn(2, 32, 32))
    assert meta["assignments"] < 2 * 32 * 2  # some were dropped
    assert max(meta["max_abs_diff_vs_naive"].values()) <= bench.DISPATCH_ATOL
