"""residual=attnres, denseformer, hyper against independent computations: the papers' equations written out
per source and per stream in float64, the pre-norm student at init, and invariants (convex depth weights,
one-hot selection, scale-invariant keys, causality, KV-cache decoding equal to the full forward)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from archlab_plugins.residual.attnres import AttentionResiduals, Mode
from archlab_plugins.residual.denseformer import DenseFormer
from archlab_plugins.residual.hyper import HyperConnections, sinkhorn
from torch import Tensor

from archlab import plots, registry
from archlab.config import compose
from archlab.context import KVCache, ModelDims
from archlab.errors import ConfigError
from archlab.generate import generate
from archlab.metrics import parameter_counts
from archlab.model import build_student

DIMS = ModelDims(d_model=32, n_layers=3, n_heads=2, context=32)
NAMES = ("L0.attention", "L0.ffn", "L1.attention", "L1.ffn", "L2.attention", "L2.ffn")
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.context=32", "teacher=none"]
#: every residual choice of this file, as overrides (the default of each, and its other modes)
VARIANTS = {
    "attnres_full": ["residual=attnres"],
    "attnres_block": ["residual=attnres_block", "residual.n_blocks=2"],
    "denseformer": ["residual=denseformer"],
    "denseformer_dilated": ["residual=denseformer", "residual.dilation=2", "residual.period=2"],
    "hyper": ["residual=hyper"],
    "hyper_dynamic": ["residual=hyper", "residual.dynamic=true"],
    "mhc": ["residual=hyper", "residual.dynamic=true", "residual.sinkhorn_iters=20"],
}


def assert_close_report(actual: Tensor, expected: Tensor, atol: float) -> None:
    diff = (actual.double() - expected.double()).abs()
    assert diff.max() <= atol, f"max |Δ| = {diff.max():.3g}, mean |Δ| = {diff.mean():.3g} (atol {atol})"


def rmsnorm(v: Tensor, eps: float = 1e-6) -> Tensor:
    return v / (v.square().mean(-1, keepdim=True) + eps).sqrt()


def run_stack(module, x0: Tensor, outputs: list[Tensor]) -> tuple[list[Tensor], Tensor]:
    """What the core does, with sublayer outputs given: every read(state, i), then final(state)."""
    state, reads = module.begin(x0), []
    for i, y in enumerate(outputs):
        reads.append(module.read(state, i))
        state = module.write(state, i, y)
    return reads, module.final(state)


def sources(n: int = len(NAMES), b: int = 2, t: int = 3) -> tuple[Tensor, list[Tensor]]:
    torch.manual_seed(1)
    scales = torch.rand(n + 1, dtype=torch.float64) * 3 + 0.1  # sources of different magnitudes
    x0, *ys = (s * torch.randn(b, t, DIMS.d_model, dtype=torch.float64) for s in scales)
    return x0, ys


def attnres(mode: Mode = Mode.full, n_blocks: int = 4, names: tuple[str, ...] = NAMES, random: bool = True):
    module = AttentionResiduals(
        AttentionResiduals.Config(mode=mode, n_blocks=n_blocks),
        DIMS,
        n_sublayers=len(names),
        sublayer_names=names,
    ).double()
    if random:
        with torch.no_grad():
            module.queries.normal_(std=0.5)
    return module


def depth_softmax(w: Tensor, vs: list[Tensor]) -> Tensor:
    """h = Σ_i softmax_i(wᵀ RMSNorm(v_i)) v_i, per token, written out."""
    logits = torch.stack([(rmsnorm(v) * w).sum(-1) for v in vs])  # s b t
    alpha = logits.exp() / logits.exp().sum(0)
    return sum(a[..., None] * v for a, v in zip(alpha, vs, strict=True))


def perturb(module: torch.nn.Module, seed: int = 3) -> None:
    """Move a residual plugin's parameters off their init (where denseformer/hyper are plain pre-norm)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def student(variant: str, *overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_student(compose([*SMALL, *VARIANTS[variant], *overrides]))


# --------------------------------------------------------------------------- discovery and config


