"""The scaling benchmark still runs end to end: a toy student, 1 vs 2 processes (torchrun), no timing
assertions; its check that every variant did the same work catches variants that did not."""

from __future__ import annotations

import json

import pytest

BENCHMARK = "scaling"
QUICK = ["--quick", "--steps", "2", "--warmup", "1", "--batch-size", "4"]


@pytest.mark.slow  # a torchrun of 2 processes and 4 trainers: tens of seconds on 2 busy cores
def test_benchmark_runs_both_process_counts_and_writes_json(bench, tmp_path, capsys):
    out = tmp_path / "result.json"
    results = bench.main([*QUICK, "--json", str(out)])

    variants = results["variants"]
    assert set(variants) == {"none-2t", "none-1t", "ddp-1p", "ddp-2p"}
    assert (variants["ddp-2p"]["processes"], variants["ddp-2p"]["threads"]) == (2, 1)
    assert all(len(ts) == 2 for ts in results["step_times_s"].values())
    assert results["tokens_per_step"] == 4 * 32
    assert results["first_loss_max_rel_gap"] <= bench.LOSS_RTOL
    assert results["ddp_overhead"] > 0 and results["speedup_2p_over_1p_2t"] > 0
    assert json.loads(out.read_text())["ddp_overhead"] == pytest.approx(results["ddp_overhead"])
    printed = capsys.readouterr().out
    assert "the fair comparison" in printed and "target DDP overhead <= 1.05" in printed


def test_variants_that_saw_other_windows_are_refused(bench):
    with pytest.raises(AssertionError, match="first-step losses differ"):
        bench.check_same_work({"none-2t": 5.5452, "none-1t": 5.5452, "ddp-1p": 5.5452, "ddp-2p": 5.3})
    assert bench.check_same_work({"none-2t": 5.5452, "ddp-2p": 5.5452 * (1 + 1e-7)}) < bench.LOSS_RTOL


@pytest.mark.parametrize("flags", [["--batch-size", "5"], ["--threads", "2"]])
def test_bad_flags_are_refused(bench, flags):
    with pytest.raises(SystemExit):
        bench.parse_args(flags)
