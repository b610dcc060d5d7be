"""Memory slot ``engram``: conditional memory by hashed n-gram lookup (DeepSeek, "Engram", arXiv 2601.07372).

For each position t of the tokens x (positions before the first read ``PAD``), each order n = 2..N
and each hash head j = 1..K:
    z_{t,n,j} = (x_t·m_0 ⊕ x_{t−1}·m_1 ⊕ … ⊕ x_{t−n+1}·m_{n−1}) mod p_{n,j}     multiplicative-XOR hash
    e_t = [E_{n,j}[z_{t,n,j}]]_{n,j}                        concatenated rows, (N−1)·embed_dim wide
    s_t = ⟨RMSNorm(W_K e_t), RMSNorm(h_t)⟩ / sqrt(d),   α_t = σ(sgn(s_t)·sqrt|s_t|)   context-aware gate
    ṽ_t = α_t · W_V e_t
    out_t = ṽ_t + SiLU(Conv1D(RMSNorm(ṽ)))_t            depthwise causal conv, kernel 4, dilation N
h_t is the sublayer's (pre-normed) input; the core adds ``out`` to the residual stream before the
attention of each layer in ``layers`` (the demo puts Engram at layers 1 and 15 of 30).
The m_k are odd random multipliers below 2⁶³ / vocab (so every product fits in int64), the p_{n,j}
distinct primes ≥ ``table_size``; each head's table E_{n,j} has p_{n,j} rows of embed_dim / K.
Per token only the K·(N−1) looked-up rows are active: ``num_active_params`` counts those, and
``num_sparse_params`` the whole tables (the ``params/sparse`` metric).
Shapes: b batch, t tokens, s cached + t, d d_model, N max_ngram, K heads.

Departures from the reference (deepseek-ai/Engram ``engram_demo_v1.py`` @11a020e):
- No tokenizer compression (NFKC/lowercase canonical ids): archlab's byte vocabulary has little to merge.
  No hyper-connections (the demo's hc_mult = 4 branches): one residual stream, one gate.
- The multipliers are drawn from torch's RNG at build time (so under the run's seed, different per layer)
  and saved as a buffer, instead of numpy seeded with the layer id: a sublayer does not know its layer.
- The conv weights start at zero, so out = ṽ at init (the demo keeps nn.Conv1d's default init); the key
  and value projections have no bias (the demo's nn.Linear has one).
- Tables start at N(0, 0.02²) like archlab's token embedding, not nn.Embedding's N(0, 1) as in the demo:
  at std 1 the memory swamps the 0.02-scale residual stream at init. On the tiny model (150 steps,
  batch 8 × 128, ce, 2 CPU cores) std 0.02 reached 2.74 val bpb, std 1 3.25, no memory 3.19.
- Decoding keeps this module's token ids and conv inputs in the KVCache, d + 1 elements per token (what
  ``kv_cache_elems_per_token`` reports), though only the last N − 1 ids and (kernel_size − 1)·N conv
  inputs are read: a fixed-size window would do, the KVCache only grows.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.api import ConfigError, ForwardContext, ModelDims, RMSNorm

PAD = 0  # the id read before the first token (the byte tokenizer's end-of-document byte)


def next_primes(start: int, count: int) -> list[int]:
    """The ``count`` smallest primes ≥ ``start`` (distinct, ascending)."""
    primes, n = [], max(start, 2)
    while len(primes) < count:
        if all(n % f for f in range(2, math.isqrt(n) + 1)):
            primes.append(n)
        n += 1
    return primes


def ngram_hashes(tokens: Tensor, multipliers: Tensor, primes: Tensor) -> Tensor:
    """tokens (b, t) int64, multipliers (N,), primes (N−1, K) -> z (b, t, N−1, K), z[..., n−2, j] < p_{n,j}"""
    t, mix, out = tokens.shape[1], tokens * multipliers[0], []
    for k in range(1, multipliers.shape[0]):
        previous = F.pad(tokens, (k, 0), value=PAD)[:, :t]  # x_{t−k}
        mix = mix ^ previous * multipliers[k]
        out.append(mix[..., None] % primes[k - 1])  # order n = k + 1, every head
    return torch.stack(out, dim=-2)


def gate(key: Tensor, hidden: Tensor) -> Tensor:
    """α = σ(sgn(s)·sqrt|s|), s = ⟨key, hidden⟩ / sqrt(d) of already RMSNorm-ed (..., d) -> (..., 1).
    |s| is clamped at 1e-6 under the root (as the demo) so the gradient stays finite at s = 0."""
    s = (key * hidden).sum(-1, keepdim=True) / math.sqrt(key.shape[-1])
    return torch.sigmoid(s.sign() * s.abs().clamp_min(1e-6).sqrt())


class ShortConv(nn.Module):
    """y_t = SiLU(Σ_i w_i ⊙ u_{t−(k−1−i)·δ}), u = RMSNorm(v): depthwise causal conv, kernel k, dilation δ."""

    def __init__(self, dim: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.dilation = dilation
        self.norm = RMSNorm(RMSNorm.Config(), dim)
        self.weight = nn.Parameter(torch.zeros(dim, 1, kernel_size))  # zero: the branch starts silent

    def forward(self, v: Tensor, ctx: ForwardContext) -> Tensor:
        """v: (b, t, d) -> (b, t, d); with a cache, the previous inputs come from it."""
        u, t = self.norm(v), v.shape[1]
        window = (self.weight.shape[-1] - 1) * self.dilation
        if ctx.cache is not None:
            (u,) = ctx.cache.append(self, u)  # b s d
            u = u[:, -(t + window) :]
        u = F.pad(u.transpose(1, 2), (t + window - u.shape[1], 0))  # zeros before the first token
        y = F.conv1d(u, self.weight.to(u.dtype), dilation=self.dilation, groups=u.shape[1])
        return F.silu(y).transpose(1, 2)


class Engram(nn.Module):
    supports_kv_cache = True

    @dataclass
    class Config:
        layers: list[int] = field(default_factory=lambda: [1])  # memory before these layers' attention
        max_ngram: int = 3  # N: orders 2..N (demo: 3)
        heads: int = 4  # K hash heads per order (demo: 8)
        embed_dim: int = 64  # per order, split over the K heads (demo: 512)
        table_size: int | None = None  # rows per head, raised to distinct primes; null: 5 · vocab (demo)
        kernel_size: int = 4  # short conv (paper: 4), dilation N
        table_std: float = 0.02  # N(0, σ²) table init, as archlab's token embedding (demo: 1, see Departures)

        def validate(self, dims: ModelDims) -> None:
            for key in ("heads", "embed_dim", "kernel_size"):
                if getattr(self, key) < 1:
                    raise ConfigError(f"memory.{key}", getattr(self, key), "a positive integer")
            if self.max_ngram < 2:
                raise ConfigError("memory.max_ngram", self.max_ngram, "an integer ≥ 2 (bigrams and up)")
            if self.embed_dim % self.heads:
                allowed = f"a multiple of memory.heads={self.heads}"
                raise ConfigError("memory.embed_dim", self.embed_dim, allowed)
            if self.table_size is not None and self.table_size < 2:
                raise ConfigError("memory.table_size", self.table_size, "an integer ≥ 2, or null (5 · vocab)")
            if not self.table_std > 0:
                raise ConfigError("memory.table_std", self.table_std, "a positive number")

    def __init__(self, cfg: Config, dims: ModelDims, *, linear) -> None:
        super().__init__()
        d, orders = dims.d_model, cfg.max_ngram - 1
        primes = next_primes(cfg.table_size or 5 * dims.vocab_size, orders * cfg.heads)
        offsets = [0, *itertools.accumulate(primes)][:-1]  # each head's first row in the shared table
        self.register_buffer("primes", torch.tensor(primes).view(orders, cfg.heads), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets).view(orders, cfg.heads), persistent=False)
        half = (2**63 - 1) // dims.vocab_size // 2
        self.register_buffer("multipliers", 2 * torch.randint(0, half, (cfg.max_ngram,)) + 1)  # odd
        self.table = nn.Embedding(sum(primes), cfg.embed_dim // cfg.heads)
        nn.init.normal_(self.table.weight, std=cfg.table_std)
        self.key = linear(orders * cfg.embed_dim, d, role="memory.key")  # W_K
        self.value = linear(orders * cfg.embed_dim, d, role="memory.value")  # W_V
        self.key_norm = RMSNorm(RMSNorm.Config(), d)
        self.query_norm = RMSNorm(RMSNorm.Config(), d)
        self.conv = ShortConv(d, cfg.kernel_size, dilation=cfg.max_ngram)

    def lookup(self, tokens: Tensor, ctx: ForwardContext) -> Tensor:
        """e: the concatenated rows (b, t, (N−1)·embed_dim) of the n-grams ending at each new token."""
        t, history = tokens.shape[1], tokens
        if ctx.cache is not None:
            (history,) = ctx.cache.append(self, tokens[..., None])  # b s 1: the earlier tokens
            history = history[:, -(t + self.multipliers.shape[0] - 1) :, 0]
        z = ngram_hashes(history, self.multipliers, self.primes)[:, -t:]  # b t N−1 K
        return self.table(z + self.offsets).flatten(-3)

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        """x: (b, t, d) -> (b, t, d)"""
        e = self.lookup(ctx.tokens, ctx)
        v = gate(self.key_norm(self.key(e)), self.query_norm(x)) * self.value(e)
        return v + self.conv(v, ctx)

    def kv_cache_elems_per_token(self) -> int:
        """What the cache holds per token: its id and the conv's input, 1 + d."""
        return 1 + self.conv.weight.shape[0]

    def num_active_params(self) -> int:
        """Dense parameters plus the K·(N−1) table rows one token reads."""
        rows = self.primes.numel() * self.table.embedding_dim
        return sum(p.numel() for p in self.parameters()) - self.table.weight.numel() + rows

    def num_sparse_params(self) -> int:
        """The looked-up tables: Σ_{n,j} p_{n,j} · embed_dim / K."""
        return self.table.weight.numel()
