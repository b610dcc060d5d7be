"""``archlab study``: the main job. A reference ladder, plugin students measured against it, one report.

Stages, each printed as one line with the elapsed time:

1. teacher: ``archlab teacher build`` once; every later run only reads its soft targets.
2. ladder: ``archlab train -m +rung=...``, plain dense students at the rungs of ``archlab/conf/rung``,
   fitted to L(N) = E + A·N^(−α) (``archlab.density``, Chinchilla eq. 2 at a fixed token budget); the fit
   is saved as ``ladder_fit.json``.
3. students: ``archlab train -m +student=...`` with ``density.ladder`` set, so each summary carries its
   ``density/*`` metrics (effective size N_eff and density N_eff / N, Densing Law arXiv 2412.04315 eq. 1).
4. report: ``archlab.report.write_report`` writes ``report/index.html``.

Ladder and students share the teacher, objective, data and token budget (trainer.max_steps × batch_size ×
grad_accum × model.context): the preset's and the user's overrides go to every run, so density compares
architectures only. Each multirun is a subprocess with its own Hydra sweep dir under ``--out``; all runs
share one W&B group. Students are config-group options written at run time into ``<out>/conf/student``
(``# @package _global_`` files, like sweeps/arch), so the study runs from a non-editable install too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from archlab import registry
from archlab.errors import ConfigError


@dataclass(frozen=True)
class Student:
    """A plugin student: config-group choices (slot -> plugin) and plain values, on the base config."""

    name: str
    choices: dict[str, str] = field(default_factory=dict)
    values: dict[str, object] = field(default_factory=dict)

    def missing(self) -> list[str]:
        """``slot=plugin`` choices that no installed, loadable plugin provides."""
        return [f"{s}={p}" for s, p in self.choices.items() if p not in registry.loadable(s)]

    def yaml(self) -> str:
        lines = ["# @package _global_", f"# study student {self.name} (written by archlab study)"]
        if self.choices:
            lines += ["defaults:", *(f"  - override /{s}: {p}" for s, p in self.choices.items())]
        lines += [f"{key}: {json.dumps(value)}" for key, value in self.values.items()]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Preset:
    rungs: tuple[str, ...]  # options of archlab/conf/rung
    students: tuple[str, ...]  # names in STUDENTS
    overrides: tuple[str, ...] = ()  # for every run, before the user's
    student_rung: str | None = None  # the students' shape; None: the base config's model


# Candidates; a student whose plugin is not installed is skipped (and said so).
STUDENTS = {
    s.name: s
    for s in (
        Student("mha"),  # the dense baseline at the students' shape (density ≈ 1 if the ladder holds)
        Student("mqa", values={"attention": {"n_kv_heads": 1}}),  # core attention, one K/V head
        Student("mla", {"attention": "mla"}),
        Student("relu2", {"ffn": "relu2"}),
        Student("moe", {"ffn": "moe"}),
    )
}

PRESETS = {
    # ~15 min on 2 CPU cores: 6 ladder runs over 1.56 decades (55 K to 2.0 M non-embedding parameters, rung m
    # twice for seed noise), then 5 students at the tiny shape (0.79 M), all at 200 steps × 16 × 256 tokens.
    "full": Preset(
        rungs=("xs", "s", "m", "m_seed1", "l", "xl"),
        students=("mha", "mqa", "mla", "relu2", "moe"),
        overrides=("trainer.max_steps=200",),
    ),
    # ~3 min: 3 rungs (55 K to 692 K, 1.1 decades) and 3 students at rung m's shape (332 K), 150 steps at
    # context 128. (At 80 steps rung s came out worse than xs: too few steps to order the sizes.)
    "quick": Preset(
        rungs=("xs", "m", "l"),
        students=("mha", "mla", "relu2"),
        overrides=("trainer.max_steps=150", "model.context=128", "trainer.eval_tokens=32768"),
        student_rung="m",
    ),
}


class Study:
    """Runs the stages into ``out``, printing one line per stage."""

    def __init__(self, out: Path, preset: Preset, overrides: list[str]) -> None:
        self.out, self.preset = out, preset
        self.group = f"study_{out.name}"
        self.overrides = ["trainer.progress=false", *preset.overrides, *overrides]
        self.start = time.perf_counter()

    def say(self, message: str) -> None:
        minutes, seconds = divmod(int(time.perf_counter() - self.start), 60)
        print(f"[{minutes:3d}:{seconds:02d}] {message}", flush=True)

    def archlab(self, stage: str, *args: str) -> None:
        """``archlab ARGS`` in a subprocess, its output in logs/STAGE.log; raises StudyError if it fails."""
        log = self.out / "logs" / f"{stage}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            cmd = [sys.executable, "-m", "archlab.cli", *args]
            f.write(" ".join(cmd) + "\n\n")
            f.flush()
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        if code != 0:
            tail = "\n".join(log.read_text().splitlines()[-25:])
            raise StudyError(f"stage {stage} failed (exit {code}); last lines of {log}:\n{tail}")

    def multirun(self, stage: str, swept: str, fixed: list[str], extra: list[str] = ()) -> list[Path]:
        """One ``archlab train -m SWEPT FIXED...`` into ``<out>/<stage>``; the job dirs that wrote a summary.

        Runs are named (W&B) by the swept override alone: the fixed ones are the same for every job.
        """
        sweep_dir = self.out / stage
        fixed = [*fixed, f"logger.group={self.group}", *self.overrides]
        keys = sorted({_key(o) for o in _app_overrides(fixed)})
        self.archlab(
            stage,
            "train",
            "-m",
            *extra,
            swept,
            f"hydra.sweep.dir={sweep_dir}",
            f"hydra.job.config.override_dirname.exclude_keys=[{','.join(keys)}]",
            *fixed,
        )
        return sorted((p.parent for p in sweep_dir.glob("*/summary.json")), key=lambda d: int(d.name))

    def teacher(self) -> None:
        self.archlab("teacher", "teacher", "build", *_app_overrides(self.overrides))
        self.say("teacher: soft targets ready (logs/teacher.log)")

    def ladder(self):
        from archlab.report.runs import load_ladder

        runs = self.multirun("ladder", "+rung=" + ",".join(self.preset.rungs), [])
        fit = load_ladder(self.out / "ladder")
        fit.save(self.out / "ladder_fit.json")
        points = ", ".join(f"{int(a):,}: {b:.3f}" for a, b in sorted(fit.points))
        self.say(f"ladder: {len(runs)} runs (N: bpb) {points}")
        self.say(
            f"ladder fit: L(N) = {fit.E:.3f} + {fit.A:.3g}·N^-{fit.alpha:.3f}, residual RMS "
            f"{fit.residual_rms:.4f} bpb -> {self.out / 'ladder_fit.json'}"
        )
        for warning in fit.warnings():
            self.say(f"ladder fit warning: {warning}")
        return runs, fit

    def students(self, names: list[str]) -> list[Path]:
        conf = self.out / "conf" / "student"
        conf.mkdir(parents=True, exist_ok=True)
        for name in names:
            (conf / f"{name}.yaml").write_text(STUDENTS[name].yaml())
        shape = [f"+rung={self.preset.student_rung}"] if self.preset.student_rung else []
        runs = self.multirun(
            "students",
            "+student=" + ",".join(names),
            [*shape, f"density.ladder={self.out / 'ladder_fit.json'}"],
            extra=["--config-dir", str(conf.parent)],
        )
        for run in runs:
            s = json.loads((run / "summary.json").read_text())
            overrides = yaml.safe_load(run.joinpath(".hydra", "overrides.yaml").read_text())
            name = next(o.split("=", 1)[1] for o in overrides if o.startswith("+student="))
            density, active = s.get("density/per_param"), s.get("density/per_active_param")
            flag = " (extrapolated)" if s.get("density/extrapolated") else ""
            if active is not None and active != density:
                flag = f", per active parameter {active:.2f}{flag}"
            where = f"density {density:.2f}{flag}" if density is not None else "no density (beyond the fit)"
            self.say(
                f"student {name}: val bpb {s['val/bpb']:.4f}, {s['params/non_embedding']:,} params, {where}"
            )
        return runs

    def run(self, names: list[str]) -> Path:
        from archlab.report import load_runs, write_report

        self.teacher()
        ladder_runs, fit = self.ladder()
        student_runs = self.students(names)
        index = write_report(load_runs([*ladder_runs, *student_runs]), fit, self.out / "report")
        self.say(f"report written ({len(ladder_runs)} ladder runs, {len(student_runs)} students)")
        return index


class StudyError(RuntimeError):
    """A stage's subprocess failed; the message points at its log."""


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="archlab study",
        description="The main job: train a dense reference ladder and plugin students under one shared "
        "teacher and token budget, fit the ladder, and write a capability-density report.",
    )
    parser.add_argument("--quick", action="store_true", help="the ~3-minute preset (3 rungs, 3 students)")
    parser.add_argument("--out", help="output dir (default: outputs/study/<date>_<time>)")
    parser.add_argument(
        "--students",
        help=f"comma-separated subset of {','.join(STUDENTS)} (default: the preset's)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides for every run, e.g. trainer.max_steps=50"
    )
    opts = parser.parse_args(args)
    preset = PRESETS["quick" if opts.quick else "full"]
    names = opts.students.split(",") if opts.students else list(preset.students)
    unknown = [n for n in names if n not in STUDENTS]
    if unknown:
        raise ConfigError("--students", ",".join(unknown), f"names from {', '.join(STUDENTS)}")
    out = Path(opts.out or Path("outputs", "study", datetime.now().strftime("%Y-%m-%d_%H-%M-%S")))
    if out.exists() and any(out.iterdir()):
        raise ConfigError("--out", str(out), "a new or empty directory")
    _check_overrides([*preset.overrides, *opts.overrides])
    available = []
    for name in names:
        missing = STUDENTS[name].missing()
        if missing:
            print(f"archlab study: skipping student {name}: no installed plugin for {', '.join(missing)}")
        else:
            available.append(name)
    if not available:
        raise ConfigError("--students", ",".join(names), "at least one student whose plugins are installed")
    out.mkdir(parents=True, exist_ok=True)
    study = Study(out.resolve(), preset, opts.overrides)
    study.say(
        f"study in {study.out}: ladder rungs {','.join(preset.rungs)}; students {','.join(available)}; "
        f"overrides {' '.join(study.overrides)}"
    )
    try:
        index = study.run(available)
    except StudyError as exc:
        print(f"archlab study: error: {exc}", file=sys.stderr)
        return 1
    print(f"report: {index}")
    return 0


def _check_overrides(overrides: list[str]) -> None:
    """Compose and validate the base config with the study's overrides before any work."""
    from archlab.config import compose, validate

    validate(compose(_app_overrides(overrides)))


def _key(override: str) -> str:
    """``+a.b=1`` -> ``a.b``."""
    return override.lstrip("+~").split("=", 1)[0]


def _app_overrides(overrides: list[str]) -> list[str]:
    """The overrides of archlab's config, without Hydra's own (``hydra/launcher=...``, ``hydra.x=...``)."""
    return [o for o in overrides if not _key(o).startswith("hydra")]
