"""The step-overhead benchmark still runs end to end (tiny settings, no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch

BENCHMARK = "step_overhead"
TINY = [
    "--steps",
    "2",
    "--warmup",
    "1",
    "--batch-size",
    "2",
    "--peak-size",
    "64",
    "--override",
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.context=32",
]


def test_benchmark_runs_checks_equivalence_and_writes_json(bench, tmp_path, capsys):
    out = tmp_path / "result.json"
    results = bench.main([*TINY, "--json", str(out)])

    assert results["ratio"] > 0 and results["ratio_of_medians"] > 0
    assert results["equivalence"]["checked"] is True
    assert results["equivalence"]["logits_max_abs_diff"] <= results["equivalence"]["atol"]
    assert results["tokens_per_step"] == 2 * 32
    assert results["matmul_peak_gflops"] > 0
    assert json.loads(out.read_text())["ratio"] == pytest.approx(results["ratio"])
    printed = capsys.readouterr().out
    assert "ratio archlab/plain" in printed and "target ratio <= 1.05" in printed


def test_every_student_weight_has_a_plain_twin(bench):
    setup = bench.build(bench.parse_args(TINY))
    plain_keys = set(setup.plain.state_dict())
    assert {bench.plain_key(k) for k in setup.student.state_dict()} == plain_keys


@pytest.mark.parametrize("override", ["attention.n_kv_heads=1", "memory=engram"])
def test_non_default_slots_are_refused(bench, override):
    with pytest.raises(SystemExit, match="default slots"):
        bench.build(bench.parse_args([*TINY, override]))


def test_equivalence_check_catches_a_different_model(bench):
    setup = bench.build(bench.parse_args(TINY))
    with torch.no_grad():
        setup.plain.blocks[0].up.weight[0, 0] += 1.0
    with pytest.raises(AssertionError, match="logits"):
        bench.check_equivalence(setup.student, setup.plain, setup.x)


@pytest.mark.slow  # one torch.compile of the tiny student: tens of seconds on 2 CPU cores
def test_compile_adds_the_compiled_student_side_by_side(bench, capsys):
    results = bench.main([*TINY, "--compile"])

    assert results["compiled"]["ms_per_step"] > 0 and results["compile_speedup"] > 0
    assert results["equivalence"]["compiled_loss_rel_diff"] <= bench.COMPILED_LOSS_RTOL
    assert len(results["step_times_s"]["compiled"]) == 2
    assert "speedup plain/compiled" in capsys.readouterr().out


def test_compile_needs_a_warmup_step(bench):
    with pytest.raises(SystemExit):
        bench.parse_args([*TINY, "--compile", "--warmup", "0"])
