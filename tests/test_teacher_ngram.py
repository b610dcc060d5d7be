"""Teacher ``ngram``: interpolated modified Kneser–Ney against a plain dict implementation.

Run: ``pytest tests/test_teacher_ngram.py`` (CPU, a few seconds). The reference below is the
textbook recursion written with Counters and no vectorisation; the plugin must match it on
every one of the 256 probabilities at every position.
"""

from __future__ import annotations

import json
import math
import random
import sysconfig
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from archlab import registry
from archlab.data import TokenSplit
from archlab.errors import ConfigError
from archlab.teacher import TeacherEnv
from archlab.teachers.ngram import NGramTeacher


def make_env(text: bytes, tmp_path: Path, vocab_size: int = 256) -> TeacherEnv:
    tokens = np.frombuffer(text, dtype=np.uint8)
    return TeacherEnv(
        split=TokenSplit(train=tokens, val=tokens, meta={"path": str(tmp_path / "test")}),
        vocab_size=vocab_size,
        context=64,
        cache_dir=tmp_path,
        device=torch.device("cpu"),
        progress=False,
    )


def teacher(text: bytes, order: int, tmp_path: Path) -> NGramTeacher:
    t = NGramTeacher(NGramTeacher.Config(order=order), make_env(text, tmp_path))
    t.prepare()
    return t


def tiny_corpus(n_bytes: int = 400, seed: int = 0, start: bytes = b"") -> bytes:
    """Words over a small alphabet after ``start``, documents ended by NUL like the real splits."""
    rng = random.Random(seed)
    words = ["ab", "abc", "ba", "cab", "bead", "dead", "a", "cede", "ebb"]
    out = start
    while len(out) < n_bytes:
        doc = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        out += doc.encode() + rng.choice([b"\n", b"\x00"])
    return out


def reference_kn(text: bytes, order: int):
    """Interpolated modified KN, written plainly: ``dist(history) -> [P(w | history) for w]``."""
    raw = {k: Counter(text[i : i + k] for i in range(len(text) - k + 1)) for k in range(1, order + 1)}
    # continuation count of a k-gram: how many distinct bytes precede it in the text
    cont = {k: Counter(g[1:] for g in raw[k + 1]) for k in range(1, order)}

    @cache
    def discounts(k: int, kind: str) -> tuple[float, float, float]:
        counts = list((raw if kind == "raw" else cont)[k].values())
        n = [sum(1 for c in counts if c == j) for j in range(5)]
        if n[1] == 0 or n[2] == 0 or n[3] == 0:
            return (0.5, 1.0, 1.5)  # KenLM's --discount_fallback
        y = n[1] / (n[1] + 2 * n[2])
        d = (1 - 2 * y * n[2] / n[1], 2 - 3 * y * n[3] / n[2], 3 - 4 * y * n[4] / n[3])
        ok = 0 < d[0] <= 1 and 0 < d[1] <= 2 and 0 < d[2] <= 3
        return d if ok else (0.5, 1.0, 1.5)

    def discount(k: int, kind: str, c: int) -> float:
        return 0.0 if c == 0 else discounts(k, kind)[min(c, 3) - 1]

    @cache
    def followers(k: int, kind: str, h: bytes) -> dict[int, int]:
        table = (raw if kind == "raw" else cont)[k]
        return {g[-1]: c for g, c in table.items() if g[:-1] == h}

    def prob(w: int, h: bytes, k: int, top: int) -> float:
        if k == 0:
            return 1 / 256
        lower = prob(w, h[1:], k - 1, top)
        kind = "raw" if k == top else "cont"
        seen = followers(k, kind, h)
        total = sum(seen.values())
        if total == 0:
            return lower
        gamma = sum(discount(k, kind, c) for c in seen.values()) / total
        c = seen.get(w, 0)
        return max(c - discount(k, kind, c), 0) / total + gamma * lower

    def dist(history: bytes) -> list[float]:
        top = min(order, len(history) + 1)
        h = history[len(history) - top + 1 :]
        return [prob(w, h, top, top) for w in range(256)]

    return dist


