"""Teacher ``ngram``: the corpus as teacher, an interpolated Kneser–Ney byte n-gram model.

    P_k(w | h) = max(c_k(hw) − D_k(c_k(hw)), 0) / Σ_v c_k(hv)  +  γ_k(h) · P_{k−1}(w | h⁻)
    γ_k(h)     = (D_k1·N1(h•) + D_k2·N2(h•) + D_k3·N3+(h•)) / Σ_v c_k(hv),        P_0(w) = 1/256
h is the k−1 latest bytes, h⁻ drops its oldest byte, N_j(h•) counts the bytes w with c_k(hw) = j.
c_k is the raw count at the top order and the continuation count N1+(•hw) (distinct left
neighbours) below it. A context never seen (Σ c_k = 0) passes P_{k−1} through unchanged, so
every byte keeps a probability > 0. Modified Kneser–Ney (Chen & Goodman 1998, "An empirical
study of smoothing techniques for language modeling"): three discounts per order and count
kind, from that level's count-of-counts n_j,
    Y = n1 / (n1 + 2·n2),    D_kj = j − (j+1)·Y·n_{j+1} / n_j    (j = 1, 2, 3 where 3 means 3+)
Departures and choices:
- A level whose estimate is undefined or leaves 0 < D_kj ≤ j uses KenLM's fallback (0.5, 1, 1.5).
- Position i of a window sees only i+1 bytes: while i+2 < order it is predicted by the
  order-(i+2) model (raw counts at order i+2), exactly what a KN model of that order predicts.
- The training split is one byte stream: n-grams span a document's NUL end, so a NUL in the
  context marks the start of a document.
Reference: none pinned; checked against a plain dict implementation in tests/test_teacher_ngram.py.
Shapes: b batch, t tokens, v vocabulary (256); n-grams are int64 codes, oldest byte highest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from archlab.errors import ConfigError
from archlab.teacher import TeacherEnv

VOCAB = 256
MAX_ORDER = 7  # an n-gram code of n bytes must fit an int64
KENLM_FALLBACK = (0.5, 1.0, 1.5)
ROWS_PER_CHUNK = 16384  # positions scored at once: bounds the (rows, 256) float64 work arrays


@dataclass
class _Level:
    """Interpolation weights of one order for one count kind (raw or continuation)."""

    alpha: np.ndarray  # float32 (entries,): max(c − D(c), 0) / Σ c over the entry's context
    gamma: np.ndarray  # float32 (contexts,): mass handed to the order below
    discounts: tuple[float, float, float]


@dataclass
class _Order:
    """All k-grams of the train stream for one order k, grouped by context (CSR)."""

    contexts: np.ndarray  # int64 (contexts,) sorted codes of the k−1 context bytes
    offsets: np.ndarray  # int64 (contexts+1,) entries of context j: offsets[j]:offsets[j+1]
    next_bytes: np.ndarray  # uint8 (entries,)
    raw: _Level  # raw counts: this order as the top order
    cont: _Level | None  # continuation counts: this order below a higher one (None at the top)


def gram_codes(tokens: np.ndarray, k: int) -> np.ndarray:
    """int64 code of the k-gram starting at every position (oldest byte in the highest bits)."""
    n = len(tokens) - k + 1
    codes = np.zeros(max(n, 0), dtype=np.int64)
    for j in range(k if n > 0 else 0):
        codes <<= 8
        codes |= tokens[j : j + n]
    return codes


def estimate_discounts(counts: np.ndarray) -> tuple[float, float, float]:
    """(D1, D2, D3+) from the count-of-counts of ``counts`` (Chen & Goodman), or KenLM's fallback."""
    n1, n2, n3, n4 = (int(np.count_nonzero(counts == j)) for j in (1, 2, 3, 4))
    if min(n1, n2, n3) == 0:
        return KENLM_FALLBACK
    y = n1 / (n1 + 2 * n2)
    d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    return d if all(0 < dj <= j for j, dj in enumerate(d, 1)) else KENLM_FALLBACK


def interpolation_level(counts: np.ndarray, offsets: np.ndarray) -> _Level:
    """Discounted probabilities per entry and back-off weight per context, from one count kind."""
    d = estimate_discounts(counts)
    discount = np.array((0.0, *d))[np.minimum(counts, 3)]  # D(0) = 0: a k-gram seen only at start
    total = np.add.reduceat(counts.astype(np.float64), offsets[:-1])
    seen = total > 0
    inv_total = np.divide(1.0, total, out=np.zeros_like(total), where=seen)
    per_entry = np.repeat(inv_total, np.diff(offsets))
    alpha = np.maximum(counts - discount, 0.0) * per_entry
    gamma = np.where(seen, np.add.reduceat(discount, offsets[:-1]) * inv_total, 1.0)
    # float32 halves the largest arrays; the interpolation itself runs in float64
    return _Level(alpha=alpha.astype(np.float32), gamma=gamma.astype(np.float32), discounts=d)


