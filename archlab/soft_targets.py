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

A build may be shared by the ranks of a torchrun or SLURM job (``ranks``): rank 0 alone takes
the lock, decides, creates the temporary directory and tells the others its path; every rank
prepares the teacher and fills its own contiguous run of whole batches of the same files (so
each teacher forward sees the windows of the one-process build and the files come out
byte-identical); rank 0 sums the validation nats in batch order, checksums and publishes.
A failing rank fails the whole build (nothing is published, the temporary directory is
removed) and every rank raises, each wait bounded by ``_Crew``'s timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.constants import default_pg_timeout
from tqdm import tqdm

from archlab.cachedir import Corrupt, build_once, check_file, make_tmp, publish, read_meta
from archlab.data import TokenSplit, n_train_windows, stream_windows, windows
from archlab.distributed import Ranks
from archlab.durable import sha256_file
from archlab.errors import ArchlabError

log = logging.getLogger(__name__)
FILES = ("train_ids", "train_logprobs", "val_ids", "val_logprobs")
#: Full-vocabulary float32 log-probabilities turned into top-k at a time (64 MiB): the tempered copy and
#: top-k's scratch stay this size on the teacher's device whatever the batch, context and vocabulary.
TOPK_CHUNK_ELEMENTS = 1 << 24


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


def top_k_targets(
    logprobs: Tensor, targets: Tensor, temperature: float, k: int, chunk_rows: int = 0
) -> tuple[SoftTargets, float]:
    """The top-k of ``log_softmax(logprobs / τ)`` (on the CPU) and the nats ``−Σ logprobs[targets]``.

    ``logprobs`` is a teacher's full (b, t, V) output, ``targets`` (b, t) the next tokens. The work
    runs on ``logprobs``' device, ``chunk_rows`` positions at a time (default: ``TOPK_CHUNK_ELEMENTS``
    worth), and only the top k of each position travels to the CPU: V / k times less than the full
    distribution. Each position is computed alone, so any chunking gives the same numbers."""
    b, t, v = logprobs.shape
    flat, picked = logprobs.reshape(b * t, v), targets.reshape(b * t, 1).to(logprobs.device)
    rows, k = chunk_rows or max(1, TOPK_CHUNK_ELEMENTS // v), min(k, v)
    ids, values = torch.empty(b * t, k, dtype=torch.long), torch.empty(b * t, k)
    nats = torch.empty(b * t)
    for first in range(0, b * t, rows):
        chunk, rows_here = flat[first : first + rows].float(), slice(first, first + rows)
        nats[rows_here] = chunk.gather(-1, picked[rows_here])[:, 0].cpu()
        top = SoftTargets.from_logprobs(torch.log_softmax(chunk / temperature, dim=-1), k)
        ids[rows_here], values[rows_here] = top.ids.cpu(), top.logprobs.cpu()
    return SoftTargets(ids.view(b, t, k), values.view(b, t, k)), -float(nats.sum())


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


class _CrewFailed(ArchlabError):
    """A rank failed its share of a build; every rank knows it (it came back from ``_Crew.gather``)."""


class _Crew:
    """The processes building one cache together: rank 0 leads (lock, decision, publication), every
    rank fills its share. They talk over a gloo group of their own, whose timeout covers rank 0's wait
    for the lock (``distill.lock_timeout``) plus torch's default collective timeout (30 min) for the
    rest, so a rank waits long for a slow one, never forever for a stuck one. One process alone needs
    no group."""

    def __init__(self, ranks: Ranks, lock_timeout: float) -> None:
        self.rank, self.size = ranks.rank, ranks.world_size
        # True while the other ranks wait for a word from rank 0 (and not in a gather)
        self.listening = True
        self.group = None
        if self.size > 1:
            timeout = default_pg_timeout + timedelta(seconds=lock_timeout)
            self.group = dist.new_group(backend="gloo", timeout=timeout)

    def tell(self, word: tuple[str, str] | None = None) -> tuple[str, str]:
        """Rank 0's ``word`` on every rank: ("build", temp dir), ("ready", "") or ("failed", why)."""
        self.listening = False  # they fill, or are done, until a gather hands them back to rank 0
        if self.size == 1:
            return word
        box = [word]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: object) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        every: list = [None] * self.size
        dist.all_gather_object(every, obj, group=self.group)
        return every

    def close(self) -> None:
        if self.group is not None:
            dist.destroy_process_group(self.group)


