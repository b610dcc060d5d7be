"""The GPU check (issue 20): one prepared run that says whether archlab works on this machine's GPU.

Sections, each printing PASS / FAIL / SKIP lines with their numbers (exit code 1 on any FAIL):

    env      torch, CUDA, GPU and xformers versions; whether xformers' compiled ops run (``archlab
             doctor``'s probe: archlab's xformers kernel on a tiny CUDA tensor; the error text if not).
    attn     ``archlab.kernels``' xformers and SDPA kernels against its eager reference
             (softmax(q kᵀ / sqrt(k) + causal) v, written out), fp32 and bf16, for MHA, GQA, MQA and
             MLA shapes (v head size ≠ qk head size): the output and dq, dk, dv of a full causal block,
             and the output of a block of queries after cached keys (the bottom-right mask of cached
             decoding). The reference runs on the same inputs in fp32; the error is
             max |got − ref| / max |ref|, so one tolerance serves every tensor (fp32 1e-4, bf16 2e-2).
             xformers is called directly (``xformers_attention``), not through ``xformers_or_sdpa``,
             whose fallback to SDPA would hide a refusal.
    decode   students built from the composed config (mha, GQA, MQA and ``mla`` when installed), with
             the kernel a run would select: a prompt, then one token at a time through ``KVCache``,
             gives the full forward's logits.
    step     the trainer's step (``Trainer.train_step``) of ``model=base`` in bf16, eager against
             ``trainer.compile=true``, interleaved (``timing.interleaved``): tokens/s, and MFU against
             the card's dense bf16 peak (``PEAK_BF16``, from the device name); the two first losses agree.
    ddp      ``torchrun --standalone --nproc_per_node=1 -m archlab.cli train trainer.parallel=ddp``,
             a few steps (nccl on CUDA).
    distill  a 60-step distilled run (``teacher=ngram objective=kd``) through ``archlab train``; its
             held-out bits per byte must beat uniform bytes (8).

``--cpu`` runs every part that means something on a CPU, at toy sizes: the SDPA-vs-eager agreement in
fp32, cached decoding, eager vs compiled steps, the DDP smoke on gloo (world size 1) and a 10-step
distilled run; the CUDA-only parts (xformers, bf16 kernels, MFU) print SKIP. CI runs it after pytest
(``scripts/test.sh``): 81 s on 2 cores shared with other jobs at load 6.5 (a 22 s compile), 38 s at
load 4 with inductor's cache warm (a 4 s compile), 2026-12-07.

    scripts/gpu_check.sh                   # on a GPU machine: <= 8 minutes on one H100
    scripts/gpu_check.sh --cpu --json gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from timing import interleaved
from torch import Tensor

from archlab import registry
from archlab.config import compose
from archlab.context import KVCache
from archlab.doctor import torch_findings, xformers_finding
from archlab.errors import ConfigError
from archlab.kernels import Kernel, eager_attention, sdpa_attention, select_kernel, xformers_attention
from archlab.loggers import RunInfo
from archlab.metrics import model_metrics
from archlab.model import build_student

#: Relative error (max |got − ref| / max |ref|) allowed per dtype of the kernel's inputs.
from archlab.run_tokens import load_split
from archlab.trainer import Trainer

#: Relative error (max |got − ref| / max |ref|) allowed per dtype of the kernel's inputs.
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
#: The same for logits decoded through the KV cache against the full forward.
DECODE_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
#: Relative gap allowed between the eager and the compiled student's first training loss.
COMPILED_LOSS_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
#: Dense (no sparsity) bf16 tensor-core peak FLOP/s by device name, from NVIDIA's datasheets; the first
#: name contained in ``torch.cuda.get_device_name()`` wins, so the more specific come first.
PEAK_BF16 = (
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)
#: Overrides of every run here: no W&B, no progress bar, a small slice of the corpus.
COMMON = ("logger=none", "trainer.progress=false", "data.max_bytes=2000000")
#: A toy student for the CPU mode (and the step/decode sections' sizes there).
TOY = ("model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.context=32")


@dataclass(frozen=True)
class Size:
    """How big each section runs: attention shapes, decoding, the step benchmark, the training runs."""

    heads: int
    head_dim: int
    tokens: int
    decode_model: tuple[str, ...]
    step_model: tuple[str, ...]
    step_batch: int
    step_repeats: int
    ddp_steps: int
    distill_model: tuple[str, ...]
    distill_steps: int


GPU = Size(
    heads=8,
    head_dim=64,
    tokens=256,
    decode_model=("model=small", "model.n_layers=2", "model.context=128"),
    step_model=("model=base",),
    step_batch=16,
    step_repeats=20,
    ddp_steps=10,
    distill_model=(),  # model=tiny, the default
    distill_steps=60,
)
CPU = Size(
    heads=8,  # so that GQA (heads / 4 KV heads) differs from MQA
    head_dim=16,
    tokens=32,
    decode_model=("model.d_model=64", "model.n_layers=2", "model.n_heads=8", "model.context=32"),
    step_model=TOY,
    step_batch=4,
    step_repeats=5,
    ddp_steps=3,
    distill_model=TOY,
    distill_steps=10,
)


# --------------------------------------------------------------------------- results


@dataclass
class Results:
    """Every check's outcome, printed as it comes; ``failed`` decides the exit code."""

    checks: list[dict] = field(default_factory=list)

    def add(self, section: str, name: str, status: str, detail: str) -> None:
        self.checks.append({"section": section, "name": name, "status": status, "detail": detail})
        print(f"{status:<5} {section:<8} {name:<30} {detail}", flush=True)

    def check(self, section: str, name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        """Run ``fn`` (passed, detail); an exception is a FAIL that carries its first line."""
        try:
            passed, detail = fn()
        except Exception as exc:  # noqa: BLE001 - whatever breaks is this check's FAIL, not the script's
            passed, detail = False, describe(exc)
        self.add(section, name, "PASS" if passed else "FAIL", detail)

    @property
    def failed(self) -> bool:
        return any(c["status"] == "FAIL" for c in self.checks)

    def summary(self) -> str:
        counts = {s: sum(c["status"] == s for c in self.checks) for s in ("PASS", "FAIL", "SKIP")}
        return ", ".join(f"{n} {s}" for s, n in counts.items())


def describe(exc: BaseException) -> str:
    """The exception's type, first line and last line (xformers lists its reasons last): what a FAIL
    prints instead of a traceback."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = " … ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)
    return f"{type(exc).__name__}: {text}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- env


def xformers_status(device: torch.device) -> tuple[str, str]:
    """Print ``archlab doctor``'s torch and accelerator lines; return the status and text of its xformers
    probe (archlab's xformers kernel on a tiny CUDA tensor, with the error text when it fails)."""
    print(f"python {sys.version.split()[0]}", flush=True)
    for finding in torch_findings():
        print(f"{finding.what}: {finding.state}", flush=True)
    found = xformers_finding()
    try:
        importlib.metadata.version("xformers")
    except importlib.metadata.PackageNotFoundError:
        return "SKIP", found.state
    if device.type != "cuda":
        return "SKIP", found.state
    return ("FAIL", f"{found.state}; {found.advice}") if found.broken else ("PASS", found.state)


def peak_bf16(name: str) -> float | None:
    """The dense bf16 peak FLOP/s of the GPU called ``name``, or None when it is not in ``PEAK_BF16``."""
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


# --------------------------------------------------------------------------- attention agreement


@dataclass(frozen=True)
class AttentionCase:
    name: str
    kv_heads: int  # divides the query heads (GQA); 1 is MQA
    qk_dim: int
    v_dim: int  # MLA's differs from qk_dim


def attention_cases(size: Size) -> list[AttentionCase]:
    h, k = size.heads, size.head_dim
    return [
        AttentionCase("mha", h, k, k),
        AttentionCase("gqa", h // 4, k, k),
        AttentionCase("mqa", 1, k, k),
        AttentionCase("mla", h, 3 * k, 2 * k),  # DeepSeek-V3's ratio: qk 128 + 64 rope, v 128
    ]


def attention_inputs(
    case: AttentionCase, size: Size, dtype: torch.dtype, device: torch.device, queries: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q (b, h, t_q, qk), k (b, g, t, qk), v (b, g, t, v) and an upstream gradient (b, h, t_q, v); t_q
    defaults to t (a full causal block), fewer is a block of queries after cached keys."""
    gen = torch.Generator().manual_seed(0)
    b, h, t = 2, size.heads, size.tokens
    t_q = t if queries is None else queries
    shapes = [(b, h, t_q, case.qk_dim), (b, case.kv_heads, t, case.qk_dim), (b, case.kv_heads, t, case.v_dim)]
    q, k, v, grad = (
        torch.randn(s, generator=gen).to(device, dtype) for s in [*shapes, (b, h, t_q, case.v_dim)]
    )
    return q, k, v, grad


def rel_err(got: Tensor, want: Tensor) -> float:
    """max |got − want| / max |want|, in float64: one scale-free number per tensor."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def attention_errors(
    kernel: Callable[..., Tensor], inputs: Sequence[Tensor], backward: bool
) -> dict[str, float]:
    """Relative errors of ``kernel(q, k, v)`` against ``eager_attention`` on the same inputs in fp32:
    of the output, and with ``backward`` of dq, dk and dv for the given upstream gradient."""
    *qkv, grad = inputs
    ref_in = [x.detach().float().requires_grad_(backward) for x in qkv]
    got_in = [x.detach().clone().requires_grad_(backward) for x in qkv]
    ref, got = eager_attention(*ref_in), kernel(*got_in)
    errors = {"out": rel_err(got, ref)}
    if backward:
        ref.backward(grad.float())
        got.backward(grad)
        errors.update(
            {f"d{n}": rel_err(g.grad, r.grad) for n, g, r in zip("qkv", got_in, ref_in, strict=True)}
        )
    return errors


def agreement(
    kernel: Callable[..., Tensor], inputs: Sequence[Tensor], tol: float, backward: bool
) -> tuple[bool, str]:
    """Whether every error of ``attention_errors`` is within ``tol``, and the errors as text."""
    errors = attention_errors(kernel, inputs, backward)
    text = " ".join(f"{name} {err:.1e}" for name, err in errors.items())
    return max(errors.values()) <= tol, f"{text} (tol {tol:.0e})"


def attention_section(results: Results, size: Size, device: torch.device, xformers_ok: bool) -> None:
    kernels = {"sdpa": sdpa_attention}
    if device.type == "cuda" and xformers_ok:
        kernels["xformers"] = xformers_attention
    else:
        why = "no CUDA device" if device.type != "cuda" else "xformers' ops do not run (env above)"
        results.add("attn", "xformers vs eager", "SKIP", why)
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    if device.type != "cuda":
        results.add("attn", "bf16 kernels", "SKIP", "CUDA only (CPU bf16 SDPA is not a kernel archlab runs)")
    for dtype in dtypes:
        for case in attention_cases(size):
            full = attention_inputs(case, size, dtype, device)
            after_cache = attention_inputs(case, size, dtype, device, queries=size.tokens // 8)
            for kname, kernel in kernels.items():
                label = f"{kname} {case.name} {dtype_name(dtype)}"
                results.check("attn", f"{label} fwd+bwd", partial(agreement, kernel, full, TOL[dtype], True))
                results.check(
                    "attn", f"{label} after cache", partial(agreement, kernel, after_cache, TOL[dtype], False)
                )


# --------------------------------------------------------------------------- cached decoding


def decode_variants(size: Size) -> dict[str, tuple[str, ...]]:
    heads = compose([*size.decode_model]).model.n_heads
    variants = {
        "mha": (),
        "gqa": (f"attention.n_kv_heads={max(heads // 4, 1)}",),
        "mqa": ("attention.n_kv_heads=1",),
    }
    if "mla" in registry.plugins("attention"):
        variants["mla"] = ("attention=mla",)
    return variants


def decode_error(
    overrides: Sequence[str], device: torch.device, dtype: torch.dtype, kernel: Kernel | None = None
) -> tuple[float, str]:
    """Relative error of a prompt then one token at a time through ``KVCache`` against the full forward's
    logits, for the student of ``overrides`` with ``kernel`` (default: the one a run would select)."""
    cfg = compose(["teacher=none", "objective=ce", *overrides])
    torch.manual_seed(0)
    model = build_student(cfg).to(device).eval()
    model.kernel = kernel or select_kernel(cfg.model.attention_backend, device, dtype, model.dims.head_dim)
    t = model.dims.context
    x = torch.randint(0, model.dims.vocab_size, (2, t), generator=torch.Generator().manual_seed(0)).to(device)
    prompt = 3 * t // 4
    autocast = torch.autocast(device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        full = model(x)
        cache = KVCache(t)
        steps = [model(x[:, :prompt], cache=cache)] + [
            model(x[:, j : j + 1], cache=cache) for j in range(prompt, t)
        ]
    return rel_err(torch.cat(steps, dim=1), full), model.kernel.name


def decode_agreement(overrides: Sequence[str], device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    err, kernel = decode_error(overrides, device, dtype)
    tol = DECODE_TOL[dtype]
    return err <= tol, f"logits {err:.1e} (tol {tol:.0e}), kernel {kernel}"


def decode_section(results: Results, size: Size, device: torch.device) -> None:
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    if "mla" not in registry.plugins("attention"):
        results.add("decode", "mla", "SKIP", "the mla plugin is not installed (archlab_plugins)")
    for dtype in dtypes:
        for name, extra in decode_variants(size).items():
            check = partial(decode_agreement, [*size.decode_model, *extra], device, dtype)
            results.check("decode", f"{name} {dtype_name(dtype)} cache vs full", check)


# --------------------------------------------------------------------------- eager vs compiled step


def step_lines(size: Size, device: torch.device, root: Path) -> list[tuple[str, str, str]]:
    """The trainer's step, eager and compiled, of the same student (same weights, same windows):
    (name, status, detail) of each variant's timing and of the agreement of their first losses."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    base = [*COMMON, "teacher=none", "objective=ce", *size.step_model, f"trainer.device={device.type}"]
    base += [f"trainer.precision={precision}", f"trainer.batch_size={size.step_batch}"]
    split = load_split(compose(base))
    trainers = {
        name: Trainer(
            compose([*base, f"trainer.compile={name == 'compiled'}"]), RunInfo(root / name, name), split
        )
        for name in ("eager", "compiled")
    }
    first, first_s = {}, {}
    for name, trainer in trainers.items():  # the compiled student compiles in its first step
        start = time.perf_counter()
        first[name] = trainer.train_step()["train/loss"]
        synchronize(device)
        first_s[name] = time.perf_counter() - start

    def timed(trainer: Trainer) -> Callable[[], None]:
        return lambda: (trainer.train_step(), synchronize(device))

    times = interleaved({n: timed(t) for n, t in trainers.items()}, size.step_repeats, warmup=1)
    model = trainers["eager"].model
    tokens = trainers["eager"].windows_per_step * model.dims.context
    flops = model_metrics(model, dtype)["train_flops_per_token"] * tokens
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bf16(name) if device.type == "cuda" else None
    lines = []
    for variant, ts in times.items():
        median = statistics.median(ts)
        mfu = f", MFU {flops / median / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else ""
        detail = f"{1e3 * median:.1f} ms/step (min {1e3 * min(ts):.1f}), {tokens / median:,.0f} tokens/s{mfu}"
        lines.append((f"{precision} {variant}", "PASS", detail))
    if device.type == "cuda" and peak is None:
        lines.append(("MFU", "SKIP", f"no peak known for {name} (PEAK_BF16)"))
    speedup = statistics.median(e / c for e, c in zip(times["eager"], times["compiled"], strict=True))
    gap = abs(first["compiled"] - first["eager"]) / abs(first["eager"])
    tol = COMPILED_LOSS_RTOL[dtype]
    status = "PASS" if gap <= tol and math.isfinite(first["eager"]) else "FAIL"
    detail = (
        f"first loss {first['compiled']:.5f} vs {first['eager']:.5f} (rel {gap:.1e}, tol {tol:.0e});"
        f" eager/compiled {speedup:.2f} (median per-repeat ratio); compiling took {first_s['compiled']:.0f} s"
    )
    return [*lines, (f"{precision} compiled vs eager", status, detail)]


# --------------------------------------------------------------------------- training runs


def train(
    overrides: Sequence[str], run_dir: Path, device: torch.device, *, torchrun: bool
) -> tuple[dict, float]:
    """``archlab train OVERRIDES`` in a subprocess (under a 1-process torchrun if asked): its summary.json
    and wall seconds; a failed run raises with the end of its stderr."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun else []
    command = [
        sys.executable,
        *launcher,
        "-m",
        "archlab.cli",
        "train",
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    if device.type == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["(no stderr)"]
        raise RuntimeError(f"archlab train exited {done.returncode}: {last[0]}")
    return json.loads((run_dir / "summary.json").read_text()), wall


def ddp_smoke(size: Size, device: torch.device, root: Path) -> tuple[bool, str]:
    overrides = [
        *COMMON,
        *TOY,
        "teacher=none",
        "objective=ce",
        "trainer.parallel=ddp",
        f"trainer.device={device.type}",
    ]
    overrides += [
        f"trainer.max_steps={size.ddp_steps}",
        f"trainer.eval_every={size.ddp_steps}",
        "trainer.eval_tokens=4096",
    ]
    summary, wall = train(overrides, root / "ddp", device, torchrun=True)
    ok = summary["world_size"] == 1 and math.isfinite(summary["train/loss"])
    return ok, (
        f"world size {summary['world_size']}, {summary['train/steps']} steps,"
        f" loss {summary['train/loss']:.3f}, {summary['tokens_per_s']:,.0f} tokens/s,"
        f" kernel {summary['kernel/attention']}, {wall:.0f} s"
    )


def distilled_run(size: Size, device: torch.device, root: Path) -> tuple[bool, str]:
    steps = size.distill_steps
    overrides = [
        *COMMON,
        *size.distill_model,
        "teacher=ngram",
        "objective=kd",
        f"trainer.device={device.type}",
    ]
    overrides += [f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", "trainer.eval_tokens=16384"]
    summary, wall = train(overrides, root / "distill", device, torchrun=False)
    bpb = summary["val/bpb"]
    return math.isfinite(bpb) and bpb < 8.0, (
        f"{summary['train/steps']} steps: val {bpb:.3f} bpb (uniform bytes: 8; teacher"
        f" {summary['teacher/val_bpb']:.3f}), {summary['tokens_per_s']:,.0f} tokens/s, {wall:.0f} s"
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="the CPU-meaningful parts at toy sizes (CI)")
    p.add_argument("--json", type=Path, default=None, help="also write every check's outcome here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every section; returns the exit code (1 if any check failed)."""
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise ConfigError("device", "cpu", "a CUDA GPU (torch.cuda.is_available()), or pass --cpu")
    device, size = (torch.device("cpu"), CPU) if args.cpu else (torch.device("cuda"), GPU)
    if args.cpu:  # NOTE: toy sizes: a second intra-op thread only spin-waits, badly so on a busy machine
        torch.set_num_threads(1)
    start, results = time.perf_counter(), Results()
    results.add("env", "xformers ops", *xformers_status(device))
    xformers_ok = results.checks[-1]["status"] == "PASS"
    attention_section(results, size, device, xformers_ok)
    decode_section(results, size, device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            for name, status, detail in step_lines(size, device, root):
                results.add("step", name, status, detail)
        except Exception as exc:  # noqa: BLE001 - reported as the section's FAIL
            results.add("step", "eager vs compiled", "FAIL", describe(exc))
        results.check("ddp", "torchrun, 1 process", partial(ddp_smoke, size, device, root))
        results.check("distill", f"{size.distill_steps}-step run", partial(distilled_run, size, device, root))
    print(f"gpu_check: {results.summary()} in {time.perf_counter() - start:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "checks": results.checks}, indent=2) + "\n")
    return 1 if results.failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
