"""Medusa decoding against plain greedy decoding: tokens per base forward, tokens/s, identical output.

What is measured
    A student with ``head=medusa`` (4 draft heads by default) is trained here for ``--train-steps`` steps
    (Medusa-2: LM loss + λ0 Σ 0.8^k head losses; cross-entropy on the bytes, no teacher) or loaded from
    ``--checkpoint``. On ``--prompts`` prompts cut from the validation split (``--prompt-tokens`` each)
    it continues each by ``--new-tokens`` tokens twice: plain greedy decoding through the KV cache
    (``archlab.generate.generate``), and ``archlab.speculative.generate_speculative`` with each tree of
    ``--trees`` (top tokens per depth). The two outputs must be identical, token for token; the script
    stops if not. Mean accepted length = tokens emitted ÷ base forwards (prefill included; plain = 1).
    Speed: per prompt, each method decodes ``--repeats`` times, alternating the order
    (``timing.interleaved``); the median per prompt is summed over prompts, tokens/s = tokens / that sum,
    speed-up = plain seconds / Medusa seconds. Per-head top-1 accuracy (head k predicting the token k + 1
    after the base head's) is measured on ``--eval-windows`` validation windows through its ``aux_loss``.
    Threads default to 1: batch-1 decoding is a chain of tiny matmuls (see benchmarks/decode.py).

How to run
    python benchmarks/medusa.py          # d_model 128, 2 layers, 300 steps: ~20 min on 2 busy shared cores
    python benchmarks/medusa.py --checkpoint outputs/.../run --trees 4,2,1 2,2,2,2
    python benchmarks/medusa.py --train-steps 100 --override head.num_heads=3 --json medusa.json

The exit code is 0 whatever the speed-up; it is 1 only if Medusa's output differs from plain greedy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from timing import interleaved, publish

from archlab import checkpoint
from archlab.config import compose
from archlab.data import windows
from archlab.generate import generate
from archlab.loggers import RunInfo
from archlab.model import Student
from archlab.run_tokens import load_split
from archlab.speculative import generate_speculative, parse_widths
from archlab.trainer import Trainer

SHAPE = ["model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.context=256"]
TRAIN = ["head=medusa", "teacher=none", "objective=ce", "logger=none", "trainer.progress=false"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="a trained head=medusa run (default: train one)")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--override", nargs="*", default=[], help="Hydra overrides for the trained student")
    p.add_argument("--trees", nargs="+", default=["4,2,1", "1,1,1,1"], help="top tokens per depth")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.widths = [parse_widths(t) for t in args.trees]
    for key in ("train_steps", "prompts", "prompt_tokens", "new_tokens", "repeats", "eval_windows"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def trained_student(args: argparse.Namespace) -> tuple[Student, object, dict]:
    """(model, config, training summary) from ``--checkpoint`` or a fresh training run."""
    if args.checkpoint:
        ckpt = checkpoint.find(args.checkpoint)
        return checkpoint.load_student(ckpt, torch.device("cpu")), checkpoint.saved_config(ckpt), {}
    cfg = compose(
        [
            *SHAPE,
            *TRAIN,
            f"trainer.max_steps={args.train_steps}",
            f"trainer.batch_size={args.batch_size}",
            f"trainer.eval_every={args.train_steps}",
            "trainer.eval_tokens=8192",
            "trainer.device=cpu",
            *args.override,
        ]
    )
    run_dir = Path(tempfile.mkdtemp(prefix="medusa_bench_"))
    trainer = Trainer(cfg, RunInfo(run_dir=run_dir, name="medusa"))
    summary = trainer.run()
    return trainer.model.eval(), cfg, {"run_dir": str(run_dir), "val_bpb": summary["val/bpb"]}


@torch.no_grad()
def head_accuracy(model: Student, val: np.ndarray, n_windows: int) -> dict[str, float]:
    """Top-1 accuracy of every draft head on validation windows, as the head reports it through ctx."""
    context = model.dims.context
    n = min(n_windows, (len(val) - 1) // context)
    x, y = windows(val, [i * context for i in range(n)], context)
    ctx = model.new_context(x)
    model(x, ctx)
    model.aux_losses(ctx, y)
    return {k.split("/")[-1]: v for k, v in ctx.metrics.items() if k.endswith("_top1")}


def prompts(val: np.ndarray, args: argparse.Namespace) -> list[torch.Tensor]:
    stride = (len(val) - args.prompt_tokens) // args.prompts
    return [
        torch.from_numpy(val[i * stride : i * stride + args.prompt_tokens].astype(np.int64))[None]
        for i in range(args.prompts)
    ]


def measure(model: Student, batch: list[torch.Tensor], widths: tuple[int, ...], args) -> dict:
    """Accepted length and time of Medusa with one tree vs plain greedy, summed over the prompts."""
    n, forwards, plain_s, medusa_s = args.new_tokens, 0, 0.0, 0.0
    for prompt in batch:
        tokens, stats = generate_speculative(model, prompt, n, widths=widths)
        if not torch.equal(tokens, generate(model, prompt, n)):
            raise SystemExit(f"medusa: tree {widths} decoded differently from plain greedy")
        forwards += stats.forwards
        times = interleaved(
            {
                "plain": lambda p=prompt: generate(model, p, n),
                "medusa": lambda p=prompt: generate_speculative(model, p, n, widths=widths),
            },
            args.repeats,
        )
        plain_s += statistics.median(times["plain"])
        medusa_s += statistics.median(times["medusa"])
    tokens = n * len(batch)
    return {
        "tree": ",".join(map(str, widths)),
        "nodes": 1 + sum(int(np.prod(widths[:j])) for j in range(1, len(widths) + 1)),
        "mean_accepted_length": tokens / forwards,
        "tokens_per_s": tokens / medusa_s,
        "plain_tokens_per_s": tokens / plain_s,
        "speedup": plain_s / medusa_s,
        "identical": True,
    }


def format_report(r: dict) -> str:
    lines = [
        f"medusa: {r['dims']} student, {r['num_heads']} draft heads"
        + (f", val bpb {r['val_bpb']:.3f}" if "val_bpb" in r else ""),
        "  head top-1 (val): " + "  ".join(f"{k.split('_')[0]} {v:.3f}" for k, v in r["head_top1"].items()),
        f"  {r['prompts']} prompts × {r['new_tokens']} new tokens, batch 1, {r['threads']} thread(s)",
        f"  {'tree':<10} {'nodes':>5} {'tok/forward':>11} {'medusa tok/s':>12} {'plain tok/s':>11} "
        f"{'speed-up':>8}  identical",
    ]
    for t in r["trees"]:
        lines.append(
            f"  {t['tree']:<10} {t['nodes']:>5} {t['mean_accepted_length']:>11.2f} "
            f"{t['tokens_per_s']:>12.1f} {t['plain_tokens_per_s']:>11.1f} {t['speedup']:>7.2f}x  "
            + ("yes" if t["identical"] else "NO")
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, cfg, summary = trained_student(args)
    k = getattr(model.head, "num_draft_heads", 0)
    if k < 1 or any(len(w) > k for w in args.widths):
        raise SystemExit(f"medusa: the student has {k} draft heads; trees need at most that many depths")
    val = load_split(cfg).val
    batch = prompts(val, args)
    results = {
        "dims": f"d{model.dims.d_model} L{model.dims.n_layers} ctx{model.dims.context}",
        "num_heads": k,
        **summary,
        "head_top1": head_accuracy(model, val, args.eval_windows),
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "trees": [measure(model, batch, w, args) for w in args.widths],
    }
    return publish(results, format_report(results), args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
