"""The report's words: one table row per run, the notes on where not to trust a number, the fit in a
sentence. Shared by the local report (``archlab.report``) and the W&B one (``archlab.report.publish``).
"""

from __future__ import annotations

import itertools
import math

from archlab.density import LadderFit
from archlab.report.runs import Run, teacher_bpbs, tokenizer_of

# (header, summary key) of the measured columns, in table order
COLUMNS = (
    ("params total", "params/total"),
    ("params active", "params/active"),
    ("N (non-emb)", "params/non_embedding"),
    ("N active (non-emb)", "params/active_non_embedding"),
    ("weight bytes (non-emb)", "weight_bytes/non_embedding"),
    ("KV bytes/token", "kv_bytes_per_token"),
    ("tokens/s (wall clock)", "tokens_per_s"),
    ("val bpb", "val/bpb"),
    ("KL teacher", "val/kl_teacher_student"),
)


def _num(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    if abs(v) >= 1000 or float(v).is_integer():
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.3g}" if abs(v) < 1e-3 else f"{v:.{digits}f}"


def interval(v: float, lo: float, hi: float) -> str:
    """``v [lo, hi]`` for a 90 % interval, saying "unbounded" for an infinite end and "interval unknown"
    where an end is unknown (NaN), never ``[?, ?]``."""
    if math.isnan(lo) or math.isnan(hi):
        return f"{v:.2e} (interval unknown)"
    return f"{v:.2e} [{lo:.2e}, {'unbounded' if math.isinf(hi) else f'{hi:.2e}'}]"


def varying_slots(runs: list[Run]) -> list[str]:
    """Slots whose plugin differs between runs (each gets a column; the rest are common)."""
    slots = sorted({s for r in runs for s in r.plugins})
    return [s for s in slots if len({r.plugins.get(s) for r in runs}) > 1]


def table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows: plugin choices, sizes, costs, bpb, KL, N_eff [90% CI], ρ, flags."""
    slots = varying_slots(runs)
    header = [
        "#",
        "run",
        *slots,
        *(h for h, _ in COLUMNS),
        "N_eff [90% CI]",
        "ρ/param",
        "ρ/active param",
        "ρ/weight byte",
        "flags",
    ]
    rows = []
    for i, r in enumerate(runs):
        d = r.density
        flags = [f for f in ("extrapolated", "uncertain") if d.get(f"density/{f}")]
        if r.error:
            flags.append("no N_eff: loss ≤ E")
        n_eff = interval(d["density/n_eff"], d["density/n_eff_lo"], d["density/n_eff_hi"]) if d else "–"
        rows.append(
            [
                str(i),
                r.name,
                *(r.plugins.get(s, "–") for s in slots),
                *(_num(r.summary.get(k)) for _, k in COLUMNS),
                n_eff,
                *(
                    _num(d.get(k), 3) if d else "–"
                    for k in ("density/per_param", "density/per_active_param", "density/per_weight_byte")
                ),
                ", ".join(flags),
            ]
        )
    return header, rows


#: Why tokens/s compares runs only on one idle machine; the trainer records no CPU time to divide by.
THROUGHPUT_CAVEAT = (
    "tokens/s is wall-clock throughput on whatever machine and load each run had (runs sharing CPU cores "
    "with other jobs run slower): compare it only between runs timed on the same otherwise idle machine"
)


def notes(runs: list[Run], fit: LadderFit | None) -> list[str]:
    """Everything that limits how far the numbers can be trusted."""
    out = [THROUGHPUT_CAVEAT] if any("tokens_per_s" in r.summary for r in runs) else []
    tokenizers = sorted({tokenizer_of(r) for r in runs})
    if len(tokenizers) > 1:
        out.append(
            f"the runs use {len(tokenizers)} tokenizers ({', '.join(tokenizers)}): they are compared on "
            "bits per byte, which count the same UTF-8 bytes under each; val/loss (nats per token) does not"
        )
    if fit is None:
        out.append("no ladder given (--ladder): no effective sizes or densities, only bpb vs parameters")
        return out
    out += [f"ladder fit: {w}" for w in fit.warnings()]
    for i, r in enumerate(runs):
        if r.error:
            out.append(f"#{i} {r.name}: {r.error}")
        elif r.density.get("density/extrapolated"):
            where = "below the ladder's best" if r.bpb < fit.loss_range[0] else "above the ladder's worst"
            out.append(
                f"#{i} {r.name}: bpb {r.bpb:.4f} is {where} loss "
                f"({fit.loss_range[0]:.4f}-{fit.loss_range[1]:.4f}): N_eff is extrapolated"
            )
        if r.density.get("density/uncertain"):
            lo, hi = r.density["density/n_eff_lo"], r.density["density/n_eff_hi"]
            if math.isnan(lo) or math.isnan(hi):
                spread = "is unknown (see the ladder fit)"
            elif math.isinf(hi):
                spread = f"[{lo:.3g}, unbounded] has no upper end (some refits put E above this loss)"
            else:
                spread = f"[{lo:.3g}, {hi:.3g}] spans more than a factor 2"
            out.append(f"#{i} {r.name}: N_eff's 90% interval {spread}")
        if r.density and "weight_bytes/non_embedding" not in r.summary:
            out.append(f"#{i} {r.name}: no weight_bytes/non_embedding in its summary: no density per byte")
    noise = 2 * fit.residual_rms
    close = [
        (i, j) for (i, a), (j, b) in itertools.combinations(enumerate(runs), 2) if abs(a.bpb - b.bpb) < noise
    ]
    if close:
        pairs = ", ".join(f"#{i}/#{j}" for i, j in close[:10]) + (" ..." if len(close) > 10 else "")
        out.append(
            f"{len(close)} pair(s) of runs differ in bpb by less than twice the fit's residual RMS "
            f"({noise:.4f} bpb), so their densities are not distinguishable: {pairs}"
        )
    return out


def fit_text(fit: LadderFit | None) -> str:
    if fit is None:
        return "No reference ladder."
    sizes = len({n for n, _ in fit.points})
    return (
        f"Ladder: {len(fit.points)} runs at {sizes} sizes, N = {fit.n_range[0]:.3g}-{fit.n_range[1]:.3g} "
        f"non-embedding parameters, bpb {fit.loss_range[0]:.4f}-{fit.loss_range[1]:.4f}. "
        f"Fit L(N) = E + A·N^(−α): E = {fit.E:.4f}, A = {fit.A:.4g}, α = {fit.alpha:.4f} "
        f"(residual RMS {fit.residual_rms:.4f} bpb, {len(fit.boot)} bootstrap refits). "
        "N_eff = (A / (L − E))^(1/α); ρ = N_eff / N."
    )


def teacher_text(runs: list[Run]) -> str:
    """The teacher's validation bpb, the reference for the loss curves."""
    bpbs = teacher_bpbs(runs)
    if not bpbs:
        return "No teacher bpb recorded (teacher=none, or runs older than teacher/val_bpb)."
    return "Teacher's validation bpb: " + ", ".join(f"{b:.4f}" for b in bpbs) + "."
