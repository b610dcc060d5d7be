"""The CLI's exit codes (archlab.errors): 2 bad input, 3 a run that failed, 130 interrupted."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN


def _train(tmp_path: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "archlab.cli",
        "train",
        *TINY_RUN,
        f"hydra.run.dir={tmp_path / 'run'}",
        *overrides,
    ]


def test_bad_input_exits_2(run_cli, tmp_path: Path) -> None:
    result = run_cli("train", *TINY_RUN, f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_steps=0")
    assert (
        result.returncode == 2 and "trainer.max_steps" in result.stderr and "Traceback" not in result.stderr
    )


@pytest.mark.slow
def test_a_diverged_run_exits_3_and_keeps_its_last_finite_checkpoint(run_cli, tmp_path: Path) -> None:
    result = run_cli(
        "train", *TINY_RUN, f"hydra.run.dir={tmp_path / 'run'}",
        "trainer.lr=1e4", "trainer.max_steps=40", "trainer.ckpt_every=2", "trainer.grad_clip=0",
    )  # fmt: skip
    assert result.returncode == 3, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "is nan" in result.stderr
    assert (tmp_path / "run" / "checkpoints" / "LAST").exists()


@pytest.mark.slow
def test_ctrl_c_exits_130_and_says_how_to_resume(cli_env: dict[str, str], tmp_path: Path) -> None:
    cmd = _train(tmp_path, "trainer.max_steps=100000", "trainer.ckpt_every=2")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not (tmp_path / "run" / "checkpoints" / "LAST").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    said = r"archlab: interrupted; the checkpoint of step \d+ is kept; resume with: .*"
    assert re.fullmatch(said, line), line
    # the command it prints resumes this run: same overrides, same run dir
    resume = shlex.split(line.split("resume with: ", 1)[1])
    assert resume[:2] == ["archlab", "train"] and "trainer.max_steps=100000" in resume
    assert f"hydra.run.dir={tmp_path / 'run'}" in resume and resume[-1] == "trainer.resume=auto"
