"""The report's plots (matplotlib, no pyplot state): ladder fit, bpb vs parameters, density bars, loss
curves. Each is a ``Plot``: the figure and the numbers it draws, published as a PNG and a CSV beside it.

What is drawn is what the legend names: the bootstrap band only where it has a visible width, the floor E
only inside the axis, a whisker only between two known interval ends (an unbounded end is an arrow to
the axis edge, an unknown one is said in words). Axis ranges come from the measured points, not the fit.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from archlab import durable
from archlab.density import MIN_SIZES, LadderFit
from archlab.report.runs import Run, read_history, teacher_bpbs

DENSITIES = (
    ("density/per_param", "n", "per non-embedding parameter"),
    ("density/per_active_param", "n_active", "per active non-embedding parameter"),
    ("density/per_weight_byte", None, "per non-embedding weight byte (fp32 ladder = 1)"),
)
MARGIN = 0.08  # of the data's span, on each side of an axis range
VISIBLE = 0.004  # a band narrower than this fraction of the y range is hidden by the curve's line
DECADES = 2  # how far the density bars' log axis reaches past the densities for their intervals' ends


@dataclass
class Plot:
    """A figure and its data as CSV rows: ``panel`` (what the axes show), ``series`` (one line, bar or
    point set), ``at`` (its position: N, tokens, run #), ``value``, and its interval ``lo``-``hi`` where it
    has one (inf: unbounded, nan: unknown)."""

    fig: Figure
    rows: list[tuple] = field(default_factory=list)
    header: tuple[str, ...] = ("panel", "series", "at", "value", "lo", "hi")

    def add(
        self, panel: str, series: str, at: object, value: float, lo: object = "", hi: object = ""
    ) -> None:
        self.rows.append((panel, series, at, value, lo, hi))

    def save(self, path: Path) -> Path:
        """Write ``path`` (PNG) and the same name with ``.csv``, each atomically (``archlab.durable``)."""
        png = io.BytesIO()
        self.fig.savefig(png, format="png", dpi=110)
        durable.write_atomic(path, png.getvalue())
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(self.header)
        writer.writerows(self.rows)
        durable.write_atomic(path.with_suffix(".csv"), text.getvalue().encode())
        return path


def data_range(values: list[float], margin: float = MARGIN) -> tuple[float, float]:
    """(lo, hi) around the finite ``values`` with ``margin`` of their span on each side."""
    finite = [v for v in values if math.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(finite), max(finite)
    span = hi - lo or abs(hi) * 0.1 or 1.0
    return lo - margin * span, hi + margin * span


def _curve(plot: Plot, ax: Axes, panel: str, fit: LadderFit, x: tuple[float, float], y: tuple) -> None:
    """The fit's curve over ``x``, with its 90 % bootstrap band where that band is known and visible at
    the y range ``y``; the legend says why a band is missing."""
    n = np.geomspace(*x, 200)
    curve = fit.loss(n)
    band = None
    if fit.n_sizes <= MIN_SIZES:
        why = f"no band: {fit.n_sizes} sizes for 3 parameters leave its spread unknown"
    elif not len(fit.boot):
        why = "no band: the fit has no bootstrap refits"
    else:
        e, a, alpha = fit.boot.T
        band = np.quantile(e[:, None] + a[:, None] * n[None, :] ** (-alpha[:, None]), [0.05, 0.95], axis=0)
        thin = not np.nanmax(band[1] - band[0]) > VISIBLE * (y[1] - y[0])
        why = "90% bootstrap band thinner than the line" if thin else ""
        band = None if thin else band
    label = f"ladder fit E={fit.E:.3f} A={fit.A:.3g} α={fit.alpha:.3f}" + (f"\n({why})" if why else "")
    ax.plot(n, curve, color="black", lw=1.2, label=label)
    if band is not None:
        ax.fill_between(n, band[0], band[1], color="grey", alpha=0.3, lw=0, label="90% bootstrap band")
    for i in range(len(n)):
        lo, hi = ("", "") if band is None else (band[0][i], band[1][i])
        plot.add(panel, "ladder fit", n[i], curve[i], lo, hi)
    pts_n, pts_b = np.array(fit.points).T
    ax.scatter(pts_n, pts_b, color="black", marker="s", s=22, zorder=3, label="ladder runs")
    for n_i, b_i in fit.points:
        plot.add(panel, "ladder runs", n_i, b_i)


def _log_x(ax: Axes, label: str) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on spans under a decade
    ax.set_xlabel(label)


def ladder_plot(fit: LadderFit) -> Plot:
    """The ladder's points and fitted curve; the y range is the points' (the floor E drawn if inside)."""
    plot = Plot(Figure(figsize=(6.4, 4.4), layout="constrained"))
    ax = plot.fig.add_subplot()
    panel = "ladder: val bpb vs non-embedding parameters N"
    y = data_range([b for _, b in fit.points])
    _curve(plot, ax, panel, fit, (fit.n_range[0] / 3, fit.n_range[1] * 3), y)
    if y[0] <= fit.E <= y[1]:
        ax.axhline(fit.E, color="black", ls=":", lw=0.8, label="floor E")
    ax.set_ylim(*y)
    _log_x(ax, "non-embedding parameters N")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(f"Reference ladder: L(N) = E + A·N^(−α), residual RMS {fit.residual_rms:.4f} bpb")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return plot


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (x smaller, y smaller), ordered by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def bpb_vs_params(runs: list[Run], fit: LadderFit | None) -> Plot:
    plot = Plot(Figure(figsize=(11, 4.6), layout="constrained"))
    for k, (attr, label) in enumerate(
        (("n", "non-embedding parameters"), ("n_active", "active non-embedding parameters"))
    ):
        ax = plot.fig.add_subplot(1, 2, k + 1)
        panel = f"val bpb vs {label}"
        pts = [(getattr(r, attr), r.bpb) for r in runs]
        xs = [p[0] for p in pts]
        y = data_range([p[1] for p in pts] + ([b for _, b in fit.points] if fit else []))
        if fit is not None:
            _curve(plot, ax, panel, fit, (min([fit.n_range[0], *xs]) / 2, max([fit.n_range[1], *xs]) * 2), y)
        ax.scatter(xs, [p[1] for p in pts], color="tab:blue", s=30, zorder=4, label="runs")
        labels: dict[tuple[float, float], list[str]] = {}
        for i, p in enumerate(pts):
            labels.setdefault(p, []).append(f"#{i}")
            plot.add(panel, f"#{i} {runs[i].name}", p[0], p[1])
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
        ax.set_ylim(*y)
        _log_x(ax, label)
        ax.set_ylabel("validation bits per byte")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    plot.fig.suptitle("Validation bpb vs parameters (lower left is better)")
    return plot


def interval_mark(
    ax: Axes, at: float, value: float, lo: float, hi: float, *, vertical: bool, color: str = "black"
) -> None:
    """Draw the interval [lo, hi] around ``value`` at position ``at`` as a whisker, only where both ends
    are known: an unbounded hi is an arrow to the axis edge, an unknown end draws no whisker but says so
    at the value."""
    if math.isnan(lo) or math.isnan(hi):
        xy = (at, value) if vertical else (value, at)
        ax.annotate(
            "interval\nunknown", xy, textcoords="offset points", xytext=(0, 4), fontsize=6, ha="center"
        )
        return
    if math.isinf(value):  # the estimate itself unbounded (a loss below the fit's floor): lo to the edge
        _arrow_to_edge(ax, at, lo, vertical=vertical, color=color)
        return
    lo = min(lo, value)  # the estimate can sit (by rounding, or truly) outside its bootstrap interval
    below, above = value - lo, 0.0 if math.isinf(hi) else max(hi - value, 0.0)
    err = [[below], [above]]
    if vertical:
        ax.errorbar([at], [value], yerr=err, fmt="none", ecolor=color, capsize=3)
    else:
        ax.errorbar([value], [at], xerr=err, fmt="none", ecolor=color, capsize=3)
    if math.isinf(hi):
        _arrow_to_edge(ax, at, value, vertical=vertical, color=color)


def _arrow_to_edge(ax: Axes, at: float, start: float, *, vertical: bool, color: str) -> None:
    """An arrow from ``start`` (data) at position ``at`` to the axis edge: an unbounded interval end."""
    edge = (at, 1.0) if vertical else (1.0, at)
    coords = ax.get_xaxis_transform() if vertical else ax.get_yaxis_transform()
    ax.annotate(
        "",
        edge,
        xycoords=coords,
        xytext=(at, start) if vertical else (start, at),
        textcoords="data",
        arrowprops={"arrowstyle": "-|>", "color": color},
    )


def density_bars(runs: list[Run]) -> Plot:
    """ρ per denominator as bars up or down from the ladder's ρ = 1 (log y), with the N_eff bootstrap
    interval (``interval_mark``); extrapolated runs hatched, runs without N_eff marked."""
    plot = Plot(Figure(figsize=(max(7.0, 0.6 * len(runs) + 3), 9), layout="constrained"))
    for k, (key, _, label) in enumerate(DENSITIES):
        ax = plot.fig.add_subplot(3, 1, k + 1)
        panel = f"density {label}"
        values, ends = [1.0], []
        for i, r in enumerate(runs):
            d = r.density
            if not d or not np.isfinite(d[key]):
                ax.annotate("no N_eff" if not d else "n/a", (i, 1.0), ha="center", va="bottom", fontsize=8)
                continue
            rho, scale = d[key], d[key] / d["density/n_eff"]
            lo, hi = d["density/n_eff_lo"] * scale, d["density/n_eff_hi"] * scale
            (bar,) = ax.bar([i], [rho - 1.0], bottom=1.0, color="tab:blue", alpha=0.8)
            bar.set_hatch("//" if d["density/extrapolated"] else "")
            interval_mark(ax, i, rho, lo, hi, vertical=True)
            values.append(rho)
            ends += [v for v in (lo, hi) if math.isfinite(v) and v > 0]
            plot.add(panel, f"#{i} {r.name}", i, rho, lo, hi)
        ax.axhline(1.0, color="black", ls="--", lw=0.8)
        ax.set_yscale("log")
        # interval ends widen the axis up to DECADES past the values; a whisker beyond that leaves the plot
        bottom = max(min([*values, *ends]), min(values) / 10**DECADES)
        top = min(max([*values, *ends]), max(values) * 10**DECADES)
        ax.set_ylim(min(0.8, bottom / 1.3), max(1.25, top * 1.3))
        ax.set_xticks(range(len(runs)), [f"#{i}" for i in range(len(runs))])
        ax.set_xlim(-0.6, len(runs) - 0.4)
        ax.set_ylabel("ρ (log scale)")
        ax.set_title(f"density {label}", fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_xlabel(
        "run (see the table); whisker: N_eff's 90% interval (cut at the axis edge), arrow: unbounded"
    )
    plot.fig.suptitle("Capability density ρ = N_eff / denominator (dashed: ladder, 1; hatched: extrapolated)")
    return plot


def loss_curves(runs: list[Run]) -> Plot | None:
    """Training loss and validation bpb against training tokens (``metrics.jsonl``), one line per run,
    the teacher's validation bpb as a reference line; None when no run has a history."""
    histories = [read_history(r) for r in runs]
    if not any(histories):
        return None
    objective = runs[0].config.get("objective", {}).get("plugin", "?")
    panels = (
        ("train/loss", f"training loss, objective {objective} (nats/token)"),
        ("val/bpb", "validation bits per byte"),
    )
    plot = Plot(Figure(figsize=(11, 4.6), layout="constrained"))
    for k, (key, label) in enumerate(panels):
        ax = plot.fig.add_subplot(1, 2, k + 1)
        panel = f"{label} vs training tokens"
        values = []
        for i, history in enumerate(histories):
            pts = [(h["train/tokens"], h[key]) for h in history if "train/tokens" in h and key in h]
            if not pts:
                continue
            ax.plot(*zip(*pts, strict=True), lw=1.2, marker="." if len(pts) < 20 else None, label=f"#{i}")
            values += [v for _, v in pts]
            for tokens, v in pts:
                plot.add(panel, f"#{i} {runs[i].name}", tokens, v)
        if key == "val/bpb":
            for bpb in teacher_bpbs(runs):
                ax.axhline(bpb, color="black", ls="--", lw=1, label=f"teacher {bpb:.3f}")
                plot.add(panel, "teacher", "", bpb)
                values.append(bpb)
        if values:
            ax.set_ylim(*data_range(values))
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=max(1, len(runs) // 12))
    plot.fig.suptitle("Loss curves (runs numbered as in the table)")
    return plot
