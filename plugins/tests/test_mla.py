"""attention=mla (Multi-head Latent Attention) against the paper's equations written out per head.

The reference below is independent of the plugin: float64, one head at a time, k_nope and v
up-projected from the latent explicitly, RoPE done with complex numbers, its own causal mask.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from archlab_plugins.attention.mla import MultiHeadLatentAttention as MLA
from torch import Tensor, nn

from archlab import registry
from archlab.baselines.linear import DenseLinear
from archlab.baselines.position import RoPE
from archlab.config import compose
from archlab.context import ForwardContext, KVCache, ModelDims
from archlab.errors import ConfigError
from archlab.kernels import sdpa_attention
from archlab.metrics import model_metrics
from archlab.model import Choice, LinearFactory, build_student

DIMS = ModelDims(d_model=64, n_layers=1, n_heads=4, context=64)
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.context=24"]


def assert_close_report(actual: Tensor, expected: Tensor, atol: float = 1e-5) -> None:
    diff = (actual.double() - expected.double()).abs()
    assert diff.max() <= atol, f"max |Δ| = {diff.max():.3g}, mean |Δ| = {diff.mean():.3g} (atol {atol})"


def _no_rotate(x: Tensor, positions: Tensor) -> Tensor:
    raise AssertionError("mla must apply its own RoPE, never the position plugin's ctx.rotate")


def make(dims: ModelDims = DIMS, **fields) -> MLA:
    """An MLA module with O(1) random weights (so 1e-5 is a real tolerance, not the init's 0.02 scale)."""
    torch.manual_seed(0)
    linear = LinearFactory(Choice(DenseLinear, DenseLinear.Config()), {}, n_layers=dims.n_layers)
    cfg = MLA.Config(**fields)
    cfg.validate(dims)
    module = MLA(cfg, dims, linear=linear)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 2:
                p.normal_(std=p.shape[1] ** -0.5)  # O(1) activations through every projection
            else:
                p.uniform_(0.5, 1.5)  # RMSNorm gains away from 1
    return module


def run(module: MLA, x: Tensor, cache: KVCache | None = None, positions: Tensor | None = None) -> Tensor:
    """One forward the way the Student does it: positions continue the cache, offset advances after."""
    offset = cache.offset if cache is not None else 0
    if positions is None:
        positions = torch.arange(offset, offset + x.shape[1])
    ctx = ForwardContext(positions=positions, rotate=_no_rotate, attend=sdpa_attention, cache=cache)
    y = module(x, ctx)
    if cache is not None:
        cache.offset += x.shape[1]
    return y


def rope_complex(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate pairs (j, j + r/2) by pos · θ^(−2j/r), as complex multiplication."""
    half = x.shape[-1] // 2
    freqs = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    angles = positions.double()[:, None] * freqs
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((z.real, z.imag), dim=-1)


def rms(x: Tensor, gain: Tensor, eps: float = 1e-6) -> Tensor:
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * gain


def reference_mla(module: MLA, x: Tensor, positions: Tensor, c_v: Tensor | None = None) -> Tensor:
    """The paper's equations (V2 §2.1) in float64, head by head: x (b, t, d) -> (b, t, d), causal.
    ``c_v`` replaces c^KV as the latent the values are read from (value residual)."""
    W = {name: p.detach().double() for name, p in module.named_parameters()}
    cfg_c, n, r, v, h = module.kv_lora_rank, module.nope_dim, module.rope_dim, module.v_dim, module.n_heads
    theta, x = module.rope_theta, x.double()
    if module.q_lora_rank:
        q = rms(x @ W["q_down.weight"].T, W["q_norm.weight"]) @ W["q_up.weight"].T  # c_q W_UQ
    else:
        q = x @ W["q.weight"].T
    kv = x @ W["kv_down.weight"].T
    c_kv = rms(kv[..., :cfg_c], W["kv_norm.weight"])  # c^KV
    k_rope = rope_complex(kv[..., cfg_c:], positions, theta)  # k^R: one per token, every head uses it
    t = x.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    heads = []
    for i in range(h):
        q_i = q[..., i * (n + r) : (i + 1) * (n + r)]
        q_nope, q_rope = q_i[..., :n], rope_complex(q_i[..., n:], positions, theta)
        k_nope = c_kv @ W["k_up.weight"][i * n : (i + 1) * n].T  # k^C_i = W^UK_i c^KV
        v_i = (c_kv if c_v is None else c_v) @ W["v_up.weight"][i * v : (i + 1) * v].T  # v^C_i = W^UV_i c^KV
        scores = (q_nope @ k_nope.mT + q_rope @ k_rope.mT) / math.sqrt(n + r)
        heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v_i)
    return torch.cat(heads, dim=-1) @ W["out.weight"].T


QUERY_VARIANTS = {"no_q_latent": {}, "q_latent": {"q_lora_rank": 24}}


@pytest.mark.parametrize("variant", sorted(QUERY_VARIANTS))
def test_every_path_equals_the_paper_equations(variant: str) -> None:
    module = make(**QUERY_VARIANTS[variant])
    x = torch.randn(2, 7, DIMS.d_model)
    expected = reference_mla(module, x, torch.arange(7))
    with torch.no_grad():
        assert_close_report(run(module, x), expected)  # training path: up-projection + ctx.attend
        assert_close_report(run(module, x, KVCache()), expected)  # absorbed, one full-sequence pass
        cache = KVCache()  # absorbed: prefill 6, then a single decode step
        run(module, x[:, :6], cache)
        assert_close_report(run(module, x[:, 6:], cache), expected[:, 6:])
        cache = KVCache()  # absorbed: chunk of 3 after 4 cached (bottom-right causal mask)
        chunks = [run(module, x[:, :4], cache), run(module, x[:, 4:], cache)]
        assert_close_report(torch.cat(chunks, 1), expected)
        module.absorb = False  # naive up-projection over the cached latents
        cache = KVCache()
        chunks = [run(module, x[:, :4], cache), run(module, x[:, 4:6], cache), run(module, x[:, 6:], cache)]
        assert_close_report(torch.cat(chunks, 1), expected)


def latent(module: MLA, x: Tensor) -> Tensor:
    """c^KV = RMSNorm(x W_DKV), float64."""
    w = module.kv_down.weight.detach().double()[: module.kv_lora_rank]
    return rms(x.double() @ w.T, module.kv_norm.weight.detach().double())


@pytest.mark.parametrize("absorb", [True, False])
def test_value_residual_mixes_layer_one_latent_into_the_values(absorb: bool) -> None:
    """Layer 2 reads its values from c_v = λ_1 c^KV_2 + λ_2 c^KV_1; keys still from c^KV_2."""
    first, second = make(absorb=absorb), make(q_lora_rank=16, absorb=absorb)
    x1, x2, lam = torch.randn(2, 7, DIMS.d_model), torch.randn(2, 7, DIMS.d_model), torch.tensor([0.4, 1.3])
    mixed = lam[0].double() * latent(second, x2) + lam[1].double() * latent(first, x1)
    expected = reference_mla(second, x2, torch.arange(7), c_v=mixed)
    for cache, chunks in ((None, [(0, 7)]), (KVCache(), [(0, 4), (4, 5), (5, 7)])):
        outputs = []
        for a, b in chunks:  # both layers see one context per forward, as in the student
            ctx = ForwardContext(torch.arange(a, b), _no_rotate, sdpa_attention, cache, value_lambdas=[lam])
            with torch.no_grad():
                ctx.layer = 0
                first(x1[:, a:b], ctx)
                ctx.layer = 1
                outputs.append(second(x2[:, a:b], ctx))
            if cache is not None:
                cache.offset = b
        assert_close_report(torch.cat(outputs, 1), expected)


def test_absorbed_decode_equals_naive_decode_step_by_step() -> None:
    x = torch.randn(2, 7, DIMS.d_model)
    outputs = {}
    for absorb in (True, False):
        module, cache = make(q_lora_rank=16, absorb=absorb), KVCache()
        with torch.no_grad():
            outputs[absorb] = torch.cat([run(module, x[:, i : i + 1], cache) for i in range(7)], 1)
    assert_close_report(outputs[True], outputs[False])


VARIANTS = {"default": [], "q_latent": ["attention=mla_q"], "naive_cache": ["attention.absorb=false"]}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_incremental_decoding_equals_the_full_prefix_forward(variant: str) -> None:
    torch.manual_seed(0)
    model = build_student(compose([*SMALL, "attention=mla", *VARIANTS[variant]])).eval()
    tokens = torch.randint(0, 256, (2, 16))
    cache = KVCache()
    with torch.no_grad():
        full = model(tokens)
        steps = torch.stack([model(tokens[:, i : i + 1], cache=cache)[:, 0] for i in range(16)], 1)
    assert_close_report(steps, full)
    c, r, layers = model.sublayers[0].kv_lora_rank, model.sublayers[0].rope_dim, model.dims.n_layers
    assert cache.elements_per_token() == layers * (c + r)  # the latent and one rope key, nothing per head
    assert model_metrics(model, torch.float32)["kv_bytes_per_token"] == 4 * layers * (c + r)


def test_check_causal() -> None:
    module = make()
    x = torch.randn(2, 9, DIMS.d_model)
    changed = x.clone()
    changed[:, 5:] = torch.randn(2, 4, DIMS.d_model)
    with torch.no_grad():
        before, after = run(module, x), run(module, changed)
    assert_close_report(after[:, :5], before[:, :5], atol=0.0)
    assert not torch.allclose(after[:, 5:], before[:, 5:])


def test_rope_acts_on_the_rope_part_only_with_archlab_rope_convention() -> None:
    module = make()
    x = torch.randn(1, 6, DIMS.d_model)
    uneven = torch.tensor([0, 3, 4, 11, 12, 30])  # not a shift: relative distances change
    with torch.no_grad():
        assert not torch.allclose(run(module, x), run(module, x, positions=uneven), atol=1e-4)
        q_rope_rows = torch.arange(DIMS.n_heads * 48).remainder(48) >= 32  # per head [nope(32); rope(16)]
        module.q.weight[q_rope_rows] = 0.0  # q_rope = 0: only the nope part scores
        module.kv_down.weight[module.kv_lora_rank :] = 0.0  # k_rope = 0
        assert_close_report(run(module, x, positions=uneven), run(module, x))  # no position left at all
    rope = RoPE(RoPE.Config(theta=module.rope_theta), replace(DIMS, d_model=16, n_heads=1))
    y = torch.randn(2, 5, 16)
    positions = torch.tensor([0, 1, 7, 20, 63])
    torch.testing.assert_close(module.rotate(y, positions), rope.rotate(y, positions))
    assert_close_report(module.rotate(y, positions), rope_complex(y.double(), positions, module.rope_theta))


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_num_params_matches_config(q_lora_rank: int) -> None:
    module = make(q_lora_rank=q_lora_rank)
    assert sum(p.numel() for p in module.parameters()) == MLA.Config(q_lora_rank=q_lora_rank).num_params(DIMS)
    tiny = ModelDims(d_model=128, n_layers=4, n_heads=4, context=256)
    # tiny preset, defaults: q 128·4·48, kv_down 128·80, kv_norm 64, k_up/v_up 64·128 each, out 128·128
    assert MLA.Config().num_params(tiny) == 24576 + 10240 + 64 + 2 * 8192 + 16384 == 67648
    # with a 64-wide query latent: q_down 128·64, q_norm 64, q_up 64·192 replace q
    assert MLA.Config(q_lora_rank=64).num_params(tiny) == 67648 - 24576 + 8192 + 64 + 12288


BAD = [
    ("kv_lora_rank", 0),
    ("q_lora_rank", -1),
    ("qk_nope_head_dim", 0),
    ("qk_rope_head_dim", 15),
    ("v_head_dim", -2),
    ("rope_theta", 0.0),
]


@pytest.mark.parametrize(("key", "value"), BAD)
def test_config_errors_name_the_key(key: str, value) -> None:
    with pytest.raises(ConfigError) as err:
        MLA.Config(**{key: value}).validate(DIMS)
    assert err.value.key == f"attention.{key}"
    if key == "qk_rope_head_dim":  # and through the composed config, before anything is built
        with pytest.raises(ConfigError, match="attention.qk_rope_head_dim=15"):
            build_student(compose([*SMALL, "attention=mla", f"attention.{key}={value}"]))


def test_discovered_through_its_entry_point_with_preset() -> None:
    plugin = registry.plugins("attention")["mla"]
    assert plugin.distribution.startswith("archlab-plugins ")
    assert plugin.load() is MLA
    cfg = compose(["attention=mla_q"])
    assert cfg.attention.plugin == "mla" and cfg.attention.q_lora_rank == 64


def test_composes_builds_and_trains() -> None:
    torch.manual_seed(0)
    model = build_student(compose([*SMALL, "attention=mla"]))
    assert isinstance(model.sublayers[0], MLA)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 256, (4, 17))
    losses = []
    for step in range(3):
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
            assert not missing, f"parameters without gradient: {missing}"
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert torch.isfinite(model(tokens, cache=KVCache())).all()  # bf16 absorbed decode: no NaN


def test_meta_build_then_reset_and_state_dict_roundtrip() -> None:
    linear = LinearFactory(Choice(DenseLinear, DenseLinear.Config()), {}, n_layers=1)
    with torch.device("meta"):
        meta = MLA(MLA.Config(q_lora_rank=8), DIMS, linear=linear)
    meta.to_empty(device="cpu")
    for m in meta.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    built = make(q_lora_rank=8)
    torch.testing.assert_close(meta.rope_cos, built.rope_cos)
    assert set(built.state_dict()) == {n for n, _ in built.named_parameters()}  # tables are not saved
    meta.load_state_dict(built.state_dict())
    x = torch.randn(1, 5, DIMS.d_model)
    with torch.no_grad():
        torch.testing.assert_close(run(meta, x), run(built, x))