def test_discovered_through_entry_points() -> None:
    classes = {"attnres": AttentionResiduals, "denseformer": DenseFormer, "hyper": HyperConnections}
    for name, cls in classes.items():
        plugin = registry.plugins("residual")[name]
        assert plugin.distribution.startswith("archlab-plugins ") and plugin.load() is cls
    assert compose(["residual=attnres_block"]).residual.mode.name == "block"


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="residual.n_blocks"):
        attnres(Mode.block, n_blocks=len(NAMES) + 1)
    for cfg, key in (
        (AttentionResiduals.Config(n_blocks=0), "n_blocks"),
        (DenseFormer.Config(dilation=0), "dilation"),
        (HyperConnections.Config(n_streams=0), "n_streams"),
        (HyperConnections.Config(sinkhorn_iters=-1), "sinkhorn_iters"),
    ):
        with pytest.raises(ConfigError, match=f"residual.{key}"):
            cfg.validate(DIMS)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_counts_follow_the_papers(variant: str) -> None:
    """attnres: one w ∈ R^d per reader (sublayers + final); denseformer: Σ_ℓ |S_ℓ|; hyper: per sublayer
    n(1+n) + n static, + d(1+n) + d + 2 dynamic."""
    d, n_sub, n_layers, n = 32, 4, 2, 4
    expected = {
        "attnres_full": (n_sub + 1) * d,
        "attnres_block": (n_sub + 1) * d,
        "denseformer": n_layers * (n_layers + 3) // 2,
        "denseformer_dilated": 2,  # period 2: only after layer 1, S_1 = {0, 2}
        "hyper": n_sub * (n * (1 + n) + n),
        "hyper_dynamic": n_sub * (n * (1 + n) + n + d * (1 + n) + d + 2),
        "mhc": n_sub * (n * (1 + n) + n + d * (1 + n) + d + 2),
    }[variant]
    extra = (
        parameter_counts(student(variant))["params/non_embedding"]
        - parameter_counts(build_student(compose(SMALL)))["params/non_embedding"]
    )
    assert extra == expected


# --------------------------------------------------------------------------- attnres


def test_attnres_zero_queries_read_the_mean_of_their_sources() -> None:
    x0, ys = sources()
    reads, final = run_stack(attnres(random=False), x0, ys)
    for i, h in enumerate(reads):
        assert_close_report(h, torch.stack([x0, *ys[:i]]).mean(0), atol=1e-12)
    assert_close_report(final, torch.stack([x0, *ys]).mean(0), atol=1e-12)


def test_attnres_full_equals_the_depth_softmax_written_out() -> None:
    x0, ys = sources()
    module = attnres()
    reads, final = run_stack(module, x0, ys)
    for i, h in enumerate([*reads, final]):
        assert_close_report(h, depth_softmax(module.queries[i], [x0, *ys[:i]]), atol=1e-12)


@pytest.mark.parametrize(
    ("n_sublayers", "n_blocks", "groups"),
    [(6, 3, [0, 0, 1, 1, 2, 2]), (5, 2, [0, 0, 0, 1, 1]), (6, 4, [0, 0, 1, 2, 2, 3])],
)
def test_attnres_block_mixes_completed_blocks_and_the_partial_block(n_sublayers, n_blocks, groups) -> None:
    names = NAMES[:n_sublayers]
    x0, ys = sources(n_sublayers)
    module = attnres(Mode.block, n_blocks, names)
    reads, final = run_stack(module, x0, ys)
    for h, expected in zip([*reads, final], block_reads(module.queries, x0, ys, groups), strict=True):
        assert_close_report(h, expected, atol=1e-12)
    assert len(module.source_names) == 1 + n_blocks  # the embedding and one source per block


def block_reads(queries: Tensor, x0: Tensor, ys: list[Tensor], groups: list[int]) -> list[Tensor]:
    """Every reader's mix (sublayers, then final), written out: the embedding, each group complete before
    the reader summed, and the reader's own group's outputs so far summed (the partial block)."""
    reads = []
    for i in range(len(ys) + 1):
        done = {g for g in groups[:i] if i == len(groups) or g != groups[i]}  # groups complete before i
        blocks = [sum(y for y, g in zip(ys, groups, strict=False) if g == k) for k in sorted(done)]
        partial = [ys[j] for j in range(i) if groups[j] not in done]
        reads.append(depth_softmax(queries[i], [x0, *blocks, *([sum(partial)] if partial else [])]))
    return reads


