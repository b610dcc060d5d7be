"""memory=engram (DeepSeek Engram, arXiv 2601.07372) against its equations written out plainly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from archlab_plugins.memory.engram import PAD, Engram, ShortConv, next_primes, ngram_hashes
from torch import Tensor

from archlab import registry
from archlab.baselines.linear import DenseLinear
from archlab.config import compose
from archlab.context import ForwardContext, KVCache, ModelDims
from archlab.errors import ConfigError
from archlab.generate import generate
from archlab.metrics import model_metrics
from archlab.model import Choice, LinearFactory, build_student

DIMS = ModelDims(d_model=32, n_layers=2, n_heads=2, context=64)
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.context=32", "memory=engram"]


def make(**fields) -> Engram:
    """An Engram module with O(1) random weights, a non-zero conv and non-unit norm gains."""
    torch.manual_seed(0)
    linear = LinearFactory(Choice(DenseLinear, DenseLinear.Config()), {}, n_layers=DIMS.n_layers)
    cfg = Engram.Config(**{"table_size": 101, **fields})
    cfg.validate(DIMS)
    module = Engram(cfg, DIMS, linear=linear)
    randomize(module)
    return module


def randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("conv.weight"):
                p.normal_(std=0.5)
            elif p.ndim == 2 and "table" not in name:
                p.normal_(std=p.shape[1] ** -0.5)
            elif p.ndim == 1:
                p.uniform_(0.5, 1.5)


def run(module: Engram, x: Tensor, tokens: Tensor, cache: KVCache | None = None) -> Tensor:
    ctx = ForwardContext(positions=torch.arange(tokens.shape[1]), rotate=None, attend=None, cache=cache)
    ctx.tokens = tokens
    y = module(x, ctx)
    if cache is not None:
        cache.offset += tokens.shape[1]
    return y


def hash_by_hand(tokens: list[int], t: int, n: int, multipliers: list[int], p: int) -> int:
    """(x_t·m_0 ⊕ x_{t−1}·m_1 ⊕ … ⊕ x_{t−n+1}·m_{n−1}) mod p with Python integers; PAD before the start."""
    mix = 0
    for k in range(n):
        mix ^= (tokens[t - k] if t - k >= 0 else PAD) * multipliers[k]
    return mix % p


def rms_norm(x: Tensor, g: Tensor, eps: float = 1e-6) -> Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g


def test_discovered_through_its_entry_point() -> None:
    plugin = registry.plugins("memory")["engram"]
    assert plugin.distribution.startswith("archlab-plugins ")
    assert plugin.load() is Engram


def test_primes_are_distinct_primes_from_the_table_size_up() -> None:
    primes = next_primes(100, 6)
    assert primes == sorted(set(primes)) and primes[0] >= 100
    assert all(all(p % f for f in range(2, p)) for p in primes)
    assert not any(all(n % f for f in range(2, n)) for n in range(100, primes[-1]) if n not in primes)


def test_hashes_are_the_multiplicative_xor_formula_deterministic_and_in_range() -> None:
    module = make(max_ngram=4, heads=3, embed_dim=12)
    tokens = torch.randint(0, DIMS.vocab_size, (2, 9))
    z = ngram_hashes(tokens, module.multipliers, module.primes)
    assert z.shape == (2, 9, 3, 3)
    assert torch.equal(z, ngram_hashes(tokens.clone(), module.multipliers, module.primes))
    multipliers = module.multipliers.tolist()
    assert all(m % 2 == 1 and 0 < m * (DIMS.vocab_size - 1) < 2**63 for m in multipliers)
    for b in range(2):
        row = tokens[b].tolist()
        for t in range(9):
            for n in range(2, 5):
                for j, p in enumerate(module.primes[n - 2].tolist()):
                    assert z[b, t, n - 2, j] == hash_by_hand(row, t, n, multipliers, p)
                    assert 0 <= z[b, t, n - 2, j] < p


def test_output_is_the_gated_value_plus_its_short_conv() -> None:
    """With the conv at zero, out = α · W_V e, α computed here from the RMSNorm-ed key and input."""
    module = make()
    with torch.no_grad():
        module.conv.weight.zero_()
    tokens = torch.randint(0, DIMS.vocab_size, (2, 7))
    x = 3 * torch.randn(2, 7, DIMS.d_model)
    e = module.table(ngram_hashes(tokens, module.multipliers, module.primes) + module.offsets).flatten(-3)
    s = (rms_norm(module.key(e), module.key_norm.weight) * rms_norm(x, module.query_norm.weight)).sum(-1)
    s = s / math.sqrt(DIMS.d_model)
    alpha = torch.sigmoid(torch.sign(s) * torch.sqrt(s.abs()))
    torch.testing.assert_close(
        run(module, x, tokens), alpha[..., None] * module.value(e), atol=1e-5, rtol=1e-5
    )


def test_gate_lies_strictly_inside_zero_one() -> None:
    """|s| ≤ |RMSNorm(k)|·|RMSNorm(h)|/sqrt(d) = sqrt(d) with unit gains, so α ∈ [σ(−d^¼), σ(d^¼)]."""
    module = make()
    with torch.no_grad():
        module.conv.weight.zero_()
        module.key_norm.weight.fill_(1.0)
        module.query_norm.weight.fill_(1.0)
    tokens = torch.randint(0, DIMS.vocab_size, (4, 16))
    x = 100 * torch.randn(4, 16, DIMS.d_model)
    e = module.table(ngram_hashes(tokens, module.multipliers, module.primes) + module.offsets).flatten(-3)
    alpha = run(module, x, tokens) / module.value(e)
    bound = torch.sigmoid(torch.tensor(DIMS.d_model**0.25))
    assert alpha.min() >= 1 - bound - 1e-4 and alpha.max() <= bound + 1e-4
    assert alpha.min() > 0 and alpha.max() < 1


def test_short_conv_is_the_causal_dilated_depthwise_sum() -> None:
    torch.manual_seed(0)
    conv = ShortConv(8, kernel_size=4, dilation=3)
    with torch.no_grad():
        conv.weight.normal_()
    v = torch.randn(2, 13, 8)
    u, w = rms_norm(v, conv.norm.weight), conv.weight[:, 0]  # (d, k)
    expected = torch.zeros_like(v)
    for t in range(13):
        for i in range(4):
            if t - (3 - i) * 3 >= 0:
                expected[:, t] += w[:, i] * u[:, t - (3 - i) * 3]
    ctx = ForwardContext(positions=torch.arange(13), rotate=None, attend=None)
    torch.testing.assert_close(conv(v, ctx), F.silu(expected), atol=1e-5, rtol=1e-5)


def test_output_at_t_ignores_later_tokens_and_inputs() -> None:
    module = make()
    tokens = torch.randint(0, DIMS.vocab_size, (2, 20))
    x = torch.randn(2, 20, DIMS.d_model)
    out = run(module, x, tokens)
    for t in (0, 5, 12):
        later_tokens, later_x = tokens.clone(), x.clone()
        later_tokens[:, t + 1 :] = torch.randint(0, DIMS.vocab_size, (2, 19 - t))
        later_x[:, t + 1 :] = torch.randn(2, 19 - t, DIMS.d_model)
        changed = run(module, later_x, later_tokens)
        torch.testing.assert_close(changed[:, : t + 1], out[:, : t + 1], atol=0, rtol=0)
        assert (changed[:, t + 1 :] - out[:, t + 1 :]).abs().max() > 1e-3  # later positions do change


def test_cached_chunks_equal_the_full_forward() -> None:
    module = make()
    tokens = torch.randint(0, DIMS.vocab_size, (2, 20))
    x = torch.randn(2, 20, DIMS.d_model)
    full = run(module, x, tokens)
    cache = KVCache()
    chunks = [run(module, x[:, a:b], tokens[:, a:b], cache) for a, b in ((0, 2), (2, 3), (3, 13), (13, 20))]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)


def test_student_decodes_the_same_with_and_without_cache() -> None:
    torch.manual_seed(0)
    model = build_student(compose([*SMALL, "memory.layers=[0,1]", "memory.table_size=211"])).eval()
    randomize(model)
    assert model.sublayer_names[:3] == ["L0.memory", "L0.attention", "L0.ffn"]
    tokens = torch.randint(0, 256, (2, 16))  # 12 decode steps: past the conv's (4 − 1)·3 look-back
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.dims.context)
        steps = [model(tokens[:, :4], cache=cache)]
        steps += [model(tokens[:, i : i + 1], cache=cache) for i in range(4, 16)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    held = cache.elements_per_token()  # mha K, V: 2 · d; engram: its token id and conv input, 1 + d
    assert held == 2 * (2 * 32 + 1 + 32) == model_metrics(model, torch.float32)["kv_bytes_per_token"] / 4
    prompt = tokens[:, :3]
    torch.testing.assert_close(generate(model, prompt, 10), generate(model, prompt, 10, use_cache=False))


def test_gradients_reach_exactly_the_looked_up_rows() -> None:
    module = make()
    tokens = torch.randint(0, DIMS.vocab_size, (2, 6))
    run(module, torch.randn(2, 6, DIMS.d_model), tokens).square().sum().backward()
    rows = ngram_hashes(tokens, module.multipliers, module.primes) + module.offsets
    touched = module.table.weight.grad.abs().sum(-1) > 0
    assert set(touched.nonzero().flatten().tolist()) == set(rows.flatten().tolist())


def test_active_and_sparse_parameter_counts() -> None:
    torch.manual_seed(0)
    fields = ["memory.layers=[0,1]", "memory.max_ngram=3", "memory.heads=2", "memory.embed_dim=8"]
    with_memory = model_metrics(
        build_student(compose([*SMALL, *fields, "memory.table_size=50"])), torch.float32
    )
    without = model_metrics(build_student(compose(SMALL[:-1])), torch.float32)
    primes = [53, 59, 61, 67]  # the 2 · 2 primes from 50 up, rows of embed_dim / heads = 4
    assert with_memory["params/sparse"] == 2 * sum(primes) * 4 and without["params/sparse"] == 0
    d, width = 32, 2 * 8  # W_K, W_V: (N−1)·embed_dim -> d; norms: key, query, conv; conv: d · 4
    dense = 2 * width * d + 3 * d + 4 * d + d  # + the memory sublayer's own pre-norm gain
    per_layer_active = dense + 2 * 8  # K·(N−1) rows of embed_dim / K
    gap = with_memory["params/active_non_embedding"] - without["params/active_non_embedding"]
    assert gap == 2 * per_layer_active
    gap = with_memory["params/non_embedding"] - without["params/non_embedding"]
    assert gap == 2 * dense + with_memory["params/sparse"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("memory.layers=[2]", "memory.layers"),
        ("memory.layers=[1,1]", "memory.layers"),
        ("memory.max_ngram=1", "memory.max_ngram"),
        ("memory.embed_dim=10", "memory.embed_dim"),
        ("memory.table_size=1", "memory.table_size"),
    ],
)
def test_config_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_student(compose([*SMALL, "memory.heads=4", override]))
    assert err.value.key == key


def test_memory_none_rejects_layers() -> None:
    with pytest.raises(ConfigError, match="memory.layers"):
        build_student(compose([*SMALL[:-1], "memory.layers=[0]"]))


@pytest.mark.slow
def test_archlab_train_with_engram_reports_sparse_params(train_cli) -> None:
    summary = train_cli("memory=engram", "model.value_residual=true")
    assert summary["params/sparse"] > 0
    assert summary["params/active"] < summary["params/total"] - summary["params/sparse"] / 2
