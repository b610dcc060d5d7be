"""Studies of training *procedures* (``archlab study --preset continual | onpolicy``): the same student
trained several ways (arms) at several seeds, each final checkpoint evaluated on named corpora (domains),
every number reported as a mean over seeds with a 90 % t interval and, seed by seed, as a difference
from a reference arm.

A procedure study is not a density study: its arms share one architecture, so there is no ladder and no
density; what differs is how the student learns (on-policy λ, fine-tuning vs self-distillation).

Stages, one line each:

1. base (optional): a model trained on ``base.domain`` per seed, which every arm of that seed starts
   from (``trainer.init_from``);
2. arms: per seed, each arm trains ``steps`` optimizer steps on ``train_domain`` with its overrides, so
   every arm does the same student updates (equal update FLOPs; on-policy sampling and teacher scoring
   are extra and show in the wall clock). An arm with ``sample:`` trains on the base model's own samples
   (``archlab teacher sample``, prompts from ``train_domain``): sequence-level self-distillation (SSD);
3. evaluation: the base and every arm's final checkpoint on every domain's validation windows
   (``archlab.evaluation``, bits per byte), plus the ``metrics`` read from each run's ``summary.json``;
4. tables: ``arms.json``, ``report.md`` and ``arms.png`` (+ CSV).

Interval: mean ± t₀.₉₅(S−1)·sd/√S over S seeds; Δ vs the reference arm is taken seed by seed (the arms
of one seed share the base model and the data order) and gets the same interval of the paired
differences. Two seeds give t₀.₉₅(1) = 6.3: the intervals are honest and wide.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict
from scipy import stats

from archlab.errors import ConfigError
from archlab.study_common import run_archlab, say

BASE = "base"


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...]
    sample: dict | None  # `archlab teacher sample` flags (name -> value): train on the base's samples


@dataclass(frozen=True)
class ArmsPreset:
    """A procedure study's design (a YAML in ``archlab/studies`` with ``kind: arms``)."""

    name: str
    seeds: int
    steps: int
    overrides: tuple[str, ...]
    domains: dict[str, tuple[str, ...]]
    train_domain: str
    base: dict | None  # {domain, steps, overrides}
    arms: dict[str, Arm]
    reference: str
    metrics: tuple[str, ...]

    @classmethod
    def from_yaml(cls, name: str, raw: dict, path: Path) -> ArmsPreset:
        try:
            arms = {
                n: Arm(n, tuple(str(o) for o in a.get("overrides") or ()), a.get("sample"))
                for n, a in raw["arms"].items()
            }
            preset = cls(
                name=name,
                seeds=int(raw["seeds"]),
                steps=int(raw["steps"]),
                overrides=tuple(str(o) for o in raw.get("overrides") or ()),
                domains={n: tuple(str(o) for o in d or ()) for n, d in raw["domains"].items()},
                train_domain=str(raw["train_domain"]),
                base=raw.get("base"),
                arms=arms,
                reference=str(raw["reference"]),
                metrics=tuple(raw.get("metrics") or ()),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(
                "--preset", str(path), f"a procedure study YAML like continual.yaml ({exc!r})"
            ) from None
        names = {"train_domain": preset.train_domain, "base.domain": (preset.base or {}).get("domain")}
        for key, value in names.items():
            if value is not None and value not in preset.domains:
                raise ConfigError(
                    f"{path.name}: {key}", value, f"one of the domains {', '.join(preset.domains)}"
                )
        if preset.reference not in preset.arms:
            raise ConfigError(f"{path.name}: reference", preset.reference, f"one of {', '.join(preset.arms)}")
        if any(a.sample for a in arms.values()) and not preset.base:
            raise ConfigError(f"{path.name}: arms", "sample", "a study with a base model to sample from")
        return preset


def interval(values: list[float]) -> dict[str, float]:
    """Mean and its 90 % t interval over seeds (an infinite half-width for one seed)."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "lo": -math.inf, "hi": math.inf, "n": len(x)}
    half = float(stats.t.ppf(0.95, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(x)}


def tabulate(values: dict[str, dict[int, dict[str, float]]], reference: str) -> dict[str, dict]:
    """arm -> metric -> {mean, lo, hi, n} and, for arms other than the reference, ``delta`` (arm −
    reference seed by seed) with its interval; ``values`` is arm -> seed -> metric -> value."""
    table = {}
    for arm, by_seed in values.items():
        metrics = sorted({m for v in by_seed.values() for m in v})
        row = {m: interval([v[m] for v in by_seed.values() if m in v]) for m in metrics}
        if arm not in (reference, BASE):
            ref = values[reference]
            row["delta"] = {
                m: interval([by_seed[s][m] - ref[s][m] for s in by_seed if s in ref and m in ref[s]])
                for m in metrics
            }
        table[arm] = row
    return table


def _fmt(cell: dict, signed: bool = False) -> str:
    spec = "+.3f" if signed else ".3f"
    if not math.isfinite(cell["hi"] - cell["lo"]):
        return f"{cell['mean']:{spec}}"
    return f"{cell['mean']:{spec}} [{cell['lo']:{spec}}, {cell['hi']:{spec}}]"


def markdown(study: dict) -> str:
    """The table of a procedure study: one row per arm, one column per metric, then its Δ columns."""
    table, ref = study["table"], study["reference"]
    metrics = study["columns"]
    head = ["arm", *metrics, *(f"Δ {m} vs {ref}" for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, row in table.items():
        cells = [_fmt(row[m]) if m in row else "–" for m in metrics]
        delta = row.get("delta", {})
        cells += [_fmt(delta[m], signed=True) if m in delta else "–" for m in metrics]
        lines.append("| " + " | ".join([arm, *cells]) + " |")
    return "\n".join(lines)


def plot(study: dict, path: Path) -> Path:
    """One panel per metric: each arm's mean with its 90 % interval (``archlab.report.figures.Plot``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from archlab.report.figures import Plot

    metrics, table = study["columns"], study["table"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 0.5 * len(table) + 1.6))
    out = Plot(fig)
    for ax, metric in zip(np.atleast_1d(axes), metrics, strict=True):
        arms = [a for a in table if metric in table[a]]
        for y, arm in enumerate(arms):
            cell = table[arm][metric]
            out.add(metric, arm, y, cell["mean"], cell["lo"], cell["hi"])
            if math.isfinite(cell["hi"] - cell["lo"]):
                ax.plot([cell["lo"], cell["hi"]], [y, y], color="C0", lw=2)
            ax.plot([cell["mean"]], [y], "o", color="C0")
        ax.set_yticks(range(len(arms)), arms)
        ax.invert_yaxis()
        ax.set_xlabel(metric)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{study['preset']}: mean and 90 % interval over {study['seeds']} seed(s)", fontsize=10)
    fig.tight_layout()
    out.save(path)
    plt.close(fig)
    return path


