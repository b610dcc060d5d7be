"""Linear slot ``dense``: y = x Wᵀ (+ b), the factory every projection of the student goes through.

A linear plugin is built as ``cls(cfg, in_features, out_features, *, bias, init_std, role)``
(``role`` names the projection, e.g. ``ffn.down``; dense ignores it);
swapping the slot (globally or per role, see ``model.linear_overrides``) changes
every projection it covers, e.g. to ternary weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from archlab.hf_export import ANY, HFPart


class DenseLinear(nn.Linear):
    """A full-precision linear layer initialised N(0, init_std²), bias zero."""

    @dataclass
    class Config:
        pass

    def __init__(
        self, cfg: Config, in_features: int, out_features: int, *, bias: bool, init_std: float, role: str = ""
    ) -> None:
        self.init_std = init_std
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        """weight ~ N(0, init_std²) (GPT-2 init; residual outputs scaled by the factory), bias = 0."""
        nn.init.normal_(self.weight, std=self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def hf_export(self) -> HFPart:
        """An ``nn.Linear`` of any transformers model: its weight (and bias) as they are."""
        tensors = {"weight": self.weight} | ({"bias": self.bias} if self.bias is not None else {})
        return HFPart({ANY: {}}, tensors)
