"""The soft-target cache: contents equal the teacher's top-k, built once, verified, rebuilt when damaged."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from archlab.data import TokenSplit, stream_windows, windows
from archlab.errors import ArchlabError
from archlab.soft_targets import TargetRequest, build_or_load, top_k_targets


class BigramTeacher:
    """A fixed random bigram model: next-byte log-probs depend on the current byte only."""

    vocab_size = 256

    def __init__(self) -> None:
        self.table = torch.log_softmax(torch.randn(256, 256, generator=torch.Generator().manual_seed(0)), -1)
        self.prepared = 0

    def identity(self) -> dict:
        return {"plugin": "bigram-test"}

    def prepare(self) -> None:
        self.prepared += 1

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens]


def token_split(train: np.ndarray, val: np.ndarray, path: str) -> TokenSplit:
    """A split of in-memory tokens with the meta of a corpus cache (its files' checksums)."""
    files = {
        f"{k}.bin": {"sha256": hashlib.sha256(v.tobytes()).hexdigest()}
        for k, v in (("train", train), ("val", val))
    }
    return TokenSplit(train, val, {"path": path, "dtype": str(train.dtype), "files": files})


@pytest.fixture
def split(tmp_path) -> TokenSplit:
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 256, 5000, dtype=np.uint8), rng.integers(0, 256, 1000, dtype=np.uint8)
    return token_split(train, val, str(tmp_path / "corpus-key"))


REQ = TargetRequest(
    context=16, top_k=8, temperature=2.0, seed=3, train_windows=20, val_windows=5, batch_size=6
)


def test_rows_are_the_teachers_tempered_top_k_of_the_stream(split, tmp_path) -> None:
    teacher = BigramTeacher()
    cache = build_or_load(teacher, split, REQ, tmp_path, progress=False)
    first, count = 7, 4
    x, y = windows(split.train, stream_windows((5000 - 1) // 16, 3, first, count) * 16, 16)
    tempered = torch.log_softmax(teacher.table[x] / 2.0, -1)
    values, ids = tempered.topk(8, dim=-1)
    got = cache.train(first, count)
    assert got.ids.equal(ids)
    torch.testing.assert_close(got.logprobs, values, atol=2e-3, rtol=1e-3)  # stored as float16
    assert torch.all(got.tail > 0) and torch.all(got.tail < 1)
    # the teacher's own held-out bpb, at temperature 1
    xv, yv = windows(split.val, [i * 16 for i in range(5)], 16)
    nats = -teacher.table[xv].gather(-1, yv[..., None]).sum()
    assert cache.meta["teacher_val_bpb"] == pytest.approx(float(nats) / (5 * 16) / math.log(2), rel=1e-5)
    with pytest.raises(ArchlabError, match="covers 20 training windows"):
        cache.train(18, 4)


def test_found_not_rebuilt_and_damage_is_detected(split, tmp_path) -> None:
    teacher = BigramTeacher()
    cache = build_or_load(teacher, split, REQ, tmp_path, progress=False)
    build_or_load(teacher, split, REQ, tmp_path, progress=False)
    assert teacher.prepared == 1
    ids_file = cache.path / "train_ids.bin"
    ids_file.write_bytes(ids_file.read_bytes()[:-10])  # truncated
    build_or_load(teacher, split, REQ, tmp_path, progress=False)
    assert teacher.prepared == 2
    data = bytearray((cache.path / "val_logprobs.bin").read_bytes())
    data[5] ^= 0xFF  # same size, wrong content
    (cache.path / "val_logprobs.bin").write_bytes(bytes(data))
    rebuilt = build_or_load(teacher, split, REQ, tmp_path, progress=False)
    assert teacher.prepared == 3
    assert rebuilt.val(0, 5).logprobs.isfinite().all()


def test_a_longer_run_extends_and_a_foreign_cache_is_refused(split, tmp_path) -> None:
    teacher = BigramTeacher()
    cache = build_or_load(teacher, split, REQ, tmp_path, progress=False)
    longer = TargetRequest(**{**REQ.__dict__, "train_windows": 40})
    assert build_or_load(teacher, split, longer, tmp_path, progress=False).meta["train_windows"] == 40
    assert teacher.prepared == 2
    meta = json.loads((cache.path / "meta.json").read_text())
    meta["temperature"] = 1.0  # as if copied over from a cache built at another temperature
    (cache.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArchlabError, match="built with temperature=1.0, this run asks for 2.0"):
        build_or_load(teacher, split, REQ, tmp_path, progress=False)


def test_k_and_temperature_key_separate_caches(split, tmp_path) -> None:
    teacher = BigramTeacher()
    a = build_or_load(teacher, split, REQ, tmp_path, progress=False)
    b = build_or_load(teacher, split, TargetRequest(**{**REQ.__dict__, "top_k": 4}), tmp_path, progress=False)
    c = build_or_load(teacher, split, TargetRequest(**{**REQ.__dict__, "temperature": 1.0}), tmp_path, False)
    assert len({a.path, b.path, c.path}) == 3
    assert b.train(0, 1).ids.shape[-1] == 4


@pytest.mark.parametrize("chunk_rows", [1, 7, 33, 0])  # row by row, ragged, one chunk, the default
def test_chunked_top_k_equals_the_full_vocabulary_top_k(chunk_rows) -> None:
    gen = torch.Generator().manual_seed(1)
    logprobs = torch.log_softmax(3 * torch.randn(3, 11, 5000, generator=gen), -1)  # a 5000-token vocabulary
    targets = torch.randint(0, 5000, (3, 11), generator=gen)
    top, nats = top_k_targets(logprobs, targets, 0.7, 16, chunk_rows)
    # the path before chunking: the whole distribution tempered, then torch.topk over the vocabulary
    values, ids = torch.log_softmax(logprobs / 0.7, dim=-1).topk(16, dim=-1)
    assert top.ids.equal(ids) and top.logprobs.equal(values)
    assert nats == -float(logprobs.gather(-1, targets[..., None]).sum())
