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
        self.windows = 0  # scored so far

    def identity(self) -> dict:
        return {"plugin": "bigram-test"}

    def prepare(self) -> None:
        self.prepared += 1

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        self.windows += len(tokens)
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
    assert cache.teacher_val_bpb == pytest.approx(float(nats) / (5 * 16) / math.log(2), rel=1e-5)
    with pytest.raises(ArchlabError, match="no targets for training window .* position 20 of seed 3"):
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
    assert teacher.windows == 20 + 6  # the validation windows in a whole build batch
    longer = build_or_load(
        teacher, split, TargetRequest(**{**REQ.__dict__, "train_windows": 40}), tmp_path, False
    )
    assert longer.path == cache.path and longer.meta["train_rows"] == 40
    assert teacher.windows == 26 + 20  # only the 20 new windows were scored
    assert longer.train(0, 40).ids.equal(fresh(split, tmp_path, 40).train(0, 40).ids)
    build_or_load(teacher, split, REQ, tmp_path, progress=False)  # the shorter run again: nothing to build
    assert (teacher.prepared, teacher.windows) == (2, 46)
    meta = json.loads((cache.path / "meta.json").read_text())
    meta["temperature"] = 1.0  # as if copied over from a cache built at another temperature
    (cache.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArchlabError, match="built with temperature=1.0, this run asks for 2.0"):
        build_or_load(teacher, split, REQ, tmp_path, progress=False)


def fresh(split: TokenSplit, tmp_path, train_windows: int, val_windows: int = 5, seed: int = 3):
    """A cache built from nothing, in a directory of its own, for the stream of ``seed``."""
    req = TargetRequest(
        **{**REQ.__dict__, "train_windows": train_windows, "val_windows": val_windows, "seed": seed}
    )
    return build_or_load(
        BigramTeacher(), split, req, tmp_path / f"fresh-{train_windows}-{val_windows}-{seed}", False
    )


def test_rows_are_keyed_by_window_so_any_seed_or_epoch_reuses_them(split, tmp_path) -> None:
    teacher, n = BigramTeacher(), (5000 - 1) // 16
    a = build_or_load(teacher, split, REQ, tmp_path, progress=False)
    other_seed = TargetRequest(**{**REQ.__dict__, "seed": 4})
    b = build_or_load(teacher, split, other_seed, tmp_path, progress=False)
    shared = np.intersect1d(stream_windows(n, 3, 0, 20), stream_windows(n, 4, 0, 20))
    assert b.path == a.path and b.meta["train_rows"] == 40 - len(shared)
    assert teacher.windows == 26 + 20 - len(shared)  # seed 4's windows that seed 3 had were not rescored
    assert b.train(0, 20).ids.equal(fresh(split, tmp_path, 20, seed=4).train(0, 20).ids)
    teacher.windows = 0
    every = build_or_load(
        teacher, split, TargetRequest(**{**REQ.__dict__, "train_windows": 2 * n}), tmp_path, False
    )
    assert every.meta["train_rows"] == n and teacher.windows == n - b.meta["train_rows"]
    # the second epoch's order differs from the first, and every position finds its window
    assert every.train(n, 20).ids.equal(fresh(split, tmp_path, 2 * n).train(n, 20).ids)
    for seed in (3, 4, 9):
        build_or_load(teacher, split, TargetRequest(**{**REQ.__dict__, "seed": seed}), tmp_path, False)
    assert teacher.windows == n - b.meta["train_rows"]  # nothing more was scored


@pytest.mark.parametrize(("before", "then"), [(11, 3), (3, 11), (5, 5)])
def test_the_teachers_val_bpb_does_not_depend_on_what_was_cached_before(
    split, tmp_path, before, then
) -> None:
    teacher = BigramTeacher()
    build_or_load(teacher, split, TargetRequest(**{**REQ.__dict__, "val_windows": before}), tmp_path, False)
    after = build_or_load(
        teacher, split, TargetRequest(**{**REQ.__dict__, "val_windows": then}), tmp_path, False
    )
    assert after.teacher_val_bpb == fresh(split, tmp_path, 20, then).teacher_val_bpb  # exactly
    xv, yv = windows(split.val, [i * 16 for i in range(then)], 16)
    nats = -teacher.table[xv].gather(-1, yv[..., None]).double().sum()
    assert after.teacher_val_bpb == pytest.approx(float(nats) / (then * 16) / math.log(2), rel=1e-12)


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
    assert nats.equal(-logprobs.gather(-1, targets[..., None])[..., 0].double().sum(1))