def _batches(n: int, size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """(first, count) of rank ``rank``'s batches of ``n`` windows: a contiguous run of whole batches of
    ``size`` (the last batch may be short), runs of sizes differing by at most one batch. Whole batches,
    because a batched teacher may round a window differently beside other windows."""
    n_batches = -(-n // size)
    mine = range(rank * n_batches // world_size, (rank + 1) * n_batches // world_size)
    return [(b * size, min(size, n - b * size)) for b in mine]


def _span(batches: list[tuple[int, int]]) -> str:
    """``[first, end)`` of a run of batches, for the log."""
    return f"[{batches[0][0]}, {sum(batches[-1])})" if batches else "[]"


@contextlib.contextmanager
def _writable(tmp: Path, meta: dict) -> Iterator[dict[str, tuple[int, np.dtype]]]:
    """The cache's files in ``tmp`` open for writing rows in place: name -> (descriptor, dtype), each
    fsynced and closed at the end. Rows are written with pwrite, not through a shared memory map: a map
    writes whole pages back, so two ranks on two hosts of a network filesystem would overwrite each
    other's rows in the page their slices share."""
    fds: dict[str, tuple[int, np.dtype]] = {}
    try:
        for name, (_, dtype) in _shapes(meta).items():
            fds[name] = (os.open(tmp / f"{name}.bin", os.O_WRONLY), dtype)
        yield fds
        for fd, _ in fds.values():
            os.fsync(fd)
    finally:
        for fd, _ in fds.values():
            os.close(fd)


def _write_rows(fd: int, first: int, rows: np.ndarray) -> None:
    """Write ``rows`` (whole rows of the array in ``fd``'s file) in place from row ``first`` on."""
    data, offset = memoryview(rows.tobytes()), first * rows[0].nbytes
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


@torch.no_grad()
def _fill(
    teacher, split: str, starts_of, batches, files, temperature: float, k: int, bar: tqdm
) -> list[float]:
    """Write teacher targets for ``batches`` ((first, count) windows); returns the teacher's nats on
    each batch's targets (summed later in batch order, so any split of the batches adds up the same)."""
    nats = []
    for first, count in batches:
        x, y = starts_of(first, count)
        top, batch_nats = top_k_targets(teacher.log_probs(x), y, temperature, k)
        nats.append(batch_nats)
        for name, values in (("ids", top.ids), ("logprobs", top.logprobs)):
            fd, dtype = files[f"{split}_{name}"]
            _write_rows(fd, first, values.numpy().astype(dtype))
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


def _fill_share(
    tmp: Path, teacher, split: TokenSplit, req: TargetRequest, meta: dict, crew: _Crew, progress: bool
) -> list[float]:
    """This rank's share of the build in ``tmp``, then every rank's val nats per batch, in batch order.

    A rank's failure is gathered with the others' results: it re-raises its own error and the others
    raise ``_CrewFailed`` naming it, so no rank is left waiting for a share that will not come."""
    c, size = req.context, req.batch_size
    n_train = n_train_windows(split.train, c)

    def train_rows(first: int, count: int):
        return windows(split.train, stream_windows(n_train, req.seed, first, count) * c, c)

    def val_rows(first: int, count: int):
        return windows(split.val, [i * c for i in range(first, first + count)], c)

    train, val = (_batches(n, size, crew.rank, crew.size) for n in (req.train_windows, req.val_windows))
    if crew.size > 1 and crew.rank == 0:
        log.info(
            "soft targets: %d ranks fill train windows %s and val windows %s", crew.size,
            *(" ".join(_span(_batches(n, size, r, crew.size)) for r in range(crew.size))
              for n in (req.train_windows, req.val_windows)),
        )  # fmt: skip
    error, nats = None, []
    try:
        teacher.prepare()
        total = sum(n for _, n in train + val)
        bar = tqdm(total=total, desc="teacher targets", unit="window", disable=not progress)
        with bar, _writable(tmp, meta) as files:
            _fill(teacher, "train", train_rows, train, files, req.temperature, meta["top_k"], bar)
            nats = _fill(teacher, "val", val_rows, val, files, 1.0, meta["top_k"], bar)
    except Exception as exc:  # gathered below, then re-raised
        error = exc
    shares = crew.gather((None if error is None else f"{type(error).__name__}: {error}", nats))
    failed = [(rank, why) for rank, (why, _) in enumerate(shares) if why is not None]
    if error is not None:
        raise error
    if failed:
        rank, why = failed[0]
        raise _CrewFailed(f"rank {rank} of {crew.size} failed its share of the soft-target build: {why}")
    crew.listening = True  # for rank 0's word on the publication
    return [n for _, batch_nats in shares for n in batch_nats]


def _build(path: Path, teacher, split: TokenSplit, req: TargetRequest, progress: bool, crew: _Crew) -> None:
    """Rank 0, under the lock: the cache's files in a temporary directory, filled by every rank, then
    verified and published."""
    meta = _meta(teacher, split, req)
    _check_space(path, meta)
    tmp = make_tmp(path)
    try:
        for name, (shape, dtype) in _shapes(meta).items():
            with open(tmp / f"{name}.bin", "wb") as f:
                f.truncate(math.prod(shape) * dtype.itemsize)
        crew.tell(("build", str(tmp)))
        val_nats = sum(_fill_share(tmp, teacher, split, req, meta, crew, progress))
        bytes_ = split.val_window_bytes(req.context, req.val_windows).sum()
        meta["teacher_val_bpb"] = val_nats / bytes_ / math.log(2)
        meta["sha256"] = {name: sha256_file(tmp / f"{name}.bin") for name in _shapes(meta)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing of a failed build is left to publish
        raise


def _follow(path: Path, teacher, split: TokenSplit, req: TargetRequest, crew: _Crew) -> TargetCache:
    """Ranks 1..: fill a share of each build rank 0 starts, then verify and open what it published."""
    while True:
        kind, detail = crew.tell()
        if kind == "failed":
            raise ArchlabError(f"rank 0 could not build or load the soft targets {path}: {detail}")
        if kind == "ready":
            break
        _fill_share(Path(detail), teacher, split, req, _meta(teacher, split, req), crew, progress=False)
    try:
        reason = _problem(path, req)
    except Corrupt as exc:
        reason = str(exc)
    if reason is not None:
        raise ArchlabError(f"the soft targets {path} that rank 0 published cannot be used: {reason}")
    return _open(path)


def build_or_load(
    teacher,
    split: TokenSplit,
    req: TargetRequest,
    cache_dir: Path,
    progress: bool,
    ranks: Ranks | None = None,
) -> TargetCache:
    """The soft targets ``req`` needs: found in the cache, or built once under a file lock, by the
    processes of ``ranks`` together (every rank calls this; default: this process alone)."""
    path = Path(cache_dir).expanduser() / "soft_targets" / cache_key(teacher.identity(), split, req)
    crew = _Crew(ranks or Ranks(), req.lock_timeout)
    try:
        if crew.rank != 0:
            return _follow(path, teacher, split, req, crew)
        try:
            cache = build_once(
                path,
                "soft-target",
                problem=lambda: _problem(path, req),
                build=lambda: _build(path, teacher, split, req, progress, crew),
                load=lambda: _open(path),
                timeout=req.lock_timeout,
                timeout_key="distill.lock_timeout",
                label="soft targets",
            )
        except Exception as exc:
            if crew.listening:
                crew.tell(("failed", f"{type(exc).__name__}: {exc}"))
            raise
        crew.tell(("ready", ""))
        return cache
    finally:
        crew.close()
