"""Step time of ffn=moe against a dense MLP of equal active parameters, and sorted against naive dispatch.

What is measured
    1. Training step. One step (forward, cross-entropy, aux losses, backward, AdamW, then every module's
       ``on_step_end``, as ``archlab.trainer`` does) of the archlab student with ``ffn=moe`` (the plugin's
       defaults unless overridden: 16 routed SwiGLU experts of width 88, top-3, one shared expert,
       ``ffn.router`` as given) against the same student with the dense SwiGLU ``mlp`` whose
       ``ffn.hidden_dim`` is solved so that its ACTIVE non-embedding parameters (``archlab.metrics``:
       what one token touches; for the MoE router + shared + top-k experts) match the MoE's. The count is
       affine in the dense width, so two builds give it; both counts are printed. Same random-byte batch,
       same AdamW settings. Target: moe / dense <= 1.5 on CPU, as the median over repeats of the two
       steps' ratio within a repeat (a burst of other load slows both alike and cancels).
    2. Dispatch. One MoE layer's expert computation, forward + backward, on the step's b·t tokens with
       one fixed routing, three ways: ``sorted+grouped`` (the plugin: sort by expert, one
       ``torch._grouped_mm``; only where it runs for this device and dtype), ``sorted+loop`` (the plugin's
       fallback: one matmul per expert on contiguous slices) and ``naive`` (Mixtral-style: for each expert
       a boolean mask over the assignments, gather, compute, index_add; no sort). All three are checked
       to agree (1e-4) before timing.

How to run
    python benchmarks/moe.py                                  # tiny preset, batch 16 × 256, ~1 min on 2 cores
    python benchmarks/moe.py --router aux_free --moe ffn.n_experts=32 ffn.top_k=7 ffn.granularity=8
    python benchmarks/moe.py --steps 10 --json moe.json

The exit code is 0 whatever the ratio; the last line says whether the target was met.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from timing import interleaved, parse_step_args, publish
from torch import Tensor

from archlab import registry
from archlab.config import compose
from archlab.metrics import model_metrics
from archlab.model import Student, build_student
from archlab.optim import make_optimizer

TARGET_RATIO = 1.5
PROBE_WIDTHS = (256, 512)
DISPATCH_ATOL = 1e-4


# --------------------------------------------------------------------------- students


def compose_student(args: argparse.Namespace, overrides: Sequence[str]) -> DictConfig:
    return compose([f"model={args.model}", "teacher=none", "objective=ce", *overrides])


def active_params(cfg: DictConfig) -> int:
    return model_metrics(build_student(cfg), torch.float32)["params/active_non_embedding"]


def matched_dense_width(args: argparse.Namespace, target: int) -> int:
    """The dense ``ffn.hidden_dim`` whose active non-embedding parameters are closest to ``target``."""
    a, b = PROBE_WIDTHS
    pa, pb = (active_params(compose_student(args, [*args.override, f"ffn.hidden_dim={h}"])) for h in (a, b))
    return round(a + (target - pa) * (b - a) / (pb - pa))


def moe_overrides(args: argparse.Namespace) -> list[str]:
    return ["ffn=moe", f"ffn.router={args.router}", *args.override, *args.moe]


def step_fn(cfg: DictConfig, student: Student, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    """The trainer's step for one micro-batch, with the hooks it runs after the optimizer."""
    opt = make_optimizer(student, OmegaConf.to_object(cfg.trainer))
    objective_cls, objective_cfg = registry.configured("objective", cfg.objective)
    objective = objective_cls(objective_cfg)
    hooks = [m for m in student.modules() if hasattr(m, "on_step_end")]

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        ctx = student.new_context(x)
        loss = ctx.add_aux_losses(objective(student(x, ctx), y))
        loss.backward()
        opt.step()
        for module in hooks:
            module.on_step_end()
        return loss.detach()

    return step


# --------------------------------------------------------------------------- dispatch


def naive_dispatch(layer, x_nd: Tensor, routing) -> Tensor:
    """Mixtral-style: per expert, a mask over the assignments, gather, SwiGLU, gated index_add; no sort."""
    y = torch.zeros_like(x_nd)
    experts = zip(layer.w_gate_up.unbind(0), layer.w_down.unbind(0), strict=True)
    for e, (w_gate_up, w_down) in enumerate(experts):
        mine = routing.expert == e
        token = routing.token[mine]
        gate, up = (x_nd[token] @ w_gate_up).chunk(2, dim=-1)
        y = y.index_add(0, token, (F.silu(gate) * up) @ w_down * routing.gate[mine, None])
    return y


def sorted_dispatch(layer, x_nd: Tensor, routing) -> Tensor:
    """The plugin's path: sort by expert, its ``experts`` (grouped or looped), gated index_add."""
    order = routing.expert.argsort(stable=True)
    token = routing.token[order]
    counts = torch.bincount(routing.expert, minlength=layer.n_experts)
    h = layer.experts(x_nd.index_select(0, token), counts) * routing.gate[order, None]
    return torch.zeros_like(x_nd).index_add(0, token, h)


