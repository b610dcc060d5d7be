"""Corpus → byte tokens → deterministic document-level split → memory-mapped cache → batches.

Tokens are bytes (vocab 256) unless the teacher brings its own tokenizer
(``archlab.tokenizer``); bits-per-byte stays comparable across both. With bytes, each
document ends with a NUL byte (0) as end-of-document marker; corpora never contain
NUL (binary files are skipped). A document goes to validation when the
first 8 bytes of sha256(document id), read as a fraction of 2⁶⁴, fall below
``val_fraction``: the split depends on the id alone, so it is stable when documents
are added. The split is cached under ``cache_dir/corpus/<hash>/`` keyed by the
hash of every document's id and content and the split settings; ``meta.json``
records the size and SHA-256 of ``train.bin`` and ``val.bin``, checked on every load
(a damaged cache is rebuilt, with a warning). ``max_bytes`` caps what is read in whole
documents: each split stops taking documents once it holds its share
(``val_fraction · max_bytes`` for validation), so a capped corpus keeps both splits,
and a split may exceed its share by part of its last document.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from archlab.cachedir import Corrupt, build_once, check_file, make_tmp, publish, read_meta
from archlab.errors import ConfigError, CorpusError
from archlab.tokenizer import ByteTokenizer, Tokenizer, TokenizerRecipe, token_dtype

log = logging.getLogger(__name__)


@dataclass
class TokenSplit:
    """Train and validation tokens (memory maps), what they came from and how they were tokenised."""

    train: np.ndarray
    val: np.ndarray
    meta: dict
    tokenizer: Tokenizer = field(default_factory=ByteTokenizer)

    def val_window_bytes(self, context: int, n_windows: int) -> np.ndarray:
        """UTF-8 bytes that the targets of each validation window stand for (the bpb denominator)."""
        return np.array(
            [
                self.tokenizer.count_bytes(self.val[i * context + 1 : i * context + context + 1])
                for i in range(n_windows)
            ]
        )

    @property
    def content_hash(self) -> str:
        """SHA-256 of the token files and their dtype: what the tokens are, wherever they are cached."""
        files = self.meta["files"]
        material = f"{self.meta['dtype']} {files['train.bin']['sha256']} {files['val.bin']['sha256']}"
        return hashlib.sha256(material.encode()).hexdigest()

    def report(self) -> str:
        m = self.meta
        return (
            f"corpus: {m['source']}: {m['documents']} documents, "
            f"{m['train_tokens']:,} train / {m['val_tokens']:,} val tokens "
            f"({m['val_documents']} val documents), cache {m['path']}"
        )


def _is_val(doc_id: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(doc_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


# Verifying hashes both token files on every load: 37 ms for the default stdlib corpus
# (32 MB), next to ~1.2 s for reading and hashing its documents to find the cache key.
_META = {
    "source": (str,),
    "tokenizer": (str,),
    "dtype": (str,),
    "documents": (int,),
    "val_documents": (int,),
    "bytes": (int,),
    "train_tokens": (int,),
    "val_tokens": (int,),
    "val_fraction": (float, int),
    "path": (str,),
    "files": (dict,),
}


def _problem(path: Path, dtype: str) -> str | None:
    """Why the corpus cache at ``path`` cannot be used (None if it can); ``Corrupt`` if it is damaged."""
    if not path.exists():
        return "not built yet"
    meta = read_meta(path, _META)
    if meta["dtype"] != dtype:
        raise Corrupt(f"meta.json has dtype={meta['dtype']!r}, the tokenizer's is {dtype!r}")
    for name in ("train.bin", "val.bin"):
        record = meta["files"].get(name)
        if not isinstance(record, dict) or [type(record.get(k)) for k in ("size", "sha256")] != [int, str]:
            raise Corrupt(f"meta.json has no valid record of {name}")
        check_file(path / name, record["size"], record["sha256"])
    return None


#: Documents tokenised at once while a cache is written: bounds the memory of a build, not its result.
BUILD_CHUNK_BYTES = 1 << 26


def _selected(corpus, val_fraction: float, max_bytes: int | None) -> Iterator[tuple[str, bytes, bool]]:
    """``(id, data, is_val)`` of the documents the split takes, in the corpus's order; a pure function
    of the corpus, so each pass over it (key, tokenizer training, tokenising) sees the same documents."""
    budget = {True: math.inf, False: math.inf}  # bytes still allowed into val (True) / train (False)
    if max_bytes is not None:
        budget = {True: val_fraction * max_bytes, False: (1 - val_fraction) * max_bytes}
    for doc_id, data in corpus.documents():
        is_val = _is_val(doc_id, val_fraction)
        if budget[is_val] <= 0:
            if max(budget.values()) <= 0:
                break
            continue
        budget[is_val] -= len(data) + 1
        yield doc_id, data, is_val


def _write(
    path: Path, documents: Iterator[tuple[str, bytes, bool]], tokenizer: Tokenizer, meta: dict
) -> None:
    """Tokenise ``documents`` into ``train.bin`` and ``val.bin`` a chunk at a time, then publish."""
    tmp = make_tmp(path)
    names = {False: "train.bin", True: "val.bin"}
    digests = {split: hashlib.sha256() for split in names}
    sizes = dict.fromkeys(names, 0)
    pending: dict[bool, list[bytes]] = {False: [], True: []}
    pending_bytes = dict.fromkeys(names, 0)
    with open(tmp / names[False], "wb") as train_file, open(tmp / names[True], "wb") as val_file:
        files = {False: train_file, True: val_file}

        def flush(split: bool) -> None:
            data = tokenizer.encode_documents(pending[split]).astype(meta["dtype"]).tobytes()
            files[split].write(data)
            digests[split].update(data)
            sizes[split] += len(data)
            pending[split], pending_bytes[split] = [], 0

        for _, data, is_val in documents:
            pending[is_val].append(data)
            pending_bytes[is_val] += len(data)
            if pending_bytes[is_val] >= BUILD_CHUNK_BYTES:
                flush(is_val)
        for split in names:
            flush(split)
    itemsize = np.dtype(meta["dtype"]).itemsize
    meta["train_tokens"], meta["val_tokens"] = sizes[False] // itemsize, sizes[True] // itemsize
    meta["files"] = {names[s]: {"size": sizes[s], "sha256": digests[s].hexdigest()} for s in names}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    publish(tmp, path)


def _open(path: Path, tokenizer: Tokenizer) -> TokenSplit:
    meta = read_meta(path, _META)
    return TokenSplit(
        train=np.memmap(path / "train.bin", dtype=meta["dtype"], mode="r"),
        val=np.memmap(path / "val.bin", dtype=meta["dtype"], mode="r"),
        meta=meta,
        tokenizer=tokenizer,
    )


def build_split(
    corpus,
    *,
    val_fraction: float,
    max_bytes: int | None,
    cache_dir: str | Path,
    tokenizer: Tokenizer | TokenizerRecipe | None = None,
) -> TokenSplit:
    """Read ``corpus``, split it by document, tokenise and cache; reuse the cache when it exists.

    The corpus is read once to key the cache, and again (document by document, never all held in
    memory) to learn a ``TokenizerRecipe``'s tokenizer on the train split and to tokenise.
    """
    tokenizer = tokenizer or ByteTokenizer()
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError("data.val_fraction", val_fraction, "a fraction strictly between 0 and 1")
    if max_bytes is not None and max_bytes < 1:
        raise ConfigError("data.max_bytes", max_bytes, "a positive number of bytes or null")
    records = bytearray()  # id and content hash of every document taken, in order: the key's material
    train_content = hashlib.sha256()
    n_docs = n_val_docs = n_bytes = 0
    for doc_id, data, is_val in _selected(corpus, val_fraction, max_bytes):
        digest = hashlib.sha256(data).digest()
        records += doc_id.encode() + b"\x00" + digest
        if not is_val:
            train_content.update(digest)
        n_docs, n_val_docs, n_bytes = n_docs + 1, n_val_docs + is_val, n_bytes + len(data)
    if n_docs == 0:
        raise CorpusError(f"corpus {corpus.describe()} holds no text documents")
    if n_val_docs in (0, n_docs):
        raise CorpusError(
            f"corpus {corpus.describe()} has {n_docs} documents, too few for a "
            f"document-level split with data.val_fraction={val_fraction}: "
            f"{n_docs - n_val_docs} train / {n_val_docs} val; add documents or change data.val_fraction"
        )
    if isinstance(tokenizer, TokenizerRecipe):
        train_docs = (data for _, data, is_val in _selected(corpus, val_fraction, max_bytes) if not is_val)
        tokenizer = tokenizer.fit(train_docs, train_content.hexdigest(), n_docs - n_val_docs, cache_dir)
    key = hashlib.sha256(f"v2 {val_fraction} {max_bytes} {tokenizer.name}".encode() + bytes(records))
    path = Path(cache_dir).expanduser() / "corpus" / key.hexdigest()[:20]
    dtype = str(token_dtype(tokenizer.vocab_size))

    def build() -> None:
        log.info("tokenising the corpus (%s) into %s", tokenizer.name, path)
        meta = {
            "source": corpus.describe(),
            "tokenizer": tokenizer.name,
            "dtype": dtype,
            "documents": n_docs,
            "val_documents": n_val_docs,
            "bytes": n_bytes,
            "val_fraction": val_fraction,
            "path": str(path),
        }
        _write(path, _selected(corpus, val_fraction, max_bytes), tokenizer, meta)

    return build_once(
        path,
        "corpus",
        problem=lambda: _problem(path, dtype),
        build=build,
        load=lambda: _open(path, tokenizer),
    )


def windows(tokens: np.ndarray, starts: np.ndarray | list[int], context: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-token targets, (n, t) each, of the windows starting at ``starts``."""
    rows = torch.from_numpy(np.stack([tokens[s : s + context + 1] for s in starts])).long()
    return rows[:, :-1], rows[:, 1:]


@lru_cache(maxsize=4)
def _epoch_order(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_windows)


def stream_windows(n_windows: int, seed: int, first: int, count: int) -> np.ndarray:
    """Window indices at positions [first, first + count) of the training stream.

    The stream visits the ``n_windows`` aligned windows of the train split in a seeded
    random order, a fresh order each epoch. It is a pure function of its arguments, so
    resuming at a step replays the same batches, and a soft-target cache (keyed by window)
    serves any stream whose windows it holds.
    """
    positions = np.arange(first, first + count)
    epochs, offsets = np.divmod(positions, n_windows)
    return np.array([_epoch_order(n_windows, seed, e)[o] for e, o in zip(epochs, offsets, strict=True)])


def needed_windows(n_windows: int, seed: int, count: int) -> np.ndarray:
    """The distinct window indices, sorted, at positions [0, count) of the training stream: the
    first ``count`` of the first epoch's order, or every window once the stream wraps."""
    if count >= n_windows:
        return np.arange(n_windows, dtype=np.int64)
    return np.sort(_epoch_order(n_windows, seed, 0)[:count]).astype(np.int64)


def n_train_windows(tokens: np.ndarray, context: int) -> int:
    n = (len(tokens) - 1) // context
    if n < 1:
        raise CorpusError(f"train split has {len(tokens)} tokens, fewer than model.context+1")
    return n


def train_batch(
    tokens: np.ndarray, *, context: int, seed: int, first: int, count: int
) -> tuple[Tensor, Tensor]:
    """The ``count`` windows at stream positions [first, first + count), as (inputs, targets)."""
    ids = stream_windows(n_train_windows(tokens, context), seed, first, count)
    return windows(tokens, ids * context, context)


def n_val_windows(tokens: np.ndarray, context: int, max_tokens: int) -> int:
    n = min((len(tokens) - 1) // context, max(1, max_tokens // context))
    if n < 1:
        raise CorpusError(f"validation split has {len(tokens)} tokens, fewer than model.context+1")
    return n


def val_batches(tokens: np.ndarray, *, batch_size: int, context: int, max_tokens: int):
    """The fixed validation set: consecutive non-overlapping windows from the start, in batches.

    Yields ``(first, inputs, targets)`` with ``first`` the index of the batch's first window.
    """
    n = n_val_windows(tokens, context, max_tokens)
    for first in range(0, n, batch_size):
        x, y = windows(tokens, [i * context for i in range(first, min(first + batch_size, n))], context)
        yield first, x, y
