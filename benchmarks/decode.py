"""Decode speed and KV-cache size of MHA, GQA, MQA and MLA students of equal parameter count.

What is measured
    Each variant is an archlab student built from the real composed config, with random
    weights (decode cost does not depend on their values): ``mha`` (one KV head per query
    head), ``gqa`` (``attention.n_kv_heads`` = n_heads/4, or n_heads/2 when that would be
    one head), ``mqa`` (one KV head) and ``mla`` (``attention=mla``, Multi-head Latent
    Attention, with its plugin's defaults; only when the plugin is installed). Smaller
    attention frees parameters, so every variant gets the ``ffn.hidden_dim`` that brings
    its non-embedding parameter count (``archlab.metrics``) closest to the ``mha``
    student's with the default FFN: the count is affine in the hidden width, so two builds
    per variant give the width. The script refuses to time variants whose counts differ
    by more than ``--tolerance`` (default 2 %); the table prints every count.

    For every context L (``model.context`` is the largest one), each variant prefills a
    random prompt of L − warmup − steps tokens into a fresh ``archlab.context.KVCache``,
    then decodes greedily one token at a time, as ``archlab.generate.generate`` does
    (``model(new_token, cache=cache)``, ``next_token``), so the cache holds L tokens at the
    end. After ``--warmup`` untimed steps each of the next ``--steps`` decode steps is timed;
    the variants take their steps in turn, alternating the order, so a burst of load from
    other processes hits them alike. ``--repeats`` rounds (fresh prefill each) are pooled;
    the median seconds per token gives tokens/s (batch 1 by default). The no-cache path
    (``generate(..., use_cache=False)``: the whole prefix recomputed every step) is timed
    the same way at the smallest context only, to show what the cache buys.

    KV-cache bytes per token come from ``model_metrics(model, float32)["kv_bytes_per_token"]``
    and from what the filled cache really holds (``KVCache.elements_per_token()`` × 4 bytes);
    the script raises if they disagree. "KV at L" is bytes per token × L × batch: the
    logical size. (The cache's buffers grow by doubling, so the allocation can be up to
    twice that.)

    Threads default to 1 (``--threads`` changes it): batch-1 decode of a small student is
    a chain of tiny matmuls, and on a 2-core machine shared with other processes a second
    intra-op thread mostly adds contention.

How to run
    python benchmarks/decode.py     # d_model 256, 4 layers, 8 heads; L = 256/1024/4096: ~1 min on 2 cores
    python benchmarks/decode.py --contexts 128 512 --steps 16 --variants mha mqa
    python benchmarks/decode.py --set mla:attention.kv_lora_rank=32 --json decode.json
    python benchmarks/decode.py --d-model 512 --n-heads 8 --override ffn=gelu

How to read it
    "non-emb params" and "vs mha" show the match; "KV B/tok" is per token over all layers.
    "tok/s@L" is decode speed with L tokens in the cache and "KV@L" the cache it holds.
    "no-cache" is tokens/s recomputing the prefix at the smallest context and "cache ×" the
    cached path's speedup over it. The exit code is 0 whatever the numbers.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from timing import publish
from torch import Tensor

from archlab import registry
from archlab.config import compose
from archlab.context import KVCache
from archlab.generate import next_token, supports_kv_cache
from archlab.kernels import select_kernel
from archlab.metrics import model_metrics
from archlab.model import Student, build_student

VARIANTS = ("mha", "gqa", "mqa", "mla")
DTYPE = torch.float32
#: Hidden widths of the two probe builds that give each variant's params-vs-width line.
PROBE_WIDTHS = (64, 128)
#: Median / fastest step above which the report warns that the machine was busy.
NOISY_SPREAD = 1.3


# --------------------------------------------------------------------------- variants


def gqa_kv_heads(n_heads: int) -> int:
    """n_heads/4 KV heads, or n_heads/2 where a quarter would be MQA (or not a divisor)."""
    g = n_heads // 4
    if g >= 2 and n_heads % g == 0:
        return g
    return max(1, n_heads // 2)


def attention_overrides(name: str, n_heads: int) -> list[str]:
    """The attention part of each variant's overrides."""
    return {
        "mha": ["attention=mha", "attention.n_kv_heads=null"],
        "gqa": ["attention=mha", f"attention.n_kv_heads={gqa_kv_heads(n_heads)}"],
        "mqa": ["attention=mha", "attention.n_kv_heads=1"],
        "mla": ["attention=mla"],
    }[name]