def domain_bpb(run_dir: Path, corpus_and_data: DictConfig, splits: dict) -> float:
    """Bits per byte of ``run_dir``'s final checkpoint on the validation windows of the corpus and data
    that ``corpus_and_data`` (a composed config) holds, evaluated as every run evaluates
    (``archlab.evaluation.Evaluation``), so every arm of a study reads the same windows. ``splits``
    keeps each (domain, tokenizer)'s tokenised split, so the corpus is read once, not once per run."""
    import torch

    from archlab import checkpoint
    from archlab.evaluation import Evaluation
    from archlab.run_tokens import load_split, tokenizer_for

    ckpt = checkpoint.latest(run_dir)
    cfg = checkpoint.saved_config(ckpt)
    with open_dict(cfg):
        cfg.corpus, cfg.data = corpus_and_data.corpus, corpus_and_data.data
    key = (OmegaConf.to_yaml(cfg.corpus), OmegaConf.to_yaml(cfg.data), tokenizer_for(cfg).name)
    if key not in splits:
        splits[key] = load_split(cfg)
    device = torch.device("cpu")
    model = checkpoint.load_student(ckpt, device)
    evaluation = Evaluation(model, splits[key], cfg.trainer, None, device, contextlib.nullcontext)
    return evaluation()["val/bpb"]


