"""The distillation-overhead benchmark still runs end to end (tiny settings, no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch

K = 2
BENCHMARK = "distill_overhead"
TINY = [
    "--repeats",
    "2",
    "--warmup",
    "1",
    "--batch-size",
    "2",
    "--k",
    str(K),
    "--sweep-steps",
    "3",
    "--teacher-override",
    "teacher.order=3",
    "--override",
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.context=32",
    "data.max_bytes=200000",
]


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_benchmark_runs_builds_the_teacher_once_and_writes_json(bench, tmp_path, capsys, keep_threads):
    out = tmp_path / "result.json"
    results = bench.main([*TINY, "--cache-dir", str(tmp_path / "cache"), "--json", str(out)])

    step, sweep = results["step"], results["sweep"]
    assert step["tokens_per_step"] == 2 * 32
    for name in ("kd", "ce"):
        assert step[name]["ms_per_step"] > 0 and len(step["step_times_s"][name]) == 2
    assert step["ratio"] > 0 and step["ratio_of_medians"] > 0
    assert step["same_initial_weights"] is True
    assert step["setup"]["cache_built"] is True and step["setup"]["teacher"]["built"] == 1
    assert all(
        v > 0 for k, v in step["breakdown_ms"].items() if k not in ("objective_extra", "explained_extra")
    )

    # the cache: one teacher build for the whole sweep, no teacher work in the cached students
    assert sweep["cached"]["teacher_builds"] == 1
    assert sweep["cache"]["teacher"]["windows"] == 3 * 2 + sweep["cache"]["val_windows"]
    for student in sweep["cached"]["students"]:
        assert student["s"] > 0
        assert student["teacher"]["built"] == 0 and student["teacher"]["windows"] == 0
    # online: every student builds its teacher and runs it on each of its batches
    assert sweep["online"]["teacher_builds"] == K
    for student in sweep["online"]["students"]:
        assert (
            student["s"] > 0 and student["teacher"]["prepare_s"] > 0 and student["teacher"]["log_probs_s"] > 0
        )
        assert student["teacher"]["built"] == 1 and student["teacher"]["windows"] == 3 * 2
    assert [row["k"] for row in sweep["rows"]] == list(range(1, K + 1))
    assert all(row["cached_total_s"] > 0 and row["online_total_s"] > 0 for row in sweep["rows"])
    assert sweep["teacher_cost_constant"] is True
    assert sweep["targets_check"]["positions"] == 2 * 32

    rows = {row["on_policy"]: row for row in results["on_policy"]["rows"]}
    assert sorted(rows) == [0.0, 0.5, 1.0] and results["on_policy"]["prompt_len"] == 4
    assert rows[0.0]["sampled_steps"] == rows[0.0]["sampling_ms"] == rows[0.0]["teacher_ms"] == 0
    assert rows[0.0]["ratio"] == 1.0 and rows[0.0]["update_ms"] > 0
    assert (
        rows[1.0]["sampled_steps"] == 2
        and min(rows[1.0][f"{k}_ms"] for k in ("sampling", "teacher", "update")) > 0
    )

    assert json.loads(out.read_text())["step"]["ratio"] == pytest.approx(step["ratio"])
    printed = capsys.readouterr().out
    assert "ratio kd/ce" in printed and "target ratio kd/ce <= 1.1" in printed
    assert "teacher builds: cached 1, online 2" in printed
    assert "3. on-policy: prompts of 4 tokens + 28 sampled" in printed


def test_the_meter_restores_the_teacher_class(bench):
    class Teacher:
        def __init__(self) -> None:
            self.ready = False

        def prepare(self) -> None:
            self.ready = True

        def log_probs(self, tokens):
            self.prepare()  # nested: timed once, by the outer call
            return tokens

    originals = dict(Teacher.__dict__)
    meter = bench.TeacherMeter()
    with bench.metered(Teacher, meter):
        teacher = Teacher()
        teacher.log_probs(torch.zeros(3, 4))
        teacher.prepare()
    assert (meter.constructed, meter.built, meter.windows) == (1, 1, 3)
    assert meter.prepare_s > 0 and meter.log_probs_s > 0
    assert {k: Teacher.__dict__[k] for k in ("__init__", "prepare", "log_probs")} == {
        k: originals[k] for k in ("__init__", "prepare", "log_probs")
    }
