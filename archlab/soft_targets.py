"""The teacher's soft targets, computed once per (teacher, corpus, context, k, τ, stream) and shared.

A sweep of K students pays for the teacher once: the first job to need targets builds
them under a file lock into a temporary directory and renames it into place; the
others wait on the lock and then read the same memory-mapped files. Each row of the
train cache is one position of the training stream (``archlab.data.stream_windows``),
so a student reads the targets of its batch by slicing, with no teacher in the loop.

What is stored: for every token, the teacher's top-k next-token ids and their
log-probabilities at temperature τ (validation targets at τ = 1, so that eval metrics
compare across runs), taken from the **full** softmax, so the tail mass
``1 − Σ p`` is known and objectives can treat it as a "rest" bucket. Full distributions
are not stored even for bytes: 256 float16 values cost 512 B per token (630 MB for the
main job's 1.2 M training tokens), while the top 32 cost 96 B and carry the tail exactly
as one bucket. Files are checked against sizes and SHA-256 sums in ``meta.json`` on
every load; a truncated or corrupted cache is rebuilt, not trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from torch import Tensor
from tqdm import tqdm

from archlab.data import TokenSplit, n_train_windows, stream_windows, windows
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
        "corpus": split.meta["path"],
        "context": req.context,
        "top_k": req.top_k,
        "temperature": req.temperature,
        "seed": req.seed,
        "format": 1,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _shapes(meta: dict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    id_dtype = np.dtype(np.uint8 if meta["vocab_size"] <= 256 else np.int32)
    out = {}
    for split in ("train", "val"):
        shape = (meta[f"{split}_windows"], meta["context"], meta["top_k"])
        out[f"{split}_ids"] = (shape, id_dtype)
        out[f"{split}_logprobs"] = (shape, np.dtype(np.float16))
    return out


def _problem(path: Path, req: TargetRequest) -> str | None:
    """Why the cache at ``path`` cannot serve ``req`` (None if it can)."""
    if not (path / "meta.json").exists():
        return "not built yet"
    meta = json.loads((path / "meta.json").read_text())
    for key in ("top_k", "temperature", "context"):
        if meta[key] != getattr(req, key):
            raise ArchlabError(
                f"soft-target cache {path} was built with {key}={meta[key]}, this run asks for "
                f"{getattr(req, key)}; delete the directory to rebuild it"
            )
    if meta["train_windows"] < req.train_windows or meta["val_windows"] < req.val_windows:
        return f"covers {meta['train_windows']}/{meta['val_windows']} train/val windows, fewer than needed"
    for name, (shape, dtype) in _shapes(meta).items():
        file = path / f"{name}.bin"
        if not file.exists() or file.stat().st_size != math.prod(shape) * dtype.itemsize:
            return f"{file.name} is missing or truncated"
        if _sha256(file) != meta["sha256"][name]:
            return f"{file.name} does not match its checksum"
    return None


def _open(path: Path) -> TargetCache:
    meta = json.loads((path / "meta.json").read_text())
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


def _build(path: Path, teacher, split: TokenSplit, req: TargetRequest, progress: bool) -> None:
    meta = {
        "teacher": teacher.identity(),
        "corpus": split.meta["path"],
        "vocab_size": teacher.vocab_size,
        "context": req.context,
        "top_k": min(req.top_k, teacher.vocab_size),
        "temperature": req.temperature,
        "seed": req.seed,
        "train_windows": req.train_windows,
        "val_windows": req.val_windows,
    }
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
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
    meta["sha256"] = {name: _sha256(tmp / f"{name}.bin") for name in arrays}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    if path.exists():
        shutil.rmtree(path)
    os.rename(tmp, path)


def build_or_load(
    teacher, split: TokenSplit, req: TargetRequest, cache_dir: Path, progress: bool
) -> TargetCache:
    """The soft targets ``req`` needs: found in the cache, or built once under a file lock."""
    path = Path(cache_dir).expanduser() / "soft_targets" / cache_key(teacher.identity(), split, req)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        problem = _problem(path, req)
        if problem is None:
            log.info("soft targets: found %s", path)
        else:
            log.info("soft targets: building %s (%s)", path, problem)
            teacher.prepare()
            _build(path, teacher, split, req, progress)
        return _open(path)
