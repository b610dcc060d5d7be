"""Step overhead of archlab's plugin-assembled student against the same model written by hand.

What is measured
    One training step (forward, cross-entropy, backward, AdamW step) of the archlab
    dense student, built from the real composed Hydra config (default slots: mha +
    RoPE, SwiGLU mlp, prenorm, rmsnorm, dense linears, tied lm head), against a plain
    nanoGPT-style PyTorch model of the identical architecture defined in this file.
    Before any timing the plain model receives a copy of the student's weights, and
    the script asserts equal parameter counts and logits that agree to 1e-5, so
    "identical architecture" is checked rather than claimed.

    Both models train on the same random-byte batch with the same AdamW settings
    (``archlab.optim.make_optimizer``'s groups and the config's lr, betas and decay).
    The archlab step is the trainer's inner step (``new_context``, the objective plugin,
    aux losses); work the trainer does around it (data loading, gradient clipping, the
    lr schedule, logging) is left out of both.
    After warmup steps, each repeat times one step of each model, alternating which
    goes first; medians over the repeats are reported. The ratio archlab/plain is the
    framework's overhead (target: <= 1.05): the median over repeats of the two steps'
    ratio within that repeat, so a burst of load from other processes, which slows both
    steps of a repeat alike, cancels; the ratio of the two medians is printed beside it
    (it is the noisier of the two on a shared machine). Achieved GFLOP/s uses archlab's own
    ``train_flops_per_token`` (3x forward: 2 FLOPs per parameter per token plus
    attention at full context) and is printed next to this machine's float32 matmul
    peak, measured in the same run with a large ``torch.mm``.

    With ``--compile`` a third variant joins the same interleaved repeats: a copy of the
    student (same weights) compiled in place as ``trainer.compile=true`` does it, its step
    otherwise the archlab one. Its first loss must equal the eager student's to 1e-4
    (relative); the compile itself happens in the warmup. The speedup plain/compiled
    (target: >= 1.10) is printed as the median of per-repeat ratios and as the ratio of the
    fastest steps.

How to run
    python benchmarks/step_overhead.py                       # tiny preset, CPU, ~1 minute on 2 cores
    python benchmarks/step_overhead.py --model small --batch-size 4 --steps 10
    python benchmarks/step_overhead.py --override model.d_model=256 --json results.json
    python benchmarks/step_overhead.py --compile             # + the compiled student, side by side

The exit code is 0 whatever the ratio; the last line says whether the target was met.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from timing import interleaved, parse_step_args, publish
from torch import Tensor, nn

from archlab import registry
from archlab.config import TrainerConfig, compose
from archlab.kernels import select_kernel
from archlab.metrics import model_metrics
from archlab.model import Student, build_student
from archlab.optim import make_optimizer

LAYER_SLOTS = ("attention", "ffn")  # each layer's sublayers with memory=none (archlab.slots order)

TARGET_RATIO = 1.05
#: The compiled student's step against the hand-written eager one (plain / compiled).
TARGET_COMPILE_SPEEDUP = 1.10
COMPILED_LOSS_RTOL = 1e-4
LOGITS_ATOL = 1e-5
#: Median / fastest step above which the report warns that the machine was busy.
NOISY_SPREAD = 1.3
#: The slot choices the plain model mirrors; anything else is refused rather than mis-measured.
DEFAULT_SLOTS = {
    "attention": "mha",
    "ffn": "mlp",
    "memory": "none",  # then every layer has exactly LAYER_SLOTS, as plain_key assumes
    "residual": "prenorm",
    "linear": "dense",
    "norm": "rmsnorm",
    "position": "rope",
    "head": "lm",
}

StepFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- config


def compose_config(model: str, overrides: Sequence[str]) -> DictConfig:
    """archlab's composed config as ``archlab train model=<model> teacher=none objective=ce <overrides>``
    sees it: the plain model is trained on hard labels, so the student is too."""
    return compose([f"model={model}", "teacher=none", "objective=ce", *overrides])


def check_default_slots(cfg: DictConfig) -> None:
    """The plain twin only mirrors the default dense student; refuse any other composition."""
    problems = [f"{s}={cfg[s].plugin}" for s, name in DEFAULT_SLOTS.items() if cfg[s].plugin != name]
    ffn, attn = cfg.ffn, cfg.attention
    if ffn.activation.name != "swiglu" or ffn.bias or attn.bias or cfg.head.tied is not True:
        problems.append("ffn.activation/ffn.bias/attention.bias/head.tied differ from the defaults")
    if attn.n_kv_heads not in (None, cfg.model.n_heads):
        problems.append(f"attention.n_kv_heads={attn.n_kv_heads}")
    if cfg.model.linear_overrides:
        problems.append(f"model.linear_overrides={dict(cfg.model.linear_overrides)}")
    if problems:
        raise SystemExit(f"step_overhead: the plain model mirrors only the default slots; got {problems}")


# --------------------------------------------------------------------------- plain model


@dataclass(frozen=True)
class PlainConfig:
    d_model: int
    n_layers: int
    n_heads: int
    context: int
    vocab_size: int
    ffn_hidden: int
    norm_eps: float
    rope_theta: float

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> PlainConfig:
        m, ffn = cfg.model, cfg.ffn
        hidden = ffn.hidden_dim or ffn.multiple_of * math.ceil(8 / 3 * m.d_model / ffn.multiple_of)
        return cls(
            m.d_model,
            m.n_layers,
            m.n_heads,
            m.context,
            m.vocab_size,
            hidden,
            cfg.norm.eps,
            cfg.position.theta,
        )


def rope_tables(head_dim: int, context: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of pos · θ^(−2i/k), duplicated for the rotate-half pairing (i, i + k/2)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(context, dtype=torch.float64), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class PlainBlock(nn.Module):
    def __init__(self, c: PlainConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = c.n_heads, c.d_model // c.n_heads
        self.attn_norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.mlp_norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.up = nn.Linear(c.d_model, 2 * c.ffn_hidden, bias=False)
        self.down = nn.Linear(c.ffn_hidden, c.d_model, bias=False)

    def attention(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))

    def mlp(self, x: Tensor) -> Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attention(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class PlainGPT(nn.Module):
    """Pre-norm decoder: embedding, blocks, final RMSNorm, head tied to the embedding."""

    def __init__(self, c: PlainConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(PlainBlock(c) for _ in range(c.n_layers))
        self.final_norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        cos, sin = rope_tables(c.d_model // c.n_heads, c.context, c.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return F.linear(self.final_norm(x), self.embed.weight)


def plain_key(key: str) -> str:
    """The plain model's name for one of the student's state-dict keys."""
    parts = key.split(".")
    if parts[0] in ("embed", "final_norm"):
        return key
    kind, (layer, slot), rest = parts[0], divmod(int(parts[1]), len(LAYER_SLOTS)), parts[2:]
    if kind == "norms":
        name = {"attention": "attn_norm", "ffn": "mlp_norm"}[LAYER_SLOTS[slot]]
    else:
        name, rest = {"qkv": "qkv", "out": "proj", "up": "up", "down": "down"}[rest[0]], rest[1:]
    return ".".join(["blocks", str(layer), name, *rest])


def copy_weights(student: Student, plain: PlainGPT) -> None:
    """Load the student's weights into the plain model; strict, so every key must map."""
    plain.load_state_dict({plain_key(k): v.clone() for k, v in student.state_dict().items()}, strict=True)


