"""Distillation overhead: a kd step on cached teacher targets against a ce step, and a K-student sweep
with the soft-target cache against an online teacher.

What is measured
    1. Step overhead. Two ``archlab.trainer.Trainer`` objects are built from the real composed
       config for the same student: one with ``teacher=<teacher> objective=kd`` (reads the cached
       top-k soft targets; the cache is built in setup, outside the timing) and one with
       ``teacher=none objective=ce``. Both start from the same seed, and the script checks that
       their initial weights are identical. ``trainer.max_steps`` is warmup + repeats, so the
       cache covers every timed step. After the warmup steps, each repeat times one
       ``Trainer.train_step()`` of each, alternating which goes first. The result is the
       median ms/step of each and the ratio kd/ce (target: <= 1.10). The ratio is the median
       over repeats of the two steps' ratio within that repeat, so a burst of load that slows
       both steps of a repeat cancels out. The ratio of the medians is printed beside it.
       A breakdown then times the parts of the kd step that a ce step lacks: reading a
       batch of targets from the memory map (``TargetCache.train``: slice, uint8 -> int64
       ids, float16 -> float32 log-probs) and the kd objective's forward and backward pass
       (log_softmax, gather, rest-bucket logsumexp, KL) against ce's, on the step's own logits.

    2. Sweep. K students (default 4) of the same config each train ``--sweep-steps`` steps:
       (a) cached: the cache is built once (``soft_targets_for``: teacher prepare plus the
           targets of the stream positions the sweep reads), then K trainers read it.
       (b) online: each of the K runs builds its own teacher (constructor + ``prepare()``) and
           computes the teacher's targets for each batch inside the step. It calls
           ``teacher.log_probs`` and builds
           ``SoftTargets.from_logprobs(log_softmax(logp / tau), k)`` before the objective,
           which is what TRL's GKDTrainer and torchtune's KD recipes do.
       Both variants run the same ``Trainer.train_step`` with the same student, batches,
       temperature and k. The script checks that the online targets equal the cached ones
       (up to the cache's float16 rounding). The teacher's methods (constructor, ``prepare``,
       ``log_probs``) are wrapped with timers and counters while the sweep runs, so the
       teacher's cost is measured directly, not inferred from totals. A cached student's
       teacher cost is only the teacher object that ``soft_targets_for`` constructs to compute
       the cache key. A "teacher build" is a teacher object whose ``prepare()`` ran: the ngram
       teacher counts its n-grams in every one, a trained teacher trains in the first build of
       each variant (in a fresh directory) and loads its checkpoint in the later ones.
       Students alternate cached/online in each round. The sweep students do no evaluation,
       so the cache is asked for one validation window (``trainer.eval_tokens=1``). In a real
       sweep the cache holds the validation targets once, and an online teacher would
       recompute them at every evaluation of every student.
       For each k in 1..K the table gives the wall time and the teacher's time of the first
       k students of each variant. Each row adds one student. The cached variant's teacher
       time stays flat, because the cache is built once. The online variant's grows by one
       teacher build plus one teacher pass over the student's batches.

    3. On-policy (GKD, ``distill.on_policy=λ``; ``archlab.onpolicy``). Three trainers of the kd config,
       λ = 0 (offline: cached targets), 0.5 and 1, step interleaved after the warmup; each step's own
       metrics give its split into sampling (the student's continuations through its KV cache),
       teacher (scoring them online) and update (the optimizer step). The ratio to the offline step is
       the median of per-repeat ratios, as in part 1. Prompts are ``--prompt-len`` tokens (default
       context / 8) and the student samples the rest of the context. No target: on CPU sampling token
       by token costs far more than a step, which is the point of measuring it.

    Threads default to 1 (``--threads`` changes it): on a 2-core machine shared with other
    processes, two intra-op threads contend with them, and a step can take ten times longer.

How to run
    python benchmarks/distill_overhead.py              # tiny preset, ngram teacher, K=4: ~4 min, 2 cores
    python benchmarks/distill_overhead.py --k 8 --sweep-steps 10 --json distill.json
    python benchmarks/distill_overhead.py --teacher trained   # a small teacher, trained once per variant
    python benchmarks/distill_overhead.py --override model.d_model=64 data.max_bytes=2000000

How to read it
    "ratio kd/ce" is the cost of distillation per step once targets are cached. The breakdown
    says where the difference goes. In the sweep table, "cached teacher s" should not grow with k;
    "online teacher s" grows by about the same amount per row. "online/cached" is the sweep's
    wall-time ratio at that k. The teacher-build counts (cached 1, online K) are checked. The exit
    code is 0 whatever the numbers; the last lines say whether the targets were met.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from timing import interleaved, publish

from archlab import registry
from archlab.config import compose, validate
from archlab.data import TokenSplit, train_batch
from archlab.loggers import RunInfo
from archlab.run_tokens import load_split
from archlab.soft_targets import SoftTargets
from archlab.teacher import TeacherEnv
from archlab.trainer import Trainer, resolve_device, soft_targets_for

TARGET_RATIO = 1.10
#: Median / fastest step above which the report warns that the machine was busy.
NOISY_SPREAD = 1.3
#: Teacher overrides used unless --teacher-override is given: ``trained`` is kept small enough to train
#: in seconds (it is trained once in setup and once per sweep variant).
DEFAULT_TEACHER_OVERRIDES = {
    "trained": [
        'teacher.overrides=["model.d_model=64","model.n_layers=2","model.n_heads=2",'
        '"trainer.max_steps=40","trainer.eval_tokens=4096"]'
    ],
}
#: Largest |online − cached| log-probability allowed, relative to 1 + |log p| (float16 keeps 11 bits).
TARGETS_RTOL = 2e-3


# --------------------------------------------------------------------------- config


def compose_config(
    args: argparse.Namespace, cache_dir: Path, max_steps: int, chosen: Sequence[str]
) -> DictConfig:
    """The student's config with the ``chosen`` teacher and objective, shared settings and overrides."""
    batch = [f"trainer.batch_size={args.batch_size}"] if args.batch_size else []
    return compose(
        [
            f"model={args.model}",
            *chosen,
            "logger=none",
            "trainer.progress=false",
            f"data.cache_dir={cache_dir}",
            f"trainer.max_steps={max_steps}",
            "trainer.eval_tokens=1",  # nothing here evaluates: the cache holds one validation window
            *batch,
            *args.override,
        ]
    )


