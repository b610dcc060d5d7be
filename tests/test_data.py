"""Corpus plugins, the document-level split, the token cache and batching."""

from __future__ import annotations

import os

import numpy as np
import pytest

from archlab.baselines.corpus import FilesCorpus, StdlibCorpus
from archlab.data import _is_val, build_split, stream_windows, train_batch, val_batches
from archlab.errors import ConfigError, CorpusError
from archlab.tokenizer import EOD


def write_docs(root, n: int = 40) -> dict[str, bytes]:
    docs = {}
    for i in range(n):
        data = f"document {i}\n".encode() * (i + 1)
        (root / f"doc{i:02d}.txt").write_bytes(data)
        docs[f"doc{i:02d}.txt"] = data
    return docs


def test_stdlib_corpus_is_real_text_without_site_packages() -> None:
    corpus = StdlibCorpus(StdlibCorpus.Config())
    docs = list(corpus.documents())
    ids = [doc_id for doc_id, _ in docs]
    assert len(docs) > 500 and ids == sorted(ids)
    assert not any("site-packages" in doc_id for doc_id in ids)
    assert "os.py" in ids
    assert all(data and EOD not in data for _, data in docs)


def test_split_is_document_level_deterministic_and_cached(tmp_path) -> None:
    (tmp_path / "c").mkdir()
    docs = write_docs(tmp_path / "c")
    (tmp_path / "c" / "binary.bin").write_bytes(b"\x00\x01")  # skipped: not text
    corpus = FilesCorpus(FilesCorpus.Config(paths=[str(tmp_path / "c")]))
    split = build_split(corpus, val_fraction=0.25, max_bytes=None, cache_dir=tmp_path / "cache")
    val_ids = [i for i in sorted(docs) if _is_val(i, 0.25)]
    assert 0 < len(val_ids) < len(docs)
    # Files are read in sorted absolute-path order; ids are absolute paths.
    by_path = {str((tmp_path / "c" / i).resolve()): d for i, d in docs.items()}
    expected_val = b"".join(by_path[p] + EOD for p in sorted(by_path) if _is_val(p, 0.25))
    expected_train = b"".join(by_path[p] + EOD for p in sorted(by_path) if not _is_val(p, 0.25))
    assert bytes(split.val) == expected_val and bytes(split.train) == expected_train
    assert split.meta["documents"] == len(docs)
    assert "train" in split.report() and "val" in split.report()
    cached = os.stat(os.path.join(split.meta["path"], "train.bin")).st_mtime_ns
    again = build_split(corpus, val_fraction=0.25, max_bytes=None, cache_dir=tmp_path / "cache")
    assert again.meta["path"] == split.meta["path"]
    assert os.stat(os.path.join(again.meta["path"], "train.bin")).st_mtime_ns == cached
    (tmp_path / "c" / "doc00.txt").write_bytes(b"changed\n")
    changed = build_split(corpus, val_fraction=0.25, max_bytes=None, cache_dir=tmp_path / "cache")
    assert changed.meta["path"] != split.meta["path"]


def test_files_corpus_accepts_globs_and_single_files(tmp_path) -> None:
    write_docs(tmp_path, 3)
    assert len(list(FilesCorpus(FilesCorpus.Config(paths=[str(tmp_path / "*.txt")])).documents())) == 3
    one = FilesCorpus(FilesCorpus.Config(paths=[str(tmp_path / "doc01.txt")]))
    assert [d for _, d in one.documents()] == [b"document 1\n" * 2]


def test_bad_corpora_are_clear_errors(tmp_path) -> None:
    with pytest.raises(CorpusError, match="matches no file"):
        list(FilesCorpus(FilesCorpus.Config(paths=[str(tmp_path / "missing")])).documents())
    with pytest.raises(CorpusError, match="corpus.paths is empty"):
        FilesCorpus(FilesCorpus.Config(paths=[]))
    (tmp_path / "empty.txt").write_bytes(b"")
    empty = FilesCorpus(FilesCorpus.Config(paths=[str(tmp_path / "empty.txt")]))
    with pytest.raises(CorpusError, match="holds no text"):
        build_split(empty, val_fraction=0.1, max_bytes=None, cache_dir=tmp_path)
    (tmp_path / "one.txt").write_bytes(b"only one document")
    single = FilesCorpus(FilesCorpus.Config(paths=[str(tmp_path / "one.txt")]))
    with pytest.raises(CorpusError, match="too few for a document-level split"):
        build_split(single, val_fraction=0.1, max_bytes=None, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="data.val_fraction"):
        build_split(single, val_fraction=1.5, max_bytes=None, cache_dir=tmp_path)


def test_max_bytes_caps_the_corpus(tmp_path) -> None:
    split = build_split(
        StdlibCorpus(StdlibCorpus.Config()), val_fraction=0.05, max_bytes=300_000, cache_dir=tmp_path
    )
    total = split.meta["train_tokens"] + split.meta["val_tokens"]
    assert split.meta["val_documents"] > 0
    assert 300_000 <= total < 300_000 + 2_000_000  # each split stops after the document crossing its share


def test_the_training_stream_is_a_seeded_permutation_per_epoch() -> None:
    order = stream_windows(10, seed=1, first=0, count=30)
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert not np.array_equal(order[:10], order[10:20])  # a fresh order each epoch
    assert np.array_equal(stream_windows(10, seed=1, first=7, count=5), order[7:12])  # pure in its arguments
    assert not np.array_equal(stream_windows(10, seed=2, first=0, count=10), order[:10])


def test_batches_are_aligned_windows_of_the_stream() -> None:
    tokens = np.arange(1000, dtype=np.int64).astype(np.uint8)
    x, y = train_batch(tokens, context=8, seed=1, first=3, count=4)
    x2, _ = train_batch(tokens, context=8, seed=1, first=3, count=4)
    assert x.equal(x2)
    starts = stream_windows(124, seed=1, first=3, count=4) * 8
    assert x[:, 0].tolist() == [s % 256 for s in starts]
    assert x[:, 1:].equal(y[:, :-1])  # targets are the next tokens
    batches = list(val_batches(tokens, batch_size=3, context=8, max_tokens=80))
    assert [first for first, _, _ in batches] == [0, 3, 6, 9]
    assert sum(len(b[1]) for b in batches) == 10
    assert batches[0][1][1, 0] == 8  # consecutive non-overlapping windows
