"""A throw-away virtual environment that sees this interpreter's packages, for installing a plugin.

Tests install generated plugins with a real ``pip install -e`` without touching the
environment archlab runs in: the new venv's own site-packages comes first on ``sys.path``
and this interpreter's site directories (with their editable installs) after it.
``bin/`` gets ``archlab``, ``pytest`` and ``pip`` commands that run in the venv, so a
shell with ``bin/`` first on PATH behaves like an activated venv.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

COMMANDS = {"archlab": "-m archlab.cli", "pytest": "-m pytest", "pip": "-m pip"}
#: pip settings for installing offline into the venv with the build backend it already sees.
PIP_ENV = {"PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def overlay_venv(path: Path) -> Path:
    """Create the venv at ``path``; returns its ``bin`` directory."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    own = next(path.glob("lib/python*/site-packages"))
    lines = [f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages()]
    (own / "_archlab_overlay.pth").write_text("".join(lines))
    bin_dir = path / "bin"
    for command, module in COMMANDS.items():
        script = bin_dir / command
        script.write_text(f'#!/bin/sh\nexec "{bin_dir / "python"}" {module} "$@"\n')
        script.chmod(0o755)
    return bin_dir


def venv_env(bin_dir: Path, base: dict[str, str]) -> dict[str, str]:
    """``base`` with the venv first on PATH (as ``activate`` does) and pip set up offline."""
    env = {**base, **PIP_ENV, "VIRTUAL_ENV": str(bin_dir.parent)}
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    env.pop("PYTHONPATH", None)
    return env
