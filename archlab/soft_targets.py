"""The teacher's soft targets, computed once per (teacher, corpus, context, k, τ) and shared.

A sweep of K students pays for the teacher once: the first job to need targets builds
them under a file lock into a temporary directory and publishes it durably
(``archlab.cachedir``, ``archlab.durable``); the others wait on the lock, at most
``distill.lock_timeout`` seconds, and then read the same memory-mapped files. The
cache is keyed by the teacher and the corpus *content* (``TokenSplit.content_hash``),
so a corpus cache moved elsewhere keeps its targets.

Rows are keyed by **window**: a train row holds the targets of one aligned window of the train
split, and ``train_index`` lists which windows the cache holds, sorted. A student maps its stream
positions to windows (``archlab.data.stream_windows``) and reads their rows, so any seed, epoch or
data order reuses what is there. A run that needs windows the cache lacks (another seed, a longer
run, more validation windows) extends it to the union: under the lock, the published rows are
copied into a new temporary directory, only the missing windows are computed, and the result
replaces the old cache (readers holding the old files keep them until they close). Runs of
different lengths therefore never rebuild each other's targets. Validation windows are the
split's first ones, computed in whole batches of the cache's first build size from window 0, and
each window's nats are stored, so the teacher's ``val_bpb`` over a run's windows is the same
whatever was cached before.

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
the lock, decides what to compute (``_Plan``), prepares the temporary directory and tells the
others the plan; every rank prepares the teacher and fills its own contiguous run of whole
batches of the same files (so each teacher forward sees the windows of the one-process build and
the files come out byte-identical); rank 0 checksums and publishes. A failing rank fails the
whole build (nothing is published, the temporary directory is removed) and every rank raises,
each wait bounded by ``_Crew``'s timeout.
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
from archlab.data import TokenSplit, n_train_windows, needed_windows, stream_windows, windows
from archlab.distributed import Ranks
from archlab.durable import sha256_file
from archlab.errors import ArchlabError

log = logging.getLogger(__name__)
#: Full-vocabulary float32 log-probabilities turned into top-k at a time (64 MiB): the tempered copy and
#: top-k's scratch stay this size on the teacher's device whatever the batch, context and vocabulary.
TOPK_CHUNK_ELEMENTS = 1 << 24
#: Rows copied at a time from the published cache into an extension of it.
COPY_ROWS = 1024


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
) -> tuple[SoftTargets, Tensor]:
    """The top-k of ``log_softmax(logprobs / τ)`` (on the CPU) and each window's nats
    ``−Σ_t logprobs[targets]``, (b,) float64 summed from float32 positions.

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
    return SoftTargets(ids.view(b, t, k), values.view(b, t, k)), -nats.view(b, t).double().sum(1)


@dataclass
class TargetRequest:
    """What a run needs from the cache."""

    context: int
    top_k: int
    temperature: float
    seed: int  # of the training stream whose positions [0, train_windows) the run reads
    train_windows: int
    val_windows: int
    batch_size: int = 16  # windows per teacher forward in a cache's first build (later ones keep its size)
    lock_timeout: float = 3600.0  # seconds to wait for another process's build of the same targets


@dataclass
class TargetCache:
    """Memory-mapped soft targets, as one run reads them: its training stream's windows (rows of the
    cache's sorted ``train_index``, found by window) and its validation windows."""

    path: Path
    meta: dict
    arrays: dict[str, np.ndarray]
    n_windows: int  # aligned windows in the train split: the stream's range
    seed: int
    teacher_val_bpb: float  # the teacher's bits per byte on the run's validation windows

    def _rows(self, split: str, rows: np.ndarray | slice) -> SoftTargets:
        ids = torch.from_numpy(np.array(self.arrays[f"{split}_ids"][rows])).long()
        logprobs = torch.from_numpy(np.array(self.arrays[f"{split}_logprobs"][rows]))
        return SoftTargets(ids, logprobs.float())

    def train(self, first: int, count: int) -> SoftTargets:
        """The targets of the windows at stream positions [first, first + count)."""
        wanted = stream_windows(self.n_windows, self.seed, first, count)
        index = self.arrays["train_index"]
        rows = np.searchsorted(index, wanted).clip(max=len(index) - 1)
        absent = index[rows] != wanted
        if absent.any():
            position = first + int(np.argmax(absent))
            raise ArchlabError(
                f"soft-target cache {self.path} has no targets for training window "
                f"{wanted[absent][0]} (stream position {position} of seed {self.seed}); "
                f"it holds {len(index)} of the {self.n_windows} windows"
            )
        return self._rows("train", rows)

    def val(self, first: int, count: int) -> SoftTargets:
        return self._rows("val", slice(first, first + count))


