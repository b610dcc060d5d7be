"""The study's statistics (archlab.calibration) against hand computations and synthetic studies whose true
densities are known: interval coverage, placebo and shifted-student verdicts over 200 draws."""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from archlab.calibration import Arm, anchored_density, calibrate, pooled_noise, verdict
from archlab.density import fit_ladder

E, A, ALPHA = 2.0, 25.0, 0.25  # a made-up true curve L(N) = E + A·N^(−α), ~2.8 bpb at the baseline
RUNGS = 12288 * np.array([2, 3, 4, 5, 6]) ** 3.0  # the ladder rule's sizes (12·32²·k³)
N_BASE = RUNGS[2]


def true_loss(n):
    return E + A * np.asarray(n, dtype=float) ** -ALPHA


def true_n_eff(loss: float) -> float:
    return (A / (loss - E)) ** (1 / ALPHA)


def synthetic_study(
    rng, *, seeds: int, sigma: float, students: dict[str, tuple[float, float]], n_boot: int = 40
):
    """Ladder + arms with per-run noise σ and a shared data-order effect per seed.

    ``students``: name -> (N, true loss); returns (fit, arms).
    """
    u = rng.normal(0, sigma / 2, seeds)  # the data order of seed s, common to every arm
    ladder_n = [*RUNGS, *[N_BASE] * (seeds - 1)]
    ladder_seed = [0] * len(RUNGS) + list(range(1, seeds))
    ladder_bpb = [
        true_loss(n) + u[s] + rng.normal(0, sigma) for n, s in zip(ladder_n, ladder_seed, strict=True)
    ]
    fit = fit_ladder(ladder_n, ladder_bpb, n_boot=n_boot, seed=int(rng.integers(1 << 30)))
    base_bpb = [ladder_bpb[2], *ladder_bpb[len(RUNGS) :]]
    arms = [Arm("baseline", "baseline", tuple(range(seeds)), tuple(base_bpb), N_BASE, N_BASE)]
    for name, (n, loss) in students.items():
        bpb = tuple(loss + u[s] + rng.normal(0, sigma) for s in range(seeds))
        role = name if name in ("placebo", "control") else "student"
        arms.append(Arm(name, role, tuple(range(seeds)), bpb, n, n))
    return fit, arms


def test_pooled_noise_is_the_two_way_anova_residual() -> None:
    y = np.array([[3.0, 3.1, 2.9], [3.2, 3.25, 3.0], [2.8, 3.0, 2.85]])  # arms × seeds
    arms = [
        Arm(f"a{i}", "baseline" if i == 0 else "student", (0, 1, 2), tuple(row), 1e5, 1e5)
        for i, row in enumerate(y)
    ]
    ss = sum(
        (y[i, s] - y[i].mean() - y[:, s].mean() + y.mean()) ** 2 for i in range(3) for s in range(3)
    )  # written out
    noise = pooled_noise(arms)
    assert noise.dof == 4 and noise.source == "anova"
    assert noise.sigma == pytest.approx(math.sqrt(ss / 4))


def test_one_seed_takes_the_noise_from_the_placebo() -> None:
    arms = [
        Arm("baseline", "baseline", (0,), (3.00,), 1e5, 1e5),
        Arm("placebo", "placebo", (0,), (3.03,), 1e5, 1e5),
        Arm("x", "student", (0,), (2.9,), 1e5, 1e5),
    ]
    noise = pooled_noise(arms)
    assert (noise.dof, noise.source) == (1, "placebo")
    assert noise.sigma == pytest.approx(0.03 / math.sqrt(2))  # Var(Δ_placebo) = 2σ²


def test_anchored_density_inverts_the_fit_at_the_baseline_plus_delta() -> None:
    e, a, alpha, n_b, delta, n = 1.5, 30.0, 0.3, 8e5, -0.04, 6e5
    loss = e + a * n_b**-alpha + delta  # the fitted baseline loss moved by Δ
    by_hand = (a / (loss - e)) ** (1 / alpha) / n  # N_eff = (A / (L − E))^(1/α), ρ = N_eff / N
    got = anchored_density(np.array([[e, a, alpha]]), n_b, np.array([delta]), n)
    assert got[0] == pytest.approx(by_hand, rel=1e-12)
    past_floor = anchored_density(np.array([[e, a, alpha]]), n_b, np.array([-a * n_b**-alpha - 0.1]), n)
    assert past_floor[0] == math.inf


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [(1.1, 1.5, "denser"), (0.5, 0.9, "less dense"), (0.9, 1.1, "no detectable difference")],
)
def test_verdicts_come_from_the_interval(lo: float, hi: float, expected: str) -> None:
    assert verdict(lo, hi) == expected