def describe_attention(cfg: DictConfig) -> str:
    a = cfg.attention
    if a.plugin == "mha":
        return f"mha kv_heads={a.n_kv_heads or cfg.model.n_heads}"
    if a.plugin == "mla":
        q = a.get("q_lora_rank")
        return f"mla kv_rank={a.get('kv_lora_rank')}" + (f" q_rank={q}" if q else "")
    return a.plugin


@dataclass
class Variant:
    name: str
    overrides: list[str]  # everything but the shape, including the matched ffn.hidden_dim
    cfg: DictConfig
    model: Student
    ffn_hidden: int | None
    params: int  # non-embedding
    kv_bytes_per_token: int  # archlab.metrics
    cache_bytes_per_token: int = 0  # measured on a filled KVCache
    decode_s: dict[int, list[float]] = field(default_factory=dict)
    no_cache_s: list[float] = field(default_factory=list)


def shape_overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model.d_model={args.d_model}",
        f"model.n_layers={args.n_layers}",
        f"model.n_heads={args.n_heads}",
        f"model.context={max(args.contexts)}",
        *args.override,
    ]


def non_embedding_params(cfg: DictConfig) -> int:
    return model_metrics(build_student(cfg), DTYPE)["params/non_embedding"]


def matched_hidden(args: argparse.Namespace, overrides: list[str], target: int) -> int:
    """The ``ffn.hidden_dim`` whose student has non-embedding parameters closest to ``target``."""
    cfg = compose([*shape_overrides(args), *overrides])
    if "hidden_dim" not in cfg.ffn:
        raise SystemExit(
            f"decode: matching parameter counts sets ffn.hidden_dim, which ffn={cfg.ffn.plugin} lacks;"
            " pick an ffn with it (e.g. mlp) or pass --no-match"
        )
    a, b = PROBE_WIDTHS
    pa, pb = (
        non_embedding_params(compose([*shape_overrides(args), *overrides, f"ffn.hidden_dim={h}"]))
        for h in (a, b)
    )
    per_unit = (pb - pa) / (b - a)
    hidden = round(a + (target - pa) / per_unit)
    if hidden < 1:
        raise SystemExit(
            f"decode: {overrides} has more non-embedding parameters at ffn.hidden_dim=1 than mha has"
            f" in all ({target:,}); use smaller ranks (--set) or --no-match"
        )
    return hidden


def build_variants(args: argparse.Namespace) -> tuple[dict[str, Variant], int]:
    """Every requested variant with its matched FFN width; also the mha reference count."""
    reference = non_embedding_params(
        compose([*shape_overrides(args), *attention_overrides("mha", args.n_heads)])
    )
    variants = {}
    for name in args.variants:
        overrides = [*attention_overrides(name, args.n_heads), *args.sets.get(name, [])]
        hidden = None
        if not args.no_match:
            hidden = matched_hidden(args, overrides, reference)
            overrides.append(f"ffn.hidden_dim={hidden}")
        cfg = compose([*shape_overrides(args), *overrides])
        torch.manual_seed(args.seed)
        model = build_student(cfg).eval()
        model.kernel = select_kernel(
            cfg.model.attention_backend, torch.device("cpu"), DTYPE, model.dims.head_dim
        )
        if not supports_kv_cache(model):
            raise SystemExit(f"decode: variant {name} ({cfg.attention.plugin}) has no KV cache")
        metrics = model_metrics(model, DTYPE)
        if hidden is None and "hidden_dim" in cfg.ffn:
            hidden = cfg.ffn.hidden_dim
        variants[name] = Variant(
            name,
            overrides,
            cfg,
            model,
            hidden,
            metrics["params/non_embedding"],
            metrics["kv_bytes_per_token"],
        )
    if not args.no_match:
        off = {n: v.params / reference - 1 for n, v in variants.items()}
        bad = {n: f"{d:+.2%}" for n, d in off.items() if abs(d) > args.tolerance}
        if bad:
            raise SystemExit(f"decode: parameter counts off by more than {args.tolerance:.0%}: {bad}")
    return variants, reference


# --------------------------------------------------------------------------- timing


def greedy(logits: Tensor) -> Tensor:
    return next_token(logits.float(), temperature=0.0, top_k=0, top_p=1.0, generator=None)


