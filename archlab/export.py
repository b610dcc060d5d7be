"""``archlab export CHECKPOINT --packed [--out PATH]``: a trained student as one packed safetensors file
(``--hf DIR``: as a transformers model directory, ``archlab.hf_dir``).

Generic through two hooks a module may define (docs/plugins.md):
    packed_state() -> dict[str, Tensor]     the module's whole state (its subtree) in a compact form
    load_packed_state(state)                 the inverse, on a freshly built module; may freeze it
Every other tensor is stored as in the checkpoint. The file's metadata holds the resolved config, so
``load_packed(path)`` rebuilds the student without the run directory. The size report compares the file's
tensor bytes with the same parameters at float32 and bfloat16.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from archlab.errors import ArchlabError, ConfigError, check_out
from archlab.slots import PackedState, offers

FORMAT = "archlab-packed/1"


def packed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost modules (by qualified name) that define ``packed_state``."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        inside = any(name.startswith(outer + ".") for outer in found)
        if offers(module, PackedState) and not inside:
            found[name] = module
    return found


def _under(key: str, prefixes) -> bool:
    return any(key.startswith(p + ".") for p in prefixes)


def packed_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor of ``model``: packed modules through their hook, the rest as its state_dict has it."""
    modules = packed_modules(model)
    out = {k: v for k, v in model.state_dict().items() if not _under(k, modules)}
    for name, module in modules.items():
        out.update({f"{name}.{k}": v for k, v in module.packed_state().items()})
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def save_packed(model: nn.Module, cfg: DictConfig, path: Path) -> dict[str, Tensor]:
    """Write ``model`` packed to ``path`` (safetensors, config in the metadata); returns what was written."""
    tensors = packed_state_dict(model)
    config = json.dumps(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": FORMAT, "config": config})
    return tensors


def load_packed(path: str | Path, device: torch.device | str = "cpu"):
    """The student stored by ``save_packed``, frozen for inference, and its config."""
    from archlab.checkpoint import warn_non_finite
    from archlab.kernels import select_kernel
    from archlab.model import build_student

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ArchlabError(f"{path} is not an archlab packed export (format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    cfg = OmegaConf.create(json.loads(meta["config"]))
    model = build_student(cfg)
    modules = packed_modules(model)
    for name, module in modules.items():
        prefix = name + "."
        module.load_packed_state({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    rest = {k: v for k, v in tensors.items() if not _under(k, modules)}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if not _under(k, modules)]
    if missing or unexpected:
        raise ArchlabError(f"{path} does not fit its own config: missing {missing}, unexpected {unexpected}")
    warn_non_finite(model, path)
    device = torch.device(device)
    model.kernel = select_kernel("auto", device, torch.float32, model.dims.head_dim)
    return model.to(device).eval().requires_grad_(False), cfg


def size_report(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, int | float]:
    """The file's tensor bytes vs the parameters at fp32/bf16; bits per parameter of the packed modules."""
    n_params = sum(p.numel() for p in model.parameters())
    modules = packed_modules(model)
    inside = sum(p.numel() for m in modules.values() for p in m.parameters())
    inside_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if _under(k, modules))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    return {
        "params": n_params,
        "bytes_packed": total,
        "bytes_fp32": 4 * n_params,
        "bytes_bf16": 2 * n_params,
        "packed_params": inside,
        "packed_bytes": inside_bytes,
        "bits_per_packed_param": 8 * inside_bytes / inside if inside else math.nan,
    }


def format_report(r: dict[str, int | float], path: Path) -> str:
    return "\n".join(
        [
            f"wrote {path}",
            f"  weight bytes: packed {r['bytes_packed']:,} | fp32 {r['bytes_fp32']:,} "
            f"({r['bytes_fp32'] / r['bytes_packed']:.2f}x) | bf16 {r['bytes_bf16']:,} "
            f"({r['bytes_bf16'] / r['bytes_packed']:.2f}x)   ({r['params']:,} parameters)",
            f"  packed modules: {r['packed_params']:,} parameters in {r['packed_bytes']:,} bytes = "
            f"{r['bits_per_packed_param']:.3f} bits each (scales and norm gains included)",
        ]
    )


def main(args: list[str]) -> int:
    """``archlab export CHECKPOINT --packed [--out PATH]`` or ``... --hf DIR [--force]``."""
    parser = argparse.ArgumentParser(
        prog="archlab export",
        description="Write a trained student as one packed safetensors file (--packed) or as a directory "
        "that transformers loads with stock classes (--hf DIR).",
    )
    parser.add_argument("checkpoint", help="a run dir, its checkpoints/ dir, or one checkpoint dir")
    parser.add_argument("--packed", action="store_true", help="pack what can be packed (ternary: 2 bits)")
    parser.add_argument(
        "--out", type=Path, default=None, help="--packed: default CHECKPOINT/packed.safetensors"
    )
    parser.add_argument("--hf", type=Path, default=None, metavar="DIR", help="write a transformers model dir")
    parser.add_argument("--force", action="store_true", help="--hf: replace a non-empty DIR")
    opts = parser.parse_args(args)
    if opts.packed == (opts.hf is not None):
        raise ConfigError("--packed/--hf", "both" if opts.packed else "neither", "exactly one of them")
    from archlab import checkpoint

    ckpt = checkpoint.find(opts.checkpoint, key="CHECKPOINT")
    if opts.hf is not None:
        return export_hf(ckpt, check_out(opts.hf, directory=True, key="--hf"), force=opts.force)
    out = check_out(opts.out or ckpt / "packed.safetensors", directory=False)
    model = checkpoint.load_student(ckpt, torch.device("cpu"))
    tensors = save_packed(model, checkpoint.saved_config(ckpt), out)
    print(format_report(size_report(model, tensors), out))
    return 0


def write_hf(ckpt: Path, out: Path, *, force: bool = False) -> dict:
    """The checkpoint's student and its run's tokenizer as a transformers model directory ``out``
    (``archlab.hf_dir.write_dir``'s report); ``archlab eval --model hf`` exports through it too."""
    from archlab import checkpoint, hf_dir
    from archlab.run_tokens import run_tokenizer

    model = checkpoint.load_student(ckpt, torch.device("cpu"))
    return hf_dir.write_dir(model, run_tokenizer(checkpoint.saved_config(ckpt)), out, force=force)


def export_hf(ckpt: Path, out: Path, *, force: bool) -> int:
    """``--hf DIR``: ``write_hf``, and what it wrote."""
    from archlab import hf_dir

    print(hf_dir.format_report(write_hf(ckpt, out, force=force)))
    return 0