# "#" occurs only at the start: k-grams with no left neighbour (continuation count 0)
@pytest.mark.parametrize("start", [b"", b"#"])
def test_matches_reference(tmp_path, start):
    text = tiny_corpus(start=start)
    rows = [r[:20] for r in (b"ab cab dead ebb\x00a bead", b"\x00zzab\xffcede ba ab dead", text[100:])]
    tokens = torch.tensor([list(r) for r in rows])
    for order in (1, 2, 3, 4):
        got = teacher(text, order, tmp_path).log_probs(tokens).exp().double()
        dist = reference_kn(text, order)
        want = torch.tensor([[dist(r[: i + 1]) for i in range(len(r))] for r in rows], dtype=torch.float64)
        diff = (got - want).abs()
        assert diff.max() < 1e-6, f"order {order}: max diff {diff.max():.2e}, mean {diff.mean():.2e}"


def test_modified_discounts_used(tmp_path):
    """The tiny corpus must exercise Chen & Goodman's estimate, not only the fallback."""
    t = teacher(tiny_corpus(), 3, tmp_path)
    assert any(o.raw.discounts != (0.5, 1.0, 1.5) for o in t.tables)


@pytest.mark.parametrize("order", [1, 3, 5])
def test_distributions_normalised_and_positive(tmp_path, order):
    t = teacher(tiny_corpus(), order, tmp_path)
    rng = torch.Generator().manual_seed(0)
    tokens = torch.cat([torch.randint(0, 256, (3, 40), generator=rng), torch.zeros(1, 40, dtype=torch.long)])
    lp = t.log_probs(tokens)
    assert lp.shape == (4, 40, 256) and lp.dtype == torch.float32
    assert torch.isfinite(lp).all()  # every byte > 0, also unseen contexts and position 0
    assert torch.allclose(lp.double().exp().sum(-1), torch.ones(4, 40, dtype=torch.float64), atol=1e-5)


def test_causal(tmp_path):
    t = teacher(tiny_corpus(), 4, tmp_path)
    text = tiny_corpus(seed=1)
    base = torch.tensor([list(text[:30])])
    before = t.log_probs(base)
    for i in (0, 5, 28):
        changed = base.clone()
        changed[0, i + 1 :] = torch.tensor(list(text[60 : 60 + 29 - i]))
        after = t.log_probs(changed)
        assert torch.equal(before[:, : i + 1], after[:, : i + 1]), f"output at ≤ {i} changed after token {i}"


def test_batch_invariance(tmp_path):
    t = teacher(tiny_corpus(), 3, tmp_path)
    tokens = torch.tensor([list(tiny_corpus(seed=s)[:25]) for s in (1, 2, 3)])
    batch = t.log_probs(tokens)
    for i in range(3):
        assert torch.equal(t.log_probs(tokens[i : i + 1])[0], batch[i])


def bits_per_byte(t: NGramTeacher, text: bytes, window: int = 64) -> float:
    n = (len(text) - 1) // window
    x = torch.tensor(np.frombuffer(text[: n * window + 1], dtype=np.uint8).astype(np.int64))
    inputs = torch.stack([x[i * window : (i + 1) * window] for i in range(n)])
    targets = torch.stack([x[i * window + 1 : (i + 1) * window + 1] for i in range(n)])
    nll = -t.log_probs(inputs).gather(-1, targets[..., None]).mean().item()
    return nll / math.log(2)


def test_beats_lower_orders_on_held_out_text(tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train = b"\x00".join((stdlib / f).read_bytes()[:60_000] for f in ("argparse.py", "textwrap.py", "csv.py"))
    held_out = (stdlib / "shlex.py").read_bytes()[:8_000]
    bpb = {n: bits_per_byte(teacher(train, n, tmp_path), held_out) for n in (1, 2, 4)}
    assert bpb[4] < bpb[2] - 0.5 and bpb[2] < bpb[1] - 0.5, bpb


def test_config_errors_name_the_key(tmp_path):
    env = make_env(b"abc", tmp_path)
    for bad in (0, 8, -1, 2.5, True):
        with pytest.raises(ConfigError, match=r"teacher\.order"):
            NGramTeacher(NGramTeacher.Config(order=bad), env)
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        NGramTeacher(NGramTeacher.Config(), make_env(b"abc", tmp_path, vocab_size=512))


def test_identity_and_prepare_idempotent(tmp_path):
    t = teacher(b"abcabd\x00", 2, tmp_path)
    tables = t.tables
    t.prepare()
    assert t.tables is tables
    assert json.loads(json.dumps(t.identity())) == {
        "plugin": "ngram",
        "version": 1,
        "config": {"order": 2},
        "corpus": "test",
    }
    assert t.vocab_size == 256


def test_discovery():
    assert registry.get("teacher", "ngram") is NGramTeacher