@pytest.mark.parametrize(
    ("mode", "n_blocks", "groups"),
    [
        (Mode.full, 4, [0, 1, 2, 3, 4, 5]),
        (Mode.block, 3, [0, 0, 1, 1, 2, 2]),
        (Mode.block, 4, [0, 0, 1, 2, 2, 3]),
    ],
)
def test_attnres_gradients_equal_autograd_through_the_equations(mode, n_blocks, groups) -> None:
    """The hand-written backward (per-source accumulators) against autograd through ``block_reads``: the
    gradient of every source, sublayer output and pseudo-query, float64. A second backward of the same graph
    (retain_graph) gives the same gradients: the accumulators start empty each time."""
    x0, ys = sources()
    leaves = [x0.requires_grad_(), *(y.requires_grad_() for y in ys)]
    module = attnres(mode, n_blocks)
    weights = torch.randn(len(ys) + 1, *x0.shape, dtype=torch.float64)  # a loss that weighs every read

    def loss(reads: list[Tensor]) -> Tensor:
        return sum((w * h).sum() for w, h in zip(weights, reads, strict=True))

    reads, final = run_stack(module, x0, ys)
    ours = loss([*reads, final])
    got = torch.autograd.grad(ours, [*leaves, module.queries], retain_graph=True)
    again = torch.autograd.grad(ours, [*leaves, module.queries])
    want = torch.autograd.grad(loss(block_reads(module.queries, x0, ys, groups)), [*leaves, module.queries])
    for g, a, w in zip(got, again, want, strict=True):
        assert_close_report(g, w, atol=1e-10)
        assert torch.equal(g, a)


def test_attnres_under_bf16_autocast_mixes_in_float32() -> None:
    """bf16 sublayer outputs: the depth logits and softmax stay float32, the mix has the stream's float32."""
    module = attnres(Mode.block, n_blocks=2).float()
    x0, ys = sources()
    x0 = x0.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reads, final = run_stack(module, x0, [y.bfloat16() for y in ys])
        alpha, _ = module.weights(module.begin(x0), 0)
    assert final.dtype == torch.float32 and alpha.dtype == torch.float32
    final.sum().backward()
    assert x0.grad.dtype == torch.float32 and torch.isfinite(module.queries.grad).all()


def test_attnres_block_with_one_sublayer_per_block_is_full() -> None:
    x0, ys = sources()
    full, block = attnres(), attnres(Mode.block, n_blocks=len(NAMES))
    block.load_state_dict(full.state_dict())
    for a, b in zip(run_stack(full, x0, ys)[0], run_stack(block, x0, ys)[0], strict=True):
        assert torch.equal(a, b)
    model_block = build_student_seeded([*SMALL, "residual=attnres_block", "residual.n_blocks=4"])
    model_full = student("attnres_full")
    perturb(model_full.residual)
    model_block.load_state_dict(model_full.state_dict())
    x = torch.randint(0, 256, (2, 9))
    assert torch.equal(model_full(x), model_block(x))


def test_attnres_large_aligned_query_selects_that_source() -> None:
    x0, ys = sources(b=1, t=1)
    module = attnres(random=False)
    for v in [x0, *ys[:4]]:
        with torch.no_grad():
            module.queries[4] = 50 * rmsnorm(v)[0, 0]  # before the forward: logits are taken at write time
        assert_close_report(run_stack(module, x0, ys)[0][4], v, atol=1e-4)


def test_attnres_depth_weights_are_convex_per_token() -> None:
    x0, ys = sources()
    for module in (attnres(), attnres(Mode.block, n_blocks=2)):
        state = module.begin(x0)
        for i, y in enumerate(ys):
            alpha, values = module.weights(state, i)
            assert alpha.shape == (len(values), *x0.shape[:-1])
            assert (alpha >= 0).all() and torch.allclose(alpha.sum(0), torch.ones(()).double())
            state = module.write(state, i, y)


def test_attnres_scaling_one_source_keeps_its_weights_and_scales_its_share() -> None:
    """Keys are RMSNorm(v): scaling a source by s > 0 leaves every depth logit (so every α) unchanged, up to
    the norm's eps; the mix then changes by exactly (s − 1)·α_k·v_k. The LM's logits do change."""
    x0, ys = sources()
    module, k, s = attnres(), 2, 7.0
    module.eps = 1e-14  # the invariance is exact only without the norm's eps (1e-6 moves α by ~1e-7 here)
    scaled = [y * s if j == k else y for j, y in enumerate(ys)]
    state, state_s = module.begin(x0), module.begin(x0)
    for i in range(len(ys)):
        (alpha, values), (alpha_s, _) = module.weights(state, i), module.weights(state_s, i)
        assert_close_report(alpha_s, alpha, atol=1e-9)
        expected = module.read(state, i)
        if i > k:  # y_k is source k + 1 (source 0: the embedding)
            expected = expected + (s - 1) * alpha[k + 1, ..., None] * values[k + 1]
        assert_close_report(module.read(state_s, i), expected, atol=1e-9)
        state, state_s = module.write(state, i, ys[i]), module.write(state_s, i, scaled[i])


