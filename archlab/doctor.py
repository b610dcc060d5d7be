"""``archlab doctor``: what this machine gives archlab — torch and its build, the accelerator, whether
xformers' kernels run, W&B's mode and login, the distributed backends, broken plugins — and what to
install for what is missing. Exit 0 when everything archlab found can be used, 1 when something is
broken (a plugin that does not load, xformers installed on a GPU but failing)."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from archlab import __version__, registry, slots

CPU_WHEELS = "https://download.pytorch.org/whl/cpu"
CUDA_WHEELS = "https://download.pytorch.org/whl/cu126"


@dataclass(frozen=True)
class Finding:
    """One line of the report: ``what`` is ``state``; ``advice`` says what to do about it (if anything);
    ``broken`` when it cannot work as installed."""

    what: str
    state: str
    advice: str = ""
    broken: bool = False


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_findings() -> list[Finding]:
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    out = [Finding("torch", f"{torch.__version__} ({build}), {torch.get_num_threads()} threads")]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        bf16 = "bf16 supported" if torch.cuda.is_bf16_supported() else "no bf16"
        out.append(Finding("accelerator", f"{torch.cuda.device_count()} CUDA device(s): {names}; {bf16}"))
    elif torch.version.cuda:
        out.append(Finding("accelerator", "none visible (a CUDA build, but no usable GPU or driver)"))
    else:
        advice = f"for a GPU: pip install torch --index-url {CUDA_WHEELS} (match your driver's CUDA)"
        out.append(Finding("accelerator", "CPU only: training uses PyTorch SDPA attention", advice))
    return out


def xformers_finding() -> Finding:
    from archlab.kernels import _xformers_problem

    version = _version("xformers")
    if version is None:
        return Finding(
            "xformers",
            "not installed",
            "on a Linux x86-64 GPU machine: pip install xformers==0.0.35 (CPU runs need none)",
        )
    if not torch.cuda.is_available():
        return Finding("xformers", f"{version}, unused here: it has no CPU kernels (SDPA is used)")
    problem = _xformers_problem(torch.device("cuda"), torch.bfloat16, 64)
    if problem is None:
        return Finding("xformers", f"{version}: memory-efficient attention runs on this GPU")
    return Finding(
        "xformers",
        f"{version}, not usable: {problem}",
        "reinstall the xformers build made for this torch (pip install -U xformers)",
        broken=True,
    )


def wandb_finding() -> Finding:
    from archlab.report.publish import has_credentials

    version = _version("wandb")
    if version is None:
        return Finding("wandb", "not installed", "pip install wandb (or logger=none)", broken=True)
    mode = os.environ.get("WANDB_MODE", "online")
    login = "logged in" if has_credentials() else "no API key or netrc login"
    advice = "" if mode == "offline" or has_credentials() else "wandb login, or WANDB_MODE=offline"
    return Finding("wandb", f"{version}, WANDB_MODE={mode}, {login}", advice)


def distributed_finding() -> Finding:
    backends = [
        name for name, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available())) if ok
    ]
    return Finding(
        "torch.distributed", ", ".join(backends) or "no backend", "" if backends else "a torch with gloo"
    )


def plugin_finding() -> Finding:
    found = [(slot, name, p) for slot in slots.names() for name, p in registry.plugins(slot).items()]
    broken = [f"{slot}={name}" for slot, name, p in found if p.error is not None]
    if broken:
        return Finding(
            "plugins",
            f"{len(found)} found, broken: {', '.join(broken)}",
            "archlab plugins shows why",
            broken=True,
        )
    return Finding("plugins", f"{len(found)} found, all load")


def findings() -> list[Finding]:
    python = f"{platform.python_version()} on {platform.system()} {platform.machine()}"
    return [
        Finding("archlab", f"{__version__}, Python {python}"),
        *torch_findings(),
        xformers_finding(),
        distributed_finding(),
        wandb_finding(),
        plugin_finding(),
    ]


def main(args: list[str]) -> int:
    argparse.ArgumentParser(prog="archlab doctor", description=__doc__.split("\n\n")[0]).parse_args(args)
    report = findings()
    width = max(len(f.what) for f in report)
    for f in report:
        print(f"{'BROKEN ' if f.broken else ''}{f.what:<{width}}  {f.state}")
        if f.advice:
            print(f"{'':<{width}}  -> {f.advice}")
    if not torch.cuda.is_available() and not torch.version.cuda:
        print(f"\n(no torch yet on another machine? pip install torch --index-url {CPU_WHEELS} first:")
        print(
            " a plain `pip install archlab` would pull the multi-GB CUDA build; ./scripts/setup.sh does this)"
        )
    return 1 if any(f.broken for f in report) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
