"""The reference ladder's family: the baseline student scaled by one rule, so its shape is a rung.

Rule (fixed head dim, fixed FFN ratio, depth and width grown together at a fixed aspect ratio; the
Kaplan et al. 2020, arXiv 2001.08361, §3 ladders hold d_model / n_layers fixed in the same way):

    rung k:   n_layers = k,   n_heads = k,   d_model = HEAD_DIM · k        (HEAD_DIM = 32, d / L = 32)

with every other setting the run's own (the FFN's default hidden width 8/3·d, RoPE, RMSNorm, ...), so
N ≈ 12 · d² · L = 12 · 32² · k³ non-embedding parameters. The default student (``model=tiny``: d 128,
4 layers, 4 heads of 32) is rung k4. The rungs are written out as ``conf/rung/k<k>.yaml``
(``+rung=k4``); ``tests/test_ladder.py`` checks each file against this rule and each count against the
built module.
"""

from __future__ import annotations

from dataclasses import dataclass

HEAD_DIM = 32
BASELINE_RUNG = 4  # model=tiny
RUNGS = (2, 3, 4, 5, 6)  # the rung files that ship


@dataclass(frozen=True)
class Shape:
    d_model: int
    n_layers: int
    n_heads: int

    def overrides(self) -> list[str]:
        return [f"model.{k}={v}" for k, v in vars(self).items()]


def rung_shape(k: int) -> Shape:
    """The model shape of rung ``k`` (k ≥ 1)."""
    if k < 1:
        raise ValueError(f"rung k={k}: k must be >= 1")
    return Shape(d_model=HEAD_DIM * k, n_layers=k, n_heads=k)


def rung_name(k: int) -> str:
    return f"k{k}"


def rung_yaml(k: int, non_embedding: int) -> str:
    """The text of ``conf/rung/k<k>.yaml``: rung ``k``'s shape and its parameter count at the defaults."""
    s = rung_shape(k)
    role = " (the default student, model=tiny)" if k == BASELINE_RUNG else ""
    return (
        "# @package _global_\n"
        f"# Reference-ladder rung {rung_name(k)}{role}: d_model {s.d_model}, {s.n_layers} layers, "
        f"{s.n_heads} heads of {HEAD_DIM}\n"
        f"# ({non_embedding:,} non-embedding parameters at the default FFN width 8/3·d). Written from the "
        "rule in archlab/ladder.py;\n# every other setting is the run's own.\n"
        f"model:\n  d_model: {s.d_model}\n  n_layers: {s.n_layers}\n  n_heads: {s.n_heads}\n"
    )
