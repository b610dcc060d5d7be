"""Data-parallel scaling on CPU: 1 vs 2 processes at the same global batch, and DDP's cost at world size 1.

What is measured
    The trainer's own optimizer step (``Trainer.train_step``: the step's windows of the training
    stream, forward, objective, backward, gradient clipping, AdamW; under ``trainer.parallel=ddp``
    also DDP's gradient all-reduce and the ranks' metric average) of the default student
    (``model=tiny``, every slot at its default, hard-label CE without a teacher unless
    ``--override`` says otherwise), at one global batch of B windows, in four variants:

    ============  =====================  ==========================================================
    variant       processes x threads    how
    ============  =====================  ==========================================================
    none-2t       1 x 2                  ``trainer.parallel=none``, batch B
    none-1t       1 x 1                  the same, one intra-op thread
    ddp-1p        1 x 1                  ``trainer.parallel=ddp`` without torchrun (world size 1)
    ddp-2p        2 x 1                  ``torchrun --standalone --nproc_per_node=2``, gloo, B/2 each
    ============  =====================  ==========================================================

    The three one-process variants run in this process, interleaved (``timing.interleaved``: each
    repeat steps every variant once, alternating the order) with the thread count set before each
    step; their repeats are split around the 2-process run, so drift in the machine's load reaches
    all four. The 2-process run is a torchrun of this file (``--worker``): rank 0 times each of its
    steps (every step ends in the gradient all-reduce, so the ranks move in lockstep). Every variant
    starts from the same weights and reads the same windows, and the script checks that their
    first steps' losses agree (1e-5 relative) before it reports: the same work is timed.

Which comparison is fair
    Two processes of one thread use the machine's two cores; so does one process of two threads.
    ``ddp-2p / none-2t`` is the fair one (same cores, same global batch): what torchrun buys on this
    machine. ``ddp-2p / none-1t`` (ideal 2.0) is scaling per core: what adding a second device of the
    same speed would give, communication included. DDP's overhead is ``ddp-1p / none-1t``, the
    median of per-repeat ratios (target <= 1.05), at one thread: on a busy 2-core machine a process of
    two threads spends most of its step spin-waiting for the second (its steps were ~4x slower than
    one thread's at load average 7-12, 2026-12-07), which would drown DDP's own cost.

How to run
    python benchmarks/scaling.py                # tiny preset, global batch 16 x 256: 2.4 min on 2 cores
    python benchmarks/scaling.py --quick        # a toy student, 2 repeats: a smoke test of the script
    python benchmarks/scaling.py --steps 40 --batch-size 32 --json scaling.json

The default run took 2.4 minutes on 2 cores shared with other jobs at load average 3.5, and 7.5 at
load 7 (2026-12-07). The exit code is 0 whatever the numbers; the
report says whether the DDP-overhead target was met.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from timing import interleaved, parse_step_args, publish

from archlab import distributed
from archlab.config import compose
from archlab.data import TokenSplit
from archlab.loggers import RunInfo
from archlab.run_tokens import load_split
from archlab.trainer import Trainer

TARGET_DDP_OVERHEAD = 1.05
LOSS_RTOL = 1e-5
PROCESSES = 2
#: Overrides every variant shares: no logging, no progress bar, the CPU.
COMMON = ("logger=none", "trainer.progress=false", "trainer.device=cpu")
#: A student and corpus small enough for the smoke test (seconds per variant).
QUICK = (
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.context=32",
    "data.max_bytes=200000",
)
#: variant -> (trainer.parallel, intra-op threads) of the one-process variants.
IN_PROCESS = {"none-2t": ("none", 2), "none-1t": ("none", 1), "ddp-1p": ("ddp", 1)}


def overrides_for(args: argparse.Namespace, parallel: str, batch_size: int) -> list[str]:
    """Hydra overrides of one variant: the student and corpus, then the variant's parallelism and batch."""
    base = ["model=tiny", "teacher=none", "objective=ce", *COMMON, *(QUICK if args.quick else ())]
    return [*base, *args.override, f"trainer.parallel={parallel}", f"trainer.batch_size={batch_size}"]


