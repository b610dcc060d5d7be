"""The Medusa benchmark still runs end to end (tiny settings, no timing assertions)."""

from __future__ import annotations

import json

import pytest

from archlab.testing import requires_plugin

BENCHMARK = "medusa"
pytestmark = requires_plugin("head", "medusa")
TINY = [
    "--train-steps",
    "2",
    "--batch-size",
    "2",
    "--prompts",
    "2",
    "--prompt-tokens",
    "4",
    "--new-tokens",
    "8",
]
TINY += ["--repeats", "1", "--eval-windows", "2", "--trees", "2,1", "1,1,1"]
SHAPE = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.context=32", "head.num_heads=3"]
SHAPE += ["trainer.eval_tokens=256", "data.max_bytes=100000"]


def test_benchmark_trains_measures_and_reloads_its_checkpoint(bench, tmp_path):
    out = tmp_path / "result.json"
    r = bench.main([*TINY, "--json", str(out), "--override", *SHAPE])
    assert r["num_heads"] == 3 and set(r["head_top1"]) == {"head1_top1", "head2_top1", "head3_top1"}
    assert [t["tree"] for t in r["trees"]] == ["2,1", "1,1,1"] and [t["nodes"] for t in r["trees"]] == [5, 4]
    for t in r["trees"]:
        assert t["identical"] and 1 <= t["mean_accepted_length"] <= len(t["tree"].split(",")) + 1
        assert t["tokens_per_s"] > 0 and t["plain_tokens_per_s"] > 0 and t["speedup"] > 0
    assert json.loads(out.read_text())["trees"][0]["tree"] == "2,1"
    again = bench.main([*TINY, "--checkpoint", r["run_dir"], "--trees", "1"])
    assert again["head_top1"] == pytest.approx(r["head_top1"])
    assert "tok/forward" in bench.format_report(again)
    with pytest.raises(SystemExit, match="3 draft heads"):
        bench.main([*TINY, "--checkpoint", r["run_dir"], "--trees", "1,1,1,1"])
