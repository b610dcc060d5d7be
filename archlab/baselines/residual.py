"""Residual slot ``prenorm``: the standard pre-norm depth stream (Xiong et al. 2020, arXiv 2002.04745).

The residual slot owns the depth stream. Its plugin is a module with four methods
that the core calls around every sublayer f_i (attention, ffn, ...):
    state = begin(x0);  x_i = read(state, i);  state = write(state, i, f_i(norm_i(x_i)))
    h = final(state)    # read by the final norm and the head
Pre-norm: read(h) = h, write(h, y) = h + y, final(h) = h, i.e. h_{i+1} = h_i + f_i(norm_i(h_i)).
The constructor also gets ``sublayer_names`` ("L<layer>.<slot>"), for plugins that need layer
boundaries or label what they learn (see docs/plugins.md, "The residual slot").
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from archlab.context import ModelDims
from archlab.hf_export import ANY, HFPart


class PreNorm(nn.Module):
    @dataclass
    class Config:
        pass

    def __init__(
        self, cfg: Config, dims: ModelDims, *, n_sublayers: int, sublayer_names: tuple[str, ...]
    ) -> None:
        super().__init__()

    def begin(self, x: Tensor) -> Tensor:
        return x

    def read(self, h: Tensor, i: int) -> Tensor:
        return h

    def write(self, h: Tensor, i: int, y: Tensor) -> Tensor:
        return h + y

    def final(self, h: Tensor) -> Tensor:
        return h

    def hf_export(self) -> HFPart:
        """The sequential pre-norm stream every transformers decoder layer has; no tensors."""
        return HFPart({ANY: {}})
