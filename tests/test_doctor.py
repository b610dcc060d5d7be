"""``archlab doctor`` reports this machine as torch, importlib.metadata and the registry see it, advises
what to install, and exits 1 only for something broken."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

BROKEN = {"archlab.ffn": {"docbroken": "docbroken_pkg:Nope"}}
BROKEN_FILES = {"docbroken_pkg/__init__.py": "raise ImportError('docbroken needs frobnicate')\n"}


def lines_of(stdout: str) -> dict[str, str]:
    """``what -> state`` of each finding line (advice lines start with blanks)."""
    return {line.split()[0]: line for line in stdout.splitlines() if line and not line[0].isspace()}


def test_doctor_reports_the_installed_versions_and_exits_0(run_cli, tmp_path: Path) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    result = run_cli("doctor", env={"WANDB_MODE": "online", "WANDB_API_KEY": "", "NETRC": str(netrc)})
    assert result.returncode == 0, result.stdout + result.stderr
    found = lines_of(result.stdout)
    assert torch.__version__ in found["torch"]
    assert importlib.metadata.version("wandb") in found["wandb"] and "no API key" in found["wandb"]
    assert "-> wandb login, or WANDB_MODE=offline" in result.stdout  # online without a login: advice
    assert "gloo" in found["torch.distributed"]
    if not torch.cuda.is_available():  # here: the CPU fallback is named, and how to get a GPU build
        assert "unused here" in found["xformers"] and "CPU only" in found["accelerator"]
        assert "--index-url https://download.pytorch.org/whl/" in result.stdout


def test_doctor_exits_1_naming_a_broken_plugin(run_cli, make_dist) -> None:
    site = make_dist("doc-broken", BROKEN, BROKEN_FILES, on_path=False)
    result = run_cli("doctor", pythonpath=[site], env={"WANDB_MODE": "offline"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert lines_of(result.stdout)["BROKEN"].split()[1] == "plugins"
    assert "broken: ffn=docbroken" in result.stdout
