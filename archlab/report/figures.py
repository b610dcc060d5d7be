"""The report's plots (matplotlib, no pyplot state): ladder fit, bpb vs parameters, density bars."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from archlab.density import LadderFit
from archlab.report.runs import Run

DENSITIES = (
    ("density/per_param", "n", "per non-embedding parameter"),
    ("density/per_active_param", "n_active", "per active non-embedding parameter"),
    ("density/per_weight_byte", None, "per non-embedding weight byte (fp32 ladder = 1)"),
)


def _curve(ax, fit: LadderFit, lo: float, hi: float, band: bool) -> None:
    n = np.geomspace(lo, hi, 200)
    ax.plot(
        n,
        fit.loss(n),
        color="black",
        lw=1.2,
        label=f"ladder fit E={fit.E:.3f} A={fit.A:.3g} α={fit.alpha:.3f}",
    )
    if band and len(fit.boot):
        e, a, alpha = fit.boot.T
        curves = e[:, None] + a[:, None] * n[None, :] ** (-alpha[:, None])
        q05, q95 = np.quantile(curves, [0.05, 0.95], axis=0)
        ax.fill_between(n, q05, q95, color="grey", alpha=0.3, lw=0, label="90% bootstrap band")


def _log_x(ax, label: str) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on spans under a decade
    ax.set_xlabel(label)


def _ladder_points(ax, fit: LadderFit) -> None:
    n, b = np.array(fit.points).T
    ax.scatter(n, b, color="black", marker="s", s=22, zorder=3, label="ladder runs")


def ladder_plot(fit: LadderFit, path: Path) -> Path:
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    _curve(ax, fit, fit.n_range[0] / 3, fit.n_range[1] * 3, band=True)
    _ladder_points(ax, fit)
    ax.axhline(fit.E, color="black", ls=":", lw=0.8, label="floor E")
    _log_x(ax, "non-embedding parameters N")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(f"Reference ladder: L(N) = E + A·N^(−α), residual RMS {fit.residual_rms:.4f} bpb")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (x smaller, y smaller), ordered by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def bpb_vs_params(runs: list[Run], fit: LadderFit | None, path: Path) -> Path:
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    for k, (attr, label) in enumerate(
        (("n", "non-embedding parameters"), ("n_active", "active non-embedding parameters"))
    ):
        ax = fig.add_subplot(1, 2, k + 1)
        pts = [(getattr(r, attr), r.bpb) for r in runs]
        xs = [p[0] for p in pts]
        if fit is not None:
            lo = min([fit.n_range[0], *xs]) / 2
            hi = max([fit.n_range[1], *xs]) * 2
            _curve(ax, fit, lo, hi, band=True)
            _ladder_points(ax, fit)
        ax.scatter(xs, [p[1] for p in pts], color="tab:blue", s=30, zorder=4, label="runs")
        labels: dict[tuple[float, float], list[str]] = {}
        for i, p in enumerate(pts):
            labels.setdefault(p, []).append(f"#{i}")
        for p, names in labels.items():
            ax.annotate(",".join(names), p, textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto(pts)
        ax.step(
            [pts[i][0] for i in front],
            [pts[i][1] for i in front],
            where="post",
            color="tab:red",
            lw=1.2,
            marker="o",
            mfc="none",
            ms=10,
            label="Pareto frontier (runs)",
        )
        _log_x(ax, label)
        ax.set_ylabel("validation bits per byte")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Validation bpb vs parameters (lower left is better)")
    fig.savefig(path, dpi=110)
    return path


def density_bars(runs: list[Run], path: Path) -> Path:
    """ρ per denominator as bars up or down from the ladder's ρ = 1 (log y), with the N_eff bootstrap
    interval as error bars; extrapolated runs hatched, runs without N_eff marked."""
    fig = Figure(figsize=(max(7.0, 0.6 * len(runs) + 3), 9), layout="constrained")
    for k, (key, _, label) in enumerate(DENSITIES):
        ax = fig.add_subplot(3, 1, k + 1)
        idx, rho, err_lo, err_hi, hatch = [], [], [], [], []
        for i, r in enumerate(runs):
            d = r.density
            if not d or not np.isfinite(d[key]):
                ax.annotate("no N_eff" if not d else "n/a", (i, 1.0), ha="center", va="bottom", fontsize=8)
                continue
            scale = d[key] / d["density/n_eff"]
            top = d["density/n_eff_hi"] * scale
            idx.append(i)
            rho.append(d[key])
            # clamped: the estimate can sit (by rounding, or truly) outside its bootstrap interval
            err_lo.append(max(0.0, d[key] - d["density/n_eff_lo"] * scale))
            err_hi.append(max(0.0, (top if np.isfinite(top) else 10 * d[key]) - d[key]))  # ∞: off the axis
            hatch.append("//" if d["density/extrapolated"] else "")
        bars = ax.bar(idx, np.array(rho) - 1.0, bottom=1.0, color="tab:blue", alpha=0.8)
        for bar, h in zip(bars, hatch, strict=True):
            bar.set_hatch(h)
        ax.errorbar(idx, rho, yerr=[err_lo, err_hi], fmt="none", ecolor="black", capsize=3)
        ax.axhline(1.0, color="black", ls="--", lw=0.8)
        ax.set_yscale("log")
        if rho:
            ax.set_ylim(min(0.8, min(rho) / 1.3), max(1.25, max(rho) * 1.3))
        ax.set_xticks(range(len(runs)), [f"#{i}" for i in range(len(runs))])
        ax.set_xlim(-0.6, len(runs) - 0.4)
        ax.set_ylabel("ρ (log scale)")
        ax.set_title(f"density {label}", fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_xlabel("run (see the table)")
    fig.suptitle("Capability density ρ = N_eff / denominator (dashed: ladder, 1; hatched: extrapolated)")
    fig.savefig(path, dpi=110)
    return path
