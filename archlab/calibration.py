"""Paired-seed statistics of a density study: Δbpb against the baseline with intervals, densities whose
intervals carry both the ladder fit's and the seeds' uncertainty, a verdict per arm, and the checks of
the placebo and the negative control.

Design (a randomised block design, seeds as blocks; Montgomery, *Design and Analysis of Experiments*, ch. 4).
Arm i (the baseline b included) is trained at seeds s = 0..S−1; seed s fixes the data order of every arm
(common random numbers), so its effect u_s cancels in differences:

    y_is = μ_i + u_s + e_is,     e_is ~ N(0, σ²)          (one σ for every arm: pooled)
    Δ_is = y_is − y_bs,          Δ̄_i = mean_s Δ_is,       se_i = σ̂ · √(2 / S)
    σ̂²  = Σ_is (y_is − ȳ_i − ȳ_s + ȳ)² / ((I − 1)(S − 1))        (two-way ANOVA residual, no interaction)
    Δ̄_i ± t_{0.95, dof} · se_i                                    (90 % t-interval)
    MDE  = (t_{0.95, dof} + t_{0.80, dof}) · σ̂ · √(2 / S)          (two-sided 10 % test, 80 % power)

With one seed there is no replicate; σ̂ then comes from the placebo, whose true Δ is 0 by construction:
σ̂² = Δ_placebo² / 2 with one degree of freedom, and the placebo check can no longer fail (said so).

Density is anchored at the baseline's point on the ladder fit L(N) = E + A·N^(−α), so the baseline's own
residual from the power law cancels (it is reported instead, as a check that the ladder holds):

    N_eff,i = (A / (L(N_b) − E + Δ̄_i))^(1/α) = N_b · (1 + Δ̄_i · N_b^α / A)^(−1/α),     ρ_i = N_eff,i / N_i

(∞ where the bracket is ≤ 0: a student better than the fitted floor). Its 90 % interval is the central
range of ρ over Monte-Carlo draws that pair a bootstrap fit (E, A, α)_k of the ladder with
Δ = Δ̄_i + se_i · T, T ~ t_dof (the seeds' uncertainty, σ̂'s own included). A verdict is read from that
interval only: ``denser`` (lo > 1), ``less dense`` (hi < 1), else ``no detectable difference``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from archlab.density import DensityError, LadderFit

ROLES = ("baseline", "placebo", "control", "student")
LEVEL = 0.90  # interval mass, everywhere
POWER = 0.80  # of the minimum detectable difference
MC_DRAWS = 4000


@dataclass(frozen=True)
class Arm:
    """One arm of a study: its held-out bpb per seed (``bpb[s]`` at seed ``seeds[s]``) and its sizes.

    ``n`` is the non-embedding parameter count density is reported against (a control reports the
    baseline's), ``n_active`` the active one (MoE-style students; equal to ``n`` otherwise).
    """

    name: str
    role: str
    seeds: tuple[int, ...]
    bpb: tuple[float, ...]
    n: float
    n_active: float

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise DensityError(f"arm {self.name}: role {self.role!r} is not one of {ROLES}")
        if len(self.seeds) != len(self.bpb) or not self.seeds:
            raise DensityError(f"arm {self.name}: {len(self.bpb)} results for seeds {self.seeds}")

    @property
    def mean(self) -> float:
        return float(np.mean(self.bpb))


@dataclass(frozen=True)
class Noise:
    """Pooled per-run seed noise σ̂ (bpb), its degrees of freedom and where it came from."""

    sigma: float
    dof: int
    source: str  # "anova" (replicated seeds) or "placebo" (one seed: the placebo's Δ taken as pure noise)

    def t(self, q: float) -> float:
        return float(stats.t.ppf(q, self.dof))


def _by_seed(arm: Arm) -> dict[int, float]:
    return dict(zip(arm.seeds, arm.bpb, strict=True))


def pooled_noise(arms: list[Arm]) -> Noise:
    """σ̂ from the two-way (arm × seed) ANOVA residual over the seeds every arm has run."""
    seeds = sorted(set.intersection(*(set(a.seeds) for a in arms)))
    if len(seeds) >= 2:
        y = np.array([[_by_seed(a)[s] for s in seeds] for a in arms])  # arms × seeds
        resid = y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + y.mean()
        dof = (y.shape[0] - 1) * (y.shape[1] - 1)
        return Noise(float(math.sqrt((resid**2).sum() / dof)), dof, "anova")
    base = _role(arms, "baseline")
    placebos = [a for a in arms if a.role == "placebo"]
    if not placebos:
        raise DensityError("one seed and no placebo: the seed noise cannot be estimated")
    deltas = [v - _by_seed(base)[s] for p in placebos for s, v in _by_seed(p).items() if s in base.seeds]
    return Noise(float(math.sqrt(np.mean(np.square(deltas)) / 2)), len(deltas), "placebo")


def _role(arms: list[Arm], role: str) -> Arm:
    found = [a for a in arms if a.role == role]
    if len(found) != 1:
        raise DensityError(f"a study needs exactly one {role} arm, got {len(found)}")
    return found[0]


def paired_deltas(arm: Arm, baseline: Arm) -> list[float]:
    """Δ_is = y_is − y_bs over the seeds both arms ran."""
    base = _by_seed(baseline)
    return [v - base[s] for s, v in _by_seed(arm).items() if s in base]


def anchored_density(fit_rows: np.ndarray, n_base: float, delta: np.ndarray, n: float) -> np.ndarray:
    """ρ = N_b · (1 + Δ·N_b^α / A)^(−1/α) / n for rows (E, A, α) of ``fit_rows`` (∞ past the floor)."""
    _, a, alpha = np.asarray(fit_rows, dtype=float).T
    bracket = 1.0 + delta * n_base**alpha / a
    with np.errstate(divide="ignore", invalid="ignore"):
        out = n_base * bracket ** (-1.0 / alpha) / n
    return np.where(bracket > 0, out, np.inf)


def verdict(lo: float, hi: float) -> str:
    if lo > 1.0:
        return "denser"
    if hi < 1.0:
        return "less dense"
    return "no detectable difference"


def arm_result(arm: Arm, baseline: Arm, fit: LadderFit, noise: Noise, rng: np.random.Generator) -> dict:
    """The study.json row of one arm: mean bpb, Δbpb with its interval, densities with theirs, verdict."""
    deltas = paired_deltas(arm, baseline)
    row: dict = {"name": arm.name, "role": arm.role, "seeds": list(arm.seeds), "bpb": list(arm.bpb)}
    row |= {"bpb_mean": arm.mean, "n": arm.n, "n_active": arm.n_active}
    if arm.role == "baseline":  # the reference itself: Δ = 0 and ρ = 1 by definition
        zero = dict.fromkeys(("delta_bpb", "delta_bpb_lo", "delta_bpb_hi"), 0.0)
        one = dict.fromkeys(("density", "density_lo", "density_hi"), 1.0)
        return row | zero | one | {"density_per_active": arm.n / arm.n_active, "verdict": "reference"}
    d = float(np.mean(deltas))
    se = noise.sigma * math.sqrt(2.0 / len(deltas))
    half = noise.t(0.5 + LEVEL / 2) * se
    point = np.array([[fit.E, fit.A, fit.alpha]])
    rho = float(anchored_density(point, baseline.n, np.array([d]), arm.n)[0])
    rows = (
        fit.boot[rng.integers(0, len(fit.boot), MC_DRAWS)] if len(fit.boot) else np.repeat(point, MC_DRAWS, 0)
    )
    draws = anchored_density(rows, baseline.n, d + se * rng.standard_t(noise.dof, MC_DRAWS), arm.n)
    # "nearest": draws past the fitted floor are ∞, and interpolating between two ∞ gives NaN
    qs = np.quantile(draws, [(1 - LEVEL) / 2, (1 + LEVEL) / 2], method="nearest")
    lo, hi = (float(v) for v in qs)
    return row | {
        "delta_bpb": d,
        "delta_bpb_lo": d - half,
        "delta_bpb_hi": d + half,
        "density": rho,
        "density_lo": lo,
        "density_hi": hi,
        "density_per_active": rho * arm.n / arm.n_active,
        "verdict": verdict(lo, hi),
    }


def calibrate(arms: list[Arm], fit: LadderFit, *, seed: int = 0) -> dict:
    """``calibration`` and ``students`` of study.json from the arms' results and the ladder fit."""
    baseline = _role(arms, "baseline")
    noise = pooled_noise(arms)
    rng = np.random.default_rng(seed)
    ordered = sorted(arms, key=lambda a: ROLES.index(a.role))  # baseline, placebo, control, students
    rows = [arm_result(a, baseline, fit, noise, rng) for a in ordered]
    placebo = [r for r in rows if r["role"] == "placebo"]
    control = [r for r in rows if r["role"] == "control"]
    seeds = len(baseline.seeds)
    mde = (noise.t(0.5 + LEVEL / 2) + noise.t(POWER)) * noise.sigma * math.sqrt(2.0 / seeds)
    fitted = float(fit.loss(baseline.n))
    calibration = {
        "placebo_ok": bool(placebo) and all(r["density_lo"] <= 1.0 <= r["density_hi"] for r in placebo),
        "control_ok": bool(control) and all(r["density_hi"] < 1.0 for r in control),
        "mde_bpb": mde,
        "seed_noise_bpb": noise.sigma,
        "seed_noise_dof": noise.dof,
        "seed_noise_source": noise.source,
        "fit_residual_rms": fit.residual_rms,
        "baseline_offset_bpb": baseline.mean - fitted,  # the baseline's distance from its own ladder fit
        "level": LEVEL,
    }
    return {"calibration": calibration, "students": rows}


def calibration_problems(study: dict) -> list[str]:
    """Why this study cannot resolve architecture differences (empty when both checks pass)."""
    c, out = study["calibration"], []
    noise = f"seed noise {c['seed_noise_bpb']:.4f} bpb ({c['seed_noise_dof']} dof), fit residual RMS " + (
        f"{c['fit_residual_rms']:.4f} bpb, minimum detectable Δbpb {c['mde_bpb']:.4f}"
    )
    if not c["placebo_ok"]:
        out.append(
            "the placebo's density interval excludes 1: the study finds differences where there are "
            f"none ({noise})"
        )
    if not c["control_ok"]:
        out.append(
            "the negative control's density interval does not lie below 1: the study misses a known "
            f"loss ({noise})"
        )
    if c["seed_noise_source"] == "placebo":
        out.append(
            "one seed: the noise is estimated from the placebo itself, so the placebo check cannot fail; "
            "use --seeds 2 or more"
        )
    return out
