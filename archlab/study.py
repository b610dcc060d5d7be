"""``archlab study``: the main job. A ladder of the baseline's own family, paired-seed arms, one report.

Stages, each printed as one line with the elapsed time:

1. teacher: ``archlab teacher build`` once per seed, each adding its windows to one cache; every later run
   only reads its soft targets.
2. ladder: the rungs of ``archlab.ladder`` (seed 0) and the baseline rung at every further seed, fitted to
   L(N) = E + A·N^(−α) (``archlab.density``; the fit is saved as ``ladder_fit.json``).
3. arms: the students, a placebo and a negative control at every seed. Seed s fixes the data order of
   every arm (common random numbers), so arms are compared with the baseline seed by seed.
   - placebo: the baseline with another initialisation draw (``model.init_seed`` = 1000 + s, same data
     order): the same function class, so its Δbpb is the noise every student carries; its density
     interval must contain 1;
   - control: a deliberately weakened baseline (the preset's ``control``, e.g. half the FFN width)
     reported at the baseline's full parameter count; its density interval must lie below 1.
4. calibration (``archlab.calibration``): Δbpb with a 90 % interval, densities whose intervals carry
   the fit's and the seeds' uncertainty, a verdict per student, the minimum detectable Δbpb; written to
   ``study.json``.
5. report: ``archlab.report.write_report`` writes ``report/index.html``, the calibration panel first.

Every run shares teacher, objective, data, lr schedule and every override; the budget is equal tokens
(``--budget tokens``: ``steps`` × batch × accumulation × context each) or equal training FLOPs
(``--budget flops``: steps scaled by ``train_flops_per_token`` relative to the baseline's). Each job is a
``# @package _global_`` config option written into ``<out>/conf/job/`` and run by one Hydra multirun per
stage (``+job=NAME``), so the study runs from a non-editable install too.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from archlab import ladder, registry
from archlab.arm_study import ArmsPreset, ArmStudy
from archlab.errors import ConfigError
from archlab.study_common import (
    PRESETS_DIR,
    StudyError,
    app_overrides,
    new_out,
    override_key,
    read_preset,
    run_archlab,
    run_summary,
    say,
    steps_of,
    write_json,
)

PLACEBO_INIT_SEED = 1000  # placebo at seed s draws its initialisation with model.init_seed = 1000 + s


@dataclass(frozen=True)
class Job:
    """One training run of the study: an arm at a seed, as a config option (``+job=<name>``)."""

    arm: str  # rung name (k4) or arm name (baseline, placebo, control, a student's)
    role: str  # "rung" or one of archlab.calibration.ROLES
    seed: int
    shape: ladder.Shape
    slots: dict = field(default_factory=dict)  # slot -> plugin name | {field: value, [plugin: name]}
    init_seed: int | None = None
    steps: int = 0

    @property
    def name(self) -> str:
        return f"{self.arm}_s{self.seed}"

    def missing(self) -> list[str]:
        """``slot=plugin`` choices that no installed, loadable plugin provides."""
        return [f"{s}={p}" for s, p in self.choices().items() if p not in registry.loadable(s)]

    def choices(self) -> dict[str, str]:
        return {
            s: v if isinstance(v, str) else v["plugin"]
            for s, v in self.slots.items()
            if isinstance(v, str) or "plugin" in v
        }

    def values(self) -> dict:
        """Everything the job sets besides plugin choices (shape, seed, budget, plugin fields)."""
        model = {**vars(self.shape), **({"init_seed": self.init_seed} if self.init_seed is not None else {})}
        out: dict = {"model": model, "seed": self.seed, "trainer": {"max_steps": self.steps}}
        for slot, v in self.slots.items():
            if isinstance(v, dict) and any(k != "plugin" for k in v):
                out[slot] = {k: x for k, x in v.items() if k != "plugin"}
        return out

    def yaml(self) -> str:
        head = ["# @package _global_", f"# study job {self.name} ({self.role}; written by archlab study)"]
        defaults = [f"  - override /{s}: {p}" for s, p in self.choices().items()]
        if defaults:
            head += ["defaults:", *defaults, "  - _self_"]
        return "\n".join(head) + "\n" + yaml.safe_dump(self.values(), sort_keys=False)

    def overrides(self) -> list[str]:
        """The same job as command-line overrides (to compose its config without Hydra's search path)."""
        flat = [f"{s}={p}" for s, p in self.choices().items()]

        def walk(prefix: str, node) -> None:
            for k, v in node.items():
                if isinstance(v, dict):
                    walk(f"{prefix}{k}.", v)
                else:
                    flat.append(f"{prefix}{k}={json.dumps(v) if isinstance(v, str) else v}")

        walk("", self.values())
        return flat


@dataclass(frozen=True)
class Preset:
    """A study design: ladder rungs, baseline rung, seeds, budget, students and the control (YAML)."""

    name: str
    rungs: tuple[int, ...]
    baseline_rung: int
    seeds: int
    steps: int
    overrides: tuple[str, ...]
    students: dict[str, dict]
    control: dict

    @classmethod
    def load(cls, name_or_path: str) -> Preset:
        path, raw = read_preset(name_or_path)
        try:
            preset = cls(
                name=path.stem,
                rungs=tuple(int(k) for k in raw["rungs"]),
                baseline_rung=int(raw["baseline_rung"]),
                seeds=int(raw["seeds"]),
                steps=int(raw["steps"]),
                overrides=tuple(str(o) for o in raw.get("overrides") or ()),
                students=dict(raw.get("students") or {}),
                control=dict(raw["control"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                "--preset", str(path), f"a study YAML like {PRESETS_DIR}/full.yaml ({exc!r})"
            ) from None
        if preset.baseline_rung not in preset.rungs or len(set(preset.rungs)) < 3:
            raise ConfigError("--preset", str(path), "at least 3 rungs, the baseline_rung among them")
        return preset

    def jobs(self, students: list[str], seeds: int, steps: int) -> tuple[list[Job], list[Job]]:
        """(ladder jobs, arm jobs). The baseline at seed 0 is the ladder's rung run itself."""
        base_shape = ladder.rung_shape(self.baseline_rung)
        rung = [Job(ladder.rung_name(k), "rung", 0, ladder.rung_shape(k), steps=steps) for k in self.rungs]
        base = [Job("baseline", "baseline", s, base_shape, steps=steps) for s in range(1, seeds)]
        arms = []
        for s in range(seeds):
            arms += [Job(n, "student", s, base_shape, self.students[n], steps=steps) for n in students]
            arms.append(
                Job("placebo", "placebo", s, base_shape, init_seed=PLACEBO_INIT_SEED + s, steps=steps)
            )
            arms.append(Job("control", "control", s, base_shape, self.control, steps=steps))
        return rung + base, arms


def flops_steps(jobs: list[Job], base: Job, overrides: list[str]) -> list[Job]:
    """``--budget flops``: each job's steps scaled so its training FLOPs equal the baseline's."""
    import torch

    from archlab.config import compose
    from archlab.metrics import model_metrics
    from archlab.model import build_student

    def flops(job: Job) -> int:
        cfg = compose([*overrides, *job.overrides()])
        return model_metrics(build_student(cfg), compute_dtype=torch.float32)["train_flops_per_token"]

    target = flops(base) * base.steps
    return [replace(j, steps=max(1, round(target / flops(j)))) for j in jobs]


class Study:
    """Runs the stages into ``out``, printing one line per stage."""

    def __init__(
        self,
        out: Path,
        preset: Preset,
        overrides: list[str],
        budget: str,
        jobs: int,
        wandb: bool = False,
        evals: tuple[list[str], int | None] = ([], None),
    ) -> None:
        self.out, self.preset, self.budget, self.jobs, self.wandb = out, preset, budget, jobs, wandb
        self.eval_tasks, self.eval_limit = evals  # lm-eval tasks scored for every run, documents per task
        self.group = f"study_{out.name}"
        self.overrides = ["trainer.progress=false", *preset.overrides, *overrides]
        self.start = time.perf_counter()

    def say(self, message: str) -> None:
        say(self.start, message)

    def archlab(self, stage: str, *args: str) -> None:
        """``archlab ARGS`` in a subprocess of ``cpu_count // jobs`` threads (``run_archlab``)."""
        run_archlab(self.out, stage, list(args), threads=max(1, (os.cpu_count() or 1) // self.jobs))

    def multirun(self, stage: str, jobs: list[Job]) -> dict[str, Path]:
        """One ``archlab train -m +job=...`` into ``<out>/<stage>``; job name -> run dir with a summary.

        With ``jobs > 1`` the runs go to Hydra's joblib launcher, ``jobs`` processes of
        ``cpu_count // jobs`` threads each, the largest models first (tiny models use a second thread
        poorly, so two one-thread runs side by side finish sooner than one two-thread run after another).
        """
        conf = self.out / "conf" / "job"
        conf.mkdir(parents=True, exist_ok=True)
        jobs = sorted(jobs, key=lambda j: j.shape.d_model**2 * j.shape.n_layers * j.steps, reverse=True)
        for job in jobs:
            (conf / f"{job.name}.yaml").write_text(job.yaml())
        sweep_dir = self.out / stage
        fixed = [f"logger.group={self.group}", *self.overrides]
        if self.jobs > 1 and not any(override_key(o) == "hydra/launcher" for o in fixed):
            fixed += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={self.jobs}"]
        keys = sorted({override_key(o) for o in app_overrides(fixed)})
        self.archlab(
            stage,
            "train",
            "-m",
            "--config-dir",
            str(conf.parent),
            "+job=" + ",".join(j.name for j in jobs),
            f"hydra.sweep.dir={sweep_dir}",
            f"hydra.job.config.override_dirname.exclude_keys=[{','.join(keys)}]",
            *fixed,
        )
        runs = {}
        for summary in sweep_dir.glob("*/summary.json"):
            overrides = yaml.safe_load(summary.with_name(".hydra").joinpath("overrides.yaml").read_text())
            runs[next(o.split("=", 1)[1] for o in overrides if o.startswith("+job="))] = summary.parent
        missing = sorted({j.name for j in jobs} - set(runs))
        if missing:
            raise StudyError(f"stage {stage}: no summary.json for {', '.join(missing)} (logs/{stage}.log)")
        return runs

    def teacher(self, jobs: list[Job]) -> None:
        for seed in sorted({j.seed for j in jobs}):
            steps = max(j.steps for j in jobs if j.seed == seed)
            overrides = [*app_overrides(self.overrides), f"seed={seed}", f"trainer.max_steps={steps}"]
            self.archlab(f"teacher_s{seed}", "teacher", "build", *overrides)
        self.say(
            f"teacher: soft targets ready for seeds {sorted({j.seed for j in jobs})} (logs/teacher_s*.log)"
        )

    def fit(self, runs: dict[str, Path]):
        """The ladder fit over every rung run (``ladder_fit.json``), printed with its points."""
        from archlab.density import fit_ladder

        summaries = {name: run_summary(path) for name, path in runs.items()}
        fit = fit_ladder(
            [s["params/non_embedding"] for s in summaries.values()],
            [s["val/bpb"] for s in summaries.values()],
        )
        fit.save(self.out / "ladder_fit.json")
        points = ", ".join(f"{n}: {s['val/bpb']:.3f}" for n, s in sorted(summaries.items()))
        self.say(f"ladder: {len(runs)} runs (bpb) {points}")
        self.say(
            f"ladder fit: L(N) = {fit.E:.3f} + {fit.A:.3g}·N^-{fit.alpha:.3f}, residual RMS "
            f"{fit.residual_rms:.4f} bpb -> {self.out / 'ladder_fit.json'}"
        )
        for warning in fit.warnings():
            self.say(f"ladder fit warning: {warning}")
        return fit

    def run(self, ladder_jobs: list[Job], arm_jobs: list[Job]) -> Path:
        from archlab.calibration import calibrate, calibration_problems
        from archlab.report import load_runs, write_report

        self.teacher([*ladder_jobs, *arm_jobs])
        runs = self.multirun("runs", [*ladder_jobs, *arm_jobs])
        self.say(f"runs: {len(runs)} done ({self.jobs} at a time) -> {self.out / 'runs'}")
        rung_runs = {j.name: runs[j.name] for j in ladder_jobs if j.role == "rung"}
        fit = self.fit(rung_runs)
        base_rung = ladder.rung_name(self.preset.baseline_rung)
        baseline = [("baseline_s0", runs[f"{base_rung}_s0"])]
        baseline += [(j.name, runs[j.name]) for j in ladder_jobs if j.role == "baseline"]
        pairs = [*baseline, *((j.name, runs[j.name]) for j in arm_jobs)]
        study = calibrate(arms_of(pairs), fit)
        study = {"budget": self.budget, "seeds": self.seeds(arm_jobs), "preset": self.preset.name} | study
        study["fit"] = {k: v for k, v in fit.to_dict().items() if k != "boot"}
        if self.eval_tasks:
            self.downstream(pairs, study)
        write_json(self.out / "study.json", study)
        for line in summary_lines(study):
            self.say(line)
        for problem in calibration_problems(study):
            self.say(f"CALIBRATION FAILED: {problem}")
        loaded = load_runs(list(runs.values()))
        index = write_report(loaded, fit, self.out / "report", study=study, budget=self.budget)
        self.say(f"report written ({len(rung_runs)} ladder runs, {len(runs)} runs in all) -> study.json")
        if self.wandb:
            from archlab.report.publish import publish_if_possible

            publish_if_possible(loaded, fit, project=None, entity=None, study=study)
        return index

    def downstream(self, pairs: list[tuple[str, Path]], study: dict) -> None:
        """``archlab eval`` of every arm's runs (``(job name, run dir)``) on ``eval_tasks``, into
        ``<run>/eval.json``; each row of ``study["students"]`` gains ``downstream``: per task, each
        metric's mean over the arm's seeds (``mean_scores``)."""
        per_arm: dict[str, list[dict]] = {}
        args = ["--tasks", ",".join(self.eval_tasks)]
        args += [] if self.eval_limit is None else ["--limit", str(self.eval_limit)]
        for name, run in pairs:
            out = run / "eval.json"
            self.archlab(f"eval_{name}", "eval", str(run), *args, "--out", str(out))
            per_arm.setdefault(name.rsplit("_s", 1)[0], []).append(json.loads(out.read_text())["scores"])
        for row in study["students"]:
            row["downstream"] = mean_scores(per_arm[row["name"]])
        self.say(f"eval: {len(pairs)} runs on {','.join(self.eval_tasks)} (logs/eval_*.log)")

    @staticmethod
    def seeds(jobs: list[Job]) -> int:
        return len({j.seed for j in jobs})


def arms_of(runs: list[tuple[str, Path]]):
    """calibration.Arm per arm from ``(job name, run dir)`` pairs (job names are ``<arm>_s<seed>``)."""
    from archlab.calibration import Arm

    grouped: dict[str, list[tuple[int, dict]]] = {}
    for name, path in runs:
        arm, seed = name.rsplit("_s", 1)
        grouped.setdefault(arm, []).append((int(seed), run_summary(path)))
    base = dict(sorted(grouped["baseline"]))[0]
    arms = []
    for arm, results in grouped.items():
        results.sort(key=lambda r: r[0])
        role = arm if arm in ("baseline", "placebo", "control") else "student"
        last = results[0][1]
        n = base["params/non_embedding"] if role == "control" else last["params/non_embedding"]
        n_active = last.get("params/active_non_embedding", last["params/non_embedding"])
        n_active = n if role == "control" else n_active
        arms.append(
            Arm(arm, role, tuple(s for s, _ in results), tuple(r["val/bpb"] for _, r in results), n, n_active)
        )
    return arms


def mean_scores(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per task and metric, the mean over ``runs`` (each ``archlab eval``'s ``scores``) of those that
    have it."""
    values: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for task, metrics in run.items():
            for metric, value in metrics.items():
                values.setdefault(task, {}).setdefault(metric, []).append(value)
    return {task: {m: sum(v) / len(v) for m, v in ms.items()} for task, ms in values.items()}


def downstream_line(row: dict) -> str:
    """``  NAME downstream: task metric value, ...`` for a row with downstream scores."""
    scores = ", ".join(f"{t} {m} {v:.4g}" for t, ms in row["downstream"].items() for m, v in ms.items())
    return f"  {row['name']} downstream: {scores}"


def summary_lines(study: dict) -> list[str]:
    """The study's result as printed lines: calibration, then one line per arm."""
    c = study["calibration"]
    ok = "passed" if c["placebo_ok"] and c["control_ok"] else "FAILED"
    out = [
        f"calibration {ok}: placebo {'ok' if c['placebo_ok'] else 'NOT ok'}, control "
        f"{'ok' if c['control_ok'] else 'NOT ok'}; seed noise {c['seed_noise_bpb']:.4f} bpb "
        f"({c['seed_noise_dof']} dof), fit residual RMS {c['fit_residual_rms']:.4f} bpb, minimum detectable "
        f"Δbpb {c['mde_bpb']:.4f} ({study['seeds']} seeds, {study['budget']} budget)"
    ]
    for r in study["students"]:
        out.append(
            f"{r['role']} {r['name']}: bpb {r['bpb_mean']:.4f}, Δbpb {r['delta_bpb']:+.4f} "
            f"[{r['delta_bpb_lo']:+.4f}, {r['delta_bpb_hi']:+.4f}], density {r['density']:.2f} "
            f"[{r['density_lo']:.2f}, {r['density_hi']:.2f}] -> {r['verdict']}"
        )
        if "downstream" in r:
            out.append(downstream_line(r))
    return out


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="archlab study",
        description="The main job: a dense ladder of the baseline's own family and paired-seed plugin "
        "students, a placebo and a negative control under one teacher and budget; a calibrated "
        "capability-density report and study.json.",
    )
    parser.add_argument("--preset", default="full", help="full (default), quick, long, or a study YAML file")
    parser.add_argument("--quick", action="store_true", help="the same as --preset quick")
    parser.add_argument("--seeds", type=int, help="paired seeds per arm (default: the preset's)")
    parser.add_argument(
        "--budget", choices=("tokens", "flops"), default="tokens", help="equal tokens or FLOPs"
    )
    parser.add_argument("--out", help="output dir (default: outputs/study/<date>_<time>)")
    parser.add_argument("--students", help="comma-separated subset of the preset's students")
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time (default: 2)"
    )
    parser.add_argument(
        "--teacher",
        help="the teacher every run distils from, a teacher option (e.g. smollm2; default: the config's); "
        "a teacher with its own tokenizer gives the students its tokens and vocabulary",
    )
    parser.add_argument("--wandb", action="store_true", help="also publish a W&B Report (needs credentials)")
    parser.add_argument(
        "--eval", help="comma-separated lm-eval tasks to score every run on (archlab eval; archlab[eval])"
    )
    parser.add_argument("--eval-limit", type=int, help="--eval: at most N documents per task")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. trainer.lr=1e-3")
    opts = parser.parse_args(args)
    path, raw = read_preset("quick" if opts.quick else opts.preset)
    if raw.get("kind") == "arms":
        return procedure_study(ArmsPreset.from_yaml(path.stem, raw, path), opts)
    preset = Preset.load(str(path))
    seeds = preset.seeds if opts.seeds is None else opts.seeds
    if seeds < 1:
        raise ConfigError("--seeds", seeds, "a positive number of seeds")
    if opts.jobs < 1:
        raise ConfigError("--jobs", opts.jobs, "a positive number of parallel runs")
    names = opts.students.split(",") if opts.students else list(preset.students)
    unknown = [n for n in names if n not in preset.students]
    if unknown:
        raise ConfigError("--students", ",".join(unknown), f"names from {', '.join(preset.students)}")
    evals = _eval_tasks(opts.eval, opts.eval_limit)
    out = new_out(opts.out)
    steps, overrides = steps_of(preset, _with_teacher(opts.teacher, opts.overrides))
    ladder_jobs, arm_jobs = preset.jobs(names, seeds, steps)
    _check_overrides([*preset.overrides, *overrides], [*ladder_jobs, *arm_jobs])
    skipped = {j.arm: j.missing() for j in arm_jobs if j.missing()}
    for arm, missing in skipped.items():
        print(f"archlab study: skipping student {arm}: no installed plugin for {', '.join(missing)}")
    arm_jobs = [j for j in arm_jobs if j.arm not in skipped]
    if opts.budget == "flops":
        base = ladder_jobs[preset.rungs.index(preset.baseline_rung)]
        app = app_overrides([*preset.overrides, *overrides])
        ladder_jobs, arm_jobs = flops_steps(ladder_jobs, base, app), flops_steps(arm_jobs, base, app)
    if seeds == 1:
        print("archlab study: warning: one seed per arm: the seed noise comes from the placebo alone and "
              "the placebo check cannot fail; use --seeds 2 or more for a calibrated study")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    study = Study(out.resolve(), preset, overrides, opts.budget, opts.jobs, opts.wandb, evals)
    rungs = ",".join(ladder.rung_name(k) for k in preset.rungs)
    study.say(
        f"study in {study.out}: preset {preset.name}, {seeds} seed(s), {opts.budget} budget; rungs "
        f"{rungs} (baseline {ladder.rung_name(preset.baseline_rung)}); {opts.jobs} run(s) at a time; "
        f"students {','.join(n for n in names if n not in skipped)}; overrides {' '.join(study.overrides)}"
    )
    index = study.run(ladder_jobs, arm_jobs)
    print(f"report: {index}")
    return 0


def procedure_study(preset: ArmsPreset, opts: argparse.Namespace) -> int:
    """``archlab study --preset continual|onpolicy``: arms of one student (``archlab.arm_study``)."""
    refused = (
        ("--students", opts.students),
        ("--eval", opts.eval),
        ("--teacher", opts.teacher),
        ("--budget", opts.budget != "tokens" or None),
    )
    for flag, value in refused:
        if value:
            raise ConfigError(
                flag, value, f"not given: preset {preset.name} compares procedures, not students"
            )
    seeds = preset.seeds if opts.seeds is None else opts.seeds
    if seeds < 1:
        raise ConfigError("--seeds", seeds, "a positive number of seeds")
    steps, overrides = steps_of(preset, opts.overrides)
    preset = replace(preset, steps=steps)
    study = ArmStudy(new_out(opts.out).resolve(), preset, overrides, seeds)
    study.check()
    study.out.mkdir(parents=True, exist_ok=True)
    study.say(
        f"study in {study.out}: preset {preset.name}, {seeds} seed(s), {steps} steps per arm; arms "
        f"{','.join(preset.arms)}; domains {','.join(preset.domains)}; overrides {' '.join(study.overrides)}"
    )
    study.run()
    return 0


def _eval_tasks(text: str | None, limit: int | None) -> tuple[list[str], int | None]:
    """``--eval``'s tasks, checked now (lm-eval installed, every task known), and ``--eval-limit``."""
    if limit is not None and (limit < 1 or text is None):
        raise ConfigError("--eval-limit", limit, "a positive integer, with --eval")
    if text is None:
        return [], None
    from archlab import downstream

    tasks = downstream.parse_tasks(text)
    downstream.require_lm_eval()
    downstream.task_manager(tasks)
    return tasks, limit


def _with_teacher(teacher: str | None, overrides: list[str]) -> list[str]:
    """The overrides with ``--teacher``'s ``teacher=NAME`` first; refused beside a ``teacher=`` override."""
    if teacher is None:
        return overrides
    if any(override_key(o) == "teacher" for o in overrides):
        raise ConfigError("--teacher", teacher, "either --teacher or a teacher= override, not both")
    return [f"teacher={teacher}", *overrides]


def _check_overrides(overrides: list[str], jobs: list[Job]) -> None:
    """Compose and validate every job's config with the study's overrides before any work."""
    from archlab.config import compose, validate

    seen = set()
    for job in jobs:
        if job.arm in seen or job.missing():
            continue
        seen.add(job.arm)
        validate(compose([*app_overrides(overrides), *job.overrides()]))