# --------------------------------------------------------------------------- setup


@dataclass
class Setup:
    cfg: DictConfig
    student: Student
    plain: PlainGPT
    x: Tensor
    y: Tensor
    equivalence: dict


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_equivalence(student: Student, plain: PlainGPT, x: Tensor) -> dict:
    """Assert equal parameter counts and matching logits; returns what was checked."""
    n_student, n_plain = count_params(student), count_params(plain)
    if n_student != n_plain:  # not `assert`: the check must survive python -O
        raise AssertionError(f"parameter counts differ: archlab {n_student:,} vs plain {n_plain:,}")
    with torch.no_grad():
        a, b = student(x), plain(x)
    diff = float((a - b).abs().max())
    if not torch.allclose(a, b, atol=LOGITS_ATOL, rtol=0):
        raise AssertionError(f"logits of the two models differ by up to {diff:.3e}")
    return {"checked": True, "params": n_student, "logits_max_abs_diff": diff, "atol": LOGITS_ATOL}


def build(args: argparse.Namespace) -> Setup:
    cfg = compose_config(args.model, args.override)
    check_default_slots(cfg)
    torch.manual_seed(cfg.seed)
    student = build_student(cfg)
    student.kernel = select_kernel(
        cfg.model.attention_backend, torch.device("cpu"), torch.float32, student.dims.head_dim
    )
    if student.kernel.name != "sdpa":
        raise SystemExit(
            f"step_overhead: archlab chose kernel {student.kernel.name}; the plain model uses SDPA"
        )
    plain = PlainGPT(PlainConfig.from_cfg(cfg))
    copy_weights(student, plain)
    batch = args.batch_size or cfg.trainer.batch_size
    data = torch.randint(0, cfg.model.vocab_size, (batch, cfg.model.context + 1))
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    return Setup(cfg, student, plain, x, y, check_equivalence(student, plain, x))


