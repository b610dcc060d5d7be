"""docs/writing-a-plugin.md runs: its ``bash`` blocks, in order, as one script in a throw-away venv
(scaffold, implement, pip install, conformance tests, ladder + student sweeps, report), with a few
training steps; then the module the tutorial wrote is ruff clean."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from archlab.testing.venv import overlay_venv, venv_env

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "writing-a-plugin.md"
#: The only placeholders the tutorial may use (documented in its table).
ENV = {"STEPS": "4", "EVAL_TOKENS": "2048"}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```$", text, flags=re.M | re.S)


def test_tutorial_has_a_block_for_every_step() -> None:
    script = "\n".join(bash_blocks(TUTORIAL.read_text()))
    for command in ("archlab new-plugin", "pip install -e", "pytest", "archlab train -m", "archlab report"):
        assert command in script
    assigned = set(re.findall(r"^([A-Z_]+)=", script, flags=re.M))
    assert set(re.findall(r"\$\{?([A-Z_]+)", script)) - assigned <= {"WORK", *ENV}, "undocumented placeholder"


@pytest.mark.slow
def test_every_command_of_the_tutorial_runs(tmp_path: Path, cli_env: dict[str, str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env = {**venv_env(overlay_venv(tmp_path / "venv"), cli_env), **ENV, "WORK": str(work)}
    script = "set -euo pipefail\n" + "\n".join(bash_blocks(TUTORIAL.read_text()))
    done = subprocess.run(
        ["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert "passed" in done.stdout and (work / "report" / "report.md").is_file()
    runs = (work / "report" / "report.md").read_text()
    assert re.search(r"attention=gated\b", runs) and "attention=mha" in runs, runs[:2000]
    ruff = Path(sys.executable).parent / "ruff"
    lint = subprocess.run(
        [ruff, "check", "--no-cache", "."], cwd=work / "archlab-gated", capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout
