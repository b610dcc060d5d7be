"""Residual slot ``denseformer``: Depth-Weighted Averages after each layer (DenseFormer, Pagliardini et al.,
arXiv 2402.02622, §3).

Inside a layer the stream is the pre-norm sum. After layer ℓ (0-based), with X_0 the embedding and X_{ℓ+1}
the layer's output, the next layer (or the final norm) reads the depth-weighted average
    Y_ℓ = Σ_{j ∈ S_ℓ} α_{ℓ,j} · X_j,      S_ℓ = { j ≤ ℓ+1 : (ℓ+1 − j) mod dilation = 0 }
with learned scalars α, only after layers with (ℓ+1) mod period = 0 (elsewhere Y_ℓ = X_{ℓ+1}).
Init α_{ℓ,ℓ+1} = 1, others 0: exactly the pre-norm transformer. dilation = period = 1 is the dense
DenseFormer: Σ_ℓ (ℓ+2) = L(L+3)/2 scalars for L layers.
Layers are found from the sublayer names ("L<layer>.<slot>"), so a layer may hold any number of
sublayers. Reference: epfml/DenseFormer ``denseformer/denseformer.py`` (``DWAModules``: same S_ℓ, init
and period rule).
Shapes: b batch, t tokens, d d_model, j averaged layer outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from archlab.api import ConfigError, DepthWeights, ModelDims


def layer_of(name: str) -> int:
    """The layer index of a sublayer name ``L<layer>.<slot>``."""
    return int(name.split(".", 1)[0].removeprefix("L"))


@dataclass
class DenseState:
    """Every layer output so far (X_0 = embedding, ...) and the stream inside the current layer."""

    outputs: list[Tensor]
    h: Tensor


class DenseFormer(nn.Module):
    @dataclass
    class Config:
        dilation: int = 1  # average only every dilation-th earlier output
        period: int = 1  # average only after every period-th layer

        def validate(self, dims: ModelDims) -> None:
            for key in ("dilation", "period"):
                if getattr(self, key) < 1:
                    raise ConfigError(f"residual.{key}", getattr(self, key), "a positive integer")

    def __init__(
        self, cfg: Config, dims: ModelDims, *, n_sublayers: int, sublayer_names: tuple[str, ...]
    ) -> None:
        super().__init__()
        layers = [layer_of(name) for name in sublayer_names]
        ends = [i for i in range(n_sublayers) if i + 1 == n_sublayers or layers[i + 1] != layers[i]]
        self.layer_end = {i: layer for layer, i in enumerate(ends)}  # last sublayer of a layer -> layer
        self.n_layers, self.dilation, self.period = len(self.layer_end), cfg.dilation, cfg.period
        self.alphas = nn.ParameterDict(
            {
                str(layer): nn.Parameter(torch.empty((layer + 1 + cfg.dilation) // cfg.dilation))
                for layer in range(self.n_layers)
                if (layer + 1) % cfg.period == 0
            }
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """
        | tensor        | init                         | why                                   |
        |---------------|------------------------------|---------------------------------------|
        | alphas[ℓ]     | 0, except 1 on X_{ℓ+1}       | Y_ℓ = X_{ℓ+1}: the pre-norm model     |
        """
        for alpha in self.alphas.values():
            nn.init.zeros_(alpha)
            nn.init.ones_(alpha[-1:])

    def sources(self, layer: int) -> list[int]:
        """S_ℓ in increasing order: the layer outputs X_j averaged after ``layer``."""
        return list(range((layer + 1) % self.dilation, layer + 2, self.dilation))

    def begin(self, x: Tensor) -> DenseState:
        return DenseState(outputs=[x], h=x)

    def read(self, state: DenseState, i: int) -> Tensor:
        return state.h

    def write(self, state: DenseState, i: int, y: Tensor) -> DenseState:
        h = state.h + y
        layer = self.layer_end.get(i)
        if layer is None:
            return DenseState(state.outputs, h)
        outputs = [*state.outputs, h]
        if str(layer) in self.alphas:
            x = torch.stack([outputs[j] for j in self.sources(layer)])  # j b t d
            h = torch.tensordot(self.alphas[str(layer)].to(x.dtype), x, dims=1)
        return DenseState(outputs, h)

    def final(self, state: DenseState) -> Tensor:
        return state.h

    def depth_weights(self) -> DepthWeights:
        """α as a matrix: row ℓ = what layer ℓ+1 (the last row: the final norm) reads of X_0..X_L."""
        w = torch.full((self.n_layers, self.n_layers + 1), float("nan"))
        for layer in range(self.n_layers):
            if str(layer) in self.alphas:
                w[layer, self.sources(layer)] = self.alphas[str(layer)].detach().float().cpu()
            else:
                w[layer, layer + 1] = 1.0
        readers = [*(f"L{layer} input" for layer in range(1, self.n_layers)), "final"]
        return DepthWeights(w, readers, ["emb", *(f"L{layer} output" for layer in range(self.n_layers))])
