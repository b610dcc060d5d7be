"""``tokenizer=bpe``: a byte-level BPE learnt on the training split with Hugging Face ``tokenizers``.

Byte-pair encoding (Sennrich, Haddow & Birch 2016, "Neural Machine Translation of Rare Words with
Subword Units") over UTF-8 bytes, as GPT-2 does it (Radford et al. 2019): the base alphabet is the
256 bytes, each shown as one printable character (``ByteLevel.alphabet()``), so every text encodes
and no token is unknown. Id 0 is ``<|endoftext|>``, which ends each document, as NUL does for bytes.

Bits per byte stay comparable with ``tokenizer=bytes``: a token stands for as many UTF-8 bytes as
its string has alphabet characters, and ``<|endoftext|>`` for one (the NUL it replaces), so a
BPE whose vocabulary is the bytes alone counts exactly what the byte tokenizer counts. A document
that is not valid UTF-8 is read with U+FFFD for its bad bytes (the library encodes text, not bytes).

A trained tokenizer is cached under ``<data.cache_dir>/bpe/<key>/tokenizer.json``, next to the
corpus cache, keyed by the training documents' hashes and the trainer's settings; the corpus
cache is keyed by the tokenizer file's hash, so ``tokenizer.path=`` that file reuses it.
Requires the ``hf`` extra: ``pip install 'archlab[hf]'``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from archlab.cachedir import build_once, check_file, make_tmp, publish, read_meta
from archlab.errors import ConfigError, optional_module
from archlab.tokenizer import token_dtype

EOD_TOKEN = "<|endoftext|>"
MIN_VOCAB = 257  # the 256 bytes and <|endoftext|>
ENCODE_BATCH = 1024  # documents per encode_batch call (the library spreads a batch over threads)


def _tokenizers():
    return optional_module("tokenizers", "tokenizer", "bpe", "hf")


def _texts(docs: list[bytes]) -> list[str]:
    return [doc.decode("utf-8", errors="replace") for doc in docs]


@dataclass
class BPETokenizerConfig:
    """``tokenizer=bpe``: learnt on the training split, or read from ``path`` (a ``tokenizer.json``)."""

    kind: str = "bpe"
    vocab_size: int = 4096  # at most this many tokens (fewer when the corpus has fewer merges)
    min_frequency: int = 2  # a pair merges only if it occurs this often
    path: str | None = None  # a byte-level BPE tokenizer.json to use instead of training one

    def validate(self) -> None:
        if isinstance(self.vocab_size, bool) or self.vocab_size < MIN_VOCAB:
            raise ConfigError("tokenizer.vocab_size", self.vocab_size, f"an integer >= {MIN_VOCAB}")
        if self.min_frequency < 1:
            raise ConfigError("tokenizer.min_frequency", self.min_frequency, "a positive integer")
        if self.path is not None and not Path(self.path).expanduser().is_file():
            raise ConfigError("tokenizer.path", self.path, "an existing tokenizer.json file, or null")


class BPETokenizer:
    """A byte-level BPE ``tokenizer.json`` as an archlab ``Tokenizer`` (see ``archlab.tokenizer``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser().resolve()
        text = self.path.read_bytes()
        try:
            self.tok = _tokenizers().Tokenizer.from_str(text.decode("utf-8"))
            decoder = (json.loads(text).get("decoder") or {}).get("type")
        except Exception as exc:  # noqa: BLE001 - the library raises a bare Exception for a bad file
            raise ConfigError("tokenizer.path", str(path), f"a tokenizer.json file ({exc})") from None
        self.eod = self.tok.token_to_id(EOD_TOKEN)
        if decoder != "ByteLevel" or self.eod is None:
            allowed = f"a byte-level BPE tokenizer.json with the {EOD_TOKEN} token (as tokenizer=bpe writes)"
            raise ConfigError("tokenizer.path", str(path), allowed)
        self.tok.encode_special_tokens = True  # "<|endoftext|>" inside a document is text, not its end
        self.vocab_size = self.tok.get_vocab_size()
        self.name = f"bpe:{hashlib.sha256(text).hexdigest()[:16]}"
        self.token_bytes = self._token_bytes()

    def _token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for: one per alphabet character; added tokens their text's."""
        alphabet = set(_tokenizers().pre_tokenizers.ByteLevel.alphabet())
        added = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self.tok.get_vocab(with_added_tokens=True).items():
            if token in added:
                counts[i] = len(token.encode("utf-8"))
            elif not set(token) <= alphabet:
                allowed = "a byte-level BPE tokenizer.json (tokens spelt in ByteLevel.alphabet())"
                raise ConfigError("tokenizer.path", str(self.path), allowed)
            else:
                counts[i] = len(token)
        counts[self.eod] = 1  # the end of a document counts as the NUL byte it replaces
        return counts

    def encode_documents(self, docs: list[bytes]) -> np.ndarray:
        ids: list[int] = []
        batches = range(0, len(docs), ENCODE_BATCH)
        for first in tqdm(batches, desc="bpe", unit="batch", leave=False, disable=len(batches) < 2):
            for encoded in self.tok.encode_batch(_texts(docs[first : first + ENCODE_BATCH])):
                ids += [*encoded.ids, self.eod]
        return np.asarray(ids, dtype=token_dtype(self.vocab_size))

    def count_bytes(self, ids: np.ndarray) -> int:
        return int(self.token_bytes[np.asarray(ids, dtype=np.int64)].sum())

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def train_bpe(docs, vocab_size: int, min_frequency: int, n_docs: int | None = None):
    """A byte-level BPE ``tokenizers.Tokenizer`` learnt on ``docs`` (an iterable of bytes)."""
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN],  # first: id 0
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (doc.decode("utf-8", errors="replace") for doc in docs)
    tok.train_from_iterator(tqdm(texts, desc="training bpe", unit="doc", total=n_docs, leave=False), trainer)
    return tok


