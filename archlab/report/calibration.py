"""The study's part of the report: the calibration panel, Δbpb forest plot, density intervals, verdicts.

Reads the ``study.json`` of ``archlab study`` (``archlab.calibration``); drawn before everything else.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from archlab.calibration import calibration_problems
from archlab.report.figures import Plot, interval_mark

COLORS = {"baseline": "black", "placebo": "tab:grey", "control": "tab:red", "student": "tab:blue"}
HOW_TO_READ = (
    "How to read this: each arm is trained at the same seeds as the baseline (seed s = the same data order "
    "for every arm) and compared with it seed by seed. Δbpb < 0 is better. Density ρ = N_eff / N, with N_eff "
    "the size of a ladder model that would reach the arm's loss; its interval carries the ladder fit's and "
    "the seeds' uncertainty. A verdict is read from that interval only. The placebo (the baseline with "
    "another initialisation) must come out at ρ ≈ 1, the negative control (a weakened baseline counted at "
    "the baseline's size) below 1; if either fails, no verdict of this study can be trusted."
)


def _fmt(v: float | None, spec: str) -> str:
    """A number of study.json: None or NaN (unknown) as –, an unbounded end as ∞."""
    if v is None or math.isnan(v):
        return "–"
    return "∞" if v == math.inf else format(v, spec)


def panel(study: dict) -> list[str]:
    """The calibration panel's lines: the verdict on the study itself, then its noise figures."""
    c = study["calibration"]
    problems = calibration_problems(study)
    passed = c["placebo_ok"] and c["control_ok"]
    head = (
        "Calibration passed: the placebo's density interval contains 1 and the negative control's lies "
        "below 1."
        if passed
        else "This study cannot resolve architecture differences at this budget: " + "; ".join(problems) + "."
    )
    return [
        head,
        f"Budget: equal {study['budget']}; {study['seeds']} paired seed(s) per arm; preset "
        f"{study.get('preset', '?')}.",
        f"Seed noise σ = {c['seed_noise_bpb']:.4f} bpb per run ({c['seed_noise_dof']} degrees of freedom, "
        f"from {'the arm × seed ANOVA residual' if c['seed_noise_source'] == 'anova' else 'the placebo'}).",
        f"Minimum detectable Δbpb (90 % two-sided, 80 % power): {c['mde_bpb']:.4f}.",
        f"Ladder fit residual RMS {c['fit_residual_rms']:.4f} bpb; the baseline sits "
        f"{c['baseline_offset_bpb']:+.4f} bpb from its own fitted point.",
        *(p for p in problems if passed),  # e.g. the one-seed caveat when the checks pass
    ]


def rows(study: dict) -> tuple[list[str], list[list[str]]]:
    """The verdict table: one row per arm."""
    header = [
        "arm",
        "role",
        "seeds",
        "bpb (mean)",
        "Δbpb [90% CI]",
        "ρ/param [90% CI]",
        "ρ/active",
        "verdict",
    ]
    scored = [(t, m) for t, ms in study["students"][0].get("downstream", {}).items() for m in ms]
    header += [f"{task} {metric}" for task, metric in scored]  # `archlab study --eval`
    out = []
    for r in study["students"]:
        out.append(
            [
                r["name"],
                r["role"],
                str(len(r["seeds"])),
                f"{r['bpb_mean']:.4f}",
                f"{r['delta_bpb']:+.4f} [{r['delta_bpb_lo']:+.4f}, {r['delta_bpb_hi']:+.4f}]",
                f"{_fmt(r['density'], '.2f')} "
                f"[{_fmt(r['density_lo'], '.2f')}, {_fmt(r['density_hi'], '.2f')}]",
                _fmt(r["density_per_active"], ".2f"),
                r["verdict"],
                *(_fmt(r["downstream"].get(t, {}).get(m), ".4g") for t, m in scored),
            ]
        )
    return header, out


def _interval_plot(plot: Plot, panel: str, study: dict, key: str, ref: float, log: bool) -> Axes:
    """Each arm's ``key`` as a dot with its 90 % interval (``interval_mark``), the baseline's without."""
    ax = plot.fig.add_subplot()
    arms = study["students"]
    for y, r in enumerate(arms):
        v, lo, hi = (math.nan if r[k] is None else r[k] for k in (key, f"{key}_lo", f"{key}_hi"))
        color = COLORS[r["role"]]
        if r["role"] != "baseline":
            interval_mark(ax, y, v, lo, hi, vertical=False, color=color)
        ax.plot([v], [y], "o", color=color)
        plot.add(panel, f"{r['name']} ({r['role']})", y, v, lo, hi)
    ax.axvline(ref, color="black", ls="--", lw=0.8)
    ax.set_yticks(range(len(arms)), [f"{r['name']} ({r['role']})" for r in arms])
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    return ax


def forest_plot(study: dict) -> Plot:
    """Δbpb of every arm against the baseline with its 90 % interval (left of 0: better), over the
    shaded ± minimum detectable Δ where the study has one."""
    plot = Plot(Figure(figsize=(7.5, 0.45 * len(study["students"]) + 1.6), layout="constrained"))
    ax = _interval_plot(plot, "Δbpb vs baseline", study, "delta_bpb", 0.0, log=False)
    mde = study["calibration"]["mde_bpb"]
    label = "Δbpb vs baseline (90 % interval)"
    if mde is not None and math.isfinite(mde):
        ax.axvspan(-mde, mde, color="grey", alpha=0.15, lw=0)
        label += f"; shaded: ± minimum detectable Δ ({mde:.3f})"
        plot.add("Δbpb vs baseline", "minimum detectable Δ", "", mde, -mde, mde)
    ax.set_xlabel(label)
    ax.set_title("Paired differences in validation bpb")
    return plot


def density_plot(study: dict) -> Plot:
    """Density per non-embedding parameter of every arm with its 90 % interval (log x; 1 = the baseline)."""
    plot = Plot(Figure(figsize=(7.5, 0.45 * len(study["students"]) + 1.6), layout="constrained"))
    ax = _interval_plot(plot, "density per non-embedding parameter", study, "density", 1.0, log=True)
    finite = [
        v
        for r in study["students"]
        for v in (r["density"], r["density_lo"], r["density_hi"])
        if v and np.isfinite(v)
    ]
    if finite:  # room to the right for the arrow of an unbounded end
        unbounded = any(r["density_hi"] == math.inf for r in study["students"])
        ax.set_xlim(min(0.8, min(finite) / 1.2), max(1.25, max(finite) * (10 if unbounded else 1.2)))
    ax.set_xlabel("capability density ρ = N_eff / N (90 % interval, arrow: unbounded; log scale)")
    ax.set_title("Capability density against the baseline's ladder")
    return plot
