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
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from archlab.cachedir import Corrupt, build_once, check_file, make_tmp, publish, read_meta
from archlab.errors import ConfigError, CorpusError
from archlab.tokenizer import ByteTokenizer, Tokenizer, token_dtype

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


def _write(path: Path, tokens: dict[str, np.ndarray], meta: dict) -> None:
    tmp = make_tmp(path)
    meta["files"] = {}
    for split, array in tokens.items():
        data = array.astype(meta["dtype"]).tobytes()
        (tmp / f"{split}.bin").write_bytes(data)
        meta["files"][f"{split}.bin"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
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
    tokenizer: Tokenizer | None = None,
) -> TokenSplit:
    """Read ``corpus``, split it by document, tokenise and cache; reuse the cache when it exists."""
    tokenizer = tokenizer or ByteTokenizer()
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError("data.val_fraction", val_fraction, "a fraction strictly between 0 and 1")
    if max_bytes is not None and max_bytes < 1:
        raise ConfigError("data.max_bytes", max_bytes, "a positive number of bytes or null")
    key = hashlib.sha256(f"v2 {val_fraction} {max_bytes} {tokenizer.name}".encode())
    budget = {True: math.inf, False: math.inf}  # bytes still allowed into val (True) / train (False)
    if max_bytes is not None:
        budget = {True: val_fraction * max_bytes, False: (1 - val_fraction) * max_bytes}
    train, val, n_docs, n_val_docs = [], [], 0, 0
    for doc_id, data in corpus.documents():
        is_val = _is_val(doc_id, val_fraction)
        if budget[is_val] <= 0:
            if max(budget.values()) <= 0:
                break
            continue
        key.update(doc_id.encode() + b"\x00" + hashlib.sha256(data).digest())
        (val if is_val else train).append(data)
        budget[is_val] -= len(data) + 1
        n_docs, n_val_docs = n_docs + 1, n_val_docs + is_val
    if n_docs == 0:
        raise CorpusError(f"corpus {corpus.describe()} holds no text documents")
    if not val or not train:
        raise CorpusError(
            f"corpus {corpus.describe()} has {n_docs} documents, too few for a "
            f"document-level split with data.val_fraction={val_fraction}: "
            f"{len(train)} train / {len(val)} val; add documents or change data.val_fraction"
        )
    path = Path(cache_dir).expanduser() / "corpus" / key.hexdigest()[:20]
    dtype = str(token_dtype(tokenizer.vocab_size))

    def build() -> None:
        log.info("tokenising the corpus (%s) into %s", tokenizer.name, path)
        tokens = {"train": tokenizer.encode_documents(train), "val": tokenizer.encode_documents(val)}
        meta = {
            "source": corpus.describe(),
            "tokenizer": tokenizer.name,
            "dtype": dtype,
            "documents": n_docs,
            "val_documents": n_val_docs,
            "bytes": sum(map(len, train)) + sum(map(len, val)),
            "train_tokens": len(tokens["train"]),
            "val_tokens": len(tokens["val"]),
            "val_fraction": val_fraction,
            "path": str(path),
        }
        _write(path, tokens, meta)

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
    resuming at a step replays the same batches, and a soft-target cache built for the
    stream's first N positions serves every student with the same seed and context.
    """
    positions = np.arange(first, first + count)
    epochs, offsets = np.divmod(positions, n_windows)
    return np.array([_epoch_order(n_windows, seed, e)[o] for e, o in zip(epochs, offsets, strict=True)])


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
