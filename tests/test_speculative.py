"""Speculative decoding against independent computations: tree masks written out from the paths, the
speculative-sampling rule against its target by chi-square, greedy tree decoding against plain greedy
decoding, sampling against the model's exact sequence probabilities, cache roll-back against a re-run.

The drafting head here is a test double (random projections, the ``draft_logits`` hook only), so these
tests need no plugin; ``head=medusa`` itself is tested in plugins/tests/test_medusa.py."""

from __future__ import annotations

import itertools

import pytest
import torch
from einops import rearrange
from scipy.stats import chisquare
from torch import Tensor, nn

from archlab.config import compose
from archlab.context import KVCache
from archlab.errors import ArchlabError, ConfigError
from archlab.generate import generate
from archlab.kernels import eager_attention, sdpa_attention
from archlab.model import build_student
from archlab.speculative import Tree, accept_chain, accept_or_resample, generate_speculative, parse_widths

V = 4  # a tiny vocabulary: trees of width V hold every continuation
SHAPE = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.context=64",
    f"model.vocab_size={V}",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class RandomDrafts(nn.Module):
    """The base head plus K random draft projections: draft_logits(h) = rearrange(h W_dᵀ, (k v))."""

    def __init__(self, lm: nn.Module, d_model: int, k: int, scale: float) -> None:
        super().__init__()
        self.lm, self.num_draft_heads = lm, k
        self.proj = nn.Linear(d_model, k * V)
        nn.init.normal_(self.proj.weight, std=scale)

    def forward(self, h: Tensor, ctx) -> Tensor:
        return self.lm(h, ctx)

    def draft_logits(self, h: Tensor) -> Tensor:
        return rearrange(self.proj(h), "b t (k v) -> b t k v", k=self.num_draft_heads)


def drafting_student(seed: int, k: int = 3, overrides: tuple[str, ...] = ()) -> nn.Module:
    torch.manual_seed(seed)
    model = build_student(compose([*SHAPE, *overrides]))
    with torch.no_grad():  # O(1) logits, so the argmax is decided by the model, not by rounding
        model.embed.weight.normal_(std=1.0)
    model.head = RandomDrafts(model.head, 32, k, scale=1.0)
    return model.eval()


def check_tree_mask(tree: Tree) -> None:
    """Row r allows exactly the nodes whose path is a prefix of r's path (ancestors and r itself)."""
    for r, path in enumerate(tree.paths):
        allowed = [c for c, other in enumerate(tree.paths) if path[: len(other)] == other]
        assert torch.nonzero(tree.mask[r]).flatten().tolist() == allowed, f"row {r} ({path})"
        assert len(allowed) == len(path) + 1
    assert torch.equal(tree.mask, tree.mask.tril()), "not lower-triangular in breadth-first order"


@pytest.mark.parametrize("widths", [(1,), (3,), (4, 2, 1), (2, 3, 2)])
def test_tree_mask_rows_allow_exactly_ancestors_and_self(widths) -> None:
    tree = Tree.from_widths(widths)
    assert len(tree.paths) == 1 + sum(itertools.accumulate(widths, lambda a, b: a * b))
    check_tree_mask(tree)
    check_tree_mask(tree.first(5))
    assert tree.depths.tolist() == [len(p) for p in tree.paths]


def test_sparse_tree_from_paths_and_missing_parents() -> None:
    tree = Tree.from_paths([(0,), (1,), (0, 0), (0, 1), (0, 0, 0), (1, 0)])
    check_tree_mask(tree)
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    with pytest.raises(ValueError, match="lack their parent"):
        Tree.from_paths([(0,), (1, 0)])


def test_greedy_acceptance_walks_the_matching_path() -> None:
    tree = Tree.from_widths((2, 2))  # nodes: root, (0) (1), (0,0) (0,1) (1,0) (1,1)
    tokens = torch.tensor([9, 5, 6, 7, 8, 7, 8])
    best = torch.tensor([6, 1, 8, 0, 0, 0, 0])  # root -> 6 = node 2 (1,); node 2 -> 8 = node 6 (1, 1)
    assert tree.accept_greedy(tokens, best) == [0, 2, 6]
    assert tree.accept_greedy(tokens, torch.tensor([3, 1, 8, 0, 0, 0, 0])) == [0]