# --------------------------------------------------------------------------- denseformer


@pytest.mark.parametrize(("dilation", "period"), [(1, 1), (2, 1), (1, 2), (2, 3)])
def test_denseformer_averages_the_layer_outputs_it_should(dilation: int, period: int) -> None:
    """Per layer ℓ: h = X_ℓ + Σ its sublayer outputs = X_{ℓ+1}; the next input Σ_{j ≡ ℓ+1 mod dilation} α X_j
    after every period-th layer. Layer 1 has three sublayers here (a memory slot)."""
    names = ("L0.attention", "L0.ffn", "L1.memory", "L1.attention", "L1.ffn", "L2.attention", "L2.ffn")
    module = DenseFormer(
        DenseFormer.Config(dilation, period), DIMS, n_sublayers=7, sublayer_names=names
    ).double()
    perturb(module)
    x0, ys = sources(len(names))
    reads, final = run_stack(module, x0, ys)
    xs, h, expected_reads = [x0], x0, []
    for layer, members in enumerate(((0, 1), (2, 3, 4), (5, 6))):
        for i in members:
            expected_reads.append(h)
            h = h + ys[i]
        xs.append(h)
        if (layer + 1) % period == 0:
            js = [j for j in range(layer + 2) if (layer + 1 - j) % dilation == 0]
            alpha = module.alphas[str(layer)]
            assert len(alpha) == len(js)
            h = sum(a * xs[j] for a, j in zip(alpha, js, strict=True))
    for got, want in zip([*reads, final], [*expected_reads, h], strict=True):
        assert_close_report(got, want, atol=1e-12)


# --------------------------------------------------------------------------- hyper-connections


def test_hyper_connections_equal_the_streams_written_out() -> None:
    """H'_k = Σ_j A_r[j,k] H_j + β_k y, input Σ_j A_m[j] H_j, [A_m|A_r] = static + s_α tanh(RMSNorm(H) W_α),
    stream by stream and token by token (dynamic HC, Eq. 10–13)."""
    n = 3
    module = HyperConnections(
        HyperConnections.Config(n_streams=n, dynamic=True), DIMS, n_sublayers=4, sublayer_names=NAMES[:4]
    ).double()
    perturb(module)
    x0, ys = sources(4, b=1, t=2)
    reads, final = run_stack(module, x0, ys)
    for t in range(2):
        H = [x0[0, t].clone() for _ in range(n)]
        for i, y in enumerate(ys):
            normed = [rmsnorm(h) for h in H]
            s_a, s_b = module.scale[i]
            A = [
                [
                    module.alpha_init[i, j, c]
                    + module.alpha[i, j, c]
                    + s_a * torch.tanh(normed[j] @ module.w_alpha[i, :, c])
                    for c in range(n + 1)
                ]
                for j in range(n)
            ]
            beta = [1 + module.beta[i, k] + s_b * torch.tanh(normed[k] @ module.w_beta[i]) for k in range(n)]
            assert_close_report(reads[i][0, t], sum(A[j][0] * H[j] for j in range(n)), atol=1e-12)
            H = [sum(A[j][1 + k] * H[j] for j in range(n)) + beta[k] * y[0, t] for k in range(n)]
        assert_close_report(final[0, t], sum(H) / n, atol=1e-12)


def test_sinkhorn_gives_doubly_stochastic_mixing() -> None:
    a = sinkhorn(torch.randn(5, 4, 4, dtype=torch.float64) * 3, iters=50)
    assert (a >= 0).all()
    assert_close_report(a.sum(-1), torch.ones(5, 4), atol=1e-9)
    assert_close_report(a.sum(-2), torch.ones(5, 4), atol=1e-6)


def test_static_hyper_depth_weights_reproduce_each_input() -> None:
    """Unrolled static HC: input_i = Σ_s W[i, s] · source_s exactly (sources: embedding, sublayer outputs);
    at init W is all ones below the diagonal, the pre-norm sum."""
    module = HyperConnections(HyperConnections.Config(), DIMS, n_sublayers=6, sublayer_names=NAMES).double()
    x0, ys = sources()
    module.record_depth_weights = True
    run_stack(module, x0, ys)
    init = module.depth_weights().weights
    assert torch.equal(init.nan_to_num(0), torch.ones(7, 7).tril())
    perturb(module)
    reads, final = run_stack(module, x0, ys)
    w = module.depth_weights().weights.double()
    for i, h in enumerate([*reads, final]):
        assert_close_report(h, sum(w[i, s] * v for s, v in enumerate([x0, *ys[:i]])), atol=1e-5)  # w: fp32