class ArmStudy:
    """Runs a procedure study into ``out``, printing one line per stage."""

    def __init__(self, out: Path, preset: ArmsPreset, overrides: list[str], seeds: int) -> None:
        self.out, self.preset, self.seeds = out, preset, seeds
        self.overrides = ["trainer.progress=false", *preset.overrides, *overrides]
        self.start = time.perf_counter()
        self.wall: dict[str, float] = {}

    def say(self, message: str) -> None:
        say(self.start, message)

    def check(self) -> None:
        """Compose and validate the base's and every arm's config before any work (an arm that trains on
        samples is checked on its train domain: the samples do not exist yet)."""
        from archlab.config import compose, validate
        from archlab.study_common import app_overrides

        p, common = self.preset, app_overrides(self.overrides)
        configs = [[*common, *p.domains[p.train_domain], *a.overrides] for a in p.arms.values()]
        if p.base:
            configs.append([*common, *p.domains[p.base["domain"]], *p.base.get("overrides", ())])
        for overrides in configs:
            validate(compose(overrides))

    def archlab(self, stage: str, *args: str) -> float:
        """``archlab ARGS`` in a subprocess (``run_archlab``); its wall-clock seconds."""
        return run_archlab(self.out, stage, list(args))

    def train(self, name: str, overrides: list[str]) -> Path:
        run_dir = self.out / "runs" / name
        self.wall[name] = self.archlab(name, "train", f"hydra.run.dir={run_dir}", *overrides)
        return run_dir

    def arm_overrides(self, arm: Arm, seed: int, base: Path | None) -> list[str]:
        p = self.preset
        data = list(p.domains[p.train_domain])
        if arm.sample:
            samples = self.out / "samples" / f"{arm.name}_s{seed}"
            flags = [f"--{k.replace('_', '-')}={v}" for k, v in arm.sample.items()]
            self.archlab(f"sample_{arm.name}_s{seed}", "teacher", "sample", str(base), "--out", str(samples),
                         f"--seed={seed}", *flags, *p.domains[p.train_domain])  # fmt: skip
            data = ["corpus=files", f"corpus.paths=[{samples}/*.txt]", "data.val_fraction=0.1"]
        start = [f"trainer.init_from={base}"] if base else []
        return [
            *self.overrides,
            *data,
            *arm.overrides,
            f"seed={seed}",
            f"trainer.max_steps={p.steps}",
            *start,
        ]

    def train_all(self) -> dict[tuple[str, int], Path]:
        """Stages 1-2: (arm or ``base``, seed) -> run dir."""
        p, runs = self.preset, {}
        for seed in range(self.seeds):
            base = None
            if p.base:
                name = f"{BASE}_s{seed}"
                domain, steps = p.base["domain"], p.base["steps"]
                overrides = [*self.overrides, *p.domains[domain], *p.base.get("overrides", ())]
                base = runs[(BASE, seed)] = self.train(
                    name, [*overrides, f"seed={seed}", f"trainer.max_steps={steps}"]
                )
                self.say(f"base s{seed}: {steps} steps on {domain} in {self.wall[name]:.0f} s")
            for arm in p.arms.values():
                name = f"{arm.name}_s{seed}"
                runs[(arm.name, seed)] = self.train(name, self.arm_overrides(arm, seed, base))
                self.say(f"arm {name}: {p.steps} steps on {p.train_domain} in {self.wall[name]:.0f} s")
        return runs

    def evaluate(self, runs: dict[tuple[str, int], Path]) -> dict[str, dict[int, dict[str, float]]]:
        """Stage 3: arm -> seed -> metric -> value."""
        from archlab.config import compose
        from archlab.study_common import app_overrides, run_summary

        p, values = self.preset, {}
        common = app_overrides(self.overrides)
        domains = {d: compose([*common, *o]) for d, o in p.domains.items()}
        splits: dict = {}
        for (arm, seed), run_dir in runs.items():
            row = {f"{d} bpb": domain_bpb(run_dir, c, splits) for d, c in domains.items()}
            summary = run_summary(run_dir)
            row |= {m: float(summary[m]) for m in p.metrics if m in summary}
            row["wall s"] = self.wall[run_dir.name]
            values.setdefault(arm, {})[seed] = row
        self.say(f"evaluation: {len(runs)} checkpoints on {', '.join(p.domains)}")
        return values

    def run(self) -> dict:
        from archlab.study_common import write_json

        p = self.preset
        values = self.evaluate(self.train_all())
        study = {
            "preset": p.name,
            "seeds": self.seeds,
            "steps": p.steps,
            "reference": p.reference,
            "columns": [*(f"{d} bpb" for d in p.domains), *p.metrics, "wall s"],
            "values": {arm: {str(s): v for s, v in by_seed.items()} for arm, by_seed in values.items()},
            "table": tabulate(values, p.reference),
        }
        write_json(self.out / "arms.json", study)
        table = markdown(study)
        title = f"# {p.name} study: {self.seeds} seed(s), {p.steps} steps per arm"
        (self.out / "report.md").write_text(f"{title}\n\n{table}\n\n![arms](arms.png)\n")
        plot(study, self.out / "arms.png")
        for line in table.splitlines():
            self.say(line)
        self.say(f"report: {self.out / 'report.md'} (arms.json, arms.png)")
        return study