def check_kv_accounting(v: Variant, cache: KVCache) -> None:
    measured = cache.elements_per_token() * DTYPE.itemsize
    if measured != v.kv_bytes_per_token:  # not `assert`: the check must survive python -O
        raise AssertionError(
            f"{v.name}: model_metrics says {v.kv_bytes_per_token} KV bytes per token,"
            f" the filled KVCache holds {measured}"
        )
    v.cache_bytes_per_token = measured


@torch.no_grad()
def time_decode(variants: dict[str, Variant], context: int, args: argparse.Namespace, cached: bool) -> None:
    """Fill ``decode_s[context]`` (or ``no_cache_s``) of every variant, steps interleaved."""
    names = list(variants)
    prefix = context - args.warmup - args.steps
    gen = torch.Generator().manual_seed(args.seed + context)
    for _ in range(args.repeats):
        state: dict[str, tuple[KVCache | None, Tensor, Tensor]] = {}
        for name in names:  # prefill (untimed)
            v = variants[name]
            prompt = torch.randint(0, v.model.dims.vocab_size, (args.batch_size, prefix), generator=gen)
            cache = KVCache() if cached else None
            new = greedy(v.model(prompt, cache=cache)[:, -1])[:, None]
            state[name] = (cache, prompt, new)
        gc.collect()
        gc.disable()
        try:
            for i in range(args.warmup + args.steps):
                for name in names if i % 2 == 0 else names[::-1]:
                    model, (cache, tokens, new) = variants[name].model, state[name]
                    start = time.perf_counter()
                    if cached:
                        new = greedy(model(new, cache=cache)[:, -1])[:, None]
                    else:
                        tokens = torch.cat((tokens, new), dim=1)
                        new = greedy(model(tokens)[:, -1])[:, None]
                    elapsed = time.perf_counter() - start
                    state[name] = (cache, tokens, new)
                    if i >= args.warmup:
                        v = variants[name]
                        (v.decode_s.setdefault(context, []) if cached else v.no_cache_s).append(elapsed)
        finally:
            gc.enable()
        if cached:
            for name in names:
                cache = state[name][0]
                if cache.offset != context:
                    raise AssertionError(f"{name}: cache holds {cache.offset} tokens, expected {context}")
                check_kv_accounting(variants[name], cache)


# --------------------------------------------------------------------------- report


def speed(times: list[float], batch: int) -> dict:
    median = statistics.median(times)
    return {"ms_per_token": 1e3 * median, "ms_min": 1e3 * min(times), "tokens_per_s": batch / median}


