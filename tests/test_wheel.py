"""The built wheel carries the top-level ``conf/`` tree as ``archlab.conf`` (setup.py maps it) and trains
from any working directory once installed: ``pkg://archlab.conf`` does not depend on the source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN

REPO = Path(__file__).resolve().parents[1]
#: What a build of archlab reads from the repository.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "archlab", "conf", "hydra_plugins")


def build_wheel(out: Path) -> Path:
    """The wheel of a copy of the sources (an in-tree build would leave build/ and egg-info behind)."""
    src = out / "src"
    src.mkdir(parents=True)
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "-q", "--no-deps"]
    subprocess.run([*pip, "--no-build-isolation", "-w", str(out / "dist"), str(src)], check=True, timeout=300)
    (wheel,) = (out / "dist").glob("archlab-*.whl")
    return wheel


@pytest.mark.slow
def test_the_wheel_carries_conf_and_trains_from_another_directory(tmp_path: Path, cli_env) -> None:
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"archlab/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    tasks = {f"archlab/eval_tasks/{p.name}" for p in (REPO / "archlab" / "eval_tasks").glob("*.*l")}
    assert len(tasks) == 4 and tasks <= names, sorted(tasks - names)  # archlab eval's YAMLs and JSONL
    assert not any(n.startswith("conf/") for n in names)  # installed under archlab/, not as a top-level conf

    cli_env = {k: v for k, v in cli_env.items() if k != "PYTHONPATH"}  # the installed archlab, not the tree
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    install = [python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)]
    subprocess.run(install, env=cli_env, check=True, timeout=300)
    # then the dependencies (torch, Hydra, ...) from this interpreter, after the venv's own packages (no
    # download); written after the install, which would otherwise see this interpreter's archlab and skip
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.check_output(
        [python, "-c", "import archlab.conf; print(archlab.conf.__file__)"],
        cwd=elsewhere,
        env=cli_env,
        text=True,
    )
    assert Path(where.strip()).is_relative_to(site), where  # the wheel's copy, not the repository's
    tiny = [o for o in TINY_RUN if not o.startswith(("teacher=", "objective="))]
    run = [python, "-m", "archlab.cli", "train", *tiny, "+rung=k2", "objective=jsd", "trainer.max_steps=2"]
    done = subprocess.run(
        [*run, f"hydra.run.dir={elsewhere / 'run'}"],
        cwd=elsewhere,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (elsewhere / "run" / "summary.json").is_file()