def test_speculative_sampling_reproduces_the_target_with_acceptance_sum_min() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)
    n = 200_000
    draft = torch.multinomial(q, n, replacement=True, generator=gen)
    accepted, token = accept_or_resample(p.expand(n, -1), q.expand(n, -1), draft, gen)
    counts = torch.bincount(token, minlength=5).double()
    assert chisquare(counts.numpy(), (p * n).numpy()).pvalue > 0.01, counts / n
    alpha = torch.minimum(p, q).sum().item()  # 0.6
    assert abs(accepted.double().mean().item() - alpha) < 4 * (alpha * (1 - alpha) / n) ** 0.5
    assert torch.equal(token[accepted], draft[accepted])


def test_masked_sdpa_equals_masked_eager_and_the_causal_mask_is_the_default() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 9, 8), torch.randn(1, 1, 9, 8)
    tree = Tree.from_widths((2, 2)).first(5)
    mask = torch.cat((torch.ones(5, 4, dtype=torch.bool), tree.mask), dim=1)
    torch.testing.assert_close(sdpa_attention(q, k, v, mask), eager_attention(q, k, v, mask))
    causal = torch.ones(5, 9, dtype=torch.bool).tril(4)
    torch.testing.assert_close(sdpa_attention(q, k, v, causal), sdpa_attention(q, k, v))


def test_cache_keep_equals_caching_only_the_kept_tokens() -> None:
    torch.manual_seed(0)
    owner_a, owner_b = object(), object()
    x, y = torch.randn(2, 3, 9, 4), torch.randn(2, 9, 5)
    kept = torch.tensor([0, 2, 5])
    cache, reference = KVCache(), KVCache()
    cache.append(owner_a, x[:, :, :3]), cache.append(owner_b, y[:, :3])
    cache.append(owner_a, x[:, :, 3:]), cache.append(owner_b, y[:, 3:])
    cache.offset = 9
    cache.keep(3, kept)
    assert cache.offset == 6
    (
        reference.append(owner_a, x[:, :, [0, 1, 2, 3, 5, 8]]),
        reference.append(owner_b, y[:, [0, 1, 2, 3, 5, 8]]),
    )
    more_x, more_y = torch.randn(2, 3, 1, 4), torch.randn(2, 1, 5)
    for got, want in zip(
        (*cache.append(owner_a, more_x), *cache.append(owner_b, more_y)),
        (*reference.append(owner_a, more_x), *reference.append(owner_b, more_y)),
        strict=True,
    ):
        assert torch.equal(got, want)


@pytest.mark.parametrize(("seed", "widths"), [(0, (2, 1)), (1, (V, V)), (2, (1, 1, 1)), (3, (3, 2, 2))])
def test_greedy_tree_decoding_is_plain_greedy_token_for_token(seed, widths) -> None:
    model = drafting_student(seed)
    prompt = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(seed))
    plain = generate(model, prompt, 20)
    tokens, stats = generate_speculative(model, prompt, 20, widths=widths)
    assert torch.equal(tokens, plain), f"first difference at {int((tokens != plain).int().argmax())}"
    assert all(1 <= e <= len(widths) + 1 for e in stats.emitted)
    assert sum(stats.emitted) == 20 and 1 <= stats.mean_accepted_length <= len(widths) + 1
    if widths == (V, V):  # every continuation is in the tree: each verify forward emits 3 (the last ≤ 3)
        assert stats.emitted[1:-1] == [3] * (len(stats.emitted) - 2)


def test_greedy_tree_decoding_fills_the_context_exactly() -> None:
    model = drafting_student(0, overrides=("model.context=40",))
    prompt = torch.randint(0, V, (1, 3), generator=torch.Generator().manual_seed(1))
    tokens, _ = generate_speculative(model, prompt, 37, widths=(V, V))  # the last trees are cut to fit
    assert torch.equal(tokens, generate(model, prompt, 37))


