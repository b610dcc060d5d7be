"""Diagnostic plots of a run, written to ``<run_dir>/plots/`` (the report embeds every PNG there).

Depth weights: a residual plugin that mixes earlier layers (attention residuals, DenseFormer,
hyper-connections) may offer the optional hook pair
    record_depth_weights: bool          # set by the trainer around one evaluation forward
    depth_weights() -> DepthWeights | None
where ``weights[r, s]`` is how much reader r (a sublayer's input, or ``final``: what the final
norm and head read) takes from source s (the embedding, earlier outputs, blocks...), averaged
over the tokens of the last recorded forward; NaN where r cannot see s. ``save_depth_weights``
draws it as a heat map and writes the matrix as JSON beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from archlab.slots import DepthWeightsReport, offers

DEPTH_WEIGHTS = "depth_weights"


class DepthWeights(NamedTuple):
    """Mean depth-mixing weights: ``weights`` (readers, sources), NaN where not visible."""

    weights: Tensor
    readers: list[str]
    sources: list[str]


@torch.no_grad()
def record_depth_weights(model: nn.Module, tokens: Tensor) -> DepthWeights | None:
    """One forward of ``tokens`` with the residual plugin recording; None if it has no such hook."""
    residual = model.residual
    if not offers(residual, DepthWeightsReport):
        return None
    was_training = model.training
    model.eval()
    residual.record_depth_weights = True
    try:
        model(tokens)
    finally:
        residual.record_depth_weights = False
        model.train(was_training)
    return residual.depth_weights()


def save_depth_weights(depth: DepthWeights, plot_dir: Path, step: int) -> Path:
    """``plot_dir/depth_weights.png`` (heat map) and ``.json`` (the matrix); returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in workers and on headless machines
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    w = depth.weights.detach().float().cpu()
    finite = w[w.isfinite()]
    signed = bool(finite.numel()) and float(finite.min()) < 0
    fig, ax = plt.subplots(figsize=(2 + 0.45 * len(depth.sources), 1.5 + 0.4 * len(depth.readers)))
    if signed:  # hyper-connections' unrolled weights can be negative: a diverging map centred on 0
        bound = float(finite.abs().max())
        image = ax.imshow(w.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    else:
        image = ax.imshow(w.numpy(), cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xticks(range(len(depth.sources)), depth.sources, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(depth.readers)), depth.readers, fontsize=7)
    ax.set_xlabel("source (what is read)")
    ax.set_ylabel("reading sublayer")
    ax.set_title(f"depth weights, step {step}", fontsize=9)
    fig.colorbar(image, ax=ax, label="mean weight over tokens")
    fig.tight_layout()
    png = plot_dir / f"{DEPTH_WEIGHTS}.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    matrix = [[v if v == v else None for v in row] for row in w.tolist()]  # NaN -> null
    record = {"step": step, "readers": depth.readers, "sources": depth.sources, "weights": matrix}
    png.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return png