def test_calibration_passes_on_a_clean_synthetic_study() -> None:
    rng = np.random.default_rng(1)
    control_loss = true_loss(N_BASE / 2)  # a model worth half the baseline, counted at the full size
    fit, arms = synthetic_study(
        rng,
        seeds=3,
        sigma=0.005,
        students={"placebo": (N_BASE, true_loss(N_BASE)), "control": (N_BASE, control_loss)},
    )
    study = calibrate(arms, fit)
    c, rows = study["calibration"], {r["name"]: r for r in study["students"]}
    assert c["placebo_ok"] and c["control_ok"]
    assert rows["control"]["density"] == pytest.approx(0.5, rel=0.15)
    assert rows["baseline"]["density"] == 1.0 and rows["baseline"]["verdict"] == "reference"
    assert c["seed_noise_bpb"] == pytest.approx(0.005, rel=0.6)


def test_an_interval_reaching_past_the_fitted_floor_ends_at_infinity_not_nan() -> None:
    """A student whose loss draws cross the floor E has ∞ among its density draws: hi is ∞."""
    rng = np.random.default_rng(3)
    fit, arms = synthetic_study(rng, seeds=2, sigma=0.01, students={"placebo": (N_BASE, true_loss(N_BASE))})
    gap = true_loss(N_BASE) - E
    near_floor = Arm("floor", "student", (0, 1), tuple(b - gap + 0.005 for b in arms[0].bpb), N_BASE, N_BASE)
    row = next(r for r in calibrate([*arms, near_floor], fit)["students"] if r["name"] == "floor")
    assert row["density_hi"] == math.inf and not math.isnan(row["density_lo"])
    assert row["verdict"] in ("denser", "no detectable difference")


SIGMA = 0.03  # per-run seed noise of the order measured at the studies' budgets
N_SMALL = 0.7 * N_BASE
TRUE_RHO = 0.9 * N_BASE / N_SMALL  # a student with 30 % fewer parameters worth 90 % of the baseline


def one_draw(seed: int) -> tuple[bool, str, str]:
    """One synthetic study: (the small student's interval covers its true density, placebo verdict,
    verdict of a clearly worse student worth 40 % of the baseline)."""
    rng = np.random.default_rng(seed)
    students = {
        "placebo": (N_BASE, true_loss(N_BASE)),
        "control": (N_BASE, true_loss(N_BASE / 2)),
        "small": (N_SMALL, true_loss(0.9 * N_BASE)),
        "shifted": (N_BASE, true_loss(0.4 * N_BASE)),
    }
    fit, arms = synthetic_study(rng, seeds=2, sigma=SIGMA, students=students, n_boot=20)
    rows = {r["name"]: r for r in calibrate(arms, fit, seed=seed)["students"]}
    small = rows["small"]
    return (
        small["density_lo"] <= TRUE_RHO <= small["density_hi"],
        rows["placebo"]["verdict"],
        rows["shifted"]["verdict"],
    )


@pytest.mark.slow
def test_intervals_cover_the_true_density_and_verdicts_hold_over_200_synthetic_studies() -> None:
    draws = 200  # issue 17 asks for 200; seeded, so a fixed computation, not a flaky one
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(one_draw, range(draws), chunksize=10))
    covered = sum(c for c, _, _ in results)
    placebo_null = sum(p == "no detectable difference" for _, p, _ in results)
    right = sum(v == "less dense" for _, _, v in results)
    wrong = sum(v == "denser" for _, _, v in results)
    assert covered >= 0.85 * draws, f"coverage {covered / draws:.2f}"
    assert placebo_null >= 0.85 * draws, f"placebo null {placebo_null / draws:.2f}"
    assert right >= 0.85 * draws, f"shifted student: right direction {right / draws:.2f}"
    assert wrong == 0
