"""Capability density: a dense reference ladder's loss curve and the effective size of other students.

Loss curve (Chinchilla, Hoffmann et al. 2022, arXiv 2203.15556, eq. 2 with D fixed by the ladder):

    L(N) = E + A · N^(−α)

fitted as in Chinchilla App. D.2 / Besiroglu et al. 2024 (arXiv 2404.10102): minimise the Huber loss
(δ = 1e-3) of ``LSE(a − α·log N, e) − log L`` with ``A = exp(a)``, ``E = exp(e)`` by L-BFGS-B from a grid
of starts. Unlike those fits the parameters are BOUNDED (E ≥ 0 and below the ladder's best loss,
α in ``ALPHA_BOUNDS``): on small ladders the free fit runs off to α → 0, E < 0 (DESIGN.md).

Effective size and density (Densing Law, Xiao et al. 2024, arXiv 2412.04315, eq. 1 with loss instead of a
downstream score):

    N_eff(L) = (A / (L − E))^(1/α),        ρ = N_eff / N

N is the NON-EMBEDDING parameter count everywhere (Kaplan et al. 2020). Uncertainty comes from a bootstrap
over ladder runs; a loss outside the ladder's range is flagged as extrapolated and ``L ≤ E`` is an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from archlab.errors import ArchlabError

ALPHA_BOUNDS = (0.05, 2.0)  # α below ~0.05 is the degenerate "flat curve, huge A" fit
LOG_A_BOUNDS = (-20.0, 60.0)
LOG_E_MIN = math.log(1e-6)  # E ≥ 0 (exp(e) > 0); this floor only keeps e finite
HUBER_DELTA = 1e-3
MIN_SIZES = 3


class DensityError(ArchlabError, ValueError):
    """A fit or an effective size that cannot be computed (too few sizes, a loss at or below E)."""


def _huber_objective(
    theta: np.ndarray, x: np.ndarray, y: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    """Huber loss (scaled by 1/δ²) of log residuals r = LSE(a − αx, e) − y, and its gradient in (a, α, e)."""
    a, alpha, e = theta
    t1, t2 = a - alpha * x, np.full_like(x, e)
    top = np.maximum(t1, t2)
    lse = top + np.log(np.exp(t1 - top) + np.exp(t2 - top))
    r = lse - y
    w = np.exp(t1 - lse)  # ∂LSE/∂t1; ∂LSE/∂t2 = 1 − w
    # Huber(r) / δ²: the same minimiser, but values of order one so that L-BFGS-B's
    # relative stopping rule does not stop on the tiny raw values
    z = r / delta
    value = np.where(np.abs(z) <= 1, 0.5 * z**2, np.abs(z) - 0.5).sum()
    dr = np.clip(z, -1, 1) / delta
    grad = np.array([(dr * w).sum(), -(dr * w * x).sum(), (dr * (1 - w)).sum()])
    return float(value), grad


def _starts(x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """A grid over α and E; log A from least squares of log(L − E) + α log N given the two."""
    best = float(np.exp(y).min())
    out = []
    for alpha in (0.1, 0.3, 0.6, 1.0):
        for frac in (1e-3, 0.5, 0.8, 0.95):
            e_val = frac * best
            a = float(np.mean(np.log(np.exp(y) - e_val) + alpha * x))
            out.append(np.array([np.clip(a, *LOG_A_BOUNDS), alpha, math.log(e_val)]))
    return out


def _fit_params(x: np.ndarray, y: np.ndarray, starts: list[np.ndarray]) -> np.ndarray:
    """Best bounded L-BFGS-B solution (a, α, e) over the starts."""
    bounds = [LOG_A_BOUNDS, ALPHA_BOUNDS, (LOG_E_MIN, float(y.min()) - 1e-9)]
    best_val, best = math.inf, None
    for theta0 in starts:
        theta0 = np.clip(theta0, [b[0] for b in bounds], [b[1] for b in bounds])
        res = minimize(
            _huber_objective, theta0, args=(x, y, HUBER_DELTA), jac=True, method="L-BFGS-B", bounds=bounds
        )
        if res.fun < best_val:
            best_val, best = res.fun, res.x
    return best


def _to_eaa(theta: np.ndarray) -> tuple[float, float, float]:
    a, alpha, e = theta
    return math.exp(e), math.exp(a), float(alpha)


@dataclass(frozen=True, eq=False)  # eq would compare the boot arrays elementwise
class LadderFit:
    """A fitted L(N) = E + A·N^(−α) with its bootstrap, over ladder points (N non-embedding, bpb)."""

    E: float
    A: float
    alpha: float
    boot: np.ndarray = field(repr=False)  # n_boot × 3 rows of (E, A, α)
    n_range: tuple[float, float]
    loss_range: tuple[float, float]
    residual_rms: float
    points: list[tuple[float, float]] = field(repr=False)

    def loss(self, n: float | np.ndarray) -> float | np.ndarray:
        """L(N) = E + A·N^(−α)."""
        return self.E + self.A * np.asarray(n, dtype=float) ** (-self.alpha)

    def n_eff(self, loss: float) -> float:
        """N_eff = (A / (L − E))^(1/α): the dense ladder size that the fit says reaches ``loss``."""
        if not loss > self.E:
            raise DensityError(
                f"loss {loss:.4f} bpb is at or below the fitted floor E = {self.E:.4f}: the ladder's curve "
                "never reaches it, so it has no effective size (refit with a larger ladder)"
            )
        return (self.A / (loss - self.E)) ** (1.0 / self.alpha)

    def n_eff_boot(self, loss: float) -> np.ndarray:
        """N_eff under every bootstrap fit; inf where that fit's E is at or above ``loss``."""
        e, a, alpha = self.boot.T
        with np.errstate(divide="ignore", invalid="ignore"):
            out = (a / (loss - e)) ** (1.0 / alpha)
        return np.where(loss > e, out, np.inf)

    @property
    def n_sizes(self) -> int:
        return len({n for n, _ in self.points})

    def n_eff_interval(self, loss: float, q: float = 0.9) -> tuple[float, float]:
        """Central ``q`` bootstrap interval of N_eff (hi may be inf when some fits put E above ``loss``).

        NaN with only ``MIN_SIZES`` sizes: three parameters through three sizes leave no residual, every
        bootstrap replicate refits the same curve, and the spread is unknown rather than zero.
        """
        if not 0 < q < 1:
            raise DensityError(f"interval mass q={q} must be in (0, 1)")
        if self.n_sizes <= MIN_SIZES:
            return math.nan, math.nan
        vals = self.n_eff_boot(loss)
        lo, hi = np.quantile(vals, [(1 - q) / 2, (1 + q) / 2], method="nearest")
        return float(lo), float(hi)

    def extrapolated(self, loss: float) -> bool:
        """True when ``loss`` lies outside the ladder's measured losses (N_eff then leaves its sizes)."""
        return not self.loss_range[0] <= loss <= self.loss_range[1]

    @property
    def seed_std(self) -> float | None:
        """Pooled std of bpb between runs of the same size (seed noise), or None without repeats."""
        groups: dict[float, list[float]] = {}
        for n, b in self.points:
            groups.setdefault(n, []).append(b)
        dev = [b - np.mean(bs) for bs in groups.values() if len(bs) > 1 for b in bs]
        dof = sum(len(bs) - 1 for bs in groups.values() if len(bs) > 1)
        return float(math.sqrt(sum(d * d for d in dev) / dof)) if dof else None

    def warnings(self) -> list[str]:
        """Reasons not to trust densities from this fit; empty when none was found."""
        out = []
        sizes = self.n_sizes
        if sizes <= MIN_SIZES:
            out.append(f"{sizes} ladder sizes for 3 fitted parameters: the fit's uncertainty is unknown")
        elif sizes < 5:
            out.append(f"only {sizes} ladder sizes (the protocol asks for 5-6)")
        decades = math.log10(self.n_range[1] / self.n_range[0])
        if decades < 1.5:
            out.append(f"the ladder spans {decades:.2f} decades of N (the protocol asks for >= 1.5)")
        if math.isclose(self.alpha, ALPHA_BOUNDS[0], rel_tol=1e-3) or math.isclose(
            self.alpha, ALPHA_BOUNDS[1], rel_tol=1e-3
        ):
            out.append(
                f"alpha = {self.alpha:.3f} sits on its bound {ALPHA_BOUNDS}: the curve is not determined"
            )
        if 0.999 * self.loss_range[0] < self.E:
            out.append(f"E = {self.E:.4f} sits at the ladder's best loss: the floor is not determined")
        if self.E < 1e-3:
            out.append(f"E = {self.E:.4f} sits on its lower bound 0: the floor is not determined")
        lo, hi = np.quantile(self.boot[:, 2], [0.05, 0.95])
        if hi - lo > 0.5 * self.alpha:
            out.append(f"alpha's 90% bootstrap interval [{lo:.3f}, {hi:.3f}] is wider than half of alpha")
        spread = self.loss_range[1] - self.loss_range[0]
        if self.residual_rms > 0.05 * spread:
            out.append(
                f"fit residual RMS {self.residual_rms:.4f} bpb is {self.residual_rms / spread:.0%} of the "
                f"ladder's bpb range: bpb differences below ~{2 * self.residual_rms:.3f} are within its noise"
            )
        noise = self.seed_std
        if noise is not None and self.residual_rms > 3 * noise:
            out.append(
                f"fit residual RMS {self.residual_rms:.4f} bpb is > 3x the seed noise {noise:.4f}: "
                "the power law does not describe this ladder well"
            )
        return out

    def to_dict(self) -> dict:
        return {
            "E": self.E,
            "A": self.A,
            "alpha": self.alpha,
            "boot": self.boot.tolist(),
            "n_range": list(self.n_range),
            "loss_range": list(self.loss_range),
            "residual_rms": self.residual_rms,
            "points": [list(p) for p in self.points],
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LadderFit:
        d = json.loads(Path(path).read_text())
        return cls(
            E=d["E"],
            A=d["A"],
            alpha=d["alpha"],
            boot=np.asarray(d["boot"], dtype=float).reshape(-1, 3),
            n_range=tuple(d["n_range"]),
            loss_range=tuple(d["loss_range"]),
            residual_rms=d["residual_rms"],
            points=[tuple(p) for p in d["points"]],
        )


def fit_ladder(n: Sequence[float], bpb: Sequence[float], *, n_boot: int = 200, seed: int = 0) -> LadderFit:
    """Fit L(N) = E + A·N^(−α) to ladder runs (N non-embedding params, held-out bpb) with a bootstrap.

    Each bootstrap replicate resamples the runs with replacement (redrawn until it holds ``MIN_SIZES``
    distinct sizes) and refits from the full fit's solution and one grid start.
    """
    x_n, l_ = np.asarray(n, dtype=float), np.asarray(bpb, dtype=float)
    if x_n.shape != l_.shape or x_n.ndim != 1:
        raise DensityError(f"need matching 1-d sizes and losses, got shapes {x_n.shape} and {l_.shape}")
    if not (np.all(np.isfinite(x_n)) and np.all(np.isfinite(l_)) and np.all(x_n > 0) and np.all(l_ > 0)):
        raise DensityError("ladder sizes and losses must be finite and positive")
    if len(np.unique(x_n)) < MIN_SIZES:
        raise DensityError(
            f"a ladder fit needs at least {MIN_SIZES} distinct sizes, got {len(np.unique(x_n))} "
            f"({sorted(set(x_n.tolist()))})"
        )
    x, y = np.log(x_n), np.log(l_)
    grid = _starts(x, y)
    rng = np.random.default_rng(seed)
    boot = []
    # NOTE: one BLAS thread: L-BFGS-B's tiny algebra runs 25x slower with OpenBLAS threads on a busy CPU
    with threadpool_limits(limits=1, user_api="blas"):
        theta = _fit_params(x, y, grid)
        while len(boot) < n_boot:
            idx = rng.integers(0, len(x), len(x))
            if len(np.unique(x[idx])) < MIN_SIZES:
                continue
            boot.append(_to_eaa(_fit_params(x[idx], y[idx], [theta, grid[5]])))
    e_, a_, alpha = _to_eaa(theta)
    resid = l_ - (e_ + a_ * x_n ** (-alpha))
    return LadderFit(
        E=e_,
        A=a_,
        alpha=alpha,
        boot=np.asarray(boot, dtype=float).reshape(-1, 3),
        n_range=(float(x_n.min()), float(x_n.max())),
        loss_range=(float(l_.min()), float(l_.max())),
        residual_rms=float(np.sqrt(np.mean(resid**2))),
        points=[(float(a), float(b)) for a, b in zip(x_n, l_, strict=True)],
    )


def density_metrics(
    fit: LadderFit,
    bpb: float,
    *,
    params: float,
    active_params: float,
    weight_bytes: float | None,
    ladder_bytes_per_param: float = 4.0,
) -> dict[str, float | bool]:
    """Effective size and densities of a student with held-out ``bpb`` (raises DensityError if bpb ≤ E).

    ``params`` and ``active_params`` are non-embedding counts (``params/non_embedding``,
    ``params/active_non_embedding``);
    ``weight_bytes`` is the bytes of those same weights (``weight_bytes/non_embedding``; None gives NaN).
    Per weight byte is normalised so that a ladder member stored at ``ladder_bytes_per_param`` bytes
    per parameter (fp32: 4) scores 1: ρ_byte = N_eff · ladder_bytes_per_param / weight_bytes.
    ``density/uncertain`` is True when the bootstrap interval of N_eff spans more than a factor 2.
    """
    n_eff = fit.n_eff(bpb)
    lo, hi = fit.n_eff_interval(bpb)
    return {
        "density/n_eff": n_eff,
        "density/n_eff_lo": lo,
        "density/n_eff_hi": hi,
        "density/per_param": n_eff / params,
        "density/per_active_param": n_eff / active_params,
        "density/per_weight_byte": (
            n_eff * ladder_bytes_per_param / weight_bytes if weight_bytes else float("nan")
        ),
        "density/extrapolated": fit.extrapolated(bpb),
        "density/uncertain": not hi <= 2 * lo,
    }


def summary_density(fit: LadderFit, summary: Mapping[str, object]) -> dict[str, float | bool]:
    """``density_metrics`` of a run from its ``summary.json`` metrics (val/bpb, non-embedding counts and
    weight bytes; active defaults to total where a run has no MoE-style count). Raises DensityError."""
    n = summary["params/non_embedding"]
    return density_metrics(
        fit,
        summary["val/bpb"],
        params=n,
        active_params=summary.get("params/active_non_embedding", n),
        weight_bytes=summary.get("weight_bytes/non_embedding"),
    )