def archlab_step_fn(cfg: DictConfig, student: Student) -> StepFn:
    """The trainer's step for one micro-batch: context, objective plugin, aux losses, AdamW."""
    opt = make_optimizer(student, OmegaConf.to_object(cfg.trainer))
    objective_cls, objective_cfg = registry.configured("objective", cfg.objective)
    objective = objective_cls(objective_cfg)

    def step(x: Tensor, y: Tensor) -> Tensor:
        opt.zero_grad(set_to_none=True)
        ctx = student.new_context(x)
        loss = ctx.add_aux_losses(objective(student(x, ctx), y))
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def plain_step_fn(t: TrainerConfig, plain: PlainGPT) -> StepFn:
    """The hand-written step: same AdamW settings and decay groups, nothing else."""
    params = list(plain.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))

    def step(x: Tensor, y: Tensor) -> Tensor:
        opt.zero_grad(set_to_none=True)
        logits = plain(x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def compiled_step_fn(cfg: DictConfig, student: Student, x: Tensor, y: Tensor) -> tuple[StepFn, dict]:
    """The archlab step of a compiled copy of ``student`` (weights as they are now), and the check that
    its first step's loss equals the eager student's on (x, y); neither student is stepped by it."""
    eager, compiled = copy.deepcopy(student), copy.deepcopy(student)
    compiled.compile()  # in place, as trainer.compile=true
    step = archlab_step_fn(cfg, compiled)
    want, got = float(archlab_step_fn(cfg, eager)(x, y)), float(step(x, y))
    rel = abs(got - want) / abs(want)
    if rel > COMPILED_LOSS_RTOL:
        raise AssertionError(f"compiled loss {got:.6g} differs from eager {want:.6g} (relative {rel:.1e})")
    return step, {"compiled_loss_rel_diff": rel, "compiled_rtol": COMPILED_LOSS_RTOL}


# --------------------------------------------------------------------------- timing


def matmul_peak_gflops(n: int, repeats: int = 7) -> float:
    """Float32 GFLOP/s of an n×n by n×n ``torch.mm`` (median of ``repeats`` after one warmup)."""
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


# --------------------------------------------------------------------------- report


def summarise(setup: Setup, times: dict, peak: float, args: argparse.Namespace) -> dict:
    m = setup.cfg.model
    tokens = setup.x.numel()
    flops_per_step = model_metrics(setup.student, torch.float32)["train_flops_per_token"] * tokens
    rows = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        rows[name] = {
            "ms_per_step": 1e3 * median,
            "ms_min": 1e3 * min(ts),
            "tokens_per_s": tokens / median,
            "gflops": flops_per_step / median / 1e9,
            "peak_fraction": flops_per_step / median / 1e9 / peak,
        }
    paired = statistics.median(a / p for a, p in zip(times["archlab"], times["plain"], strict=True))
    compiled = {}
    if "compiled" in times:
        speedup = statistics.median(p / c for p, c in zip(times["plain"], times["compiled"], strict=True))
        compiled = {
            "compiled": rows["compiled"],
            "compile_speedup": speedup,
            "compile_speedup_min": min(times["plain"]) / min(times["compiled"]),
            "compile_speedup_over_archlab": statistics.median(
                a / c for a, c in zip(times["archlab"], times["compiled"], strict=True)
            ),
            "target_compile_speedup": TARGET_COMPILE_SPEEDUP,
            "compile_target_met": speedup >= TARGET_COMPILE_SPEEDUP,
        }
    return {
        "model": args.model,
        "overrides": list(args.override),
        "dims": {k: m[k] for k in ("d_model", "n_layers", "n_heads", "context", "vocab_size")},
        "batch_size": setup.x.shape[0],
        "tokens_per_step": tokens,
        "train_flops_per_step": flops_per_step,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args.steps,
        "warmup": args.warmup,
        "kernel": setup.student.kernel.name,
        "equivalence": setup.equivalence,
        "archlab": rows["archlab"],
        "plain": rows["plain"],
        "ratio": paired,
        "ratio_of_medians": rows["archlab"]["ms_per_step"] / rows["plain"]["ms_per_step"],
        "matmul_peak_gflops": peak,
        "matmul_size": args.peak_size,
        "target_ratio": TARGET_RATIO,
        "target_met": paired <= TARGET_RATIO,
        **compiled,
        "step_times_s": times,
    }


def format_report(r: dict) -> str:
    d, eq = r["dims"], r["equivalence"]
    lines = [
        f"archlab step overhead: model={r['model']} {' '.join(r['overrides'])}".rstrip(),
        f"  d_model={d['d_model']} n_layers={d['n_layers']} n_heads={d['n_heads']} context={d['context']}"
        f" vocab={d['vocab_size']}; batch {r['batch_size']} -> {r['tokens_per_step']:,} tokens/step",
        f"  params {eq['params']:,} (equal); logits max |diff| {eq['logits_max_abs_diff']:.1e}"
        f" (atol {eq['atol']:.0e}); kernel {r['kernel']}; torch {r['torch']}, {r['threads']} threads",
        f"  {r['repeats']} interleaved repeats after {r['warmup']} warmup steps;"
        f" {r['train_flops_per_step'] / 1e9:.2f} GFLOP per train step",
        "",
        f"  {'':<10}{'ms/step':>10}{'min ms':>10}{'tokens/s':>12}{'GFLOP/s':>10}{'of peak':>9}",
    ]
    for name in ("archlab", "plain", "compiled"):
        if name not in r:
            continue
        row = r[name]
        lines.append(
            f"  {name:<10}{row['ms_per_step']:>10.1f}{row['ms_min']:>10.1f}{row['tokens_per_s']:>12,.0f}"
            f"{row['gflops']:>10.1f}{row['peak_fraction']:>9.1%}"
        )
    n = r["matmul_size"]
    lines += [
        f"  {'matmul':<10}{'':>32}{r['matmul_peak_gflops']:>10.1f}   (torch.mm {n}x{n} fp32)",
        "",
        f"  ratio archlab/plain: {r['ratio']:.3f} (median of per-repeat ratios;"
        f" ratio of the medians {r['ratio_of_medians']:.3f})",
        f"  target ratio <= {r['target_ratio']}: {'met' if r['target_met'] else 'NOT met'}",
    ]
    spread = max(r[name]["ms_per_step"] / r[name]["ms_min"] for name in ("archlab", "plain"))
    if spread > NOISY_SPREAD:
        lines.insert(
            -2,
            f"  note: the median step is {spread:.1f}x the fastest one: other load on this machine?"
            " The per-repeat ratio cancels load that slows both steps of a repeat; the medians do not.",
        )
    if "compiled" in r:
        lines += [
            f"  speedup plain/compiled: {r['compile_speedup']:.3f} (median of per-repeat ratios;"
            f" fastest steps {r['compile_speedup_min']:.3f}); archlab/compiled"
            f" {r['compile_speedup_over_archlab']:.3f}; first loss within"
            f" {r['equivalence']['compiled_loss_rel_diff']:.1e} of eager",
            f"  target speedup >= {r['target_compile_speedup']}:"
            f" {'met' if r['compile_target_met'] else 'NOT met'}",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="model preset (conf/model/*.yaml)")
    p.add_argument("--override", nargs="*", action="extend", default=[], help="Hydra overrides")
    p.add_argument("--peak-size", type=int, default=2048, help="n of the n x n matmul peak probe")
    p.add_argument("--compile", action="store_true", help="also time the student under torch.compile")
    args = parse_step_args(p, argv, steps=40, warmup=3)
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup >= 1 (the compile happens in the warmup)")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print the table, optionally write JSON; returns the results."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = build(args)
    steps = {
        "archlab": archlab_step_fn(setup.cfg, setup.student),
        "plain": plain_step_fn(OmegaConf.to_object(setup.cfg.trainer), setup.plain),
    }
    if args.compile:
        steps["compiled"], checked = compiled_step_fn(setup.cfg, setup.student, setup.x, setup.y)
        setup.equivalence.update(checked)
    times = interleaved(
        {n: functools.partial(f, setup.x, setup.y) for n, f in steps.items()}, args.steps, args.warmup
    )
    results = summarise(setup, times, matmul_peak_gflops(args.peak_size), args)
    return publish(results, format_report(results), args.json)


if __name__ == "__main__":
    main()
    sys.exit(0)
