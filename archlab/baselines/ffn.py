"""FFN slot ``mlp``: position-wise feed-forward, SwiGLU or GELU.

    swiglu: y = W_down (SiLU(x W_gate) ⊙ x W_up)      (Shazeer 2020, arXiv 2002.05202)
    gelu:   y = W_down GELU(x W_up)                    (Hendrycks & Gimpel 2016)
Default hidden width: 4·d for GELU and 8/3·d for SwiGLU (equal parameters), rounded
up to a multiple of ``multiple_of``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch.nn.functional as F
from torch import Tensor, nn

from archlab.context import ForwardContext, ModelDims
from archlab.errors import ConfigError
from archlab.hf_export import HFPart, NotExportable, linear_tensors, split_rows


class Activation(Enum):
    swiglu = "swiglu"
    gelu = "gelu"


def hidden_width(d_model: int, mult: float, multiple_of: int) -> int:
    return multiple_of * math.ceil(mult * d_model / multiple_of)


class MLP(nn.Module):
    @dataclass
    class Config:
        activation: Activation = Activation.swiglu
        hidden_dim: int | None = None  # None: 8/3·d (swiglu) or 4·d (gelu)
        multiple_of: int = 8
        bias: bool = False

        def validate(self, dims: ModelDims) -> None:
            if self.hidden_dim is not None and self.hidden_dim < 1:
                raise ConfigError("ffn.hidden_dim", self.hidden_dim, "a positive integer or null")
            if self.multiple_of < 1:
                raise ConfigError("ffn.multiple_of", self.multiple_of, "a positive integer")

    def __init__(self, cfg: Config, dims: ModelDims, *, linear) -> None:
        super().__init__()
        self.gated = cfg.activation is Activation.swiglu
        mult = 8 / 3 if self.gated else 4.0
        hidden = cfg.hidden_dim or hidden_width(dims.d_model, mult, cfg.multiple_of)
        d = dims.d_model
        self.hidden, self.n_layers = hidden, dims.n_layers
        self.up = linear(d, hidden * (2 if self.gated else 1), bias=cfg.bias, role="ffn.up")
        self.down = linear(hidden, d, bias=cfg.bias, role="ffn.down")

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        """x: (b, t, d) -> (b, t, d)"""
        if self.gated:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x)))

    def hf_export(self) -> HFPart:
        """SwiGLU: Llama's MLP (and DeepSeek-V3's dense layers, which have no bias) with ``up`` split into
        gate_proj and up_proj; GELU (exact, erf): Arcee's ungated MLP with hidden_act=gelu."""
        f, down = self.hidden, linear_tensors(self.down, "down_proj")
        fields = {"intermediate_size": f, "mlp_bias": "down_proj.bias" in down}
        if "down_proj.rms_norm.weight" in down:
            return self.bitnet_part(down)
        if not self.gated:
            return HFPart(
                {"arcee": fields | {"hidden_act": "gelu"}}, linear_tensors(self.up, "up_proj") | down
            )
        tensors = split_rows(linear_tensors(self.up, "up"), "up", {"gate_proj": f, "up_proj": f}) | down
        config = {"llama": fields | {"hidden_act": "silu"}}
        if not fields["mlp_bias"]:  # every layer dense
            config["deepseek_v3"] = {
                "intermediate_size": f,
                "hidden_act": "silu",
                "first_k_dense_replace": self.n_layers,
            }
        return HFPart(config, tensors)

    def bitnet_part(self, down: dict[str, Tensor]) -> HFPart:
        """BitNet's MLP, down_proj(ffn_sub_norm(SiLU(gate_proj x) ⊙ up_proj x)) with no bias: ``down``'s own
        input norm is ffn_sub_norm."""
        if not self.gated or "down_proj.bias" in down:
            why = "BitNet's MLP is gated (SwiGLU here) and has no bias: ffn.activation=swiglu ffn.bias=false"
            raise NotExportable("ffn", self, why)
        f = self.hidden
        tensors = split_rows(linear_tensors(self.up, "up"), "up", {"gate_proj": f, "up_proj": f})
        sub_norm = down.pop("down_proj.rms_norm.weight")
        tensors |= down | {"ffn_sub_norm.weight": sub_norm}
        return HFPart({"bitnet": {"intermediate_size": f, "hidden_act": "silu"}}, tensors)
