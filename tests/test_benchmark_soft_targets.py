"""The soft-target build benchmark runs end to end (n-gram teacher, tiny settings, no timing assertions)."""

from __future__ import annotations

import json

BENCHMARK = "soft_targets"


def test_benchmark_times_both_variants_and_they_agree(bench, tmp_path) -> None:
    out = tmp_path / "result.json"
    args = ["--teacher", "ngram", "--context", "32", "--batch-size", "2", "--top-k", "8", "--json", str(out)]
    results = bench.main([*args, "--override", "data.max_bytes=100000", "teacher.order=2"])
    assert results == json.loads(out.read_text())
    assert results["tokens_per_pass"] == 2 * 2 * 32 and results["vocab_size"] == 256
    assert results["same_ids"] is True and results["max_logprob_diff"] == 0.0
    for variant in ("copy", "on-device"):
        assert results[variant]["tokens_per_s"] > 0 and len(results[variant]["passes"]) == 2
