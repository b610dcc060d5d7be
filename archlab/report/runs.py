"""Finished runs read back from their run dirs: ``summary.json``, ``.hydra/`` and ``plots/*.png``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from archlab.density import DensityError, LadderFit, fit_ladder, summary_density
from archlab.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One finished run: its metrics, plugin choices, W&B names and diagnostic plots."""

    path: Path
    name: str  # the run's Hydra overrides (those it shares with every loaded run dropped), or its dir
    summary: dict
    plugins: dict[str, str]  # slot (or slot.part) -> plugin name
    overrides: list[str] = field(default_factory=list)  # Hydra overrides, hydra.* dropped
    group: str | None = None  # W&B group: the logger's, or the sweep's as the trainer names it
    wandb_id: str | None = None
    project: str | None = None
    entity: str | None = None
    plots: list[Path] = field(default_factory=list)
    density: dict = field(default_factory=dict)  # density_metrics() once a ladder is known
    error: str | None = None  # why the run has no density

    @property
    def bpb(self) -> float:
        return float(self.summary["val/bpb"])

    @property
    def n(self) -> float:
        """Non-embedding parameters (the N of the ladder fit)."""
        return float(self.summary["params/non_embedding"])

    @property
    def n_active(self) -> float:
        return float(self.summary.get("params/active_non_embedding", self.n))


def _plugins(node: DictConfig, prefix: str = "", depth: int = 2) -> dict[str, str]:
    out = {}
    for key, value in node.items():
        if isinstance(value, DictConfig):
            if "plugin" in value and isinstance(value.get("plugin"), str):
                out[f"{prefix}{key}"] = value.plugin
            if depth > 1:
                out.update(_plugins(value, f"{prefix}{key}.", depth - 1))
    return out


def _wandb_id(run_dir: Path) -> str | None:
    """The id in ``wandb/[offline-]run-DATE_TIME-ID``, latest first."""
    found = sorted((run_dir / "wandb").glob("*run-*-*"), key=lambda p: p.name.split("run-", 1)[1])
    return found[-1].name.rsplit("-", 1)[1] if found else None


def read_summary(path: Path) -> dict:
    """A run's ``summary.json``; ``ValueError`` saying why if it is not a JSON object with a numeric
    ``val/bpb`` and ``params/non_embedding`` (what every report needs)."""
    summary = json.loads(path.read_bytes())  # ValueError also for bytes that are not UTF-8
    if not isinstance(summary, dict):
        raise ValueError(f"a JSON {type(summary).__name__}, not an object")
    for key in ("val/bpb", "params/non_embedding"):
        if isinstance(summary.get(key), bool) or not isinstance(summary.get(key), int | float):
            raise ValueError(f"{key} is {summary.get(key)!r}, not a number")
    return summary


def load_run(run_dir: Path, summary: dict) -> Run:
    """The run in ``run_dir``, whose summary (``read_summary``) is ``summary``."""
    hydra = run_dir / ".hydra"
    cfg = OmegaConf.load(hydra / "config.yaml") if (hydra / "config.yaml").exists() else OmegaConf.create()
    overrides = OmegaConf.load(hydra / "overrides.yaml") if (hydra / "overrides.yaml").exists() else []
    overrides = [str(o) for o in overrides if not str(o).startswith("hydra")]
    logger = cfg.get("logger") or {}
    group = logger.get("group")
    if group is None and (run_dir.parent / "multirun.yaml").exists():  # cli.run_info's sweep group
        group = f"{run_dir.parent.parent.name}_{run_dir.parent.name}"
    return Run(
        path=run_dir,
        name=" ".join(overrides) or run_dir.name,
        summary=summary,
        plugins=_plugins(cfg),
        overrides=overrides,
        group=group,
        wandb_id=_wandb_id(run_dir),
        project=logger.get("project"),
        entity=logger.get("entity"),
        plots=sorted((run_dir / "plots").glob("*.png")),
    )


def _job_dirs(path: Path) -> list[Path]:
    """``path`` itself if it is a run dir, else its job dirs (a multirun sweep dir), numbers in order."""
    if (path / "summary.json").exists() or (path / ".hydra").is_dir():
        return [path]
    jobs = [
        p for p in path.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / "summary.json").exists())
    ]
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def load_runs(paths: list[str | Path], notes: list[str] | None = None) -> list[Run]:
    """Finished runs under run dirs or multirun sweep dirs; unfinished ones are skipped with a note."""
    runs = []
    for raw in paths:
        path = Path(raw).expanduser()
        jobs = _job_dirs(path) if path.is_dir() else []
        if not jobs:
            raise ConfigError("RUN_DIRS", str(raw), "a run dir (with .hydra/) or a multirun dir of run dirs")
        for job in jobs:
            file = job / "summary.json"
            try:
                summary = read_summary(file)
            except FileNotFoundError:
                note = f"skipped {job}: no summary.json (unfinished or failed run)"
            except ValueError as exc:
                note = f"skipped {job}: {file} is not a run summary ({exc})"
            else:
                runs.append(load_run(job, summary))
                continue
            log.warning(note)
            if notes is not None:
                notes.append(note)
    if len(runs) > 1:  # name runs by what sets them apart (the ladder a run was measured against does not)
        shared = set.intersection(*(set(r.overrides) for r in runs))
        for r in runs:
            own = [o for o in r.overrides if o not in shared and not o.startswith("density.")]
            r.name = " ".join(own) or f"{r.path.parent.name}/{r.path.name}"
    return runs


def load_ladder(path: str | Path, *, n_boot: int = 200, notes: list[str] | None = None) -> LadderFit:
    """A saved fit (``*.json``) or a fit of the ladder multirun's runs (N non-embedding, val bpb)."""
    path = Path(path).expanduser()
    if path.is_file():
        try:
            return LadderFit.load(path)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                "--ladder", str(path), f"a fit.json written by archlab report ({exc!r})"
            ) from None
    runs = load_runs([path], notes)
    return fit_ladder([r.n for r in runs], [r.bpb for r in runs], n_boot=n_boot)


def attach_density(runs: list[Run], fit: LadderFit) -> None:
    """Fill each run's ``density`` (or ``error``, e.g. a loss at or below the fit's E)."""
    for run in runs:
        try:
            run.density = summary_density(fit, run.summary)
        except DensityError as exc:
            run.density, run.error = {}, str(exc)