def cache_key(teacher_identity: dict, split: TokenSplit, req: TargetRequest) -> str:
    """The cache's name: the teacher, the corpus content and how targets are taken. Not the seed or
    the run's length: rows are keyed by window, and one cache grows to the union runs need."""
    material = {
        "teacher": teacher_identity,
        "corpus": split.content_hash,
        "context": req.context,
        "top_k": req.top_k,
        "temperature": req.temperature,
        "format": 2,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _shapes(meta: dict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    id_dtype = np.dtype(np.uint8 if meta["vocab_size"] <= 256 else np.int32)
    rows = {"train": meta["train_rows"], "val": meta["val_windows"]}
    out = {"train_index": ((rows["train"],), np.dtype(np.int64))}
    for split, n in rows.items():
        shape = (n, meta["context"], meta["top_k"])
        out[f"{split}_ids"] = (shape, id_dtype)
        out[f"{split}_logprobs"] = (shape, np.dtype(np.float16))
    out["val_nats"] = ((rows["val"],), np.dtype(np.float64))  # the teacher's nats on each window
    return out


_META = {
    "teacher": (dict,),
    "corpus": (str,),
    "vocab_size": (int,),
    "context": (int,),
    "top_k": (int,),
    "temperature": (float, int),
    "batch_size": (int,),
    "train_rows": (int,),
    "val_windows": (int,),
    "sha256": (dict,),
}


def _needs(path: Path, req: TargetRequest, split: TokenSplit, meta: dict) -> tuple[np.ndarray, int]:
    """The training windows ``req`` reads that the cache lacks, and the validation windows it lacks."""
    index = np.fromfile(path / "train_index.bin", dtype=np.int64)
    wanted = needed_windows(n_train_windows(split.train, req.context), req.seed, req.train_windows)
    return np.setdiff1d(wanted, index, assume_unique=True), max(0, req.val_windows - meta["val_windows"])


def _problem(path: Path, req: TargetRequest, split: TokenSplit) -> str | None:
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
    for name, (shape, dtype) in _shapes(meta).items():
        if type(meta["sha256"].get(name)) is not str:
            raise Corrupt(f"meta.json has no checksum of {name}.bin")
        check_file(path / f"{name}.bin", math.prod(shape) * dtype.itemsize, meta["sha256"][name])
    train, val = _needs(path, req, split, meta)
    if len(train) or val:
        return f"lacks {len(train)} of this run's training windows and {val} of its validation windows"
    return None


def _memmaps(path: Path, meta: dict, mode: str) -> dict[str, np.memmap]:
    """The cache files under ``path`` that ``meta`` describes, memory-mapped with ``mode``."""
    return {
        name: np.memmap(path / f"{name}.bin", dtype=dtype, mode=mode, shape=shape)
        for name, (shape, dtype) in _shapes(meta).items()
    }


def _open(path: Path, req: TargetRequest, split: TokenSplit) -> TargetCache:
    """The verified cache at ``path`` as run ``req`` reads it."""
    meta = read_meta(path, _META)
    arrays = _memmaps(path, meta, "r")
    n = req.val_windows
    bits = math.fsum(arrays["val_nats"][:n]) / math.log(2)
    bpb = bits / float(split.val_window_bytes(req.context, n).sum())
    return TargetCache(path, meta, arrays, n_train_windows(split.train, req.context), req.seed, bpb)


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

    def tell(self, word: tuple[str, object] | None = None) -> tuple[str, object]:
        """Rank 0's ``word`` on every rank: ("build", _Plan), ("ready", "") or ("failed", why)."""
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


@dataclass
class _Plan:
    """One build of a cache, as rank 0 decided it under the lock and told every rank: the windows to
    compute into the temporary directory ``tmp``, whose ``meta`` describes the cache to publish."""

    tmp: str
    meta: dict
    missing: np.ndarray  # training windows to compute, sorted
    missing_rows: np.ndarray  # their rows in the new train_index
    val_from: int  # validation windows [val_from, meta["val_windows"]) to compute


@torch.no_grad()
def _fill(teacher, rows_of, batches, files, split: str, temperature: float, k: int, bar: tqdm) -> None:
    """Write the teacher's targets (and for validation, each window's nats) for ``batches``: (first,
    count) of a list of windows, whose tokens and cache rows ``rows_of(first, count)`` gives."""
    for first, count in batches:
        (x, y), rows = rows_of(first, count)
        top, nats = top_k_targets(teacher.log_probs(x), y, temperature, k)
        values = {"ids": top.ids.numpy(), "logprobs": top.logprobs.numpy()}
        if split == "val":
            values["nats"] = nats.numpy()
        for name, array in values.items():
            fd, dtype = files[f"{split}_{name}"]
            for row, value in zip(rows, array.astype(dtype), strict=True):
                _write_rows(fd, int(row), value[None])
        bar.update(count)


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
            f"the soft-target cache {path} needs {_size(need)} ({meta['train_rows']} train + "
            f"{meta['val_windows']} val windows x {meta['context']} tokens x top_k {meta['top_k']}), "
            f"but only {_size(free)} is free there; lower trainer.max_steps or distill.top_k, "
            f"or set data.cache_dir to a larger disk"
        )


def _fill_share(plan: _Plan, teacher, split: TokenSplit, crew: _Crew, progress: bool) -> None:
    """This rank's share of ``plan``: a contiguous run of whole batches of its missing training windows
    and of its validation windows (the same batches whatever the number of ranks).

    A rank's failure is gathered with the others' results: it re-raises its own error and the others
    raise ``_CrewFailed`` naming it, so no rank is left waiting for a share that will not come."""
    meta, c, size = plan.meta, plan.meta["context"], plan.meta["batch_size"]

    def train_rows(first: int, count: int):
        wins = plan.missing[first : first + count]
        return windows(split.train, wins * c, c), plan.missing_rows[first : first + count]

    def val_rows(first: int, count: int):
        first += plan.val_from
        return windows(split.val, [i * c for i in range(first, first + count)], c), range(
            first, first + count
        )

    n_val = meta["val_windows"] - plan.val_from
    train, val = (_batches(n, size, crew.rank, crew.size) for n in (len(plan.missing), n_val))
    if crew.size > 1 and crew.rank == 0:
        log.info(
            "soft targets: %d ranks fill train windows %s and val windows %s (of those to compute)",
            crew.size, *(" ".join(_span(_batches(n, size, r, crew.size)) for r in range(crew.size))
                         for n in (len(plan.missing), n_val)),
        )  # fmt: skip
    error = None
    try:
        teacher.prepare()
        bar = tqdm(
            total=sum(n for _, n in train + val), desc="teacher targets", unit="window", disable=not progress
        )
        with bar, _writable(Path(plan.tmp), meta) as files:
            _fill(teacher, train_rows, train, files, "train", meta["temperature"], meta["top_k"], bar)
            _fill(teacher, val_rows, val, files, "val", 1.0, meta["top_k"], bar)
    except Exception as exc:  # gathered below, then re-raised
        error = exc
    failed = [
        (r, why) for r, why in enumerate(crew.gather(error and f"{type(error).__name__}: {error}")) if why
    ]
    if error is not None:
        raise error
    if failed:
        rank, why = failed[0]
        raise _CrewFailed(f"rank {rank} of {crew.size} failed its share of the soft-target build: {why}")
    crew.listening = True  # for rank 0's word on the publication


def _plan(path: Path, teacher, split: TokenSplit, req: TargetRequest, old: tuple[dict, dict] | None) -> _Plan:
    """What a build of ``path`` for ``req`` computes, in a fresh temporary directory holding ``old``'s
    rows already (copied, not moved: readers of the published cache keep it until they close it)."""
    c = req.context
    wanted = needed_windows(n_train_windows(split.train, c), req.seed, req.train_windows)
    old_meta, old_arrays = old or ({}, {})
    kept = np.asarray(old_arrays.get("train_index", np.empty(0, np.int64)))
    size = old_meta.get("batch_size", req.batch_size)
    val_from = old_meta.get("val_windows", 0)
    # validation windows come in whole batches from window 0, so each is always computed beside the same
    # others and its nats (the teacher's val bpb) do not depend on which runs came before
    n_val = max(req.val_windows, min(-(-req.val_windows // size) * size, (len(split.val) - 1) // c))
    index = np.union1d(kept, wanted)
    missing = np.setdiff1d(wanted, kept, assume_unique=True)
    meta = {
        "teacher": teacher.identity(),
        "corpus": split.content_hash,
        "vocab_size": teacher.vocab_size,
        "context": c,
        "top_k": min(req.top_k, teacher.vocab_size),
        "temperature": req.temperature,
        "batch_size": size,
        "train_rows": len(index),
        "val_windows": max(val_from, n_val),
    }
    _check_space(path, meta)
    tmp = make_tmp(path)
    for name, (shape, dtype) in _shapes(meta).items():
        with open(tmp / f"{name}.bin", "wb") as f:
            f.truncate(math.prod(shape) * dtype.itemsize)
    new = _memmaps(tmp, meta, "r+")
    new["train_index"][:] = index
    if old is not None:
        kept_rows = np.searchsorted(index, kept)
        for first in range(0, len(kept), COPY_ROWS):
            part = slice(first, first + COPY_ROWS)
            for name in ("train_ids", "train_logprobs"):
                new[name][kept_rows[part]] = old_arrays[name][part]
        for name in ("val_ids", "val_logprobs", "val_nats"):
            new[name][:val_from] = old_arrays[name]
    for array in new.values():
        array.flush()
    return _Plan(str(tmp), meta, missing, np.searchsorted(index, missing), val_from)


def _build(
    path: Path, teacher, split: TokenSplit, req: TargetRequest, old, progress: bool, crew: _Crew
) -> None:
    """Rank 0, under the lock: the cache's files in a temporary directory, ``old``'s rows copied and the
    missing ones filled by every rank, then verified and published in its place."""
    plan = _plan(path, teacher, split, req, old)
    tmp = Path(plan.tmp)
    try:
        kept = plan.meta["train_rows"] - len(plan.missing)
        log.info(
            "soft targets: %d training windows to compute (%d kept), %d validation windows (%d kept)",
            len(plan.missing), kept, plan.meta["val_windows"] - plan.val_from, plan.val_from,
        )  # fmt: skip
        crew.tell(("build", plan))
        _fill_share(plan, teacher, split, crew, progress)
        meta = {
            **plan.meta,
            "sha256": {name: sha256_file(tmp / f"{name}.bin") for name in _shapes(plan.meta)},
        }
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
        _fill_share(detail, teacher, split, crew, progress=False)
    try:
        reason = _problem(path, req, split)
    except Corrupt as exc:
        reason = str(exc)
    if reason is not None:
        raise ArchlabError(f"the soft targets {path} that rank 0 published cannot be used: {reason}")
    return _open(path, req, split)


def build_or_load(
    teacher,
    split: TokenSplit,
    req: TargetRequest,
    cache_dir: Path,
    progress: bool,
    ranks: Ranks | None = None,
) -> TargetCache:
    """The soft targets ``req`` needs: found in the cache, or built once under a file lock, by the
    processes of ``ranks`` together (every rank calls this; default: this process alone). A cache that
    lacks some of the windows is extended: its rows are kept and only the missing ones computed."""
    path = Path(cache_dir).expanduser() / "soft_targets" / cache_key(teacher.identity(), split, req)
    crew = _Crew(ranks or Ranks(), req.lock_timeout)
    intact: list[tuple[dict, dict]] = []  # the published cache's meta and files, undamaged but lacking

    def problem() -> str | None:
        intact.clear()
        reason = _problem(path, req, split)
        if reason is not None and path.exists():
            meta = read_meta(path, _META)
            intact.append((meta, _memmaps(path, meta, "r")))
        return reason

    try:
        if crew.rank != 0:
            return _follow(path, teacher, split, req, crew)
        try:
            cache = build_once(
                path,
                "soft-target",
                problem=problem,
                build=lambda: _build(path, teacher, split, req, next(iter(intact), None), progress, crew),
                load=lambda: _open(path, req, split),
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
