"""Fixtures shared by the core tests (tests/) and the first-party plugin tests (plugins/tests/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from archlab.testing import suite

#: Overrides that make ``archlab train`` a few-second run on the embedded corpus.
FAST_TRAIN = (
    "logger=none",
    "teacher=none",
    "objective=ce",
    "trainer.max_steps=3",
    "trainer.eval_every=3",
    "trainer.eval_tokens=256",
    "trainer.progress=false",
    "data.max_bytes=200000",
    "model.context=32",
)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Decoding is a chain of tiny matmuls: on a busy 2-core machine a second intra-op thread made such
    tests ~14x slower (spin-waiting), so they run single-threaded and restore the setting after."""
    with suite.one_thread():
        yield


@pytest.fixture
def train_cli(tmp_path: Path) -> Callable[..., dict]:
    """``train_cli(*overrides)``: ``archlab train`` with ``FAST_TRAIN`` in a subprocess; its summary.json."""

    def run(*overrides: str) -> dict:
        env = {**os.environ, "ARCHLAB_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
        args = [*FAST_TRAIN, *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
        command = [sys.executable, "-m", "archlab.cli", "train", *args]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(next((tmp_path / "run").rglob("summary.json")).read_text())

    return run
