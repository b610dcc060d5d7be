"""Soft-target build throughput: the teacher's full-vocabulary log-probabilities copied to the CPU before
top-k, against top-k on the teacher's device in chunks (``archlab.soft_targets.top_k_targets``).

What is measured
    The configured teacher (default ``teacher=smollm2``: SmolLM2-135M-Instruct, vocabulary 49 152) is
    built and prepared once, outside the timing, on the run's corpus tokenised by its tokenizer. Then
    ``--batches`` batches of ``--batch-size`` training windows of ``model.context`` tokens go through
    the cache build's per-batch work twice per repeat, the two variants alternating which goes first:
      copy:      ``teacher.log_probs(x).cpu()``, then top-k of the whole batch at once on the CPU (the
                 build before this benchmark's change);
      on-device: ``top_k_targets`` on the log-probabilities where the teacher left them, chunked to
                 ``TOPK_CHUNK_ELEMENTS`` floats, only the top k of each position copied to the CPU.
    Each batch's time is split into the teacher's forward and the rest (copy, temperature, top-k). The
    report gives build tokens/s (forward included, what a cache build sees) and the top-k part in ms per
    batch, as medians over repeats, and checks that both variants give the same ids and log-probs (equal
    on a CPU; on a GPU the device's softmax may differ from the CPU's in the last bits, so the largest
    difference is reported). On a CPU the two variants do the same arithmetic (the "copy" of a CPU
    tensor is free): the difference they show is the chunking's; the transfer saving needs an accelerator.

How to run
    pip install 'archlab[smollm2]'
    python benchmarks/soft_targets.py                          # 2 batches x 4 windows x 256 tokens, 2 repeats
    python benchmarks/soft_targets.py --batches 4 --json soft_targets.json
    python benchmarks/soft_targets.py --teacher ngram --override model.context=64   # any teacher

How to read it
    "tokens/s" is the build throughput of each variant; "top-k ms/batch" is the part after the forward,
    which is all that the change touches. The exit code is 0 whatever the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from timing import publish

from archlab import registry
from archlab.config import compose
from archlab.data import windows
from archlab.run_tokens import load_split
from archlab.soft_targets import SoftTargets, top_k_targets
from archlab.trainer import resolve_device, teacher_env

VARIANTS = ("copy", "on-device")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="smollm2", help="teacher config option (default: smollm2)")
    p.add_argument("--batches", type=int, default=2, help="teacher forwards per variant and repeat")
    p.add_argument("--batch-size", type=int, default=4, help="windows per teacher forward")
    p.add_argument("--context", type=int, default=256, help="tokens per window (model.context)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes over the batches per variant")
    p.add_argument("--top-k", type=int, default=32, help="distill.top_k")
    p.add_argument("--temperature", type=float, default=2.0, help="distill.temperature")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--override", nargs="*", default=[], help="more config overrides")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if min(args.batches, args.batch_size, args.context, args.repeats, args.top_k) < 1:
        p.error("--batches, --batch-size, --context, --repeats and --top-k must be >= 1")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_batch(teacher, x, y, variant: str, k: int, temperature: float, device) -> tuple[SoftTargets, dict]:
    """One batch of the cache build in ``variant``; its targets and seconds of forward and top-k."""
    start = time.perf_counter()
    logprobs = teacher.log_probs(x)
    _sync(device)
    forward = time.perf_counter()
    if variant == "copy":
        full = logprobs.cpu()
        top, _ = top_k_targets(full, y, temperature, k, chunk_rows=full.shape[0] * full.shape[1])
    else:
        top, _ = top_k_targets(logprobs, y, temperature, k)
    done = time.perf_counter()
    return top, {"forward_s": forward - start, "top_k_s": done - forward}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="soft-targets-bench-") as root:
        cfg = compose(
            [f"teacher={args.teacher}", f"model.context={args.context}", "logger=none"]
            + [f"data.cache_dir={root}", "data.max_bytes=1000000", *args.override]
        )
        split = load_split(cfg)
        device = resolve_device(cfg.trainer.device)
        cls, teacher_cfg = registry.configured("teacher", cfg.teacher)
        teacher = cls(teacher_cfg, teacher_env(cfg, split, device, progress=False))
        start = time.perf_counter()
        teacher.prepare()
        prepare_s = time.perf_counter() - start
        c, b = cfg.model.context, args.batch_size
        batches = [windows(split.train, [(i * b + j) * c for j in range(b)], c) for i in range(args.batches)]
        times = {v: [] for v in VARIANTS}  # per repeat: (forward s, top-k s) summed over the batches
        targets: dict[str, list[SoftTargets]] = {}
        for r in range(args.repeats):
            for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                parts = [
                    build_batch(teacher, x, y, variant, args.top_k, args.temperature, device)
                    for x, y in batches
                ]
                targets[variant] = [top for top, _ in parts]
                times[variant].append({k: sum(p[k] for _, p in parts) for k in ("forward_s", "top_k_s")})
    tokens = args.batches * b * c
    pairs = list(zip(targets["copy"], targets["on-device"], strict=True))
    results = {
        "teacher": args.teacher,
        "vocab_size": teacher.vocab_size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tokens_per_pass": tokens,
        "batch": [b, c],
        "top_k": args.top_k,
        "prepare_s": prepare_s,
        "same_ids": all(a.ids.equal(o.ids) for a, o in pairs),
        "max_logprob_diff": max(float((a.logprobs - o.logprobs).abs().max()) for a, o in pairs),
    }
    for variant, runs in times.items():
        total = statistics.median(t["forward_s"] + t["top_k_s"] for t in runs)
        top_k = statistics.median(t["top_k_s"] for t in runs)
        results[variant] = {
            "tokens_per_s": tokens / total,
            "top_k_ms_per_batch": 1000 * top_k / args.batches,
            "passes": runs,
        }
    return publish(results, report(results), args.json)


def report(r: dict) -> str:
    lines = [
        f"soft-target build, teacher={r['teacher']} (vocabulary {r['vocab_size']}) on {r['device']}, "
        f"{r['threads']} threads; batches of {r['batch'][0]} x {r['batch'][1]} tokens, top-k {r['top_k']}; "
        f"teacher prepared in {r['prepare_s']:.1f} s",
        f"{'variant':<10} {'tokens/s':>10} {'top-k ms/batch':>15}",
    ]
    for variant in VARIANTS:
        v = r[variant]
        lines.append(f"{variant:<10} {v['tokens_per_s']:>10.1f} {v['top_k_ms_per_batch']:>15.1f}")
    lines.append(f"same top-k ids: {r['same_ids']}; largest log-prob difference {r['max_logprob_diff']:.2e}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
    sys.exit(0)