def group_by_context(grams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique contexts of sorted ``grams`` and CSR offsets into them."""
    ctx = grams >> 8
    starts = np.flatnonzero(np.concatenate(([True], ctx[1:] != ctx[:-1]))) if len(ctx) else np.zeros(0, int)
    return ctx[starts], np.append(starts, len(grams)).astype(np.int64)


def count_orders(tokens: np.ndarray, order: int, progress: bool) -> list[_Order]:
    """Tables for orders 1..order: one sort of the top-order n-grams, lower orders from suffixes.

    The k-grams at positions 1.. are the suffixes of the (k+1)-grams, so their raw counts are
    group sums, their continuation counts group sizes; the k-gram at position 0 adds one raw count.
    """
    codes = gram_codes(tokens, order)
    codes.sort()
    new = np.concatenate(([True], codes[1:] != codes[:-1])) if len(codes) else np.zeros(0, bool)
    grams = codes[new]
    raw = np.diff(np.append(np.flatnonzero(new), len(codes)))
    del codes, new
    tables, cont = [], None
    for k in tqdm(range(order, 0, -1), desc="ngram teacher", disable=not progress):
        if k < order:  # the suffixes of the (k+1)-grams, plus the k-gram at position 0
            grams, inverse = np.unique(grams & ((1 << 8 * k) - 1), return_inverse=True)
            raw = np.bincount(inverse, weights=raw, minlength=len(grams)).astype(np.int64)
            cont = np.bincount(inverse, minlength=len(grams))
            if len(tokens) >= k:
                first = int(gram_codes(tokens[:k], k)[0])
                j = int(np.searchsorted(grams, first))
                if j < len(grams) and grams[j] == first:
                    raw[j] += 1
                else:  # seen only at the very start: no left neighbour, continuation count 0
                    grams, raw, cont = np.insert(grams, j, first), np.insert(raw, j, 1), np.insert(cont, j, 0)
        contexts, offsets = group_by_context(grams)
        tables.append(
            _Order(
                contexts=contexts,
                offsets=offsets,
                next_bytes=(grams & 0xFF).astype(np.uint8),
                raw=interpolation_level(raw, offsets),
                cont=None if cont is None else interpolation_level(cont, offsets),
            )
        )
    return tables[::-1]


def interpolate(p: np.ndarray, rows: np.ndarray, ctx: np.ndarray, table: _Order, level: _Level) -> None:
    """In place: p[rows] = alpha(ctx, ·) + gamma(ctx) · p[rows]; unseen contexts keep p[rows]."""
    j = np.searchsorted(table.contexts, ctx)
    found = j < len(table.contexts)
    found[found] = table.contexts[j[found]] == ctx[found]
    gamma = np.ones(len(rows))
    gamma[found] = level.gamma[j[found]]
    p[rows] *= gamma[:, None]
    rows, j = rows[found], j[found]
    start, length = table.offsets[j], table.offsets[j + 1] - table.offsets[j]
    row_of_entry = np.repeat(rows, length)
    entry = np.arange(length.sum()) + np.repeat(start - (np.cumsum(length) - length), length)
    p[row_of_entry, table.next_bytes[entry]] += level.alpha[entry]  # (row, byte) pairs are unique


class NGramTeacher:
    """Interpolated modified Kneser–Ney byte n-gram model of ``env.train_tokens``."""

    @dataclass
    class Config:
        order: int = 5  # n: predict each byte from the n−1 bytes before it

    def __init__(self, cfg: Config, env: TeacherEnv) -> None:
        order = cfg.order
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_ORDER:
            raise ConfigError("teacher.order", order, f"an integer from 1 to {MAX_ORDER}")
        if env.vocab_size != VOCAB:
            allowed = f"{VOCAB}: the ngram teacher reads bytes (tokenizer=bytes); "
            allowed += "with tokenizer=bpe use teacher=trained, teacher=self or teacher=none"
            raise ConfigError("model.vocab_size", env.vocab_size, allowed)
        self.cfg, self.env = cfg, env
        self.order = order
        self.vocab_size = VOCAB
        self.tables: list[_Order] | None = None

    def identity(self) -> dict:
        return {
            "plugin": "ngram",
            "version": 1,
            "config": dataclasses.asdict(self.cfg),
            "corpus": self.env.corpus_key,
        }

    def prepare(self) -> None:
        """Count the train split's n-grams (seconds: one sort of the top order); idempotent."""
        if self.tables is None:
            self.tables = count_orders(np.asarray(self.env.train_tokens), self.order, self.env.progress)

    def log_probs(self, tokens: Tensor) -> Tensor:
        """tokens: (b, t) -> (b, t, v) float32 log P(next byte | bytes ≤ i of its row)."""
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= VOCAB):
            raise ValueError(f"ngram teacher reads bytes: token ids must lie in [0, {VOCAB})")
        self.prepare()
        x = tokens.detach().cpu().numpy().astype(np.int64)  # b t
        step = max(1, ROWS_PER_CHUNK // max(1, x.shape[1]))
        chunks = [self._probs(x[i : i + step]) for i in range(0, x.shape[0], step)]
        out = np.concatenate(chunks) if chunks else np.zeros((*x.shape, VOCAB))
        return torch.from_numpy(np.log(out).astype(np.float32)).to(tokens.device)

    def _probs(self, x: np.ndarray) -> np.ndarray:
        """x: (b, t) int64 -> (b, t, v) float64 probabilities; orders interpolated from 1 upwards."""
        b, t = x.shape
        p = np.full((b * t, VOCAB), 1.0 / VOCAB)  # (b t) v
        pos = np.tile(np.arange(t), b)
        top = np.minimum(self.order, pos + 2)  # position i sees i+1 bytes
        ctx = np.zeros((b, t), dtype=np.int64)  # the k−1 latest bytes up to position i
        for k, table in enumerate(self.tables, 1):
            if k >= 2:  # add the oldest byte of the longer context (valid from position k−2)
                ctx[:, k - 2 :] |= x[:, : t - k + 2] << (8 * (k - 2))
            flat = ctx.reshape(-1)
            for rows, level in (
                (np.flatnonzero(top == k), table.raw),
                (np.flatnonzero(top > k), table.cont),
            ):
                if len(rows):
                    interpolate(p, rows, flat[rows], table, level)
        return p.reshape(b, t, VOCAB)
