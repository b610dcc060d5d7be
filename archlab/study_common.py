"""What both kinds of study share (``archlab.study``, ``archlab.arm_study``): presets, the output dir,
the step budget, Hydra overrides, and the files they read and publish."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

from archlab.errors import ConfigError, RunFailedError, check_out

PRESETS_DIR = Path(__file__).parent / "studies"


def read_preset(name_or_path: str) -> tuple[Path, dict]:
    """A study YAML: a preset's name (``archlab/studies/NAME.yaml``) or a path; its parsed content."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError("--preset", name_or_path, f"one of {names}, or a study YAML file")
    return path, yaml.safe_load(path.read_text())


def new_out(path: str | None) -> Path:
    """The study's output dir (default: outputs/study/<date>_<time>), which must be new or empty."""
    out = check_out(
        Path(path or Path("outputs", "study", datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))), directory=True
    )
    if out.exists() and any(out.iterdir()):
        raise ConfigError("--out", str(out), "a new or empty directory")
    return out


def steps_of(preset, overrides: list[str]) -> tuple[int, list[str]]:
    """The baseline's trainer.max_steps (the preset's, or the user's override) and the other overrides."""
    steps, rest = preset.steps, []
    for o in overrides:
        if override_key(o) == "trainer.max_steps":
            try:
                steps = int(o.split("=", 1)[1])
            except ValueError:
                raise ConfigError("trainer.max_steps", o.split("=", 1)[1], "a positive integer") from None
        else:
            rest.append(o)
    if steps < 1:
        raise ConfigError("trainer.max_steps", steps, "a positive integer")
    return steps, rest


def run_summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def write_json(path: Path, data: dict) -> None:
    """Publish ``data`` as JSON at ``path``: temp file, fsync, rename. JSON has no NaN or infinity: an
    unknown number (NaN) is written as null, an unbounded interval end as the string "inf" or "-inf"."""
    text = json.dumps(_finite(data), indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _finite(node):
    if isinstance(node, dict):
        return {k: _finite(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_finite(v) for v in node]
    if isinstance(node, float) and math.isinf(node):
        return "inf" if node > 0 else "-inf"
    if isinstance(node, float) and math.isnan(node):
        return None
    return node


def override_key(override: str) -> str:
    """``+a.b=1`` -> ``a.b``."""
    return override.lstrip("+~").split("=", 1)[0]


def app_overrides(overrides: list[str]) -> list[str]:
    """The overrides of archlab's config, without Hydra's own (``hydra/launcher=...``, ``hydra.x=...``)."""
    return [o for o in overrides if not override_key(o).startswith("hydra")]


class StudyError(RunFailedError):
    """A stage's subprocess failed; the message points at its log."""


def say(start: float, message: str) -> None:
    """One stage line, prefixed with the time since ``start`` (``time.perf_counter``)."""
    minutes, seconds = divmod(int(time.perf_counter() - start), 60)
    print(f"[{minutes:3d}:{seconds:02d}] {message}", flush=True)


def run_archlab(out: Path, stage: str, args: list[str], threads: int | None = None) -> float:
    """``archlab ARGS`` in a subprocess, its output in ``<out>/logs/STAGE.log`` (``threads``: its BLAS
    threads, else the environment's); its wall-clock seconds. Raises StudyError if it fails."""
    log = out / "logs" / f"{stage}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = (
        os.environ
        if threads is None
        else os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    )
    start = time.perf_counter()
    with log.open("w") as f:
        cmd = [sys.executable, "-m", "archlab.cli", *args]
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise StudyError(f"stage {stage} failed (exit {code}); last lines of {log}:\n{tail}")
    return time.perf_counter() - start