def dispatch_fns(layer, x: Tensor) -> tuple[dict[str, Callable[[], Tensor]], dict]:
    """Forward + backward of each dispatch on the same tokens and routing; checks they agree first."""
    with torch.no_grad():
        routing = layer.router(x)
    x_nd = x.reshape(-1, x.shape[-1]).detach().requires_grad_()

    def run(fn: Callable, grouped: bool) -> Tensor:
        layer.use_grouped_mm = grouped
        x_nd.grad = None
        y = fn(layer, x_nd, routing)
        y.backward(torch.ones_like(y))
        return y.detach()

    fns = {
        "sorted+grouped": functools.partial(run, sorted_dispatch, True),
        "sorted+loop": functools.partial(run, sorted_dispatch, False),
        "naive": functools.partial(run, naive_dispatch, False),
    }
    if not layer.grouped_mm_fits(x.device.type, x.dtype):
        fns.pop("sorted+grouped")
    outputs = {name: fn() for name, fn in fns.items()}
    reference = outputs["naive"]
    diffs = {name: float((out - reference).abs().max()) for name, out in outputs.items()}
    if max(diffs.values()) > DISPATCH_ATOL:
        raise AssertionError(f"dispatch variants disagree: {diffs}")
    return fns, {"assignments": routing.token.numel(), "max_abs_diff_vs_naive": diffs}


# --------------------------------------------------------------------------- report


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def summarise(args, meta: dict, step_times: dict, dispatch_times: dict, dispatch_meta: dict) -> dict:
    paired = statistics.median(m / d for m, d in zip(step_times["moe"], step_times["dense"], strict=True))
    return {
        **meta,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args.steps,
        "warmup": args.warmup,
        "step_ms": medians(step_times),
        "ratio": paired,
        "target_ratio": TARGET_RATIO,
        "target_met": paired <= TARGET_RATIO,
        "dispatch_ms": medians(dispatch_times),
        "dispatch": dispatch_meta,
        "step_times_s": step_times,
        "dispatch_times_s": dispatch_times,
    }


def format_report(r: dict) -> str:
    p, step, disp = r["params"], r["step_ms"], r["dispatch_ms"]
    lines = [
        f"moe vs dense at equal active parameters: model={r['model']} router={r['router']}"
        f" {' '.join(r['overrides'])}".rstrip(),
        f"  batch {r['batch_size']} x {r['context']} = {r['tokens_per_step']:,} tokens/step;"
        f" torch {r['torch']}, {r['threads']} threads; {r['repeats']} interleaved repeats after"
        f" {r['warmup']} warmup",
        "",
        f"  {'':<30}{'ms/step':>10}{'active non-emb':>16}{'total params':>14}",
        f"  {'moe (' + r['moe_shape'] + ')':<30}{step['moe']:>10.1f}"
        f"{p['moe_active']:>16,}{p['moe_total']:>14,}",
        f"  {'dense (hidden ' + str(r['dense_hidden']) + ')':<30}{step['dense']:>10.1f}"
        f"{p['dense_active']:>16,}{p['dense_total']:>14,}",
        "",
        f"  one MoE layer, forward + backward, {r['dispatch']['assignments']:,} assignments:",
        *(f"  {name:<30}{ms:>10.2f} ms" for name, ms in disp.items()),
        "",
        f"  ratio moe/dense: {r['ratio']:.3f} (median of per-repeat ratios)",
        f"  target ratio <= {r['target_ratio']}: {'met' if r['target_met'] else 'NOT met'}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="model preset (conf/model/*.yaml)")
    p.add_argument("--router", default="softmax_topk", help="ffn.router of the moe student")
    p.add_argument("--override", nargs="*", action="extend", default=[], help="Hydra overrides, both")
    p.add_argument(
        "--moe", nargs="*", action="extend", default=[], help="moe student only, e.g. ffn.n_experts=32"
    )
    return parse_step_args(p, argv, steps=20, warmup=2)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print the table, optionally write JSON; returns the results."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    moe_cfg = compose_student(args, moe_overrides(args))
    torch.manual_seed(moe_cfg.seed)
    moe = build_student(moe_cfg)
    moe_counts = model_metrics(moe, torch.float32)
    hidden = matched_dense_width(args, moe_counts["params/active_non_embedding"])
    dense_cfg = compose_student(args, [f"ffn.hidden_dim={hidden}", *args.override])
    dense = build_student(dense_cfg)
    dense_counts = model_metrics(dense, torch.float32)
    batch, context = args.batch_size or moe_cfg.trainer.batch_size, moe_cfg.model.context
    data = torch.randint(0, moe_cfg.model.vocab_size, (batch, context + 1))
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    steps = {"moe": step_fn(moe_cfg, moe, x, y), "dense": step_fn(dense_cfg, dense, x, y)}
    step_times = interleaved(steps, args.steps, args.warmup)
    layer = moe.sublayers[1]
    with torch.no_grad():
        layer_input = moe.norms[1](moe.embed(x))  # realistic scale for the router
    fns, dispatch_meta = dispatch_fns(layer, layer_input)
    dispatch_times = interleaved(fns, args.steps, args.warmup)
    f = moe_cfg.ffn
    meta = {
        "model": args.model,
        "router": args.router,
        "overrides": [*args.override, *args.moe],
        "moe_shape": f"{f.n_experts}x{layer.expert_dim}, top-{f.top_k}, {f.n_shared_experts} shared",
        "dense_hidden": hidden,
        "batch_size": batch,
        "context": context,
        "tokens_per_step": x.numel(),
        "params": {
            "moe_active": moe_counts["params/active_non_embedding"],
            "moe_total": moe_counts["params/total"],
            "dense_active": dense_counts["params/active_non_embedding"],
            "dense_total": dense_counts["params/total"],
        },
    }
    results = summarise(args, meta, step_times, dispatch_times, dispatch_meta)
    return publish(results, format_report(results), args.json)


if __name__ == "__main__":
    main()
    sys.exit(0)