# --------------------------------------------------------------------------- in the student


@pytest.mark.parametrize("variant", ["denseformer", "denseformer_dilated", "hyper", "hyper_dynamic"])
def test_at_init_equal_to_the_prenorm_student(variant: str) -> None:
    """Same seed, same weights (these plugins draw no random numbers): the same logits, bit for bit."""
    x = torch.randint(0, 256, (2, 12))
    prenorm, other = build_student_seeded(SMALL), student(variant)
    shared = {k: v for k, v in other.state_dict().items() if not k.startswith("residual.")}
    assert all(torch.equal(v, prenorm.state_dict()[k]) for k, v in shared.items())
    assert torch.equal(other(x), prenorm(x))


def build_student_seeded(overrides: list[str]):
    torch.manual_seed(0)
    return build_student(compose(overrides))


def test_mhc_at_init_equals_prenorm_up_to_rounding() -> None:
    """Sinkhorn(exp(I)) is not I, but any doubly-stochastic mix of identical streams leaves them identical."""
    x = torch.randint(0, 256, (2, 12))
    assert_close_report(student("mhc")(x), build_student_seeded(SMALL)(x), atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_causal_and_kv_cache_decoding_equals_the_full_forward(variant: str) -> None:
    model = student(variant)
    perturb(model.residual)
    model.eval()
    x = torch.randint(0, 256, (2, 12))
    changed = x.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 256
    with torch.no_grad():
        full = model(x)
        assert torch.equal(model(changed)[:, :8], full[:, :8]), "a later token changed an earlier output"
        cache = KVCache(model.dims.context)
        steps = [model(x[:, :5], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(5, 12)]
    assert_close_report(torch.cat(steps, dim=1), full, atol=1e-5)
    prompt = x[:, :4]
    assert torch.equal(generate(model, prompt, 8), generate(model, prompt, 8, use_cache=False))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_parameter_gets_a_gradient(variant: str) -> None:
    model = student(variant)
    perturb(model.residual)
    x = torch.randint(0, 256, (2, 12))
    model(x).square().mean().backward()
    missing = [n for n, p in model.residual.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, missing


# --------------------------------------------------------------------------- depth-weight heat map


@pytest.mark.parametrize("variant", ["attnres_full", "attnres_block", "denseformer", "hyper_dynamic"])
def test_depth_weights_heat_map_is_written(variant: str, tmp_path) -> None:
    model = student(variant)
    perturb(model.residual)
    x = torch.randint(0, 256, (2, 12))
    model(x)  # not recording: nothing kept (denseformer's weights are parameters, always there)
    assert (model.residual.depth_weights() is None) == variant.startswith(("attnres", "hyper"))
    depth = plots.record_depth_weights(model, x)
    assert not model.residual.record_depth_weights and model.training
    w = depth.weights
    assert w.shape == (len(depth.readers), len(depth.sources)) and depth.readers[-1] == "final"
    if variant.startswith("attnres"):  # convex rows over the visible sources
        assert_close_report(w.nan_to_num(0).sum(1), torch.ones(len(w)), atol=1e-5)
        assert torch.isnan(w[0, 1:]).all() and depth.sources[0] == "emb"
    png = plots.save_depth_weights(depth, tmp_path / "plots", step=7)
    assert png == tmp_path / "plots" / "depth_weights.png" and png.read_bytes()[:4] == b"\x89PNG"
    record = json.loads(png.with_suffix(".json").read_text())
    assert record["step"] == 7 and record["readers"] == depth.readers and record["sources"] == depth.sources
    assert record["weights"][0][-1] is None or not variant.startswith("attnres")


@pytest.mark.slow
def test_cli_training_writes_the_heat_map(tmp_path) -> None:
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "archlab.cli",
        "train",
        "residual=attnres_block",
        "residual.n_blocks=2",
        *SMALL,
        "objective=ce",
        "trainer.max_steps=3",
        "trainer.eval_every=2",
        "trainer.eval_tokens=256",
        "trainer.batch_size=2",
        "data.max_bytes=200000",
        "logger=none",
        "trainer.progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "plots" / "depth_weights.json").read_text())
    assert record["step"] == 3 and record["sources"] == [
        "emb",
        "L0.attention..L0.ffn",
        "L1.attention..L1.ffn",
    ]
    assert (run_dir / "plots" / "depth_weights.png").stat().st_size > 1000