def summarise(variants: dict[str, Variant], reference: int, args: argparse.Namespace) -> dict:
    small = min(args.contexts)
    rows = {}
    for name, v in variants.items():
        contexts = {}
        for L in args.contexts:
            contexts[str(L)] = {
                **speed(v.decode_s[L], args.batch_size),
                "kv_bytes": v.kv_bytes_per_token * L * args.batch_size,
            }
        no_cache = speed(v.no_cache_s, args.batch_size) if v.no_cache_s else None
        if no_cache:
            no_cache["context"] = small
            no_cache["cache_speedup"] = contexts[str(small)]["tokens_per_s"] / no_cache["tokens_per_s"]
        rows[name] = {
            "attention": describe_attention(v.cfg),
            "overrides": v.overrides,
            "ffn_hidden": v.ffn_hidden,
            "params_non_embedding": v.params,
            "params_vs_mha": v.params / reference - 1,
            "kv_bytes_per_token": v.kv_bytes_per_token,
            "kv_bytes_per_token_cache": v.cache_bytes_per_token,
            "contexts": contexts,
            "no_cache": no_cache,
        }
    return {
        "dims": {
            "d_model": args.d_model,
            "n_layers": args.n_layers,
            "n_heads": args.n_heads,
            "context": max(args.contexts),
        },
        "overrides": list(args.override),
        "contexts": list(args.contexts),
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "dtype": str(DTYPE).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "kernel": next(iter(variants.values())).model.kernel.name,
        "mha_params_non_embedding": reference,
        "tolerance": None if args.no_match else args.tolerance,
        "skipped": args.skipped,
        "variants": rows,
    }


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def format_report(r: dict) -> str:
    d = r["dims"]
    contexts = r["contexts"]
    small = min(contexts)
    head = [
        f"{'variant':<8}",
        f"{'attention':<24}",
        f"{'ffn hid':>8}",
        f"{'non-emb params':>15}",
        f"{'vs mha':>8}",
        f"{'KV B/tok':>9}",
    ]
    for L in contexts:
        head += [f"{f'tok/s@{L}':>11}", f"{f'KV@{L}':>10}"]
    head += [f"{f'no-cache@{small}':>14}", f"{'cache ×':>8}"]
    lines = [
        "archlab decode: tokens/s and KV cache at equal non-embedding parameters"
        + (f" ({' '.join(r['overrides'])})" if r["overrides"] else ""),
        f"  d_model={d['d_model']} n_layers={d['n_layers']} n_heads={d['n_heads']}"
        f" model.context={d['context']}; batch {r['batch_size']}, {r['dtype']}, kernel {r['kernel']},"
        f" torch {r['torch']}, {r['threads']} thread(s)",
        f"  {r['repeats']} repeat(s) x {r['steps']} timed decode steps (after {r['warmup']} warmup) per"
        f" context, variants interleaved; median per token",
        "",
        "  " + "".join(head),
    ]
    for name, v in r["variants"].items():
        hidden = "-" if v["ffn_hidden"] is None else str(v["ffn_hidden"])
        cells = [
            f"{name:<8}",
            f"{v['attention']:<24}",
            f"{hidden:>8}",
            f"{v['params_non_embedding']:>15,}",
            f"{v['params_vs_mha']:>+8.2%}",
            f"{v['kv_bytes_per_token']:>9,}",
        ]
        for L in contexts:
            c = v["contexts"][str(L)]
            cells += [f"{c['tokens_per_s']:>11,.0f}", f"{fmt_bytes(c['kv_bytes']):>10}"]
        nc = v["no_cache"]
        cells += [f"{nc['tokens_per_s']:>14,.0f}", f"{nc['cache_speedup']:>7.1f}x"] if nc else ["", ""]
        lines.append("  " + "".join(cells))
    lines.append("")
    lines.append(
        "  KV B/tok: model_metrics and the filled KVCache agree for every variant"
        + (f"; parameter counts within {r['tolerance']:.0%} of mha" if r["tolerance"] is not None else "")
    )
    spread = max(
        c["ms_per_token"] / c["ms_min"] for v in r["variants"].values() for c in v["contexts"].values()
    )
    if spread > NOISY_SPREAD:
        lines.append(
            f"  note: a median decode step is up to {spread:.1f}x the fastest one: other load on this"
            " machine? Interleaving spreads it over the variants alike; ms_min is in the --json output."
        )
    for name, why in r["skipped"].items():
        lines.append(f"  {name}: skipped ({why})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096], help="cache sizes L")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per context and repeat")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps before them")
    p.add_argument("--repeats", type=int, default=2, help="rounds per context, each with a fresh prefill")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=None, help="default: all (mla when installed)"
    )
    p.add_argument(
        "--set",
        dest="set_",
        action="append",
        default=[],
        metavar="VARIANT:OVERRIDE",
        help="a Hydra override for one variant, e.g. mla:attention.kv_lora_rank=32 (repeatable)",
    )
    p.add_argument("--override", nargs="*", action="extend", default=[], help="Hydra overrides for all")
    p.add_argument("--tolerance", type=float, default=0.02, help="max relative non-embedding params gap")
    p.add_argument("--no-match", action="store_true", help="keep the composed ffn width for every variant")
    p.add_argument("--no-cache-check", action="store_true", help="skip timing the no-cache path")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.batch_size < 1:
        p.error("--steps, --repeats and --batch-size must be >= 1, --warmup >= 0")
    if min(args.contexts) < args.steps + args.warmup + 1:
        p.error(f"every context must exceed --steps + --warmup ({args.steps + args.warmup})")
    args.contexts = sorted(set(args.contexts))
    args.sets = {}
    for item in args.set_:
        name, sep, override = item.partition(":")
        if not sep or name not in VARIANTS:
            p.error(f"--set {item!r}: expected VARIANT:OVERRIDE with VARIANT one of {', '.join(VARIANTS)}")
        args.sets.setdefault(name, []).append(override)
    args.skipped = {}
    if args.variants is None:
        installed = registry.plugins("attention")
        args.variants = [n for n in VARIANTS if n != "mla" or "mla" in installed]
        if "mla" not in installed:
            args.skipped["mla"] = "attention plugin mla is not installed"
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print the table, optionally write JSON; returns the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    variants, reference = build_variants(args)
    for context in args.contexts:
        time_decode(variants, context, args, cached=True)
    if not args.no_cache_check:
        time_decode(variants, min(args.contexts), args, cached=False)
    results = summarise(variants, reference, args)
    return publish(results, format_report(results), args.json)


if __name__ == "__main__":
    main()
    sys.exit(0)
