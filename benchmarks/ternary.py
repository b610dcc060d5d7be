"""Training step time of linear=ternary (BitNet b1.58) against dense, and the packed weight memory.

What is measured
    1. Training step. One trainer step (forward, cross-entropy, backward, AdamW, ``on_step_end`` hooks;
       ``moe.step_fn``) of the same student three ways: ``dense`` (every projection full precision),
       ``ternary`` (``linear=ternary``: every attention and FFN projection, the head dense) and
       ``ternary_ffn`` (``linear=ternary model.linear_overrides={attention: dense}``). Same random-byte batch,
       same AdamW settings, interleaved repeats; the ratio is the median over repeats of the two steps'
       ratio within a repeat (a burst of other load slows both alike and cancels). Fake quantisation
       costs extra elementwise passes (norm, absmax, round) per projection and saves nothing on a CPU or
       GPU without ternary kernels, so expect ratios above 1.
    2. Memory. The ternary student is exported with ``archlab.export.save_packed`` and the file's tensor
       bytes are compared with the same parameters at float32 and bfloat16; the ternary projections alone
       are reported as bytes and bits per weight (2.0 stored, log2 3 ≈ 1.585 information).
    3. Integer path. One projection's ``integer_forward`` (int8 activations × ternary weights, int32
       matmul) is checked against its fake-quant forward (float32, 1e-5) before anything is timed.

How to run
    python benchmarks/ternary.py                                  # tiny preset, batch 16 × 256, 2 CPU cores
    python benchmarks/ternary.py --model small --batch-size 4 --steps 10 --json ternary.json

The exit code is 0 whatever the ratios.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from moe import step_fn
from omegaconf import DictConfig
from timing import interleaved, parse_step_args, publish

from archlab import registry
from archlab.config import compose
from archlab.export import packed_modules, save_packed, size_report
from archlab.metrics import model_metrics
from archlab.model import build_student

VARIANTS = {
    "dense": [],
    "ternary": ["linear=ternary"],
    "ternary_ffn": ["linear=ternary", "model.linear_overrides={attention: dense}"],
}
INTEGER_ATOL = 1e-5


def compose_student(args: argparse.Namespace, overrides: Sequence[str]) -> DictConfig:
    return compose([f"model={args.model}", "teacher=none", "objective=ce", *args.override, *overrides])


def integer_path_diff(model: torch.nn.Module) -> float:
    """Max |integer_forward − forward| of the first packed projection on random inputs (float32)."""
    layer = next(iter(packed_modules(model).values()))
    x = torch.randn(4, 16, layer.in_features) * 3
    with torch.no_grad():
        diff = (layer.integer_forward(x) - layer(x)).abs().max().item()
    if diff > INTEGER_ATOL:
        raise AssertionError(f"integer path differs from fake quantisation by {diff:.3g}")
    return diff


def memory(model: torch.nn.Module, cfg: DictConfig) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "packed.safetensors"
        tensors = save_packed(model, cfg, path)
        file_bytes = path.stat().st_size
    report = size_report(model, tensors)
    projections = packed_modules(model).values()
    n = sum(m.weight.numel() for m in projections)
    packed = sum(math.ceil(m.weight.numel() / 4) for m in projections)
    return {
        **report,
        "file_bytes": file_bytes,
        "ternary_weights": n,
        "ternary_bytes": packed,
        "ternary_scales": len(projections),
        "bits_stored": 8 * packed / n,
        "bits_information": math.log2(3),
        "fp32_over_packed": report["bytes_fp32"] / report["bytes_packed"],
        "bf16_over_packed": report["bytes_bf16"] / report["bytes_packed"],
    }


def format_report(r: dict) -> str:
    m, step = r["memory"], r["step_ms"]
    lines = [
        f"linear=ternary vs dense: model={r['model']} {' '.join(r['overrides'])}".rstrip(),
        f"  batch {r['batch_size']} x {r['context']} = {r['tokens_per_step']:,} tokens/step;"
        f" torch {r['torch']}, {r['threads']} threads; {r['repeats']} interleaved repeats after"
        f" {r['warmup']} warmup",
        "",
        f"  {'':<14}{'ms/step':>10}{'vs dense':>10}{'params':>12}{'weight_bytes':>14}",
        *(
            f"  {name:<14}{step[name]:>10.1f}{r['ratio'].get(name, 1.0):>10.3f}"
            f"{r['params'][name]:>12,}{r['weight_bytes'][name]:>14,}"
            for name in step
        ),
        "",
        f"  packed ternary student: {m['bytes_packed']:,} B of tensors ({m['file_bytes']:,} B file) vs fp32"
        f" {m['bytes_fp32']:,} B ({m['fp32_over_packed']:.2f}x) and bf16 {m['bytes_bf16']:,} B"
        f" ({m['bf16_over_packed']:.2f}x)",
        f"  ternary projections: {m['ternary_weights']:,} weights in {m['ternary_bytes']:,} B"
        f" + {m['ternary_scales']} fp32 scales = {m['bits_stored']:.3f} bits/weight stored,"
        f" {m['bits_information']:.3f} information (vs 32 / 16)",
        f"  integer path (int8 x ternary, int32 matmul) vs fake quant: max |diff| {r['integer_diff']:.2g}",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="model preset (conf/model/*.yaml)")
    p.add_argument("--override", nargs="*", action="extend", default=[], help="Hydra overrides, all variants")
    return parse_step_args(p, argv, steps=20, warmup=2)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print the table, optionally write JSON; returns the results."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "ternary" not in registry.plugins("linear"):
        raise SystemExit("linear=ternary is in archlab-plugins: pip install -e ./plugins")
    cfgs = {name: compose_student(args, overrides) for name, overrides in VARIANTS.items()}
    torch.manual_seed(cfgs["dense"].seed)
    models = {name: build_student(cfg) for name, cfg in cfgs.items()}
    metrics = {name: model_metrics(model, torch.float32) for name, model in models.items()}
    cfg = cfgs["dense"]
    batch, context = args.batch_size or cfg.trainer.batch_size, cfg.model.context
    data = torch.randint(0, cfg.model.vocab_size, (batch, context + 1))
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    integer_diff = integer_path_diff(models["ternary"])
    steps = {name: step_fn(cfgs[name], model, x, y) for name, model in models.items()}
    times = interleaved(steps, args.steps, args.warmup)
    ratio = {
        name: statistics.median(t / d for t, d in zip(times[name], times["dense"], strict=True))
        for name in times
        if name != "dense"
    }
    results = {
        "model": args.model,
        "overrides": args.override,
        "batch_size": batch,
        "context": context,
        "tokens_per_step": x.numel(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args.steps,
        "warmup": args.warmup,
        "step_ms": {name: 1e3 * statistics.median(t) for name, t in times.items()},
        "ratio": ratio,
        "params": {name: m["params/total"] for name, m in metrics.items()},
        "weight_bytes": {name: m["weight_bytes"] for name, m in metrics.items()},
        "memory": memory(models["ternary"], cfgs["ternary"]),
        "integer_diff": integer_diff,
        "step_times_s": times,
    }
    return publish(results, format_report(results), args.json)


if __name__ == "__main__":
    main()
    sys.exit(0)
