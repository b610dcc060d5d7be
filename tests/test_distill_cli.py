"""Distillation end to end through the CLI: a shared teacher cache built once for concurrent jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BASE = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.context=64",
    "trainer.batch_size=4",
    "trainer.max_steps=8",
    "trainer.eval_every=8",
    "trainer.eval_tokens=2048",
    "trainer.progress=false",
    "data.max_bytes=400000",
    "logger=none",
    "objective=kd",
    "objective.alpha=0.5",
    "objective.temperature=2.0",
]
FAST = [*BASE, "teacher=ngram", "teacher.order=3"]


def archlab(cache: Path, cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "ARCHLAB_CACHE": str(cache), "WANDB_MODE": "offline"}
    return subprocess.Popen(
        [sys.executable, "-m", "archlab.cli", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
def test_two_concurrent_jobs_share_one_teacher_build(tmp_path) -> None:
    jobs = [
        archlab(tmp_path / "cache", tmp_path, "train", *FAST, f"hydra.run.dir={tmp_path / f'job{i}'}")
        for i in range(2)
    ]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    log = "\n".join(outputs)
    assert log.count("soft targets: building") == 1 and log.count("soft targets: found") == 1, log
    assert len(list((tmp_path / "cache" / "soft_targets").glob("*/meta.json"))) == 1
    for i in range(2):
        summary = json.loads((tmp_path / f"job{i}" / "summary.json").read_text())
        assert 0 < summary["val/top1_agreement"] <= 1 and summary["val/kl_teacher_student"] > 0
        assert summary["teacher/val_bpb"] < summary["val/bpb"]  # the n-gram teacher is ahead of 8 steps


@pytest.mark.slow
def test_teacher_build_then_train_reads_the_cache(tmp_path) -> None:
    build = archlab(tmp_path / "cache", tmp_path, "teacher", "build", *FAST)
    out = build.communicate(timeout=300)[0]
    assert build.returncode == 0, out
    assert "teacher ngram: val bpb" in out and "soft targets (32 train windows, top 32)" in out
    train = archlab(tmp_path / "cache", tmp_path, "train", *FAST)
    out = train.communicate(timeout=300)[0]
    assert train.returncode == 0, out
    assert "soft targets: found" in out and "soft targets: building" not in out


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["teacher=none"],
            "archlab: error: teacher='none' is not allowed: expected a teacher plugin for objective=kd",
        ),
        (["teacher=self"], "archlab: error: teacher.checkpoint='' is not allowed"),
        (["objective.temperature=0"], "archlab: error: objective.temperature=0.0 is not allowed"),
    ],
)
def test_distillation_input_errors_stop_before_training(tmp_path, overrides, message) -> None:
    job = archlab(tmp_path / "cache", tmp_path, "train", *BASE, *overrides)
    out = job.communicate(timeout=120)[0]
    assert job.returncode == 2 and message in out and "Traceback" not in out, out
    assert not list(tmp_path.glob("outputs/*/*/metrics.jsonl"))
