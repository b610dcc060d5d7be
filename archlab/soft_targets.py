"""The teacher's soft targets, computed once per (teacher, corpus, context, k, τ, stream) and shared.

A sweep of K students pays for the teacher once: the first job to need targets builds
them under a file lock into a temporary directory and publishes it durably
(``archlab.cachedir``, ``archlab.durable``); the others wait on the lock, at most
``distill.lock_timeout`` seconds, and then read the same memory-mapped files. The
cache is keyed by the teacher and the corpus *content* (``TokenSplit.content_hash``),
so a corpus cache moved elsewhere keeps its targets. Each row of the
train cache is one position of the training stream (``archlab.data.stream_windows``),
so a student reads the targets of its batch by slicing, with no teacher in the loop.

What is stored: for every token, the teacher's top-k next-token ids and their
log-probabilities at temperature τ (validation targets at τ = 1, so that eval metrics
compare across runs), taken from the **full** softmax, so the tail mass
``1 − Σ p`` is known and objectives can treat it as a "rest" bucket. Full distributions
are not stored even for bytes: 256 float16 values cost 512 B per token (630 MB for the
main job's 1.2 M training tokens), while the top 32 cost 96 B and carry the tail exactly
as one bucket. Files are checked against sizes and SHA-256 sums in ``meta.json`` on
every load; a truncated or corrupted cache (or meta.json) is rebuilt, not trusted. A
build whose estimated size exceeds the free disk space is refused before it starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from archlab.cachedir import Corrupt, build_once, check_file, make_tmp, publish, read_meta
from archlab.data import TokenSplit, n_train_windows, stream_windows, windows
from archlab.durable import sha256_file
from archlab.errors import ArchlabError

log = logging.getLogger(__name__)
FILES = ("train_ids", "train_logprobs", "val_ids", "val_logprobs")


@dataclass
class SoftTargets:
    """Teacher next-token distribution at every position, truncated to its top k.

    ``ids: (b, t, k)`` int64, sorted by decreasing probability; ``logprobs: (b, t, k)``
    float32, log-probabilities at the cache's temperature τ taken from the *full*
    softmax, so the tail mass ``1 − Σ exp(logprobs)`` is known (the "rest" bucket).
    With k equal to the vocabulary size the distribution is complete.
    """

    ids: Tensor
    logprobs: Tensor

    @property
    def tail(self) -> Tensor:
        """Probability mass outside the top k: (b, t)."""
        return (1.0 - self.logprobs.exp().sum(-1)).clamp_min(0.0)

    @classmethod
    def from_logprobs(cls, logprobs: Tensor, k: int) -> SoftTargets:
        """Top-k of a full (b, t, V) log-probability tensor."""
        values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        return cls(ids=ids, logprobs=values.float())

    def to(self, device: torch.device) -> SoftTargets:
        return SoftTargets(self.ids.to(device), self.logprobs.to(device))


@dataclass
class TargetRequest:
    """What a run needs from the cache."""

    context: int
    top_k: int
    temperature: float
    seed: int
    train_windows: int  # stream positions [0, train_windows) are needed
    val_windows: int
    batch_size: int = 16  # windows per teacher forward while building
    lock_timeout: float = 3600.0  # seconds to wait for another process's build of the same targets


@dataclass
class TargetCache:
    """Memory-mapped soft targets of the training stream and the validation windows."""

    path: Path
    meta: dict
    arrays: dict[str, np.ndarray]

    def _rows(self, split: str, first: int, count: int) -> SoftTargets:
        ids = torch.from_numpy(np.array(self.arrays[f"{split}_ids"][first : first + count])).long()
        logprobs = torch.from_numpy(np.array(self.arrays[f"{split}_logprobs"][first : first + count]))
        return SoftTargets(ids, logprobs.float())

    def train(self, first: int, count: int) -> SoftTargets:
        if first + count > self.meta["train_windows"]:
            raise ArchlabError(
                f"soft-target cache {self.path} covers {self.meta['train_windows']} training windows, "
                f"the run asked for window {first + count}"
            )
        return self._rows("train", first, count)

    def val(self, first: int, count: int) -> SoftTargets:
        return self._rows("val", first, count)


def cache_key(teacher_identity: dict, split: TokenSplit, req: TargetRequest) -> str:
    material = {
        "teacher": teacher_identity,
        "corpus": split.content_hash,
        "context": req.context,
        "top_k": req.top_k,
        "temperature": req.temperature,
        "seed": req.seed,
        "format": 1,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _shapes(meta: dict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    id_dtype = np.dtype(np.uint8 if meta["vocab_size"] <= 256 else np.int32)
    out = {}
    for split in ("train", "val"):
        shape = (meta[f"{split}_windows"], meta["context"], meta["top_k"])
        out[f"{split}_ids"] = (shape, id_dtype)
        out[f"{split}_logprobs"] = (shape, np.dtype(np.float16))
    return out


_META = {
    "teacher": (dict,),
    "corpus": (str,),
    "vocab_size": (int,),
    "context": (int,),
    "top_k": (int,),
    "temperature": (float, int),
    "seed": (int,),
    "train_windows": (int,),
    "val_windows": (int,),
    "teacher_val_bpb": (float, int),
    "sha256": (dict,),
}


def _problem(path: Path, req: TargetRequest) -> str | None:
    """Why the cache at ``path`` cannot serve ``req`` (None if it can); ``Corrupt`` if it is damaged."""
    if not path.exists():
        return "not built yet"
    meta = read_meta(path, _META)
    for key in ("top_k", "temperature", "context"):
        if meta[key] != getattr(req, key):
            raise ArchlabError(
                f"soft-target cache {path} was built with {key}={meta[key]}, this run asks for "
                f"{getattr(req, key)}; delete the directory to rebuild it"
            )
    if meta["train_windows"] < req.train_windows or meta["val_windows"] < req.val_windows:
        return f"covers {meta['train_windows']}/{meta['val_windows']} train/val windows, fewer than needed"
    for name, (shape, dtype) in _shapes(meta).items():
        if type(meta["sha256"].get(name)) is not str:
            raise Corrupt(f"meta.json has no checksum of {name}.bin")
        check_file(path / f"{name}.bin", math.prod(shape) * dtype.itemsize, meta["sha256"][name])
    return None


def _open(path: Path) -> TargetCache:
    meta = read_meta(path, _META)
    arrays = {
        name: np.memmap(path / f"{name}.bin", dtype=dtype, mode="r", shape=shape)
        for name, (shape, dtype) in _shapes(meta).items()
    }
    return TargetCache(path, meta, arrays)


@torch.no_grad()
def _fill(
    teacher, split: str, starts_of, n: int, arrays, temperature: float, req: TargetRequest, bar: tqdm
) -> float:
    """Write teacher targets for ``n`` windows; returns the teacher's total nats on their targets."""
    nats = 0.0
    for first in range(0, n, req.batch_size):
        count = min(req.batch_size, n - first)
        x, y = starts_of(first, count)
        logprobs = teacher.log_probs(x).float().cpu()
        nats -= float(logprobs.gather(-1, y[..., None]).sum())
        tempered = torch.log_softmax(logprobs / temperature, dim=-1)
        top = SoftTargets.from_logprobs(tempered, req.top_k)
        arrays[f"{split}_ids"][first : first + count] = top.ids.numpy()
        arrays[f"{split}_logprobs"][first : first + count] = top.logprobs.numpy()
        bar.update(count)
    return nats