def sequence_probabilities(model: nn.Module, prompt: Tensor, n: int) -> Tensor:
    """P(x_1..x_n | prompt) for all V^n continuations, from full forwards (no cache, no drafts)."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n)))
    with torch.no_grad():
        logp = model(torch.cat((prompt.expand(len(seqs), -1), seqs), dim=1)).log_softmax(-1)
    steps = logp[:, prompt.shape[1] - 1 : -1].gather(-1, seqs[..., None])[..., 0]
    return steps.sum(-1).exp()


def test_chain_acceptance_continues_a_markov_target_exactly() -> None:
    """Toy target x_{j+1} ~ T[x_j], drafts x_j ~ q_j blind to the prefix: the chain's tokens, continued by
    plain sampling from T to 3, are distributed as T's paths, P(y) = T[r, y1] T[y1, y2] T[y2, y3]."""
    gen = torch.Generator().manual_seed(0)
    T = torch.rand(V, V, generator=gen, dtype=torch.float64) + 0.3
    T /= T.sum(-1, keepdim=True)
    q = torch.rand(2, V, generator=gen, dtype=torch.float64) ** 3 + 0.05
    q /= q.sum(-1, keepdim=True)
    root, n, counts, lengths = 1, 4000, torch.zeros(V, V, V, dtype=torch.float64), []
    for _ in range(n):
        tokens = torch.cat((torch.tensor([root]), torch.multinomial(q, 1, generator=gen)[:, 0]))
        path, new = accept_chain(tokens, T[tokens], q, gen)  # row j of p: the target after tokens[j]
        assert path == list(range(len(new))) and new[:-1] == list(tokens[1 : len(new)])
        seq = [int(t) for t in new]
        while len(seq) < 3:
            seq.append(int(torch.multinomial(T[seq[-1]], 1, generator=gen)[0]))
        counts[tuple(seq)] += 1
        lengths.append(len(new))
    expected = T[root][:, None, None] * T[:, :, None] * T[None, :, :]
    assert chisquare(counts.flatten().numpy(), (expected.flatten() * n).numpy()).pvalue > 0.01
    assert {1, 2, 3} <= set(lengths)


@pytest.mark.slow  # 500 generations
def test_speculative_sampling_draws_sequences_with_the_models_probabilities() -> None:
    """Two tokens: the prefill's sample, then the first verified draft (accepted, or resampled)."""
    model = drafting_student(0, k=2, overrides=("model.n_layers=1",))
    with torch.no_grad():  # flatter distributions: every sequence has a countable probability
        model.embed.weight.mul_(0.2)
    prompt = torch.tensor([[1, 3, 0]])
    expected = sequence_probabilities(model, prompt, 2)
    gen, n = torch.Generator().manual_seed(0), 500
    counts = torch.zeros(V**2, dtype=torch.float64)
    for _ in range(n):
        tokens, _ = generate_speculative(model, prompt, 2, temperature=1.0, generator=gen)
        counts[int(tokens[0, 3]) * V + int(tokens[0, 4])] += 1
    expected = expected.double() / expected.double().sum()  # sums to 1 up to float32 rounding
    assert chisquare(counts.numpy(), (expected * n).numpy()).pvalue > 0.01


def test_refusals_name_the_fix(monkeypatch) -> None:
    model = drafting_student(0)
    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ArchlabError, match="one prompt at a time"):
        generate_speculative(model, prompt.expand(2, -1), 5)
    for widths in ((1, 1, 1, 1), (V + 1,)):
        with pytest.raises(ConfigError, match="at most 3 depths"):
            generate_speculative(model, prompt, 5, widths=widths)
    plain = build_student(compose(SHAPE))
    with pytest.raises(ArchlabError, match="head=medusa"):
        generate_speculative(plain, prompt, 5)
    monkeypatch.setattr(type(model.sublayers[0]), "supports_tree_mask", False)
    with pytest.raises(ArchlabError, match="cannot take a tree attention mask"):
        generate_speculative(model, prompt, 5)
    for text in ("", "4,0", "a,b"):
        with pytest.raises(ConfigError, match="draft-tree"):
            parse_widths(text)
    assert parse_widths("4,2,1") == (4, 2, 1)
