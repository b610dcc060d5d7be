"""Tokenizers turn documents into the token stream; bytes by default (vocab 256).

A tokenizer offers ``name`` (keys the corpus cache), ``vocab_size``,
``encode_documents(docs: list[bytes]) -> np.ndarray`` (each document followed by an
end-of-document token), ``encode(text)``/``decode(ids)`` for prompts and generations,
and ``count_bytes(ids) -> int`` (the UTF-8 bytes a run of
target tokens stands for, so bits-per-byte stays comparable across tokenizers). A
teacher plugin with its own vocabulary offers one through ``tokenizer(cfg)`` (see
``archlab.teacher``); the corpus is then tokenised with it. ``tokenizer=bpe`` learns one
on the training split (a ``TokenizerRecipe``, ``archlab.bpe``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

EOD = b"\x00"


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode_documents(self, docs: list[bytes]) -> np.ndarray: ...

    def count_bytes(self, ids: np.ndarray) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@runtime_checkable
class TokenizerRecipe(Protocol):
    """A tokenizer still to be learnt from the training split (``tokenizer=bpe``, ``archlab.bpe``).

    ``fit`` receives the train split's documents (an iterable, read once), ``digest`` (a hash of their
    content, to key a cache of the result) and their number, and returns the learnt ``Tokenizer``.
    """

    name: str

    def fit(self, train_docs: Iterable[bytes], digest: str, n_docs: int, cache_dir: Path) -> Tokenizer: ...


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every token id."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary of {vocab_size} tokens is too large")


class ByteTokenizer:
    """Bytes are tokens; NUL (0, absent from text corpora) ends each document and counts as one byte."""

    name = "bytes"
    vocab_size = 256

    def encode_documents(self, docs: list[bytes]) -> np.ndarray:
        return np.frombuffer(b"".join(doc + EOD for doc in docs), dtype=np.uint8)

    def count_bytes(self, ids: np.ndarray) -> int:
        return int(np.asarray(ids).size)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")