def make_trainer(overrides: list[str], run_dir: Path, split: TokenSplit | None = None) -> Trainer:
    return Trainer(compose(overrides), RunInfo(run_dir=run_dir, name="scaling"), split)


def timed_steps(trainer: Trainer, threads: int) -> tuple[Callable[[], None], list[float]]:
    """A callable that sets ``threads`` and runs one training step, and the list its losses go to."""
    losses: list[float] = []

    def step() -> None:
        torch.set_num_threads(threads)
        losses.append(trainer.train_step()["train/loss"])

    return step, losses


# --------------------------------------------------------------------------- the 2-process worker


def worker(args: argparse.Namespace) -> None:
    """One rank of the torchrun: ``--warmup`` then ``--steps`` timed steps; rank 0 writes the JSON."""
    torch.set_num_threads(1)
    batch = args.global_batch // PROCESSES
    with distributed.process_group("ddp", torch.device("cpu")) as ranks, tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(overrides_for(args, "ddp", batch), Path(tmp))
        step, losses = timed_steps(trainer, 1)
        for _ in range(args.warmup):
            step()
        dist.barrier()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        if ranks.is_main:
            args.worker.write_text(
                json.dumps({"times": times, "first_loss": losses[0], "world": ranks.world_size})
            )


def two_processes(args: argparse.Namespace, out: Path) -> dict:
    """This file under ``torchrun --standalone --nproc_per_node=2`` (one thread each); rank 0's JSON."""
    flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.global_batch)]
    flags += ["--quick"] * args.quick + [x for o in args.override for x in ("--override", o)]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}",
        __file__, "--worker", str(out), *flags,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(
            f"scaling: the 2-process torchrun failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- report


def row(times: list[float], tokens: int, procs: int, threads: int) -> dict:
    median = statistics.median(times)
    return {
        "processes": procs,
        "threads": threads,
        "ms_median": 1e3 * median,
        "ms_min": 1e3 * min(times),
        "tokens_per_s": tokens / median,
        "tokens_per_s_best": tokens / min(times),
    }


def check_same_work(first_losses: dict[str, float]) -> float:
    """The variants' first-step losses agree (same weights, same windows); returns the largest gap."""
    ref = first_losses["none-2t"]
    gap = max(abs(v - ref) / abs(ref) for v in first_losses.values())
    if gap > LOSS_RTOL:
        raise AssertionError(
            f"first-step losses differ across variants by {gap:.1e} (relative): {first_losses}"
        )
    return gap


def summarise(args: argparse.Namespace, times: dict[str, list[float]], trainer: Trainer, gap: float) -> dict:
    tokens = args.global_batch * trainer.model.dims.context
    rows = {name: row(ts, tokens, 1, IN_PROCESS[name][1]) for name, ts in times.items() if name in IN_PROCESS}
    rows["ddp-2p"] = row(times["ddp-2p"], tokens, PROCESSES, 1)
    overhead = statistics.median(d / n for d, n in zip(times["ddp-1p"], times["none-1t"], strict=True))
    m = trainer.cfg.model
    return {
        "overrides": overrides_for(args, "<variant>", args.global_batch)[:-2],
        "dims": {k: m[k] for k in ("d_model", "n_layers", "n_heads", "context")},
        "global_batch": args.global_batch,
        "tokens_per_step": tokens,
        "repeats": args.steps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "first_loss_max_rel_gap": gap,
        "variants": rows,
        "speedup_2p_over_1p_2t": rows["ddp-2p"]["tokens_per_s"] / rows["none-2t"]["tokens_per_s"],
        "speedup_2p_over_1p_2t_best": rows["ddp-2p"]["tokens_per_s_best"]
        / rows["none-2t"]["tokens_per_s_best"],
        "speedup_2p_over_1p_1t": rows["ddp-2p"]["tokens_per_s"] / rows["none-1t"]["tokens_per_s"],
        "speedup_2p_over_1p_1t_best": rows["ddp-2p"]["tokens_per_s_best"]
        / rows["none-1t"]["tokens_per_s_best"],
        "ddp_overhead": overhead,
        "ddp_overhead_best": min(times["ddp-1p"]) / min(times["none-1t"]),
        "target_ddp_overhead": TARGET_DDP_OVERHEAD,
        "ddp_overhead_met": overhead <= TARGET_DDP_OVERHEAD,
        "step_times_s": times,
    }


def format_report(r: dict) -> str:
    d = r["dims"]
    lines = [
        f"scaling: {' '.join(r['overrides'])}",
        f"  d_model={d['d_model']} n_layers={d['n_layers']} n_heads={d['n_heads']} context={d['context']};"
        f" global batch {r['global_batch']} -> {r['tokens_per_step']:,} tokens/step",
        f"  torch {r['torch']}, {r['cpus']} CPUs, load average {r['load_average'][0]:.2f} at the end;"
        f" {r['repeats']} repeats after {r['warmup']} warmup steps; first-step losses agree to"
        f" {r['first_loss_max_rel_gap']:.1e}",
        "",
        f"  {'variant':<10}{'procs x threads':>16}{'ms/step':>10}{'min ms':>9}{'tokens/s':>11}"
        f"{'best tok/s':>12}",
    ]
    for name, v in r["variants"].items():
        lines.append(
            f"  {name:<10}{v['processes']:>12} x {v['threads']}{v['ms_median']:>10.1f}{v['ms_min']:>9.1f}"
            f"{v['tokens_per_s']:>11,.0f}{v['tokens_per_s_best']:>12,.0f}"
        )
    lines += [
        "",
        f"  2 processes / 1 process x 2 threads (same cores: the fair comparison):"
        f" {r['speedup_2p_over_1p_2t']:.2f} (medians; best steps {r['speedup_2p_over_1p_2t_best']:.2f})",
        f"  2 processes / 1 process x 1 thread (per-core scaling, ideal 2.00):"
        f" {r['speedup_2p_over_1p_1t']:.2f} (medians; best steps {r['speedup_2p_over_1p_1t_best']:.2f})",
        f"  DDP overhead at world size 1, ddp-1p / none-1t: {r['ddp_overhead']:.3f} (median of per-repeat"
        f" ratios; best steps {r['ddp_overhead_best']:.3f})",
        f"  target DDP overhead <= {r['target_ddp_overhead']}: {'PASS' if r['ddp_overhead_met'] else 'FAIL'}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--override", nargs="*", action="extend", default=[], help="Hydra overrides (every variant)"
    )
    p.add_argument("--quick", action="store_true", help="a toy student (d_model 32, 1 layer, context 32)")
    p.add_argument("--timeout", type=float, default=600, help="seconds the 2-process torchrun may take")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # a rank of the torchrun
    args = parse_step_args(p, argv, steps=30, warmup=3)
    if args.threads is not None:
        p.error("--threads: each variant sets its own thread count (see the table in the docstring)")
    args.global_batch = args.batch_size or 16
    if args.global_batch % PROCESSES:
        p.error(f"--batch-size must be a multiple of {PROCESSES} (it is split over the processes)")
    return args


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Run the benchmark (or, with ``--worker``, one rank of its torchrun); returns the results."""
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args)
    with distributed.process_group("ddp", torch.device("cpu")), tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        first = overrides_for(args, "none", args.global_batch)
        split = load_split(compose(first))
        steps, losses = {}, {}
        for name, (parallel, threads) in IN_PROCESS.items():
            trainer = make_trainer(overrides_for(args, parallel, args.global_batch), root / name, split)
            steps[name], losses[name] = timed_steps(trainer, threads)
        early = interleaved(steps, math.ceil(args.steps / 2), args.warmup)
        worker_out = two_processes(args, root / "ddp-2p.json")
        late = interleaved(steps, args.steps // 2)
    times = {name: early[name] + late[name] for name in steps}
    times["ddp-2p"] = worker_out["times"]
    first_losses = {name: ls[0] for name, ls in losses.items()} | {"ddp-2p": worker_out["first_loss"]}
    results = summarise(args, times, trainer, check_same_work(first_losses))
    return publish(results, format_report(results), args.json)


if __name__ == "__main__":
    main()
    sys.exit(0)
