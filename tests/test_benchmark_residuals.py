"""The residual-plugins benchmark still runs end to end (tiny settings, no timing assertions)."""

from __future__ import annotations

import json

import pytest

from archlab.testing import requires_plugin

BENCHMARK = "residuals"
pytestmark = requires_plugin("residual", "attnres")
TINY = [
    "--steps",
    "1",
    "--warmup",
    "0",
    "--batch-size",
    "2",
    "--override",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.context=32",
]


def test_benchmark_runs_every_variant_and_writes_json(bench, tmp_path, capsys):
    out = tmp_path / "result.json"
    variants = ["attnres_full", "attnres_block", "denseformer", "hyper"]
    results = bench.main([*TINY, "--variants", *variants, "--json", str(out)])

    assert list(results["step_ms"]) == ["prenorm", *variants]  # the reference first
    assert results["ratio"]["prenorm"] == 1.0 and all(r > 0 for r in results["ratio"].values())
    params = results["params"]
    # attnres adds (4 sublayers + 1) pseudo-queries of d = 32; denseformer 2·5/2 scalars
    assert params["attnres_full"] - params["prenorm"] == 5 * 32
    assert params["denseformer"] - params["prenorm"] == 5
    assert set(results["targets_met"]) == {"attnres_block", "attnres_full"}
    assert json.loads(out.read_text())["ratio"] == pytest.approx(results["ratio"])
    printed = capsys.readouterr().out
    assert "attnres_block: ratio" in printed and "target <= 1.1" in printed


def test_variants_can_be_chosen_and_prenorm_is_always_the_reference(bench):
    args = bench.parse_args(["--variants", "hyper", "attnres_block"])
    assert args.variants == ["prenorm", "hyper", "attnres_block"]
    assert bench.compose_variant(args, "attnres_block").residual.mode.name == "block"
