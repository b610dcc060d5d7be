"""FFN slot ``relu2``: squared-ReLU feed-forward (Primer, So et al. 2021, arXiv 2109.08668, §4).

    y = W_down · ReLU(x W_up)²
Hidden width ``hidden_mult · d`` (4 by default, as in the paper's Transformer++ baseline).
Shapes: b batch, t tokens, d d_model, f hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from archlab.api import ConfigError, ForwardContext, HFPart, ModelDims, linear_tensors


class ReLU2(nn.Module):
    @dataclass
    class Config:
        hidden_mult: float = 4.0
        bias: bool = False

        def validate(self, dims: ModelDims) -> None:
            if self.hidden_mult <= 0:
                raise ConfigError("ffn.hidden_mult", self.hidden_mult, "a positive number")

    def __init__(self, cfg: Config, dims: ModelDims, *, linear) -> None:
        super().__init__()
        hidden = max(1, round(cfg.hidden_mult * dims.d_model))
        self.hidden = hidden
        self.up = linear(dims.d_model, hidden, bias=cfg.bias, role="ffn.up")
        self.down = linear(hidden, dims.d_model, bias=cfg.bias, role="ffn.down")

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        """x: (b, t, d) -> (b, t, d)"""
        return self.down(torch.relu(self.up(x)).square())  # b t f -> b t d

    def hf_export(self) -> HFPart:
        """Arcee's ungated MLP, whose default activation is this one (hidden_act=relu2)."""
        tensors = linear_tensors(self.up, "up_proj") | linear_tensors(self.down, "down_proj")
        fields = {
            "intermediate_size": self.hidden,
            "hidden_act": "relu2",
            "mlp_bias": "up_proj.bias" in tensors,
        }
        return HFPart({"arcee": fields}, tensors)
