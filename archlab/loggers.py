"""Where metrics go: ``metrics.jsonl`` and ``summary.json`` in the run dir always, W&B when chosen.

Every logger receives the same metric names. W&B runs are offline unless
``logger.mode`` (or ``WANDB_MODE``) says otherwise; each job of a multirun gets its
own W&B run (``reinit="finish_previous"`` and ``finish()`` at job end), grouped by
the sweep.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from archlab import durable

log = logging.getLogger(__name__)


@dataclass
class RunInfo:
    """Names a run gets in every logger, derived from the Hydra job."""

    run_dir: Path
    name: str
    group: str | None = None
    tags: list[str] = field(default_factory=list)


def _step(line: str) -> int | None:
    """The step of one ``metrics.jsonl`` record; None for a line that is not a whole record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("step", 0) if isinstance(record, dict) else None


class JsonlLogger:
    """One JSON object per logged step in ``metrics.jsonl``; the final metrics in ``summary.json``."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.summary_path = run_dir / "summary.json"

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written by a killed run after its last checkpoint), and a last
        line that a kill cut short."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step(line) is not None]
        kept = [line for line in kept if _step(line) <= step]
        durable.write_atomic(self.path, "".join(line + "\n" for line in kept).encode())

    def log(self, metrics: dict, step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def summary(self, metrics: dict) -> None:
        durable.write_atomic(
            self.summary_path, (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode()
        )

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger:
    """A W&B run per job, with the resolved config, summary metrics and the job's names."""

    def __init__(self, cfg: DictConfig, info: RunInfo, resume_id: str | None) -> None:
        import wandb

        lcfg = cfg.logger
        self.run = wandb.init(
            project=lcfg.project,
            entity=lcfg.entity,
            group=lcfg.group or info.group,
            name=lcfg.name or info.name,
            tags=[*info.tags, *lcfg.tags],
            job_type="train",
            config=OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True),
            dir=str(info.run_dir),
            mode=lcfg.mode,
            id=resume_id,
            resume="allow" if resume_id else None,
            reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run.define_metric("train/tokens")
        self.run.define_metric("train/*", step_metric="train/tokens")
        self.run.define_metric("val/bpb", summary="min")

    @property
    def id(self) -> str:
        return self.run.id

    @property
    def location(self) -> str:
        if self.run.settings.mode == "offline":
            return f"{self.run.settings.sync_dir} (upload with `wandb sync {self.run.settings.sync_dir}`)"
        return self.run.url or self.run.dir

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def image(self, name: str, path: Path, step: int) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(path))}, step=step)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


class Loggers:
    """Fans every call out to the jsonl logger and, if configured, W&B."""

    def __init__(self, cfg: DictConfig, info: RunInfo, resume_id: str | None = None) -> None:
        self.jsonl = JsonlLogger(info.run_dir)
        self.wandb = WandbLogger(cfg, info, resume_id) if cfg.logger.backend.name == "wandb" else None
        self.all = [self.jsonl] + ([self.wandb] if self.wandb else [])

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb else None

    def log(self, metrics: dict, step: int) -> None:
        for logger in self.all:
            logger.log(metrics, step)

    def summary(self, metrics: dict) -> None:
        for logger in self.all:
            logger.summary(metrics)

    def image(self, name: str, path: Path, step: int) -> None:
        """An image already saved in the run dir (``plots/*.png``), logged to W&B when it is on."""
        if self.wandb:
            self.wandb.image(name, path, step)

    def finish(self, exit_code: int = 0) -> None:
        for logger in self.all:
            logger.finish(exit_code)

    def locations(self) -> list[str]:
        out = [f"metrics: {self.jsonl.path}", f"summary: {self.jsonl.summary_path}"]
        if self.wandb:
            out.append(f"W&B run: {self.wandb.location}")
        return out