def _meta(teacher, split: TokenSplit, req: TargetRequest) -> dict:
    return {
        "teacher": teacher.identity(),
        "corpus": split.content_hash,
        "vocab_size": teacher.vocab_size,
        "context": req.context,
        "top_k": min(req.top_k, teacher.vocab_size),
        "temperature": req.temperature,
        "seed": req.seed,
        "train_windows": req.train_windows,
        "val_windows": req.val_windows,
    }


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"
        n /= 1000


def _check_space(path: Path, meta: dict) -> None:
    """Refuse a build that cannot fit on the cache's filesystem."""
    need = sum(math.prod(shape) * dtype.itemsize for shape, dtype in _shapes(meta).values())
    free = shutil.disk_usage(path.parent).free
    if need > free:
        raise ArchlabError(
            f"the soft-target cache {path} needs {_size(need)} ({meta['train_windows']} train + "
            f"{meta['val_windows']} val windows x {meta['context']} tokens x top_k {meta['top_k']}), "
            f"but only {_size(free)} is free there; lower trainer.max_steps or distill.top_k, "
            f"or set data.cache_dir to a larger disk"
        )


def _build(path: Path, teacher, split: TokenSplit, req: TargetRequest, progress: bool) -> None:
    meta = _meta(teacher, split, req)
    _check_space(path, meta)
    teacher.prepare()
    tmp = make_tmp(path)
    arrays = {
        name: np.memmap(tmp / f"{name}.bin", dtype=dtype, mode="w+", shape=shape)
        for name, (shape, dtype) in _shapes(meta).items()
    }
    n_train = n_train_windows(split.train, req.context)
    c = req.context

    def train_rows(first: int, count: int):
        return windows(split.train, stream_windows(n_train, req.seed, first, count) * c, c)

    def val_rows(first: int, count: int):
        return windows(split.val, [i * c for i in range(first, first + count)], c)

    total = req.train_windows + req.val_windows
    with tqdm(total=total, desc="teacher targets", unit="window", disable=not progress) as bar:
        _fill(teacher, "train", train_rows, req.train_windows, arrays, req.temperature, req, bar)
        val_nats = _fill(teacher, "val", val_rows, req.val_windows, arrays, 1.0, req, bar)
    for array in arrays.values():
        array.flush()
    meta["teacher_val_bpb"] = val_nats / split.val_window_bytes(c, req.val_windows).sum() / math.log(2)
    meta["sha256"] = {name: sha256_file(tmp / f"{name}.bin") for name in arrays}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    publish(tmp, path)


def build_or_load(
    teacher, split: TokenSplit, req: TargetRequest, cache_dir: Path, progress: bool
) -> TargetCache:
    """The soft targets ``req`` needs: found in the cache, or built once under a file lock."""
    path = Path(cache_dir).expanduser() / "soft_targets" / cache_key(teacher.identity(), split, req)
    return build_once(
        path,
        "soft-target",
        problem=lambda: _problem(path, req),
        build=lambda: _build(path, teacher, split, req, progress),
        load=lambda: _open(path),
        timeout=req.lock_timeout,
        timeout_key="distill.lock_timeout",
        label="soft targets",
    )
