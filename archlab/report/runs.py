"""Finished runs read back from their run dirs: ``summary.json``, ``metrics.jsonl``, ``.hydra/`` and
``plots/*.png``; and the check that runs compared in one report were trained alike."""

from __future__ import annotations

import json
import logging
import math
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
    config: dict = field(default_factory=dict)  # .hydra/config.yaml, unresolved ({} without one)
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
        config=OmegaConf.to_container(cfg, resolve=False),
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


def load_ladder(
    path: str | Path,
    *,
    n_boot: int = 200,
    notes: list[str] | None = None,
    students: list[Run] = (),
    budget: str = "tokens",
    across_tokenizers: bool = False,
) -> LadderFit:
    """A saved fit (``*.json``) or a fit of the ladder multirun's runs (N non-embedding, val bpb); those
    runs must have been trained like ``students`` (``check_shared``), or their curve measures nothing."""
    path = Path(path).expanduser()
    if path.is_file():
        try:
            return LadderFit.load(path)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                "--ladder", str(path), f"a fit.json written by archlab report ({exc!r})"
            ) from None
    runs = load_runs([path], notes)
    check_shared([*students, *runs], budget, across_tokenizers)
    return fit_ladder([r.n for r in runs], [r.bpb for r in runs], n_boot=n_boot)


def attach_density(runs: list[Run], fit: LadderFit) -> None:
    """Fill each run's ``density`` (or ``error``, e.g. a loss at or below the fit's E)."""
    for run in runs:
        try:
            run.density = summary_density(fit, run.summary)
        except DensityError as exc:
            run.density, run.error = {}, str(exc)


def teacher_bpbs(runs: list[Run]) -> list[float]:
    """The teacher's validation bpb as the runs' summaries record it (``teacher/val_bpb``), each once."""
    return sorted({float(r.summary["teacher/val_bpb"]) for r in runs if "teacher/val_bpb" in r.summary})


def read_history(run: Run) -> list[dict]:
    """The run's ``metrics.jsonl`` records (``archlab.loggers.JsonlLogger``) in step order, one per step;
    a line that is not a whole record (one a kill cut short) is skipped; [] without the file."""
    path = run.path / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = by_step.get(record["step"], {}) | record
    return [by_step[step] for step in sorted(by_step)]


#: Config every run of one report must share (DESIGN.md: capability is the bpb of a student "trained
#: under the same budget and teacher"), as dotted subtrees or leaves. data.cache_dir says where, not what.
SHARED = ("teacher", "distill.top_k", "objective", "corpus", "data.val_fraction", "data.max_bytes")
#: ``check_shared``'s notions of an equal training budget (``archlab study --budget``).
BUDGETS = ("tokens", "flops")
UNSET = "<unset>"


def _leaves(node: object, key: str) -> dict[str, object]:
    if not isinstance(node, dict):
        return {key: node}
    return {k: v for name, child in node.items() for k, v in _leaves(child, f"{key}.{name}").items()}


def _shared(run: Run) -> dict[str, object]:
    """``SHARED``'s leaves of the run's config, each with its value (``UNSET`` where it has none)."""
    out: dict[str, object] = {}
    for key in SHARED:
        node: object = run.config
        for part in key.split("."):
            node = node.get(part, UNSET) if isinstance(node, dict) else UNSET
        out.update(_leaves(node, key))
    return out


def _budget(run: Run, budget: str) -> tuple[float, float]:
    """(training budget, how far from equal it may be): tokens exactly; FLOPs = tokens × train FLOPs
    per token to within one step, the rounding of ``archlab study --budget flops``."""
    tokens = run.summary.get("train/tokens", math.nan)
    if budget == "tokens":
        return tokens, 0.0
    per_token = run.summary.get("train_flops_per_token", math.nan)
    step = tokens / run.summary.get("train/steps", math.nan)
    return tokens * per_token, step * per_token


def tokenizer_of(run: Run) -> str:
    """The run's tokenizer as its summary names it (``bytes``, ``bpe:<hash of tokenizer.json>``, a
    teacher's); runs from before archlab learnt other tokenizers read bytes."""
    return str(run.summary.get("corpus/tokenizer", "bytes"))


def check_shared(runs: list[Run], budget: str = "tokens", across_tokenizers: bool = False) -> None:
    """Refuse runs that differ in teacher, objective, data (``SHARED``) or training budget, with one line
    naming the first differing key, both values and both runs: their bpb differences would not be the
    architecture's. Refusing, not splitting: a report's ladder fit and its notes hold for one set.

    ``budget``: ``tokens`` (equal ``train/tokens``, what ``archlab report`` compares) or ``flops`` (equal
    training FLOPs, what ``archlab study --budget flops`` gives each arm by changing its steps).
    Runs with different tokenizers are refused too unless ``across_tokenizers`` (``archlab report
    --across-tokenizers``): bits per byte count the same UTF-8 bytes under any tokenizer, but a tokenizer
    changes the model (its vocabulary) as much as the data, so the report must say it (``tables.notes``).
    """
    if budget not in BUDGETS:
        raise ConfigError("--budget", budget, " or ".join(BUDGETS))
    if not runs:
        return
    first = runs[0]
    other = next((r for r in runs if tokenizer_of(r) != tokenizer_of(first)), None)
    if other is not None and not across_tokenizers:
        raise ConfigError(
            "corpus/tokenizer",
            f"{tokenizer_of(first)} in {first.path} but {tokenizer_of(other)} in {other.path}",
            "one tokenizer in every run of a report, or --across-tokenizers to compare them on bits per "
            "byte (the report then says so)",
        )
    ref = _shared(first)
    ref_budget, ref_slack = _budget(first, budget)
    for run in runs[1:]:
        values = _shared(run)
        differing = [
            k for k in sorted(ref.keys() | values.keys()) if ref.get(k, UNSET) != values.get(k, UNSET)
        ]
        if differing:
            key = differing[0]
            a, b = ref.get(key, UNSET), values.get(key, UNSET)
        else:
            own, slack = _budget(run, budget)
            if abs(own - ref_budget) <= max(slack, ref_slack) or (math.isnan(own) and math.isnan(ref_budget)):
                continue
            key = "train/tokens" if budget == "tokens" else "train/tokens × train_flops_per_token"
            a, b = (UNSET if math.isnan(v) else f"{v:.6g}" for v in (ref_budget, own))
        raise ConfigError(
            key,
            f"{a} in {first.path} but {b} in {run.path}",
            "one value in every run of a report (teacher, objective, data and training budget are shared; "
            "report these runs separately)",
        )