def kd_choice(args: argparse.Namespace) -> list[str]:
    return [f"teacher={args.teacher}", *args.teacher_override, f"objective={args.objective}"]


CE_CHOICE = ["teacher=none", "objective=ce"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- teacher meter


@dataclass
class TeacherMeter:
    """Seconds in, and calls of, the teacher plugin's methods (outermost calls only)."""

    construct_s: float = 0.0
    prepare_s: float = 0.0
    log_probs_s: float = 0.0
    constructed: int = 0
    built: int = 0  # teacher objects whose prepare() ran: each built (or loaded) the teacher
    windows: int = 0  # rows passed through log_probs

    @property
    def total_s(self) -> float:
        return self.construct_s + self.prepare_s + self.log_probs_s

    def copy(self) -> TeacherMeter:
        return TeacherMeter(**asdict(self))

    def since(self, start: TeacherMeter) -> TeacherMeter:
        return TeacherMeter(**{k: v - getattr(start, k) for k, v in asdict(self).items()})

    def as_dict(self) -> dict:
        return {**asdict(self), "total_s": self.total_s}


@contextlib.contextmanager
def metered(cls: type, meter: TeacherMeter) -> Iterator[TeacherMeter]:
    """Wrap the teacher class's ``__init__``, ``prepare`` and ``log_probs`` with timers while inside.

    Nested calls (``log_probs`` calling ``prepare``, a trained teacher's own trainer) are
    timed once, by the outermost wrapper.
    """
    names = ("__init__", "prepare", "log_probs")
    own = {name: cls.__dict__[name] for name in names if name in cls.__dict__}  # restored as they were
    fields = {"__init__": "construct_s", "prepare": "prepare_s", "log_probs": "log_probs_s"}
    depth = 0

    def wrap(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(self, *a, **kw):
            nonlocal depth
            if name == "__init__":
                meter.constructed += 1
            if name == "prepare" and not getattr(self, "_bench_built", False):
                self._bench_built = True
                meter.built += 1
            if depth:
                return fn(self, *a, **kw)
            if name == "log_probs":
                meter.windows += int(a[0].shape[0])
            depth += 1
            start = time.perf_counter()
            try:
                return fn(self, *a, **kw)
            finally:
                depth -= 1
                field = fields[name]
                setattr(meter, field, getattr(meter, field) + time.perf_counter() - start)

        return timed

    for name in names:
        setattr(cls, name, wrap(name, getattr(cls, name)))
    try:
        yield meter
    finally:
        for name in names:
            if name in own:
                setattr(cls, name, own[name])
            else:
                delattr(cls, name)


# --------------------------------------------------------------------------- online teacher


def make_teacher(cfg: DictConfig, split: TokenSplit, device: torch.device, teacher_dir: Path):
    """The configured teacher plugin, in the environment ``soft_targets_for`` gives it (not prepared)."""
    cls, teacher_cfg = registry.configured("teacher", cfg.teacher)
    env = TeacherEnv(
        split=split,
        vocab_size=cfg.model.vocab_size,
        context=cfg.model.context,
        cache_dir=teacher_dir,
        device=device,
        progress=False,
    )
    return cls(teacher_cfg, env)


class OnlineTargets:
    """Stands in for the trainer's ``TargetCache``: the teacher's top-k of each batch, computed in the step.

    ``train(first, count)`` takes the same stream windows the trainer's batch holds, runs the teacher
    on them and keeps its top k at the objective's temperature, as the cache builder does.
    """

    def __init__(self, teacher, cfg: DictConfig, split: TokenSplit, temperature: float, top_k: int) -> None:
        self.teacher, self.split, self.cfg = teacher, split, cfg
        self.temperature, self.top_k = temperature, top_k

    @torch.no_grad()
    def train(self, first: int, count: int) -> SoftTargets:
        x, _ = train_batch(
            self.split.train, context=self.cfg.model.context, seed=self.cfg.seed, first=first, count=count
        )
        logprobs = self.teacher.log_probs(x).float()
        return SoftTargets.from_logprobs(torch.log_softmax(logprobs / self.temperature, dim=-1), self.top_k)


def objective_settings(cfg: DictConfig) -> tuple[float, int]:
    """(temperature, k) of the kd run's cache: the same the online targets must use."""
    _, objective_cfg = registry.configured("objective", cfg.objective)
    return float(getattr(objective_cfg, "temperature", 1.0)), min(cfg.distill.top_k, cfg.model.vocab_size)


def compare_targets(cached: SoftTargets, online: SoftTargets) -> dict:
    """Online and cached top-k agree up to float16 rounding (ids may swap among tied probabilities)."""
    diff = (online.logprobs - cached.logprobs).abs()
    bound = TARGETS_RTOL * (1 + cached.logprobs.abs())
    result = {
        "positions": int(cached.ids.shape[0] * cached.ids.shape[1]),
        "ids_agree": float((online.ids == cached.ids).float().mean()),
        "logprobs_max_abs_diff": float(diff.max()),
        "rtol": TARGETS_RTOL,
    }
    if not bool((diff <= bound).all()):  # not `assert`: the check must survive python -O
        raise AssertionError(f"online teacher targets differ from the cache: {result}")
    return result


# --------------------------------------------------------------------------- 1. step overhead


def build_cache(cfg: DictConfig, split: TokenSplit):
    """The run's soft targets as a trainer gets them (built on first use, as ``archlab teacher build``)."""
    t = OmegaConf.to_object(cfg.trainer)
    _, objective_cfg = registry.configured("objective", cfg.objective)
    return soft_targets_for(cfg, split, resolve_device(t.device), t, objective_cfg)


def trainer_for(cfg: DictConfig, split: TokenSplit, root: Path, name: str) -> Trainer:
    return Trainer(cfg, RunInfo(run_dir=root / "runs" / name, name=name), split=split)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def time_step(trainer: Trainer) -> None:
    trainer.train_step()
    sync(trainer.device)


def step_rows(times: dict[str, list[float]], tokens: int) -> dict:
    return {
        name: {
            "ms_per_step": 1e3 * statistics.median(ts),
            "ms_min": 1e3 * min(ts),
            "tokens_per_s": tokens / statistics.median(ts),
        }
        for name, ts in times.items()
    }


def breakdown(kd: Trainer, ce: Trainer, repeats: int) -> dict:
    """Median ms of the kd step's extra parts: the target read, and kd's objective against ce's."""
    t = kd.t
    n_windows = t.max_steps * t.grad_accum * t.batch_size  # stream positions the run's targets cover
    x, y = train_batch(
        kd.split.train, context=kd.model.dims.context, seed=kd.cfg.seed, first=0, count=t.batch_size
    )
    x, y = x.to(kd.device), y.to(kd.device)
    soft = kd.targets.train(0, t.batch_size).to(kd.device)
    with torch.no_grad(), kd.autocast():
        logits = kd.model(x)
    state = {"read": 0}

    def read() -> None:
        first = (state["read"] * t.batch_size) % max(1, n_windows - t.batch_size + 1)
        state["read"] += 1
        kd.targets.train(first, t.batch_size).to(kd.device)
        sync(kd.device)

    def objective(trainer: Trainer, teacher: SoftTargets | None) -> Callable[[], None]:
        def run() -> None:
            trainer.objective(logits.detach().requires_grad_(), y, teacher).backward()
            sync(kd.device)

        return run

    fns = {"read": read, "kd_objective": objective(kd, soft), "ce_objective": objective(ce, None)}
    times = interleaved(fns, repeats, warmup=1)
    ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    ms["objective_extra"] = ms["kd_objective"] - ms["ce_objective"]
    ms["explained_extra"] = ms["read"] + ms["objective_extra"]
    return ms


def step_overhead(args: argparse.Namespace, root: Path) -> tuple[dict, TokenSplit, DictConfig]:
    """Part 1: the interleaved kd and ce steps; returns the results, the split and the kd config."""
    max_steps = args.warmup + args.repeats
    kd_cfg = compose_config(args, root, max_steps, kd_choice(args))
    ce_cfg = compose_config(args, root, max_steps, CE_CHOICE)
    validate(kd_cfg)
    validate(ce_cfg)
    start = time.perf_counter()
    split = load_split(kd_cfg)
    split_s = time.perf_counter() - start
    ce = trainer_for(ce_cfg, split, root, "ce")  # first: it pays the one-time imports (torch.optim)
    teacher_cls, _ = registry.configured("teacher", kd_cfg.teacher)
    with metered(teacher_cls, TeacherMeter()) as meter:
        start = time.perf_counter()
        build_cache(kd_cfg, split)
        cache_s = time.perf_counter() - start
    kd = trainer_for(kd_cfg, split, root, "kd")  # finds the cache just built
    if not same_weights(kd.model, ce.model):
        raise AssertionError("the kd and ce students start from different weights")
    for _ in range(args.warmup):
        kd.train_step()
        ce.train_step()
    times = interleaved(
        {"kd": functools.partial(time_step, kd), "ce": functools.partial(time_step, ce)}, args.repeats
    )
    tokens = kd.t.batch_size * kd.t.grad_accum * kd.model.dims.context
    rows = step_rows(times, tokens)
    paired = statistics.median(a / b for a, b in zip(times["kd"], times["ce"], strict=True))
    m = kd_cfg.model
    results = {
        "dims": {k: m[k] for k in ("d_model", "n_layers", "n_heads", "context", "vocab_size")},
        "batch_size": kd.t.batch_size,
        "tokens_per_step": tokens,
        "top_k": kd.targets.meta["top_k"],
        "temperature": kd.targets.meta["temperature"],
        "cache_path": str(kd.targets.path),
        "setup": {
            "split_s": split_s,
            "cache_s": cache_s,
            "cache_built": meter.built > 0,
            "teacher": meter.as_dict(),
        },
        "same_initial_weights": True,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "kd": rows["kd"],
        "ce": rows["ce"],
        "ratio": paired,
        "ratio_of_medians": rows["kd"]["ms_per_step"] / rows["ce"]["ms_per_step"],
        "target_ratio": TARGET_RATIO,
        "target_met": paired <= TARGET_RATIO,
        "breakdown_ms": breakdown(kd, ce, args.repeats),
        "step_times_s": times,
    }
    return results, split, kd_cfg


# --------------------------------------------------------------------------- 3. on-policy

ON_POLICY = (0.0, 0.5, 1.0)


def on_policy(args: argparse.Namespace, root: Path, split: TokenSplit) -> dict:
    """Part 3: offline kd steps against on-policy ones at λ = 0.5 and 1, each split by the step's metrics."""
    max_steps = args.warmup + args.repeats
    prompt = args.prompt_len or compose_config(args, root, 1, kd_choice(args)).model.context // 8
    trainers, split_s = {}, {}
    for lam in ON_POLICY:
        extra = [f"distill.on_policy={lam}", f"distill.prompt_len={prompt}"]
        cfg = compose_config(args, root, max_steps, [*kd_choice(args), *extra])
        validate(cfg)
        trainers[lam] = trainer_for(cfg, split, root, f"on-policy-{lam}")  # part 1 built the cache
        split_s[lam] = []
    for _ in range(args.warmup):
        for trainer in trainers.values():
            trainer.train_step()

    def timed(lam: float) -> Callable[[], None]:
        def run() -> None:
            start = time.perf_counter()
            metrics = trainers[lam].train_step()
            sync(trainers[lam].device)
            whole = time.perf_counter() - start  # λ = 0 has no on-policy wrapper: all of it is the update
            parts = {k: metrics.get(f"train/time/{k}_s", 0.0) for k in ("sampling", "teacher")}
            split_s[lam].append({**parts, "update": metrics.get("train/time/update_s", whole)})

        return run

    times = interleaved({str(lam): timed(lam) for lam in ON_POLICY}, args.repeats)
    offline = times[str(ON_POLICY[0])]
    rows = []
    for lam in ON_POLICY:
        ts, parts = times[str(lam)], split_s[lam]
        rows.append(
            {
                "on_policy": lam,
                "ms_per_step": 1e3 * statistics.median(ts),
                "ratio": statistics.median(a / b for a, b in zip(ts, offline, strict=True)),
                "sampled_steps": sum(p["sampling"] > 0 for p in parts),
                **{
                    f"{k}_ms": 1e3 * statistics.mean(p[k] for p in parts)
                    for k in ("sampling", "teacher", "update")
                },
            }
        )
    return {"prompt_len": prompt, "sample_tokens": trainers[1.0].update.n_new, "rows": rows}


# --------------------------------------------------------------------------- 2. sweep


def run_steps(trainer: Trainer, steps: int) -> None:
    for _ in range(steps):
        trainer.train_step()
    sync(trainer.device)


def sweep(args: argparse.Namespace, root: Path, split: TokenSplit) -> dict:
    """Part 2: K students reading one cache against K students each running its own teacher."""
    work = Path(tempfile.mkdtemp(dir=root, prefix="sweep-"))  # always fresh: the cache must be built here
    try:
        return _sweep(args, work, split)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _sweep(args: argparse.Namespace, work: Path, split: TokenSplit) -> dict:
    cached_dir, online_dir = work / "cached", work / "online"
    kd_cfg = compose_config(args, cached_dir, args.sweep_steps, kd_choice(args))
    validate(kd_cfg)
    # the same student and objective without a teacher: the trainer reads no cache, OnlineTargets feeds it
    on_cfg = compose_config(
        args, online_dir, args.sweep_steps, ["teacher=none", f"objective={args.objective}"]
    )
    device = resolve_device(kd_cfg.trainer.device)
    temperature, top_k = objective_settings(kd_cfg)
    teacher_cls, _ = registry.configured("teacher", kd_cfg.teacher)
    meter = TeacherMeter()
    cached: list[dict] = []
    online: list[dict] = []
    last_teacher = None

    def cached_student(i: int) -> None:
        before, start = meter.copy(), time.perf_counter()
        trainer = trainer_for(kd_cfg, split, cached_dir, f"cached-{i}")
        run_steps(trainer, args.sweep_steps)
        cached.append({"s": time.perf_counter() - start, "teacher": meter.since(before).as_dict()})

    def online_student(i: int) -> None:
        nonlocal last_teacher
        before, start = meter.copy(), time.perf_counter()
        trainer = trainer_for(on_cfg, split, online_dir, f"online-{i}")
        teacher = make_teacher(kd_cfg, split, device, online_dir / "teachers")
        teacher.prepare()
        trainer.targets = OnlineTargets(teacher, kd_cfg, split, temperature, top_k)
        run_steps(trainer, args.sweep_steps)
        online.append({"s": time.perf_counter() - start, "teacher": meter.since(before).as_dict()})
        last_teacher = teacher

    with metered(teacher_cls, meter):
        start = time.perf_counter()
        cache = build_cache(kd_cfg, split)
        build = {"s": time.perf_counter() - start, "teacher": meter.copy().as_dict()}
        for i in range(args.k):
            order = (cached_student, online_student) if i % 2 == 0 else (online_student, cached_student)
            for student in order:
                student(i)
    t = OmegaConf.to_object(kd_cfg.trainer)
    check = OnlineTargets(last_teacher, kd_cfg, split, temperature, top_k).train(0, t.batch_size)
    agreement = compare_targets(cache.train(0, t.batch_size), check)

    rows = []
    for k in range(1, args.k + 1):
        c_total = build["s"] + sum(r["s"] for r in cached[:k])
        c_teacher = build["teacher"]["total_s"] + sum(r["teacher"]["total_s"] for r in cached[:k])
        o_total = sum(r["s"] for r in online[:k])
        o_teacher = sum(r["teacher"]["total_s"] for r in online[:k])
        rows.append(
            {
                "k": k,
                "cached_total_s": c_total,
                "cached_teacher_s": c_teacher,
                "online_total_s": o_total,
                "online_teacher_s": o_teacher,
                "online_over_cached": o_total / c_total,
            }
        )
    cached_builds = build["teacher"]["built"] + sum(r["teacher"]["built"] for r in cached)
    online_builds = sum(r["teacher"]["built"] for r in online)
    per_student = {
        "cached_teacher_s": (rows[-1]["cached_teacher_s"] - rows[0]["cached_teacher_s"]) / max(1, args.k - 1),
        "online_teacher_s": (rows[-1]["online_teacher_s"] - rows[0]["online_teacher_s"]) / max(1, args.k - 1),
    }
    o1 = all(r["teacher"]["built"] == 0 and r["teacher"]["windows"] == 0 for r in cached)
    return {
        "k": args.k,
        "steps": args.sweep_steps,
        "teacher": args.teacher,
        "train_windows_per_student": args.sweep_steps * t.batch_size * t.grad_accum,
        "cache": {
            "s": build["s"],
            "teacher": build["teacher"],
            "train_windows": cache.meta["train_rows"],
            "val_windows": cache.meta["val_windows"],
        },
        "cached": {"teacher_builds": cached_builds, "students": cached},
        "online": {"teacher_builds": online_builds, "students": online},
        "rows": rows,
        "added_student": per_student,
        "targets_check": agreement,
        "teacher_cost_constant": o1 and cached_builds == 1,
    }


# --------------------------------------------------------------------------- report


def format_report(r: dict) -> str:
    s = r["step"]
    d = s["dims"]
    setup, teacher = s["setup"], s["setup"]["teacher"]
    cache_line = (
        f"built in {setup['cache_s']:.1f} s (teacher prepare {teacher['prepare_s']:.1f} s,"
        f" log_probs {teacher['log_probs_s']:.1f} s; outside the timing)"
        if setup["cache_built"]
        else "found (built by an earlier run)"
    )
    lines = [
        f"archlab distillation overhead: model={r['model']} teacher={r['teacher']} objective={r['objective']}"
        f" {' '.join(r['overrides'])}".rstrip(),
        f"  d_model={d['d_model']} n_layers={d['n_layers']} n_heads={d['n_heads']} context={d['context']}"
        f" vocab={d['vocab_size']}; batch {s['batch_size']} -> {s['tokens_per_step']:,} tokens/step;"
        f" top-{s['top_k']} targets at tau={s['temperature']}",
        f"  torch {r['torch']}, {r['threads']} threads, device {r['device']}; cache {cache_line}",
        "",
        f"1. step: {s['repeats']} interleaved repeats after {s['warmup']} warmup steps;"
        " same initial weights (checked)",
        f"  {'':<28}{'ms/step':>10}{'min ms':>10}{'tokens/s':>12}",
    ]
    labels = {"kd": "kd (cached targets)", "ce": "ce (no teacher)"}
    for name in ("kd", "ce"):
        row = s[name]
        lines.append(
            f"  {labels[name]:<28}{row['ms_per_step']:>10.1f}{row['ms_min']:>10.1f}"
            f"{row['tokens_per_s']:>12,.0f}"
        )
    b = s["breakdown_ms"]
    lines += [
        f"  ratio kd/ce: {s['ratio']:.3f} (median of per-repeat ratios; ratio of the medians"
        f" {s['ratio_of_medians']:.3f})",
        f"  kd's extra work per step: target read {b['read']:.2f} ms"
        f" + objective {b['objective_extra']:+.2f} ms (kd {b['kd_objective']:.2f} vs ce"
        f" {b['ce_objective']:.2f} ms fwd+bwd)",
        f"    = {b['explained_extra']:.2f} ms; the medians differ by"
        f" {s['kd']['ms_per_step'] - s['ce']['ms_per_step']:+.2f} ms",
    ]
    spread = max(s[name]["ms_per_step"] / s[name]["ms_min"] for name in ("kd", "ce"))
    if spread > NOISY_SPREAD:
        lines.append(
            f"  note: the median step is {spread:.1f}x the fastest one: other load on this machine?"
            " The per-repeat ratio cancels load that slows both steps of a repeat; the medians do not."
        )
    w = r["sweep"]
    c = w["cache"]
    lines += [
        "",
        f"2. sweep: K={w['k']} students x {w['steps']} steps ({w['train_windows_per_student']} windows each)",
        f"  cache built once: {c['s']:.1f} s (teacher prepare {c['teacher']['prepare_s']:.1f} s,"
        f" log_probs {c['teacher']['log_probs_s']:.1f} s on {c['train_windows']}+{c['val_windows']} windows)",
        f"  {'':<4}{'cached':>30}{'online':>30}",
        f"  {'k':<4}{'total s':>10}{'teacher s':>11}{'share':>9}{'total s':>10}{'teacher s':>11}{'share':>9}"
        f"{'online/cached':>15}",
    ]
    for row in w["rows"]:
        lines.append(
            f"  {row['k']:<4}{row['cached_total_s']:>10.2f}{row['cached_teacher_s']:>11.2f}"
            f"{row['cached_teacher_s'] / row['cached_total_s']:>9.1%}"
            f"{row['online_total_s']:>10.2f}{row['online_teacher_s']:>11.2f}"
            f"{row['online_teacher_s'] / row['online_total_s']:>9.1%}{row['online_over_cached']:>15.2f}"
        )
    on = w["online"]["students"]
    added, check = w["added_student"], w["targets_check"]
    o = r["on_policy"]
    lines_on = [
        "",
        f"3. on-policy: prompts of {o['prompt_len']} tokens + {o['sample_tokens']} sampled; {s['repeats']}"
        " interleaved repeats; split = mean ms per step (over all steps, off-policy ones included)",
        f"  {'lambda':<8}{'ms/step':>10}{'x offline':>11}{'sampled':>9}"
        f"{'sampling':>10}{'teacher':>9}{'update':>9}",
    ]
    for row in o["rows"]:
        lines_on.append(
            f"  {row['on_policy']:<8}{row['ms_per_step']:>10.1f}{row['ratio']:>11.2f}"
            f"{row['sampled_steps']:>5}/{s['repeats']:<3}{row['sampling_ms']:>10.1f}{row['teacher_ms']:>9.1f}"
            f"{row['update_ms']:>9.1f}"
        )
    lines += [
        f"  teacher time per added student: cached {added['cached_teacher_s']:.3f} s,"
        f" online {added['online_teacher_s']:.2f} s"
        f" (prepare {statistics.median(x['teacher']['prepare_s'] for x in on):.2f} s"
        f" + log_probs {statistics.median(x['teacher']['log_probs_s'] for x in on):.2f} s, medians)",
        f"  teacher builds: cached {w['cached']['teacher_builds']}, online {w['online']['teacher_builds']};"
        f" teacher windows: cached {c['teacher']['windows']},"
        f" online {sum(x['teacher']['windows'] for x in on)}",
        f"  online targets = cached targets: max |diff log p| {check['logprobs_max_abs_diff']:.1e}"
        f" (float16 cache), ids agree at {check['ids_agree']:.1%} of {check['positions']:,} top-k slots",
        "",
        f"  target ratio kd/ce <= {s['target_ratio']}: {'met' if s['target_met'] else 'NOT met'}",
        f"  target teacher cost O(1) in K (built once, never run by cached students):"
        f" {'met' if w['teacher_cost_constant'] else 'NOT met'}",
    ]
    return "\n".join(lines + lines_on)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="model preset (conf/model/*.yaml)")
    p.add_argument("--override", nargs="*", action="extend", default=[], help="Hydra overrides (both parts)")
    p.add_argument("--teacher", default="ngram", help="teacher plugin (ngram | trained)")
    p.add_argument(
        "--teacher-override",
        nargs="*",
        action="extend",
        default=None,
        help="Hydra overrides of the teacher (default for trained: a small, fast one)",
    )
    p.add_argument("--objective", default="kd", help="distillation objective preset (kd, reverse_kl, jsd...)")
    p.add_argument("--batch-size", type=int, default=None, help="default: trainer.batch_size")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats (one step of each trainer)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each trainer first")
    p.add_argument("--k", type=int, default=4, help="students in the sweep")
    p.add_argument("--sweep-steps", type=int, default=20, help="training steps of each sweep student")
    p.add_argument("--prompt-len", type=int, default=0, help="on-policy prompt tokens (0: context / 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--cache-dir", type=Path, default=None, help="data.cache_dir (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.k < 1 or args.sweep_steps < 1 or args.threads < 0:
        p.error("--repeats, --k and --sweep-steps must be >= 1; --warmup and --threads >= 0")
    if args.teacher == "none":
        p.error("--teacher must name a teacher plugin")
    if args.teacher_override is None:
        args.teacher_override = list(DEFAULT_TEACHER_OVERRIDES.get(args.teacher, []))
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run both parts, print the report, optionally write JSON; returns the results."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        if args.cache_dir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="distill-overhead-")))
        else:
            root = args.cache_dir.expanduser().resolve()
            root.mkdir(parents=True, exist_ok=True)
        step, split, kd_cfg = step_overhead(args, root)
        results = {
            "model": args.model,
            "teacher": args.teacher,
            "teacher_overrides": list(args.teacher_override),
            "objective": args.objective,
            "overrides": list(args.override),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": str(resolve_device(kd_cfg.trainer.device)),
            "step": step,
            "sweep": sweep(args, root, split),
            "on_policy": on_policy(args, root, split),
        }
    return publish(results, format_report(results), args.json)


if __name__ == "__main__":
    main()
    sys.exit(0)
