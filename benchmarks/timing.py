"""What every benchmark here shares: side-by-side timing and writing its results.

The machines are shared and noisy, so variants are never timed one after the other:
each repeat runs every variant once, alternating the order, with the garbage collector
paused, and reports compare medians and per-repeat ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 0
) -> dict[str, list[float]]:
    """Seconds of each function per repeat (one call each, alternating the order), after ``warmup`` calls."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


def publish(results: dict, report: str, json_path: Path | None) -> dict:
    """Print the report and, if asked, write the results as JSON; returns the results."""
    print(report)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    return results


def parse_step_args(p: argparse.ArgumentParser, argv: Sequence[str] | None, *, steps: int, warmup: int):
    """Add the flags every step-time benchmark takes (batch, repeats, warmup, threads, JSON), then parse."""
    p.add_argument("--batch-size", type=int, default=None, help="default: trainer.batch_size")
    p.add_argument("--steps", type=int, default=steps, help="timed repeats (one step of each variant)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed steps of each variant first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args