@dataclass
class BPERecipe:
    """A BPE still to be learnt: ``fit`` trains it on the training split (or finds it cached)."""

    cfg: BPETokenizerConfig

    @property
    def name(self) -> str:
        return f"bpe-recipe:{self.cfg.vocab_size}:{self.cfg.min_frequency}"

    def fit(self, train_docs, digest: str, n_docs: int, cache_dir: Path) -> BPETokenizer:
        """The tokenizer learnt on ``train_docs`` (iterable), whose content ``digest`` keys its cache."""
        c = self.cfg
        key = hashlib.sha256(f"bpe v1 {c.vocab_size} {c.min_frequency} {digest}".encode()).hexdigest()
        path = Path(cache_dir).expanduser() / "bpe" / key[:20]
        schema = {"vocab_size": (int,), "tokenizer.json": (dict,)}

        def problem() -> str | None:
            if not path.exists():
                return "not trained yet"
            record = read_meta(path, schema)["tokenizer.json"]
            check_file(path / "tokenizer.json", record.get("size", -1), record.get("sha256", ""))
            return None

        def build() -> None:
            tmp = make_tmp(path)
            data = train_bpe(train_docs, c.vocab_size, c.min_frequency, n_docs).to_str().encode()
            (tmp / "tokenizer.json").write_bytes(data)
            record = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            meta = {"vocab_size": c.vocab_size, "min_frequency": c.min_frequency, "tokenizer.json": record}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            publish(tmp, path)

        return build_once(
            path,
            "bpe tokenizer",
            problem=problem,
            build=build,
            load=lambda: BPETokenizer(path / "tokenizer.json"),
        )


def from_config(cfg: BPETokenizerConfig) -> BPETokenizer | BPERecipe:
    """The tokenizer at ``cfg.path``, or the recipe that learns one."""
    cfg.validate()
    return BPETokenizer(Path(cfg.path)) if cfg.path else BPERecipe(cfg)
