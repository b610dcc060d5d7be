"""Speculative decoding with draft heads: exact greedy tree verification and exact speculative sampling.

A head that drafts (the ``DraftHeads`` capability, e.g. ``head=medusa``) defines ``num_draft_heads``
(K) and ``draft_logits(h) -> (b, t, K, V)``: at position t, draft k (0-based) predicts x_{t+k+2}
while the base head predicts x_{t+1}.

Greedy (Medusa, Cai et al. 2024, arXiv 2401.10774, §2.1.2), one base forward per step:
    root  = argmax p(· | x_≤t)                          (emitted by the previous forward)
    nodes = root + a sparse tree: a node at depth j takes the i-th top token of draft j − 1 at t,
            i < widths[j − 1]; children of every node at depth j − 1 are the same top tokens
    one forward of all nodes through the KV cache at positions t + 1 + depth, node r attending to the
    prefix, its ancestors and itself (the tree mask)
    accept the longest path whose every node is the argmax of the base logits at its parent; the base
    argmax at the path's end is the next root; the cache keeps only the path.
This emits exactly plain greedy decoding's tokens (up to floating-point ties), 1 + accepted per forward.
Sampling (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318) on a chain:
    x_j ~ q_j (draft j's filtered softmax at t),  accept with probability min(1, p_j(x_j) / q_j(x_j)),
    on the first reject emit a sample of max(0, p_j − q_j) / Σ max(0, p_j − q_j) and stop; after K accepts
    emit a sample of p_{K+1}. Every emitted token is distributed exactly as plain sampling from p
    (temperature, top-k, top-p applied to p as ``archlab.generate`` does); acceptance rate Σ min(p, q).
Medusa's "typical acceptance" is not implemented: it is not distribution-exact.
Batch size 1, as the reference. Shapes: n tree nodes, K draft heads, V vocab.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from archlab.context import KVCache
from archlab.errors import ArchlabError, ConfigError
from archlab.generate import check_can_generate, filter_logits, generate
from archlab.model import Student
from archlab.slots import DraftHeads, SupportsKVCache, SupportsTreeMask, offering, offers

#: Default top tokens per depth: 1 + 4 + 8 + 8 = 21 nodes.
DEFAULT_WIDTHS = (4, 2, 1)


@dataclass
class Tree:
    """A token tree in breadth-first order; node 0 is the root, ``paths[r]`` its top-rank choices."""

    paths: list[tuple[int, ...]]
    parents: Tensor  # (n,) parent's index; the root's is −1
    depths: Tensor  # (n,)
    ranks: Tensor  # (n,) which top token of its depth's draft a node takes (the root's: 0)
    mask: Tensor  # (n, n) bool: node r sees node c iff c is r or one of its ancestors

    @classmethod
    def from_paths(cls, paths: Sequence[tuple[int, ...]]) -> Tree:
        """Tree of the root and ``paths`` (each path's prefixes must be in it too)."""
        nodes = [()] + sorted({tuple(p) for p in paths if p}, key=lambda p: (len(p), p))
        index = {p: i for i, p in enumerate(nodes)}
        missing = [p for p in nodes[1:] if p[:-1] not in index]
        if missing:
            raise ValueError(f"tree paths {missing} lack their parent paths")
        parents = torch.tensor([-1] + [index[p[:-1]] for p in nodes[1:]])
        mask = torch.eye(len(nodes), dtype=torch.bool)
        for r in range(1, len(nodes)):  # parents come first in breadth-first order
            mask[r] |= mask[parents[r]]
        depths = torch.tensor([len(p) for p in nodes])
        return cls(nodes, parents, depths, torch.tensor([p[-1] if p else 0 for p in nodes]), mask)

    @classmethod
    def from_widths(cls, widths: Sequence[int]) -> Tree:
        """Every path (i_1, …, i_j) with i_l < widths[l − 1]: ∏ widths leaves."""
        levels = [itertools.product(*(range(w) for w in widths[:j])) for j in range(1, len(widths) + 1)]
        return cls.from_paths([p for level in levels for p in level])

    def first(self, n: int) -> Tree:
        """The first n nodes (still a tree: breadth-first order puts parents first)."""
        return Tree(self.paths[:n], self.parents[:n], self.depths[:n], self.ranks[:n], self.mask[:n, :n])

    def tokens(self, root: Tensor, top: Tensor) -> Tensor:
        """root: () token, top: (K, w) drafts' top tokens -> (n,) node tokens."""
        return torch.cat((root[None], top[self.depths[1:] - 1, self.ranks[1:]]))

    def accept_greedy(self, tokens: Tensor, best: Tensor) -> list[int]:
        """Longest root path whose every node's token is ``best`` (the base argmax) at its parent."""
        path, parents = [0], self.parents.tolist()
        matches = (tokens == best[self.parents.clamp_min(0)]).tolist()
        for r in range(1, len(parents)):  # breadth-first: a match's parent was decided before it
            if parents[r] == path[-1] and matches[r]:
                path.append(r)
        return path


def parse_widths(text: str) -> tuple[int, ...]:
    """``--draft-tree 4,2,1`` -> (4, 2, 1); ConfigError unless positive integers."""
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise ConfigError("--draft-tree", text, "comma-separated positive integers, e.g. 4,2,1")
    return widths


def accept_or_resample(
    p: Tensor, q: Tensor, draft: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Speculative sampling step, row-wise: p, q (m, V) target and draft distributions, draft (m,) ~ q.

    Returns (accepted (m,) bool, token (m,)): the draft with probability min(1, p/q), else a sample of
    the normalised residual max(0, p − q). The token is distributed exactly as p."""
    p_x, q_x = p.gather(-1, draft[:, None])[:, 0], q.gather(-1, draft[:, None])[:, 0]
    u = torch.rand(p_x.shape, generator=generator, device=p.device)
    accepted = u * q_x < p_x
    residual = (p - q).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # p = q: never rejected
    resampled = torch.multinomial(residual, 1, generator=generator)[:, 0]
    return accepted, torch.where(accepted, draft, resampled)


@dataclass
class Stats:
    """What one decoding cost: base forwards (prefill included) and tokens emitted by each."""

    emitted: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def forwards(self) -> int:
        return len(self.emitted)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted ÷ base forwards (≥ 1; plain decoding is 1)."""
        return sum(self.emitted) / max(1, self.forwards)


def check_can_verify(model: Student, prompt: Tensor, max_new_tokens: int, widths: Sequence[int]) -> None:
    """Raise ArchlabError unless this student can decode speculatively with a tree of ``widths``."""
    check_can_generate(model, prompt, max_new_tokens, use_cache=True)
    k = model.head.num_draft_heads if offers(model.head, DraftHeads) else 0
    if k < 1:
        raise ArchlabError(
            f"head {type(model.head).__name__} has no draft heads (the DraftHeads capability); train the "
            "student with a head that offers them, e.g. head=medusa"
        )
    if len(widths) > k or max(widths, default=1) > model.dims.vocab_size:
        allowed = f"at most {k} depths (the heads), each at most {model.dims.vocab_size} wide (the vocab)"
        raise ConfigError("--draft-tree", ",".join(map(str, widths)), allowed)
    if prompt.shape[0] != 1:
        raise ArchlabError(
            f"speculative decoding takes one prompt at a time, not a batch of {prompt.shape[0]}"
        )
    cached = offering(model.modules(), SupportsKVCache)
    unmasked = sorted({type(m).__name__ for m in cached if not offers(m, SupportsTreeMask)})
    if unmasked:
        raise ArchlabError(
            f"{', '.join(unmasked)} cannot take a tree attention mask (no supports_tree_mask); "
            "decode without --draft"
        )


def forward(
    model: Student, tokens: Tensor, cache: KVCache, tree: Tree | None = None
) -> tuple[Tensor, Tensor]:
    """Base logits (t, V) and the head's input h (t, d) of tokens (1, t) after the cache; a tree's nodes
    sit at positions offset + depth and see the cached prefix, their ancestors and themselves."""
    ctx = model.new_context(tokens, cache)
    if tree is not None:
        prefix = torch.ones(len(tree.paths), cache.offset, dtype=torch.bool)
        ctx.positions = (cache.offset + tree.depths).to(tokens.device)
        ctx.attn_mask = torch.cat((prefix, tree.mask), dim=1).to(tokens.device)
        ctx.attend = functools.partial(ctx.attend, mask=ctx.attn_mask)
    hidden = []
    hook = model.final_norm.register_forward_hook(lambda _m, _i, out: hidden.append(out))
    try:
        logits = model(tokens, ctx)
    finally:
        hook.remove()
    return logits[0].float(), hidden[0][0]


def drafts_at(model: Student, hidden: Tensor, i: int) -> Tensor:
    """The draft heads' logits (K, V) at position i only (the others are never read)."""
    return model.head.draft_logits(hidden[i][None, None])[0, 0].float()


@torch.no_grad()
def generate_speculative(
    model: Student,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Stats]:
    """Continue ``prompt`` (1, t) by ``max_new_tokens`` with draft heads; returns (1, t + new) and stats.

    Greedy (temperature 0) verifies a tree of ``widths``; sampling verifies a chain of every draft head."""
    greedy = temperature <= 0
    check_can_verify(model, prompt, max_new_tokens, widths if greedy else ())
    model.eval()
    start, stats = time.perf_counter(), Stats()
    sample = functools.partial(_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    full = Tree.from_widths(widths if greedy else (1,) * model.head.num_draft_heads)
    cache = KVCache(model.dims.context)
    logits, hidden = forward(model, prompt, cache)
    out = [
        logits[-1].argmax() if greedy else torch.multinomial(sample(logits[-1]), 1, generator=generator)[0]
    ]
    draft, stats.emitted = drafts_at(model, hidden, -1), [1]
    while len(out) < max_new_tokens:
        tree, offset = full.first(model.dims.context - cache.offset), cache.offset
        if greedy:
            tokens = tree.tokens(out[-1], draft.topk(max(widths), dim=-1).indices)
        else:
            q = sample(draft[: len(tree.paths) - 1])
            tokens = torch.cat((out[-1][None], torch.multinomial(q, 1, generator=generator)[:, 0]))
        logits, hidden = forward(model, tokens[None], cache, tree)
        if greedy:
            best = logits.argmax(-1)
            path = tree.accept_greedy(tokens, best)
            new = [*tokens[path[1:]], best[path[-1]]]
        else:
            path, new = accept_chain(tokens, sample(logits), q, generator)
        cache.keep(offset, torch.tensor(path))
        draft = drafts_at(model, hidden, path[-1])
        new = new[: max_new_tokens - len(out)]
        out.extend(new)
        stats.emitted.append(len(new))
    stats.seconds = time.perf_counter() - start
    return torch.cat((prompt, torch.stack(out)[None].to(prompt.device)), dim=1), stats


def _sample(logits: Tensor, *, temperature: float, top_k: int, top_p: float) -> Tensor:
    """(m, V) -> (m, V) the distributions plain sampling draws from (``archlab.generate.next_token``)."""
    return filter_logits(logits / temperature, top_k=top_k, top_p=top_p).softmax(-1)


def accept_chain(
    tokens: Tensor, p: Tensor, q: Tensor, generator: torch.Generator | None
) -> tuple[list[int], list[Tensor]]:
    """tokens (1 + m,) root and drafts, target p (1 + m, V), drafts' q (m, V) -> (kept nodes, new tokens)."""
    path, new = [0], []
    for j in range(len(tokens) - 1):
        accepted, token = accept_or_resample(p[j : j + 1], q[j : j + 1], tokens[j + 1 : j + 2], generator)
        new.append(token[0])
        if not accepted[0]:
            return path, new
        path.append(j + 1)
    new.append(torch.multinomial(p[-1], 1, generator=generator)[0])
    return path, new


def speculative_report(
    model: Student, prompt: Tensor, out: Tensor, stats: Stats, sampling: dict, *, widths, compare: bool
) -> str:
    """The stats line of ``archlab generate --draft``. With ``compare``, plain decoding (KV cache, same
    sampling settings) and then speculative decoding again are timed in this process, both warm, for the
    speed-up (and, greedy, the identity check)."""
    n = out.shape[1] - prompt.shape[1]
    line = (
        f"[draft: {stats.mean_accepted_length:.2f} tokens per base forward ({n} tokens, {stats.forwards} "
        f"forwards), {n / stats.seconds:.1f} tokens/s"
    )
    if compare:
        start = time.perf_counter()
        plain = generate(model, prompt, n, **sampling)
        seconds = time.perf_counter() - start
        warm = generate_speculative(model, prompt, n, widths=widths, **sampling)[1].seconds
        line += f"; warm: {n / warm:.1f} vs plain {n / seconds:.1f} tokens/s, speed-up {seconds / warm:.2f}x"
        if sampling["temperature"] <= 0:
            line += f", identical to plain greedy: {'yes' if torch.equal(plain, out) else 'NO'}"
    return line + "]"
