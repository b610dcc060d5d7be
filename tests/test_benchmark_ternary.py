"""The ternary benchmark still runs end to end (tiny settings, no timing assertions)."""

from __future__ import annotations

import json
import math

from archlab.testing import requires_plugin

BENCHMARK = "ternary"
pytestmark = requires_plugin("linear", "ternary")
TINY = ["--steps", "1", "--warmup", "0", "--batch-size", "2", "--override"]
TINY += ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.context=32"]


def test_benchmark_runs_reports_packed_bytes_and_writes_json(bench, tmp_path, capsys):
    out = tmp_path / "result.json"
    results = bench.main([*TINY, "--json", str(out)])

    m = results["memory"]
    d, f = 32, 88  # one layer; SwiGLU hidden f = 8/3·d rounded up to a multiple of 8
    assert m["ternary_weights"] == d * 3 * d + d * d + d * 2 * f + f * d  # qkv, out, up (gate|up), down
    assert m["ternary_scales"] == 4
    assert m["ternary_bytes"] == math.ceil(m["ternary_weights"] / 4) and m["bits_stored"] == 2.0
    assert m["bytes_fp32"] == 4 * results["params"]["ternary"] > m["bytes_packed"]
    wb = results["weight_bytes"]
    assert wb["ternary"] < wb["ternary_ffn"] < wb["dense"]
    assert (
        set(results["ratio"]) == {"ternary", "ternary_ffn"} and results["integer_diff"] <= bench.INTEGER_ATOL
    )
    assert json.loads(out.read_text())["memory"]["bytes_packed"] == m["bytes_packed"]
    assert "bits/weight stored" in capsys.readouterr().out
