"""Objectives ``ce`` and ``kd`` against plain formulas written out over a full, small vocabulary.

The references use Python floats and explicit sums over every token (no torch softmax), so they share no
code with the plugin. Teacher caches are built here too: ids sorted by decreasing teacher probability,
log-probabilities from the full softmax at the cache's temperature.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from archlab import registry
from archlab.baselines.objective import CrossEntropy, Distillation, Divergence, teacher_agreement
from archlab.config import compose
from archlab.errors import ConfigError
from archlab.soft_targets import SoftTargets

V, B, T = 11, 2, 3
ALL = [Divergence.forward_kl, Divergence.reverse_kl, Divergence.jsd]

# ---- plain references: lists of floats, one distribution per position -----------------------------


def softmax(row: list[float], tau: float = 1.0) -> list[float]:
    top = max(row)
    e = [math.exp((x - top) / tau) for x in row]
    s = sum(e)
    return [x / s for x in e]


def ref_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def ref_jsd(p: list[float], q: list[float], beta: float) -> float:
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
    return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)


def ref_divergence(p: list[float], q: list[float], kind: Divergence, beta: float = 0.5) -> float:
    if kind is Divergence.forward_kl:
        return ref_kl(p, q)
    if kind is Divergence.reverse_kl:
        return ref_kl(q, p)
    return ref_jsd(p, q, beta)


def rows(x: torch.Tensor) -> list[list[float]]:
    """(b, t, v) -> b·t rows of Python floats."""
    return x.double().reshape(-1, x.shape[-1]).tolist()


def buckets(p: list[float], ids: list[int]) -> list[float]:
    """(p at ids..., 1 − Σ) over the full distribution p; no rest bucket when ids cover the vocabulary."""
    head = [p[i] for i in ids]
    return head if len(ids) == len(p) else [*head, 1.0 - sum(head)]


def cache(teacher_logits: torch.Tensor, k: int, tau: float = 1.0) -> SoftTargets:
    """Top-k of softmax(teacher_logits / tau), sorted by decreasing probability, as float32 log-probs."""
    ids, logprobs = [], []
    for row in rows(teacher_logits):
        p = softmax(row, tau)
        top = sorted(range(len(p)), key=lambda v: -p[v])[:k]
        ids.append(top)
        logprobs.append([math.log(p[v]) for v in top])
    shape = (*teacher_logits.shape[:-1], k)
    return SoftTargets(
        torch.tensor(ids).reshape(shape), torch.tensor(logprobs, dtype=torch.float32).reshape(shape)
    )


def ref_kd(z, zt, k, kind, tau=1.0, beta=0.5, mask=None) -> float:
    """tau² · mean over counted positions of D on the bucketed (or full, k = V) distributions."""
    keep = [True] * (B * T) if mask is None else mask.flatten().tolist()
    vals = []
    for row, trow, counted in zip(rows(z), rows(zt), keep, strict=True):
        if not counted:
            continue
        p, q = softmax(trow, tau), softmax(row, tau)
        ids = sorted(range(V), key=lambda v: -p[v])[:k]
        vals.append(ref_divergence(buckets(p, ids), buckets(q, ids), kind, beta))
    return tau**2 * sum(vals) / len(vals)


def ref_ce(z, y, mask=None) -> float:
    keep = [True] * (B * T) if mask is None else mask.flatten().tolist()
    vals = [
        -math.log(softmax(row)[t]) for row, t, c in zip(rows(z), y.flatten().tolist(), keep, strict=True) if c
    ]
    return sum(vals) / len(vals)


def kd(divergence=Divergence.forward_kl, **kw) -> Distillation:
    return Distillation(Distillation.Config(divergence=divergence, **kw))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, T, V, generator=g) * 2
    zt = torch.randn(B, T, V, generator=g) * 2
    y = torch.randint(0, V, (B, T), generator=g)
    return z, zt, y


# ---- divergences against the formulas -------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_forward_kl_matches_formula(batch, tau):
    z, zt, y = batch
    loss = kd(Divergence.forward_kl, temperature=tau)(z, y, cache(zt, V, tau))
    assert loss.item() == pytest.approx(ref_kd(z, zt, V, Divergence.forward_kl, tau), abs=1e-5)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_reverse_kl_matches_formula(batch, tau):
    z, zt, y = batch
    loss = kd(Divergence.reverse_kl, temperature=tau)(z, y, cache(zt, V, tau))
    assert loss.item() == pytest.approx(ref_kd(z, zt, V, Divergence.reverse_kl, tau), abs=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_formula(batch, beta):
    z, zt, y = batch
    loss = kd(Divergence.jsd, beta=beta, temperature=1.5)(z, y, cache(zt, V, 1.5))
    assert loss.item() == pytest.approx(ref_kd(z, zt, V, Divergence.jsd, 1.5, beta), abs=1e-5)


@pytest.mark.parametrize("k", [V, 4])
def test_jsd_endpoints_are_forward_and_reverse_kl(batch, k):
    """TRL convention: beta = 0 is KL(teacher ‖ student), beta = 1 is KL(student ‖ teacher), exactly."""
    z, zt, y = batch
    soft = cache(zt, k)
    assert kd(Divergence.jsd, beta=0.0)(z, y, soft).item() == pytest.approx(
        ref_kd(z, zt, k, Divergence.forward_kl), abs=1e-6
    )
    assert kd(Divergence.jsd, beta=1.0)(z, y, soft).item() == pytest.approx(
        ref_kd(z, zt, k, Divergence.reverse_kl), abs=1e-6
    )
    assert kd(Divergence.jsd, beta=0.0)(z, y, soft) == kd(Divergence.forward_kl)(z, y, soft)
    assert kd(Divergence.jsd, beta=1.0)(z, y, soft) == kd(Divergence.reverse_kl)(z, y, soft)


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("k", [V, 4])
def test_zero_at_equality(batch, kind, k):
    z, _, y = batch
    loss = kd(kind, temperature=2.0)(z, y, cache(z, k, tau=2.0))
    assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("k", [V, 3])
def test_non_negative_on_random_inputs(kind, k):
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        z, zt = torch.randn(B, T, V, generator=g) * 3, torch.randn(B, T, V, generator=g) * 3
        assert kd(kind, beta=0.3)(z, torch.zeros(B, T, dtype=torch.long), cache(zt, k)).item() >= -1e-6


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_bounded_by_binary_entropy(beta):
    """JSD_beta ≤ H(beta) (= ln 2 at 0.5), reached by disjoint supports: a near one-hot pair."""
    z = torch.full((B, T, V), -30.0)
    zt = z.clone()
    z[..., 0], zt[..., 1] = 30.0, 30.0
    loss = kd(Divergence.jsd, beta=beta)(z, torch.zeros(B, T, dtype=torch.long), cache(zt, V)).item()
    h = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert loss <= h + 1e-6 and loss == pytest.approx(h, abs=1e-4)


# ---- top-k caches ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL)
def test_topk_with_k_equal_v_is_full_kd(batch, kind):
    z, zt, y = batch
    full = []
    for row, trow in zip(rows(z), rows(zt), strict=True):
        full.append(ref_divergence(softmax(trow), softmax(row), kind, 0.3))
    loss = kd(kind, beta=0.3)(z, y, cache(zt, V))
    assert loss.item() == pytest.approx(sum(full) / len(full), abs=1e-5)


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("k", [1, 4, V - 1])
def test_topk_is_formula_on_rest_bucket_distributions(batch, kind, k):
    z, zt, y = batch
    loss = kd(kind, beta=0.3, temperature=1.5)(z, y, cache(zt, k, tau=1.5))
    assert loss.item() == pytest.approx(ref_kd(z, zt, k, kind, 1.5, 0.3), abs=1e-5)


def test_rest_bucket_is_exact_when_student_tail_is_proportional_to_teachers(batch):
    """KL chain rule: the tail term vanishes if q restricted to the tail ∝ p restricted to the tail."""
    z, zt, y = batch
    k = 4
    soft = cache(zt, k)
    z = zt + 0.7  # the tail of z equals the teacher's, shifted (proportional after softmax) ...
    z.scatter_(-1, soft.ids, torch.randn(B, T, k))  # ... the top-k logits differ
    full = [ref_kl(softmax(trow), softmax(row)) for row, trow in zip(rows(z), rows(zt), strict=True)]
    assert kd()(z, y, soft).item() == pytest.approx(sum(full) / len(full), abs=1e-5)


def test_tiny_rest_masses_are_finite():
    """A teacher whose top-k holds all the mass (tail rounds to ≤ 0) and a confident student: no NaN/inf."""
    z = torch.full((B, T, V), -60.0, requires_grad=True)
    zt = torch.full((B, T, V), -60.0)
    zt[..., 0] = 60.0
    soft = cache(zt, 2)
    with torch.no_grad():
        z[..., 0] = 60.0
    for kind in ALL:
        loss = kd(kind)(z, torch.zeros(B, T, dtype=torch.long), soft)
        loss.backward()
        assert torch.isfinite(loss) and abs(loss.item()) < 1e-5
        assert torch.isfinite(z.grad).all()
        z.grad = None


# ---- masking, mixing, dtypes, gradients -----------------------------------------------------------


def garbage_outside(mask, soft, y):
    """Teacher NaNs and ignore-index targets at the positions the mask drops."""
    lp = soft.logprobs.clone()
    lp[~mask] = math.nan
    y = y.clone()
    y[~mask] = -100
    return SoftTargets(soft.ids, lp), y


@pytest.mark.parametrize("kind", ALL)
def test_masked_positions_do_not_change_the_loss(batch, kind):
    z, zt, y = batch
    mask = torch.tensor([[True, False, True], [False, True, True]])
    soft, y_bad = garbage_outside(mask, cache(zt, 4), y)
    z = z.clone().requires_grad_()
    loss = kd(kind, alpha=0.6)(z, y_bad, soft, mask)
    expected = 0.4 * ref_ce(z.detach(), y, mask) + 0.6 * ref_kd(z.detach(), zt, 4, kind, mask=mask)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    assert (z.grad[~mask] == 0).all() and (z.grad[mask] != 0).any()


@pytest.mark.parametrize("objective", [CrossEntropy(CrossEntropy.Config()), kd(alpha=0.5)])
def test_all_masked_is_zero_and_backpropagates(batch, objective):
    z, zt, y = batch
    z = z.clone().requires_grad_()
    mask = torch.zeros(B, T, dtype=torch.bool)
    loss = objective(z, y, cache(zt, 4), mask)
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    loss.backward()
    assert (z.grad == 0).all()
    metrics = teacher_agreement(z, cache(zt, 4), mask)
    assert all(math.isnan(v) for v in metrics.values())


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_alpha_mixes_hard_ce_at_tau_1_and_scaled_kd(batch, alpha):
    z, zt, y = batch
    loss = kd(Divergence.forward_kl, alpha=alpha, temperature=2.0)(z, y, cache(zt, 4, tau=2.0))
    expected = (1 - alpha) * ref_ce(z, y) + alpha * ref_kd(z, zt, 4, Divergence.forward_kl, 2.0)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_ce_equals_f_cross_entropy(batch):
    z, _, y = batch
    ce = CrossEntropy(CrossEntropy.Config())
    assert ce(z, y).item() == pytest.approx(F.cross_entropy(z.reshape(-1, V), y.flatten()).item(), abs=1e-6)
    assert ce(z, y).item() == pytest.approx(ref_ce(z, y), abs=1e-5)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    ignored = y.masked_fill(~mask, -100)
    assert ce(z, y, mask=mask).item() == pytest.approx(
        F.cross_entropy(z.reshape(-1, V), ignored.flatten(), ignore_index=-100).item(), abs=1e-6
    )


@pytest.mark.parametrize("objective", [CrossEntropy(CrossEntropy.Config()), *(kd(k, alpha=0.5) for k in ALL)])
def test_bf16_logits_give_finite_float32_loss(batch, objective):
    z, zt, y = batch
    z16 = z.bfloat16().requires_grad_()
    loss = objective(z16, y, cache(zt, 4))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(objective(z16.detach().float(), y, cache(zt, 4)).item(), abs=1e-5)
    loss.backward()
    assert z16.grad.dtype == torch.bfloat16 and torch.isfinite(z16.grad.float()).all()


@pytest.mark.parametrize("objective", [CrossEntropy(CrossEntropy.Config()), *(kd(k, alpha=1.0) for k in ALL)])
@pytest.mark.parametrize("k", [V, 4])
def test_gradient_flows_to_logits(batch, objective, k):
    z, zt, y = batch
    z = z.clone().requires_grad_()
    objective(z, y, cache(zt, k)).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_tau_squared_keeps_gradient_scale():
    """techniques.md §7(e)2: V = 100, N(0, 1) logits; |∇| from τ = 1 to 4 changes < 2× (> 10× without τ²)."""
    g = torch.Generator().manual_seed(0)
    z, zt = torch.randn(64, 1, 100, generator=g), torch.randn(64, 1, 100, generator=g)
    y = torch.zeros(64, 1, dtype=torch.long)

    def grad_norm(tau: float) -> float:
        x = z.clone().requires_grad_()
        kd(temperature=tau)(x, y, SoftTargets.from_logprobs(F.log_softmax(zt / tau, -1), 100)).backward()
        return x.grad.norm().item()

    with_tau2 = grad_norm(1.0) / grad_norm(4.0)
    assert 0.5 < with_tau2 < 2.0
    assert with_tau2 * 16 > 10.0  # the same ratio with the τ² factor divided out


def test_kd_without_teacher_says_what_to_pass(batch):
    z, _, y = batch
    with pytest.raises(ValueError, match="teacher"):
        kd()(z, y)
    assert kd(alpha=0.0)(z, y).item() == pytest.approx(ref_ce(z, y), abs=1e-5)


# ---- eval metrics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [V, 4])
def test_teacher_agreement_matches_plain_computation(batch, k):
    z, zt, _ = batch
    z = z.clone()
    z[0, 0] = zt[0, 0]  # at least one agreeing position
    mask = torch.tensor([[True, True, True], [False, True, True]])
    got = teacher_agreement(z, cache(zt, k), mask)
    kls, agree = [], []
    for row, trow, counted in zip(rows(z), rows(zt), mask.flatten().tolist(), strict=True):
        if counted:
            p, q = softmax(trow), softmax(row)
            ids = sorted(range(V), key=lambda v: -p[v])[:k]
            kls.append(ref_kl(buckets(p, ids), buckets(q, ids)))
            agree.append(max(range(V), key=lambda v: row[v]) == ids[0])
    assert set(got) == {"kl_teacher_student", "top1_agreement"}
    assert got["kl_teacher_student"] == pytest.approx(sum(kls) / len(kls), abs=1e-5)
    assert got["top1_agreement"] == pytest.approx(sum(agree) / len(agree))
    assert 0 < got["top1_agreement"] < 1


# ---- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("beta", 1.5),
        ("beta", -0.1),
        ("temperature", 0.0),
        ("temperature", -1.0),
        ("alpha", 1.1),
        ("divergence", "kl"),
    ],
)
def test_config_validation_names_the_key(field, value):
    cfg = Distillation.Config(**{field: value})
    with pytest.raises(ConfigError, match=f"objective.{field}") as err:
        cfg.validate(None)
    assert err.value.key == f"objective.{field}"
    with pytest.raises(ConfigError):
        Distillation(cfg)


def test_plugin_flags_and_discovery():
    assert registry.get("objective", "kd") is Distillation
    assert registry.get("objective", "ce") is CrossEntropy
    assert Distillation.needs_teacher and not CrossEntropy.needs_teacher


@pytest.mark.parametrize("preset", ["forward_kl", "reverse_kl", "jsd"])
def test_presets_compose(preset):
    cfg = compose([f"objective={preset}"])
    assert cfg.objective.plugin == "kd" and cfg.objective.divergence is Divergence(preset)


def test_jsd_preset_with_override_builds_the_objective():
    from omegaconf import OmegaConf

    cfg = compose(["objective=jsd", "objective.beta=0.25"])
    assert cfg.objective.plugin == "kd" and cfg.objective.beta == 0.25
    objective = registry.get("objective", cfg.objective.plugin)(OmegaConf.to_object(cfg.objective))
    assert objective.divergence is Divergence.jsd and objective.beta == 0.25
    bad = compose(["objective=kd", "objective.alpha=2"])
    with pytest.raises(ConfigError, match="objective.alpha"):
        Distillation(OmegaConf.to_object(bad.objective))
