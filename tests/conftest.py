"""Shared fixtures: real temporary distributions on sys.path, and the CLI in a subprocess.

Plugins are only ever found through real entry points: ``make_dist`` writes a
``<name>-<version>.dist-info`` (METADATA + entry_points.txt) and the package sources
into a fresh directory and puts it on ``sys.path``, exactly as ``pip install`` into a
site directory would. Nothing patches ``importlib.metadata.entry_points``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType

import pytest
import torch

from archlab import registry

# Under pytest-xdist (scripts/test.sh runs `-n auto`) the workers share the cores: each worker, and the
# CLI subprocesses its tests start, gets its share of threads instead of all of them.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    _threads = str(max(1, (os.cpu_count() or 1) // workers))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _threads
    torch.set_num_threads(int(_threads))

# Every environment variable that changes how archlab, Hydra or W&B behave in a test run.
_SCRUBBED_ENV = (
    "ARCHLAB_STRICT_PLUGINS",
    "HYDRA_FULL_ERROR",
    "WANDB_API_KEY",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_RUN_GROUP",
    "WANDB_RUN_ID",
    "WANDB_NAME",
    "WANDB_TAGS",
    "WANDB_DIR",
)

MakeDist = Callable[..., Path]
RunCli = Callable[..., subprocess.CompletedProcess]


def _entry_points_ini(entry_points: Mapping[str, Mapping[str, str]] | str) -> str:
    if isinstance(entry_points, str):
        return textwrap.dedent(entry_points).strip() + "\n"
    sections = []
    for group, items in entry_points.items():
        lines = [f"[{group}]", *(f"{name} = {value}" for name, value in items.items())]
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def write_dist(
    root: Path,
    name: str,
    entry_points: Mapping[str, Mapping[str, str]] | str,
    files: Mapping[str, str] | None = None,
    version: str = "1.0",
) -> Path:
    """Write a distribution (dist-info + sources) into ``root`` (a future sys.path entry)."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(_entry_points_ini(entry_points))
    for rel, source in (files or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root


def _forget_modules_under(root: Path) -> None:
    """Drop modules imported from ``root`` so a later test can reuse a package name."""
    for mod_name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        locations = [
            getattr(spec, "origin", None),
            *(getattr(spec, "submodule_search_locations", None) or []),
        ]
        if any(isinstance(loc, str) and Path(loc).is_relative_to(root) for loc in locations):
            del sys.modules[mod_name]


@pytest.fixture
def make_dist(tmp_path: Path) -> Iterator[MakeDist]:
    """Factory: ``make_dist(name, entry_points, files, version="1.0") -> dir on sys.path``.

    ``entry_points`` is ``{"archlab.ffn": {"foo": "foo_pkg.mod:Foo"}}`` or the ini text;
    ``files`` maps paths relative to the new sys.path entry to their (dedented) source.
    Each call makes its own directory, so two distributions can claim the same name.
    With ``on_path=False`` the directory is only written (for a subprocess's PYTHONPATH).
    """
    made: list[Path] = []
    syspath = pytest.MonkeyPatch()
    syspath.delenv("ARCHLAB_STRICT_PLUGINS", raising=False)  # broken plugins are deliberate here

    def make(
        name: str,
        entry_points: Mapping[str, Mapping[str, str]] | str,
        files: Mapping[str, str] | None = None,
        version: str = "1.0",
        *,
        on_path: bool = True,
    ) -> Path:
        root = write_dist(tmp_path / f"site-{name}-{len(made)}", name, entry_points, files, version)
        made.append(root)
        if on_path:
            syspath.syspath_prepend(str(root))
        importlib.invalidate_caches()
        registry.clear_cache()
        return root

    yield make
    syspath.undo()  # takes the directories off sys.path before the registry forgets them
    for root in made:
        _forget_modules_under(root)
    importlib.invalidate_caches()
    registry.clear_cache()


@pytest.fixture(autouse=True)
def _fresh_registry() -> Iterator[None]:
    """Every test starts and ends with an empty plugin cache."""
    registry.clear_cache()
    yield
    registry.clear_cache()


@pytest.fixture(scope="session")
def archlab_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One corpus-token cache for every CLI run of the session (builds the stdlib split once)."""
    return tmp_path_factory.mktemp("archlab-cache")


@pytest.fixture(scope="session")
def cli_env(archlab_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of a CLI subprocess: offline W&B in temp dirs, the shared corpus cache."""
    wandb_home = tmp_path_factory.mktemp("wandb-home")
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update(
        ARCHLAB_CACHE=str(archlab_cache),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_CONFIG_DIR=str(wandb_home / "config"),
        WANDB_CACHE_DIR=str(wandb_home / "cache"),
        WANDB_DATA_DIR=str(wandb_home / "data"),
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


@pytest.fixture(scope="session")
def cli_runner(cli_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess]:
    """``cli_runner(*args, cwd=dir, pythonpath=[dirs], env={...}, timeout=s)``: ``python -m archlab.cli``."""

    def run(
        *args: str,
        cwd: Path,
        pythonpath: Sequence[Path | str] = (),
        env: Mapping[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess:
        full_env = dict(cli_env)
        paths = [str(p) for p in pythonpath]
        if full_env.get("PYTHONPATH"):
            paths.append(full_env["PYTHONPATH"])
        if paths:
            full_env["PYTHONPATH"] = os.pathsep.join(paths)
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "archlab.cli", *args],
            cwd=cwd,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture
def run_cli(tmp_path: Path, cli_runner: Callable[..., subprocess.CompletedProcess]) -> RunCli:
    """``run_cli(*args, pythonpath=[dirs], env={...}, timeout=s)``: the CLI in a subprocess, cwd=tmp_path."""

    def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return cli_runner(*args, cwd=tmp_path, **kwargs)

    return run


@pytest.fixture(scope="module")
def bench(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    """``benchmarks/<BENCHMARK>.py`` (BENCHMARK set by the test module) imported as a module."""
    name = request.module.BENCHMARK
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    sys.path.insert(0, str(script.parent))  # as `python benchmarks/NAME.py` has it: for benchmarks/timing.py
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)
    sys.path.remove(str(script.parent))


# A student and run small enough to train a step in well under a second on one CPU core.
TINY_RUN = (
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.context=32",
    "trainer.batch_size=4",
    "trainer.eval_tokens=2048",
    "trainer.progress=false",
    "data.max_bytes=400000",
    "logger=none",
    "teacher=none",
    "objective=ce",
)


@pytest.fixture(scope="session")
def tiny_overrides(archlab_cache: Path) -> list[str]:
    """Overrides of a tiny byte-level run on the session's shared corpus cache."""
    return [*TINY_RUN, f"data.cache_dir={archlab_cache}"]


@pytest.fixture(scope="session")
def make_trainer(tiny_overrides: list[str]) -> Callable[..., object]:
    """``make_trainer(run_dir, *overrides)``: an ``archlab.trainer.Trainer`` of the tiny run."""
    from archlab.config import compose
    from archlab.loggers import RunInfo
    from archlab.trainer import Trainer

    def make(run_dir: Path, *overrides: str) -> Trainer:
        return Trainer(compose([*tiny_overrides, *overrides]), RunInfo(run_dir=run_dir, name="test"))

    return make
