"""Step time of each depth-stream (residual) plugin against the pre-norm residual.

What is measured
    One training step (forward, cross-entropy, backward, AdamW, ``on_step_end`` hooks, as
    ``archlab.trainer`` does; ``step_fn`` of benchmarks/moe.py) of the archlab student with each
    ``residual=`` choice, all other slots equal (default: the ``tiny`` preset, 4 layers = 8 sublayers):
        prenorm          h_{i+1} = h_i + f_i(norm_i(h_i))                      the reference
        attnres_full     softmax over the embedding and every earlier sublayer output
        attnres_block    the same over 4 blocks of sublayers (``residual.n_blocks=4``)
        denseformer      a learned average of all earlier layer outputs after every layer
        hyper            4 residual streams, static connections
        hyper_dynamic    4 streams, per-token (tanh) connection terms
    The variants take turns within every repeat (``timing.interleaved``) on the same random-byte batch;
    each ratio is the median over repeats of (variant step / prenorm step) within the repeat, so a burst
    of load from other processes, which slows neighbouring steps alike, mostly cancels.
    Targets: attnres_block <= 1.10, attnres_full <= 1.25 (the others are reported, no target).
    Non-embedding parameters of every variant are printed (all within 1 % of prenorm on tiny).

How to run
    python benchmarks/residuals.py                               # tiny, batch 16 x 256, ~2 min on 2 cores
    python benchmarks/residuals.py --variants prenorm attnres_block --steps 10 --threads 1
    python benchmarks/residuals.py --override model.n_layers=8 --json residuals.json

The exit code is 0 whatever the ratios; the last lines say whether the targets were met.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence

import torch
from moe import step_fn
from omegaconf import DictConfig
from timing import interleaved, parse_step_args, publish

from archlab.config import compose
from archlab.metrics import model_metrics
from archlab.model import build_student

VARIANTS = {
    "prenorm": ["residual=prenorm"],
    "attnres_full": ["residual=attnres", "residual.mode=full"],
    "attnres_block": ["residual=attnres", "residual.mode=block", "residual.n_blocks=4"],
    "denseformer": ["residual=denseformer"],
    "hyper": ["residual=hyper", "residual.dynamic=false"],
    "hyper_dynamic": ["residual=hyper", "residual.dynamic=true"],
}
REFERENCE = "prenorm"
TARGETS = {"attnres_block": 1.10, "attnres_full": 1.25}


def compose_variant(args: argparse.Namespace, name: str) -> DictConfig:
    return compose([f"model={args.model}", "teacher=none", "objective=ce", *VARIANTS[name], *args.override])


def summarise(args: argparse.Namespace, meta: dict, times: dict[str, list[float]]) -> dict:
    reference = times[REFERENCE]
    ratios = {
        name: statistics.median(v / r for v, r in zip(ts, reference, strict=True))
        for name, ts in times.items()
    }
    return {
        **meta,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args.steps,
        "warmup": args.warmup,
        "step_ms": {name: 1e3 * statistics.median(ts) for name, ts in times.items()},
        "ratio": ratios,
        "targets": TARGETS,
        "targets_met": {name: ratios[name] <= t for name, t in TARGETS.items() if name in ratios},
        "step_times_s": times,
    }


def format_report(r: dict) -> str:
    params = r["params"]
    lines = [
        f"residual plugins vs {REFERENCE}: model={r['model']} {' '.join(r['overrides'])}".rstrip(),
        f"  batch {r['batch_size']} x {r['context']} tokens; torch {r['torch']}, {r['threads']} threads;"
        f" {r['repeats']} interleaved repeats after {r['warmup']} warmup",
        "",
        f"  {'variant':<16}{'ms/step':>10}{'ratio':>8}{'target':>8}{'non-emb params':>16}{'vs prenorm':>12}",
    ]
    for name, ms in r["step_ms"].items():
        target = r["targets"].get(name)
        gap = params[name] / params[REFERENCE] - 1
        lines.append(
            f"  {name:<16}{ms:>10.1f}{r['ratio'][name]:>8.3f}{target if target else '':>8}"
            f"{params[name]:>16,}{gap:>+12.2%}"
        )
    lines.append("")
    for name, met in r["targets_met"].items():
        lines.append(
            f"  {name}: ratio {r['ratio'][name]:.3f}, target <= {r['targets'][name]}: "
            f"{'met' if met else 'NOT met'}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="model preset (conf/model/*.yaml)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument(
        "--override", nargs="*", action="extend", default=[], help="Hydra overrides, every variant"
    )
    args = parse_step_args(p, argv, steps=10, warmup=1)
    args.variants = [REFERENCE, *(v for v in args.variants if v != REFERENCE)]
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print the table, optionally write JSON; returns the results."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = {name: compose_variant(args, name) for name in args.variants}
    cfg = configs[REFERENCE]
    batch, context = args.batch_size or cfg.trainer.batch_size, cfg.model.context
    data = torch.randint(0, cfg.model.vocab_size, (batch, context + 1))
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    steps, params = {}, {}
    for name, variant_cfg in configs.items():
        torch.manual_seed(variant_cfg.seed)
        student = build_student(variant_cfg)
        params[name] = model_metrics(student, torch.float32)["params/non_embedding"]
        steps[name] = step_fn(variant_cfg, student, x, y)
    times = interleaved(steps, args.steps, args.warmup)
    meta = {
        "model": args.model,
        "overrides": args.override,
        "variants": {name: VARIANTS[name] for name in args.variants},
        "batch_size": batch,
        "context": context,
        "params": params,
    }
    results = summarise(args, meta, times)
    return publish(results, format_report(results), args.json)


if __name__ == "__main__":
    main()
    sys.exit(0)
